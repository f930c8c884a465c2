"""Merging memories about one subject into one adapter, and splitting them again (the paper's open question 3).

Merge: the members' texts, joined in order with a blank line between, become one memory's passage (its
paraphrase k joins the members' paraphrase k, where they have one), learned into one new adapter by the
store's recipe; its keys are the keys of every member's texts as well as the joined ones, so a question
worded like any member still finds it. The merged record keeps every member (id, text, paraphrases,
metadata) under 'megamem.merged', and `replaces` them, so from its commit on the gate routes to it alone;
the members are forgotten after that. An intent record is written first (megamem.store.intents): a crash at
any step is finished (the merged memory committed: its members are forgotten) or rolled back (it did not: the
members stay as they were) by the next process that writes to the store, or `megamem repair`.

Split: the members come back as they were (their ids, texts and metadata), each re-learned into its own
adapter, and the merged memory is forgotten after the last one is committed (a crash in between: the next writer
forgets the members stored so far, the merged memory holding them still, and `split` can run again).

Which memories are one subject: `subjects` groups memories whose keys are close and that name the same
things (megamem.updates' test, with a looser name overlap by default), and `diverged` names merged memories
whose members no longer pass it at the given thresholds (a split candidate). Both only suggest.

    >>> from megamem import Memory
    >>> mem = Memory("store")                              # doctest: +SKIP
    >>> merged = merge(mem, ["ada-1", "ada-2"])            # doctest: +SKIP
    >>> split(mem, merged.id)                              # doctest: +SKIP

Limits: the joined text must fit the model's context as one training example; a member's id is free while
it is merged (so `replaces` cannot name it: split first); merge and split re-learn, at the cost of an add.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..checks import check_finite, check_id
from ..errors import MegamemError
from ..items import Item
from ..schema import (
    DEFAULT_NAMESPACE,
    MERGED,
    NAMESPACE,
    PARAPHRASES,
    REPLACES,
    is_consolidated,
    is_reserved,
    stored_id,
)
from ..store import Record, intents
from ..store.files import crash_point
from ..train import check_fits
from ..updates import name_overlap

if TYPE_CHECKING:
    from ..memory import Memory

SEPARATOR = "\n\n"
SUBJECT_COSINE = 0.6  # updates.LIKELY_COSINE: close keys...
SUBJECT_NAMES = 0.5  # ...and half the names of the one naming fewer (looser than an update's 0.67)


def member(record: Record) -> dict:
    """What a merged memory keeps of one member: enough to store it again exactly as it was."""
    meta = dict(record.metadata)
    paraphrases = meta.pop(PARAPHRASES, [])
    replaces = meta.pop(REPLACES, [])
    reserved = {k: meta.pop(k) for k in list(meta) if is_reserved(k)}
    return {
        "id": record.id,
        "text": record.text,
        "paraphrases": paraphrases,
        "metadata": meta,
        "reserved": reserved,
        "replaces": replaces,
    }


def members(record: Record) -> list[dict]:
    """The members a stored memory stands for: its own if merged, else itself alone."""
    held = record.metadata.get(MERGED)
    return [dict(m) for m in held] if held else [member(record)]


def joined(parts: list[dict]) -> tuple[str, list[str]]:
    """(passage, paraphrases) of a merged memory: the members' texts joined, and their paraphrase k joined for
    every k any member has (a member without one gives its text)."""
    text = SEPARATOR.join(m["text"] for m in parts)
    n = max(len(m["paraphrases"]) for m in parts)
    paras = [
        SEPARATOR.join(m["paraphrases"][k] if k < len(m["paraphrases"]) else m["text"] for m in parts) for k in range(n)
    ]
    return text, paras


def check_ids(ids: object) -> None:
    """Two or more well-formed, distinct memory ids, or an error saying what is wrong (nothing loaded)."""
    if not isinstance(ids, (list, tuple)) or len(ids) < 2:
        raise MegamemError("merge needs two or more memory ids")
    for i in ids:
        check_id(i, "merge id")
    if len(set(ids)) != len(ids):
        raise MegamemError("merge: a memory id is given twice")


def merge(mem: Memory, ids: list[str], id: str | None = None, metadata: dict | None = None, on_step=None) -> Record:
    """Learn the memories `ids` (two or more; merged ones count as their members) into one memory, then forget
    them. Everything is checked before anything is learned; an intent record (megamem.store.intents) is written
    before the first step, so a merge killed at any point is finished or rolled back by the next writer."""
    check_ids(ids)
    prior = intents.interrupted(mem.path, "merge", ids)
    mem.prepare_store()  # settles what an interrupted operation left before anything is read
    if prior and (done := mem.store.get(prior.plan["merged"], missing_ok=True)) is not None:
        return done  # the interrupted merge of these ids was finished just now
    records = [mem.show(i) for i in ids]  # an error naming the first that is not stored
    superseded = mem.superseded()
    for r in records:
        if r.id in superseded:
            raise MegamemError(f"memory {r.id!r} is replaced by a newer one; merge that one instead")
        if is_consolidated(r):
            raise MegamemError(
                f"memory {r.id!r} is consolidated (its adapter is in its namespace's cortex); merge takes memories "
                "that have their own adapters"
            )
    reserved = [
        {k: v for k, v in r.metadata.items() if is_reserved(k) and k not in (MERGED, REPLACES)} for r in records
    ]
    if any(x != reserved[0] for x in reserved):
        raise MegamemError("merge: the memories belong to different namespaces or jobs")
    parts = [m for r in records for m in members(r)]
    text, paras = joined(parts)
    # what the members replaced stays replaced; the members themselves (those of a merged one too) are replaced by
    # the merged memory, so none of them is routed beside it while a split stores them again
    replaced = list(dict.fromkeys([*ids, *(m["id"] for m in parts), *(o for m in parts for o in m["replaces"])]))
    # text, metadata, id and fit to the model's context, as an add checks them; the id is chosen now, so that the
    # intent can name it
    namespace = reserved[0].get(NAMESPACE, DEFAULT_NAMESPACE)  # a namespace's merged memory is its own, by id too
    merged_id = id if id is not None else stored_id(namespace, uuid.uuid4().hex[:12])
    (good,) = mem.validate([Item(text, paras, dict(metadata or {}), merged_id, origin="the merged memory")])
    item = Item(
        good.text,
        good.paraphrases,
        good.metadata,
        merged_id,
        replaces=replaced,
        reserved={**reserved[0], MERGED: parts},
    )
    texts = [good.text, *good.paraphrases]
    every = list(dict.fromkeys([*texts, *(t for m in parts for t in (m["text"], *m["paraphrases"]))]))
    intent = intents.begin(
        mem.path, "merge", {"ids": list(ids), "members": [m["id"] for m in parts], "merged": merged_id}
    )
    crash_point("merge:intent")
    # each member was learned with at least min_tokens example tokens; the merged memory gets that floor once per
    # member, so every sentence is seen as often as in its member (with one floor, half of a merged memory's
    # epochs fell under it and its answers dropped: QA 0.596 -> 0.500, docs/scale.md)
    recipe = replace(mem.recipe, min_tokens=mem.recipe.min_tokens * len(parts))
    (record,) = mem.learn([item], note_updates=False, key_texts=[every], recipe=recipe, on_step=on_step)
    crash_point("merge:committed")
    for r in records:
        mem.forget(r.id)
        crash_point("merge:forgot")
    intents.end(intent)
    return record


def split(mem: Memory, memory_id: str, on_step=None) -> list[Record]:
    """Store a merged memory's members again, each learned into its own adapter, then forget the merged one.
    An intent record is written first: a split killed part-way is rolled back (or finished, if every member was
    stored) by the next writer, and `split` runs again; a member stored already as the merged memory holds it
    is kept, not learned twice."""
    check_id(memory_id)
    prior = intents.interrupted(mem.path, "split", [memory_id])
    mem.prepare_store()  # settles what an interrupted operation left before anything is read
    if prior and mem.store.get(memory_id, missing_ok=True) is None:  # the interrupted split was finished
        return [mem.show(i) for i in prior.plan["members"]]
    record = mem.show(memory_id)
    parts = record.metadata.get(MERGED)
    if not parts:
        raise MegamemError(f"memory {memory_id!r} is not a merged memory")
    if is_consolidated(record):
        raise MegamemError(
            f"memory {memory_id!r} is consolidated (its adapter is in its namespace's cortex); forget it and add its "
            "members again to split it"
        )
    stored = {m["id"]: mem.store.get(m["id"], missing_ok=True) for m in parts}
    kept = {
        i for i, r in stored.items() if r is not None and r.text == _part(parts, i)["text"] and MERGED not in r.metadata
    }
    taken = [i for i, r in stored.items() if r is not None and i not in kept]
    if taken:
        raise MegamemError(
            f"split: memory {taken[0]!r} is stored again with another text; give it another id "
            f"(or forget it) before splitting {memory_id!r}"
        )
    model, tok = mem.load()
    for m in parts:
        for t in (m["text"], *m["paraphrases"]):
            check_fits(tok, model, t, f"member {m['id']!r}")
    # a member's own replaces come back with it as metadata, unchecked: the ids it names are forgotten or
    # superseded (an add would refuse them); and no "may update" note: its siblings are its own subject
    items = [
        Item(m["text"], m["paraphrases"], m["metadata"], m["id"], reserved={**m["reserved"], **replacing(m)})
        for m in parts
        if m["id"] not in kept
    ]
    intent = intents.begin(mem.path, "split", {"merged": memory_id, "members": [m["id"] for m in parts]})
    crash_point("split:intent")
    # each exactly as a fresh add learns it, committed one by one
    mem.learn(items, note_updates=False, group=1, on_step=on_step, on_stored=lambda _r: crash_point("split:member"))
    crash_point("split:members")
    mem.forget(memory_id)
    intents.end(intent)
    return [mem.show(m["id"]) for m in parts]


def _part(parts: list[dict], memory_id: str) -> dict:
    return next(m for m in parts if m["id"] == memory_id)


def replacing(member: dict) -> dict:
    """A member's own replaces, as the reserved metadata it is stored again with."""
    return {REPLACES: member["replaces"]} if member["replaces"] else {}


