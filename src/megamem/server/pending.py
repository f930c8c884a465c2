"""Memories being learned: a memory answers from its text the moment it is added, before its adapter is trained.

Where they live: in the jobs table, nowhere else. A memory's latest job holds its whole request (text,
paraphrases, metadata, user, agent, run), so the memories being learned are derived from the queued and running
jobs, and those whose learning failed from the failed ones (JobQueue.latest), rather than kept as a second copy
that would have to be kept in step by hand. A job killed mid-training is still running (or queued again) after a
restart, so its memory is still shown, and once: `merge` shows each stored id once, and a memory that its job
committed just before the process died (the job not yet marked) is shown as stored.

A memory's state:
    learning  its job is queued or running: listed, found by search, its text used as context (rag, mega+rag)
              when it is the best match; its adapter is not in the mixture yet
    ready     stored: its adapter joins the mixture as the gate weighs it
    failed    its latest job failed and nothing is stored under its id: listed with the job's error, never
              searched nor used; deleting it clears it
An update learns a new version under the same id: while it learns, the new text is the memory (the old version
is left out of search and of the gate); once committed it replaces the old one (Server.train).

    views = merge(stored_records, queue.latest("acme"))   # Records and Pending views, each id once
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import answer, schema
from ..answer import Gated
from ..calibration import calibration_keys, store_null_score
from ..gate import GateConfig
from ..memory import Memory
from ..store import Record
from .history import iso
from .jobs import UNFINISHED, Job

LEARNING, READY, FAILED = "learning", "ready", "failed"
KEY_CACHE = 4096  # learning memories whose keys are kept (the queue holds 64 at most by default)


@dataclass(frozen=True)
class Pending:
    """A memory known by its latest job alone, shaped as a stored Record where the routes read one (id, text,
    created, metadata: the user's fields and megamem's reserved ones, as Memory.commit will store them)."""

    id: str
    text: str
    created: str
    metadata: dict
    job: Job
    state: str

    @classmethod
    def of(cls, job: Job) -> Pending:
        req = job.request
        meta = dict(req.get("metadata") or {})
        if req.get("paraphrases"):
            meta[schema.PARAPHRASES] = list(req["paraphrases"])
        meta[schema.NAMESPACE] = job.namespace
        for key, field in ((schema.USER, "user_id"), (schema.AGENT, "agent_id"), (schema.RUN, "run_id")):
            if req.get(field):
                meta[key] = req[field]
        if req.get("replaces"):
            meta[schema.REPLACES] = list(req["replaces"])
        state = LEARNING if job.state in UNFINISHED else FAILED
        return cls(job.memory_id, req["text"], iso(job.created), meta, job, state)

    @property
    def key_texts(self) -> list[str]:
        """The texts its keys are made of once learned (megamem.learn keys a memory on its text and paraphrases)."""
        return [self.text, *self.metadata.get(schema.PARAPHRASES, [])]


View = Record | Pending


def state_of(rec: View) -> str:
    """A memory's state: a stored one is ready; a Pending view says its own."""
    return rec.state if isinstance(rec, Pending) else READY


def merge(stored: list[Record], jobs: list[Job]) -> list[View]:
    """The memories as the routes show them, each stored id once: a stored memory, unless a newer version of it is
    being learned (then that one); a memory being learned or failed that nothing is stored under. A memory that
    its own job committed is shown stored, whatever the job's state says (it died before marking it). Read the
    jobs before the stored records: a commit between the two reads then shows the memory stored, never twice."""
    views = {j.memory_id: Pending.of(j) for j in jobs}
    out: list[View] = []
    for r in stored:
        v = views.pop(r.id, None)
        newer = v is not None and v.state == LEARNING and r.metadata.get(schema.JOB) != v.job.id
        out.append(v if newer else r)
    out.extend(views.values())
    return out


def hidden_by(learning: list[Pending]) -> set[str]:
    """The stored memories that memories being learned replace: left out of search and of the gate right away,
    as the recency rule will once they are stored."""
    return {old for v in learning for old in schema.replaced_by(v.metadata)}


class LearningKeys:
    """The keys of memories being learned, computed once per job by the store's key function on the texts that
    will key them once learned, so their scores are the scores they will have."""

    def __init__(self, size: int = KEY_CACHE) -> None:
        self.size = size
        self._keys: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, mem: Memory, views: list[Pending]) -> list[torch.Tensor]:
        """(n_texts, d) keys of each view, in order (call under the server's lock)."""
        missing = [v for v in views if v.job.id not in self._keys]
        if missing:
            keys = mem.keys_of([t for v in missing for t in v.key_texts]).float()
            start = 0
            for v in missing:
                n = len(v.key_texts)
                self._keys[v.job.id] = keys[start : start + n]
                start += n
        out = []
        for v in views:
            self._keys.move_to_end(v.job.id)
            out.append(self._keys[v.job.id])
        while len(self._keys) > self.size:
            self._keys.popitem(last=False)
        return out


def scores(mem: Memory, query: str, keys: list[torch.Tensor], similarity: str) -> list[float]:
    """Each learning memory's score for a query: the max over its keys of the gate's similarity (what the key
    index computes for a stored memory: megamem.index)."""
    q = mem.keys_of([query])[0].float()
    if similarity == "cosine":
        q = F.normalize(q, dim=-1)
    out = []
    for k in keys:
        k = F.normalize(k, dim=-1) if similarity == "cosine" else k
        out.append(float((k @ q).max()))
    return out


def null_score(mem: Memory, cfg: GateConfig, stored: frozenset[str], keys: list[torch.Tensor]) -> float | None:
    """The null memory's score over the scope's stored memories and its learning ones together (the calibration
    the gate will use once they are stored: megamem.calibration), None when the gate has no null memory."""
    if cfg.null_rate is None:
        return None
    table = mem.keys()
    owners = [i for i, m in enumerate(table.ids) if m in stored]
    rows = [table.keys[torch.isin(table.owners, torch.tensor(owners, dtype=torch.long))]] if owners else []
    every = torch.cat([*rows, *keys]).float()
    return store_null_score(calibration_keys(mem.key_function, mem.model_name), every, cfg.similarity, cfg.null_rate)


def with_learning(
    mem: Memory,
    g: Gated,
    question: str,
    mode: str,
    cfg: GateConfig,
    stored: frozenset[str],
    learning: list[Pending],
    cache: LearningKeys,
) -> Gated:
    """The gate's answer with the memories being learned: in a context mode, the best of them puts its text in
    context when it passes the gate's rules (the null memory over the whole scope, the threshold) and outscores
    the heaviest stored memory; it is reported first among the routed memories at weight 0 (no adapter yet). The
    mixture is the stored memories' as the gate weighed them. Call under the server's lock."""
    if mode not in answer.CONTEXT_MODES or not learning:
        return g
    keys = cache.get(mem, learning)
    s = scores(mem, question, keys, cfg.similarity)
    floor = null_score(mem, cfg, stored, keys)
    passing = [
        (score, v)
        for score, v in zip(s, learning, strict=True)
        if (floor is None or score >= floor) and (cfg.threshold is None or score >= cfg.threshold)
    ]
    if not passing:
        return g
    best, view = max(passing, key=lambda sv: sv[0])
    if g.routed and g.routed[0][1] >= best:
        return g
    return Gated([(view.id, best, 0.0), *g.routed], g.mixture, answer.context(mode, [view.text]))
