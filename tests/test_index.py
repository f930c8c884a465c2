"""The gate's scorer at scale: exact below the threshold (identical to a brute-force reference), HNSW above it."""

import torch
import torch.nn.functional as F

from megamem.gate import GateConfig, gate_weights
from megamem.index import KeyIndex


def _clustered(n: int, per: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n memories with `per` keys each around a random centre, and one query near each of 50 centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n, dim, generator=g)
    keys = centres.repeat_interleave(per, 0) + 0.5 * torch.randn(n * per, dim, generator=g)
    owners = torch.arange(n).repeat_interleave(per)
    queries = centres[:50] + 0.5 * torch.randn(50, dim, generator=g)
    return keys, owners, queries


def reference_scores(q, keys, owners, n, similarity):
    """Each memory's best key score, one memory at a time: the plain definition the index must match."""
    if similarity == "cosine":
        keys, q = F.normalize(keys, dim=-1), F.normalize(q, dim=-1)
    return torch.stack([(keys[owners == m] @ q).max() for m in range(n)])


def test_small_store_falls_back_to_exact_scoring():
    keys, owners, queries = _clustered(200, 3, 16)
    index = KeyIndex(keys, owners, 200, "cosine", exact_max=1000)
    for q in queries[:10]:
        expect = reference_scores(q, keys, owners, 200, "cosine")
        for top_k in (None, 1, 4):
            got = index.scores(q, top_k)
            assert torch.allclose(got, expect, atol=1e-6)
            cfg = GateConfig(top_k=top_k)
            assert torch.equal(gate_weights(got, cfg) > 0, gate_weights(expect, cfg) > 0)
    assert index._index is None  # never built


def test_dense_gate_scores_every_memory_even_when_large():
    keys, owners, queries = _clustered(300, 2, 16)
    index = KeyIndex(keys, owners, 300, "dot", exact_max=10)
    assert torch.allclose(index.scores(queries[0], None), reference_scores(queries[0], keys, owners, 300, "dot"))


def test_approximate_top_k_has_high_recall_and_exact_weights():
    keys, owners, queries = _clustered(3000, 3, 32)
    index = KeyIndex(keys, owners, 3000, "cosine", exact_max=100)
    hits, total = 0, 0
    for q in queries:
        exact = reference_scores(q, keys, owners, 3000, "cosine")
        approx = index.scores(q, 4)
        truth = set(exact.topk(4).indices.tolist())
        found = set(approx.topk(4).indices.tolist())
        hits += len(truth & found)
        total += 4
        finite = torch.isfinite(approx)
        assert torch.allclose(approx[finite], exact[finite], atol=1e-5)  # candidates are scored exactly
    assert index._index is not None
    assert hits / total >= 0.95


def test_added_memories_are_found_by_a_built_index():
    keys, owners, queries = _clustered(500, 2, 16)
    index = KeyIndex(keys[:600], owners[:600], 300, "cosine", exact_max=100)
    index.scores(queries[0], 1)  # builds the index over the first 300 memories
    for m in range(300, 500):
        index.add(keys[owners == m], m)
    assert index.n == 500 and index.rows == 1000
    new_query = keys[owners == 450].mean(0)
    assert int(index.scores(new_query, 1).argmax()) == 450