def subjects(
    mem: Memory, cosine: float = SUBJECT_COSINE, names: float = SUBJECT_NAMES, namespace: str | None = None
) -> list[list[str]]:
    """Groups of two or more stored memories that look like one subject: a chain of pairs with best key cosine
    >= `cosine` and name overlap >= `names` (updates.name_overlap). Largest group first. A group never spans
    namespaces (a merge cannot take in two tenants' memories): namespace None groups within each namespace
    apart, a name within that namespace alone (schema.owns). Cost: one pass of every key against every key, a
    memory at a time (a minute or so at 10,000 memories)."""
    from .. import schema

    check_finite(cosine, "cosine", minimum=-1)
    check_finite(names, "names", minimum=0)
    if namespace is not None:
        schema.check_namespace(namespace)
    ids, keys, owner = mem.keys()
    records = {r.id: r for r in mem.list() if namespace is None or schema.owns(namespace, r)}
    texts = {i: r.text for i, r in records.items()}
    space = {i: schema.namespace_of(r) for i, r in records.items()}
    out = mem.superseded()
    live = [n for n, i in enumerate(ids) if i not in out and i in texts]
    keep = torch.zeros(len(ids), dtype=torch.bool)
    keep[live] = True
    rows = keep[owner]  # (K,) the keys of live memories
    at = {n: m for m, n in enumerate(live)}
    pairs = [
        (at[a], at[b])
        for a, b in close_pairs(keys[rows], owner[rows], len(ids), cosine)
        if space[ids[a]] == space[ids[b]] and name_overlap(texts[ids[a]], texts[ids[b]]) >= names
    ]
    found = [[ids[live[n]] for n in g] for g in linked(len(live), pairs) if len(g) > 1]
    return sorted(found, key=lambda g: (-len(g), g[0]))


