"""Gate scoring at scale: exact scores for small stores, an approximate HNSW index (faiss) for large ones.

A top-k gate needs only the k best memories. Up to `exact_max` key rows every key is scored (one
matrix-vector product, exact); beyond it an HNSW index proposes candidate memories and all the keys
of those candidates are then scored exactly, so every weight the gate hands out is the exact one and
only a memory the index misses entirely can be lost (recall@k: benchmarks/gate_latency.py). Dense
gates (top_k None) always score every key: they need every memory's score anyway.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MegamemError

EXACT_MAX_KEYS = 50_000  # exact scoring of this many rows costs ~10 ms a question, ~1% of a short answer (docs)
BACKENDS = ("faiss", "usearch")  # faiss: faster to build and search here (benchmarks/gate_latency.py)


class KeyIndex:
    """Scores memories against a query: exact up to `exact_max` key rows, approximate top-k beyond.

    keys: (rows, dim); owners: (rows,) memory index of each key row; n: number of memories.
    The HNSW index is built lazily, on the first top-k query that needs it, and extended by `add`.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        owners: torch.Tensor,
        n: int,
        similarity: str,
        exact_max: int = EXACT_MAX_KEYS,
        backend: str = "faiss",
        expansion: int = 128,
    ) -> None:
        if backend not in BACKENDS:
            raise MegamemError(f"unknown index backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.similarity = similarity
        self.exact_max = exact_max
        self.backend = backend
        self.expansion = expansion
        self.n = n
        self.keys = self._prepare(keys)
        self.owners = owners.long()
        self._index = None
        self._indexed = 0  # key rows already in the HNSW index
        self._rows_by_owner: list[torch.Tensor] | None = None

    def _prepare(self, keys: torch.Tensor) -> torch.Tensor:
        keys = keys.float()
        return F.normalize(keys, dim=-1) if self.similarity == "cosine" else keys.contiguous()

    def prepare_query(self, query: torch.Tensor) -> torch.Tensor:
        """A query (dim,) or queries (n, dim) as the stored keys are kept: normalised for cosine."""
        q = query.float()
        return F.normalize(q, dim=-1) if self.similarity == "cosine" else q

    @property
    def rows(self) -> int:
        return int(self.keys.shape[0])

    def add(self, keys: torch.Tensor, owner: int) -> None:
        """Append one memory's keys (it becomes memory number `owner`, the next one)."""
        self.keys = torch.cat([self.keys, self._prepare(keys)]) if self.rows else self._prepare(keys)
        self.owners = torch.cat([self.owners, torch.full((keys.shape[0],), owner, dtype=torch.long)])
        self.n = max(self.n, owner + 1)
        self._rows_by_owner = None
        if self._index is not None:
            self._extend()

    def exact_scores(self, query: torch.Tensor) -> torch.Tensor:
        """(n,) every memory's score: the max over its keys of the similarity with `query`."""
        q = query.float()
        s = self.keys @ (F.normalize(q, dim=-1) if self.similarity == "cosine" else q)
        out = torch.full((self.n,), float("-inf"))
        return out.scatter_reduce(0, self.owners, s, reduce="amax", include_self=True)

    def scores(self, query: torch.Tensor, top_k: int | None) -> torch.Tensor:
        """(n,) memory scores for a gate with `top_k`: exact for every memory when the store is small or the
        gate dense; otherwise exact for the candidates the index finds and -inf for the others."""
        if top_k is None or self.rows <= self.exact_max:
            return self.exact_scores(query)
        cand = self.candidates(query, top_k)
        q = query.float()
        q = F.normalize(q, dim=-1) if self.similarity == "cosine" else q
        rows_by_owner = self._owner_rows()
        out = torch.full((self.n,), float("-inf"))
        for m in cand.tolist():
            rows = rows_by_owner[m]
            out[m] = (self.keys[rows] @ q).max()
        return out

    def candidates(self, query: torch.Tensor, top_k: int) -> torch.Tensor:
        """Memory indices the HNSW index proposes for the top `top_k` (8x as many key hits as k, at least 64)."""
        if self._index is None:
            self._build()
        self._extend()
        count = min(self.rows, max(8 * top_k, 64))
        q = query.float()
        q = F.normalize(q, dim=-1) if self.similarity == "cosine" else q
        vec = q.numpy().astype(np.float32)[None, :]
        if self.backend == "usearch":
            hits = self._index.search(vec, count, exact=False).keys.reshape(-1)
        else:
            hits = self._index.search(vec, count)[1].reshape(-1)
        hits = torch.as_tensor(np.asarray(hits, dtype=np.int64))
        hits = hits[(hits >= 0) & (hits < self.rows)]
        return torch.unique(self.owners[hits])

    def _owner_rows(self) -> list[torch.Tensor]:
        if self._rows_by_owner is None:
            order = torch.argsort(self.owners, stable=True)
            counts = torch.bincount(self.owners, minlength=self.n).tolist()
            self._rows_by_owner = list(torch.split(order, counts))
        return self._rows_by_owner

    def _build(self) -> None:
        dim = int(self.keys.shape[1])
        if self.backend == "usearch":
            from usearch.index import Index

            # keys are already normalised for cosine, so inner product serves both similarities
            self._index = Index(ndim=dim, metric="ip", dtype="f32", connectivity=16, expansion_search=self.expansion)
        else:
            import faiss

            self._index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efSearch = self.expansion
        self._indexed = 0

    def _extend(self) -> None:
        """Add the key rows not in the index yet."""
        if self._indexed >= self.rows:
            return
        new = self.keys[self._indexed :].numpy().astype(np.float32)
        if self.backend == "usearch":
            self._index.add(np.arange(self._indexed, self.rows, dtype=np.int64), new)
        else:
            self._index.add(new)
        self._indexed = self.rows
