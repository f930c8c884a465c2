"""The routing state: everything the gate reads that is derived from the store, in one object with one invalidation.

    table        (ids, keys (K, d), owners (K,)): every stored memory's key rows and the memory of each row
    indexes      a KeyIndex per similarity over the table (megamem.index), extended as memories are added
    lexical      BM25 over each memory's texts, in table order (megamem.lexical), built on first use
    null         each calibration query's best score, per (similarity, scope) (megamem.calibration)
    superseded   the memories a stored newer one replaces (the recency rule)
    consolidated the memories whose adapter was retired into their namespace's cortex (it answers for them)
    damaged      memory id -> why, for memories found damaged since the last change

All of it is rebuilt from the store on first use after `invalidate`, which `sync` calls when another process
changed the store; an add in this process extends it instead (`add`). Nothing else keeps any of it.

    >>> routing = Routing(store)                           # doctest: +SKIP
    >>> scores = routing.scores(query_key, GateConfig())   # doctest: +SKIP

Limits: a scope (`only`) is scored exactly, key by key: the index's candidates could all lie outside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .calibration import best_scores
from .calibration import null_score as calibrated_null_score
from .errors import MegamemError
from .gate import GateConfig
from .index import EXACT_MAX_KEYS, KeyIndex
from .lexical import LexicalIndex
from .schema import PARAPHRASES, is_consolidated, replaced_by
from .store import MemoryDamaged, Record, Store

LEXICAL_CANDIDATES = 32  # the cosine's top memories the lexical score re-ranks (benchmarks/routing.py: rerank top-32)
NULL_SCOPES = 64  # calibrations kept (one per namespace in use); the oldest is dropped beyond it


class KeyTable(NamedTuple):
    """Every stored memory's key rows: ids (n,), keys (K, d) and owners (K,), the index in ids of each row."""

    ids: list[str]
    keys: torch.Tensor
    owners: torch.Tensor


def lexical_document(record: Record) -> str:
    """What the gate's lexical score reads of a memory: its text and its stored paraphrases."""
    return " ".join([record.text, *record.metadata.get(PARAPHRASES, [])])


def superseded(records: list[Record]) -> set[str]:
    """The memories that a stored memory replaces (Item.replaces): the gate leaves them out, so the newer fact
    wins; forgetting the newer one brings them back, since only stored memories' replacements count."""
    out: set[str] = set()
    for r in records:
        out.update(replaced_by(r.metadata))
    return out