def diverged(
    mem: Memory, cosine: float = SUBJECT_COSINE, names: float = SUBJECT_NAMES, namespace: str | None = None
) -> list[tuple[str, list[list[str]]]]:
    """Merged memories whose members no longer form one subject at these thresholds: (id, the member ids in the
    groups they fall into), a split candidate each. namespace: that namespace's merged memories only (None:
    every one; a merged memory's members are always one namespace's)."""
    from .. import schema

    if namespace is not None:
        schema.check_namespace(namespace)
    out = []
    for r in mem.list():
        parts = r.metadata.get(MERGED)
        if not parts or (namespace is not None and not schema.owns(namespace, r)):
            continue
        keys = [mem.keys_of([m["text"], *m["paraphrases"]]) for m in parts]
        owner = torch.cat([torch.full((len(k),), n) for n, k in enumerate(keys)])
        pairs = [
            (a, b)
            for a, b in close_pairs(torch.cat(keys), owner, len(parts), cosine)
            if name_overlap(parts[a]["text"], parts[b]["text"]) >= names
        ]
        groups = linked(len(parts), pairs)
        if len(groups) > 1:
            out.append((r.id, [[parts[n]["id"] for n in g] for g in groups]))
    return out


def close_pairs(keys: torch.Tensor, owner: torch.Tensor, n: int, cosine: float) -> list[tuple[int, int]]:
    """Pairs a < b of memories (0..n-1) whose best key cosine is >= `cosine`, from keys (K, d) and owner (K,),
    the memory of each key. One memory's keys against all at a time: (k_i, K) in memory, never (K, K)."""
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    out = []
    for a in owner.unique().tolist():
        sims = unit[owner == a] @ unit.T  # (k_a, K)
        best = torch.full((n,), -2.0).scatter_reduce(0, owner, sims.max(dim=0).values, reduce="amax")  # (n,)
        out += [(a, b) for b in torch.nonzero(best >= cosine).flatten().tolist() if b > a]
    return out


def linked(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """The connected groups of 0..n-1 that `pairs` join (union-find), each in index order."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())
