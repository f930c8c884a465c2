"""The gate: max over a memory's keys, softmax with beta, top-k renormalisation, threshold."""

import pytest
import torch

from megamem.errors import MegamemError
from megamem.gate import GateConfig, gate_weights
from megamem.index import KeyIndex


def test_memory_scores_take_max_over_keys():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    owners = torch.tensor([0, 0, 1, 2])
    q = torch.tensor([0.0, 2.0])
    dot = KeyIndex(keys, owners, 3, "dot").exact_scores(q)
    assert dot.tolist() == pytest.approx([2.0, 1.6, 0.0])
    cos = KeyIndex(keys, owners, 3, "cosine").exact_scores(q)
    assert cos.tolist() == pytest.approx([1.0, 0.8, 0.0])


def test_bench_scores_with_the_products_scorer(monkeypatch):
    """One scorer: the bench's gate goes through KeyIndex, as Memory.route does, so it measures the product."""
    from megamem.bench.run import gate_matrix

    keys = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    q = torch.tensor([[1.0, 0.0]])
    weights, scores = gate_matrix(q, keys, GateConfig(top_k=None))
    assert scores[0].tolist() == pytest.approx([1.0, 0.0]) and weights[0, 0] > 0.99
    monkeypatch.setattr(KeyIndex, "exact_scores", lambda self, query: torch.tensor([0.0, 1.0]))
    weights, scores = gate_matrix(q, keys, GateConfig(top_k=None))
    assert scores[0].tolist() == [0.0, 1.0] and weights[0, 1] > 0.99


def test_dense_gate_is_softmax_of_beta_scores():
    s = torch.tensor([0.9, 0.2, -0.3])
    w = gate_weights(s, GateConfig(beta=3.0, top_k=None))
    assert torch.allclose(w, torch.softmax(3.0 * s, 0))


def test_top_k_renormalises_over_the_best():
    s = torch.tensor([0.1, 0.9, 0.5, 0.3])
    w = gate_weights(s, GateConfig(beta=2.0, top_k=2))
    expect = torch.softmax(torch.tensor([0.9, 0.5]) * 2.0, 0)
    assert w[1] == pytest.approx(float(expect[0])) and w[2] == pytest.approx(float(expect[1]))
    assert w[0] == 0 and w[3] == 0 and float(w.sum()) == pytest.approx(1.0)


def test_threshold_excludes_and_can_switch_memory_off():
    s = torch.tensor([0.8, 0.3])
    w = gate_weights(s, GateConfig(beta=1.0, threshold=0.5))
    assert w.tolist() == [1.0, 0.0]
    assert gate_weights(s, GateConfig(threshold=0.95)).sum() == 0


def test_bad_config_rejected():
    with pytest.raises(MegamemError):
        GateConfig(similarity="l2")
    with pytest.raises(MegamemError):
        GateConfig(top_k=0)