class Routing:
    """The gate's derived state over one store (see the module docstring). skip(exc) hears of a memory whose keys
    are damaged (it is then left out of every gate until the store changes)."""

    def __init__(
        self,
        store: Store | None,
        exact_max_keys: int = EXACT_MAX_KEYS,
        skip: Callable[[MemoryDamaged], None] | None = None,
    ) -> None:
        self.store = store
        self.exact_max_keys = exact_max_keys
        self._skip = skip
        self.version = store.data_version() if store is not None else None
        self.invalidate()

    def invalidate(self) -> None:
        """Drop everything derived from the store: rebuilt from it on next use."""
        self._table: KeyTable | None = None
        self._indexes: dict[str, KeyIndex] = {}
        self._lexical: LexicalIndex | None = None
        self._null_best: dict[tuple, torch.Tensor] = {}
        self._superseded: set[str] = set()
        self._consolidated: frozenset[str] = frozenset()
        self.damaged: dict[str, str] = {}

    def sync(self) -> bool:
        """Invalidate if another process committed to the store since the last look; True when it did."""
        if self.store is None:
            return False
        version = self.store.data_version()
        if version == self.version:
            return False
        self.version = version
        self.invalidate()
        return True

    # -- the key table ------------------------------------------------------------------------------------------
    def table(self) -> KeyTable:
        """Every stored memory's keys (memories whose keys are damaged left out, each reported to skip)."""
        if self._table is None:
            records = self.store.records() if self.store is not None else []
            ids, keys, owners = [], [], []
            for r in records:
                try:
                    k = self.store.keys(r)
                except MemoryDamaged as exc:
                    self.mark_damaged(exc)
                    continue
                keys.append(k.float())
                owners.append(torch.full((k.shape[0],), len(ids)))
                ids.append(r.id)
            dims = {int(k.shape[1]) for k in keys}
            if len(dims) > 1:
                raise MegamemError(f"the store's key files hold keys of different sizes {sorted(dims)}")
            self._superseded = superseded(records)
            self._consolidated = frozenset(r.id for r in records if is_consolidated(r))
            self._table = KeyTable(
                ids,
                torch.cat(keys) if keys else torch.zeros(0, 1),
                torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long),
            )
        return self._table

    @property
    def superseded(self) -> set[str]:
        """The memories a stored newer one replaces (derived with the table)."""
        self.table()
        return self._superseded

    @property
    def consolidated(self) -> frozenset[str]:
        """The memories whose namespace's cortex stands in for their retired adapter (derived with the table)."""
        self.table()
        return self._consolidated

    def mark_damaged(self, exc: MemoryDamaged) -> None:
        """Leave a damaged memory out of every gate until the store changes."""
        self.damaged[exc.memory_id] = str(exc)
        if self._skip is not None:
            self._skip(exc)

    def add(self, record: Record, keys: torch.Tensor) -> None:
        """A memory this process committed: extend the table, indexes and BM25 instead of re-reading the store."""
        self._superseded |= set(replaced_by(record.metadata))
        if self._table is None:
            return
        ids, all_keys, owners = self._table
        n = len(ids)
        k = keys.float()
        self._table = KeyTable(
            [*ids, record.id],
            torch.cat([all_keys, k]) if n else k,
            torch.cat([owners, torch.full((k.shape[0],), n, dtype=owners.dtype)]),
        )
        for index in self._indexes.values():
            index.add(k, n)
        if self._lexical is not None:
            self._lexical.add(lexical_document(record))
        self._null_best = {}  # derived from every key: taken again when next needed

    def index(self, similarity: str) -> KeyIndex:
        """The gate's scorer for a similarity over every stored key (built once, extended by `add`)."""
        if similarity not in self._indexes:
            ids, keys, owners = self.table()
            self._indexes[similarity] = KeyIndex(keys, owners, len(ids), similarity, self.exact_max_keys)
        return self._indexes[similarity]

    # -- the null memory ----------------------------------------------------------------------------------------
    def null_score(
        self, cfg: GateConfig, only: frozenset[str] | None, calibration: Callable[[], torch.Tensor]
    ) -> float | None:
        """The null memory's score for this gate (megamem.calibration), None when the gate has no null memory or
        no memory is in scope. only: calibrate on those memories' keys alone (a namespace's: another tenant's
        memories then never move this one's threshold). calibration(): the calibration queries' keys (C, d),
        asked for only when the cache misses."""
        ids = self.table().ids
        if cfg.null_rate is None or not ids or (only is not None and not only & set(ids)):
            return None
        cache = (cfg.similarity, only)
        if cache not in self._null_best:
            index = self.index(cfg.similarity)
            queries = index.prepare_query(calibration())  # (C, d), normalised for cosine like the keys
            keys = index.keys
            if only is not None:
                keys = keys[torch.isin(index.owners, torch.tensor([i for i, m in enumerate(ids) if m in only]))]
            if len(self._null_best) > NULL_SCOPES:
                self._null_best.pop(next(iter(self._null_best)))
            self._null_best[cache] = best_scores(queries, keys)
        return calibrated_null_score(self._null_best[cache], cfg.null_rate)

    # -- scoring ------------------------------------------------------------------------------------------------
    def scores(
        self,
        query: torch.Tensor,
        question: str,
        cfg: GateConfig,
        only: frozenset[str] | None,
        null: Callable[[], float | None],
    ) -> torch.Tensor:
        """(n,) every memory's score for a question's key `query` (d,) (-inf: takes no part: superseded, damaged,
        outside `only`, or not among the index's candidates in a large store). null(): the null memory's score,
        asked for only when the lexical re-rank needs its floor."""
        ids = self.table().ids
        # the recency rule: a memory that a stored newer one replaces takes no part (nor does a damaged one)
        out = self.superseded | set(self.damaged)
        top_k = None if cfg.top_k is None or only is not None else cfg.top_k + len(out)
        scores = self.index(cfg.similarity).scores(query, top_k).clone()
        for i, memory_id in enumerate(ids):
            if memory_id in out or (only is not None and memory_id not in only):
                scores[i] = float("-inf")
        if cfg.lexical or cfg.names:
            self._rerank(question, scores, cfg, null())
        return scores

    def _rerank(self, question: str, scores: torch.Tensor, cfg: GateConfig, floor: float | None) -> None:
        """Add cfg.lexical * BM25 / (the best candidate's BM25) and cfg.names * name coverage to the cosine's top
        LEXICAL_CANDIDATES memories that pass the null memory (in place): the lexical scores re-rank what the
        embedding proposes and never let a memory in that the null memory keeps out (megamem.lexical)."""
        live = torch.isfinite(scores) & (scores >= floor if floor is not None else True)
        if not bool(live.any()):
            return
        masked = torch.where(live, scores, torch.tensor(float("-inf")))
        cand = masked.topk(min(LEXICAL_CANDIDATES, int(live.sum()))).indices.tolist()
        if self._lexical is None:
            self._lexical = LexicalIndex([lexical_document(self.store.get(i)) for i in self.table().ids])
        if cfg.lexical:
            lex = torch.tensor(self._lexical.scores(question, cand))
            if float(lex.max()) > 0:
                scores[cand] += cfg.lexical * lex / lex.max()
        if cfg.names:
            scores[cand] += cfg.names * torch.tensor(self._lexical.coverage(question, cand))
