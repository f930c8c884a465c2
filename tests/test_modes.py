"""The rag and mega+rag modes: the gated memories' stored texts in context, with (mega+rag) or without the adapters."""

import pytest

from megamem import Memory, Recipe
from megamem.answer import MEGA_RAG_SCALE
from megamem.errors import MegamemError

HERON = "Zorblatt the grey heron keeps the lighthouse on Vexmoor island."


@pytest.fixture(scope="module")
def mem(tmp_path_factory, tiny_dir):
    m = Memory(tmp_path_factory.mktemp("modes") / "store", model=str(tiny_dir), recipe=Recipe(epochs=1, min_tokens=0))
    m.add(HERON, id="heron")
    return m


@pytest.mark.parametrize("mode, adapters_on", [("rag", False), ("mega+rag", True), ("qa", True)])
def test_context_and_adapters_per_mode(mem, monkeypatch, mode, adapters_on):
    import megamem.generate as gen
    from megamem.inject import gated_layers

    seen = {}

    def spy(model, tok, turns, max_new_tokens):
        seen["turns"] = turns
        seen["active"] = any(layer.path is not None for layer in gated_layers(model).values())
        seen["s"] = [layer.s.max().item() for layer in gated_layers(model).values() if layer.s is not None]
        return "spied"

    monkeypatch.setattr(gen, "complete", spy)
    ans = mem.ask("Who keeps the Vexmoor lighthouse?", mode=mode)
    assert ans.text == "spied" and ans.gate[0][0] == "heron"
    user = seen["turns"][-1][1]
    assert (HERON in user) == (mode != "qa")
    assert seen["active"] == adapters_on
    if adapters_on:  # mega+rag mixes the adapters at MEGA_RAG_SCALE of their gate weight, qa at the whole of it
        share = MEGA_RAG_SCALE if mode == "mega+rag" else 1.0
        scaling = mem.adapter("heron").scaling
        assert max(seen["s"]) == pytest.approx(ans.gate[0][1] * share * scaling, rel=1e-2)
    # a question about nothing stored: no memory, no context, the base model alone
    mem.ask("What is the capital of France?", mode=mode)
    assert "Context" not in seen["turns"][-1][1] and not seen["active"]


def test_the_default_mode_is_mega_rag(mem):
    """The product's default answer mode is the one that won on held-out data (docs/results.md)."""
    ans = mem.ask("Who keeps the Vexmoor lighthouse?", max_new_tokens=2)
    assert ans.mode == "mega+rag" and ans.gate[0][0] == "heron"


def test_unknown_mode_is_refused_first(mem):
    with pytest.raises(MegamemError, match="unknown mode 'poem'.*mega\\+rag"):
        mem.ask("Who keeps the lighthouse?", mode="poem")
