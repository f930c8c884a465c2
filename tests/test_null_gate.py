"""The null memory: a question about nothing stored gets the base model exactly; one about a memory is routed."""

import pytest
import torch

from megamem import GateConfig, Memory, Recipe
from megamem.calibration import calibration_queries, null_score
from megamem.gate import gate_weights

FACTS = [
    ("heron", "Zorblatt the grey heron keeps the lighthouse on Vexmoor island."),
    ("ferry", "The winter ferry across Lake Tessin is called the Skarvik and carries forty passengers."),
    ("tower", "The tallest tower in Harlow Cross was designed by the architect Ada Quimbleton."),
]
GENERAL = ["What is the capital of France?", "How many legs does a spider have?", "Write a haiku about rain."]


def test_null_memory_excludes_lower_scores_and_keeps_its_share():
    s = torch.tensor([0.9, 0.5, 0.2])
    w = gate_weights(s, GateConfig(beta=10.0, top_k=None, null_rate=0.01), null_score=0.6)
    assert w[1] == 0 and w[2] == 0  # below the null score: no part at all
    assert float(w[0]) == pytest.approx(1 / (1 + torch.exp(torch.tensor(10 * (0.6 - 0.9)))).item())
    assert float(w.sum()) < 1  # the rest is the base model's
    assert gate_weights(s, GateConfig(beta=10.0), null_score=0.95).sum() == 0  # nothing above it: base alone
    assert float(gate_weights(s, GateConfig(beta=10.0, top_k=None)).sum()) == pytest.approx(1.0)  # no null


def test_null_score_is_the_calibration_quantile():
    best = torch.linspace(0, 1, 101)
    assert null_score(best, 0.01) == pytest.approx(0.99)
    assert null_score(best, 0.0) == pytest.approx(1.0)
    assert len(calibration_queries()) >= 400


@pytest.fixture(scope="module")
def mem(tmp_path_factory, tiny_dir):
    m = Memory(tmp_path_factory.mktemp("null") / "store", model=str(tiny_dir), recipe=Recipe(epochs=1, min_tokens=0))
    for memory_id, text in FACTS:
        m.add(text, id=memory_id)
    return m


@pytest.mark.parametrize("question", GENERAL)
def test_general_question_gets_the_base_models_tokens(mem, question):
    ans = mem.ask(question, max_new_tokens=8)
    assert ans.gate == []
    assert ans.text == mem.ask(question, max_new_tokens=8, use_memory=False).text
    # without the null memory the same question goes to some memory (the paper's gate always mixes)
    assert mem.route(question, GateConfig(null_rate=None)) != []


@pytest.mark.parametrize(
    ("memory_id", "question"),
    [("heron", "Who keeps the Vexmoor lighthouse?"), ("ferry", "What is the name of the Lake Tessin winter ferry?")],
)
def test_question_about_a_memory_is_routed_to_it(mem, memory_id, question):
    routed = mem.route(question)
    assert routed and routed[0][0] == memory_id and routed[0][1] > 0.5
    assert mem.null_score() is not None and mem.null_score(GateConfig(null_rate=None)) is None


def test_null_score_rises_with_a_stricter_rate(mem):
    assert mem.null_score(GateConfig(null_rate=0.0)) >= mem.null_score(GateConfig(null_rate=0.05))


def test_activation_stores_have_no_null_memory_by_default():
    """Measured: the paper's keys do not separate on-topic from other questions here (docs/tuning.md)."""
    from megamem.memory import default_gate

    assert default_gate("activation").null_rate is None and default_gate("embedder").null_rate == 0.01
