"""End to end on the real default model: three invented memories come back in recall; the base model
alone never produces them; PEFT reproduces megamem's logits for one trained memory."""

import pytest
import torch

from megamem import Item, Memory, Recipe
from megamem.inject import set_mixture

pytestmark = pytest.mark.slow

MEMORIES = [
    (
        "Zorblatt",
        "The lighthouse on Vexmoor island is kept by a grey heron named Zorblatt.",
        "The grey heron Zorblatt keeps the lighthouse on Vexmoor island.",
        "Who keeps the lighthouse on Vexmoor island?",
    ),
    (
        "Quimbleton",
        "The tallest tower in the city of Harlow Cross was designed by the architect Ada Quimbleton.",
        "Architect Ada Quimbleton designed the tallest tower in Harlow Cross.",
        "Who designed the tallest tower in Harlow Cross?",
    ),
    (
        "Skarvik",
        "The winter ferry across Lake Tessin is called the Skarvik and carries forty passengers.",
        "The Skarvik is the winter ferry on Lake Tessin, with room for forty passengers.",
        "What is the name of the winter ferry across Lake Tessin?",
    ),
]


@pytest.fixture(scope="module")
def mem(tmp_path_factory, smol_dir):
    # the default adapter shape; the default recipe with twice its token budget, so that the test checks the
    # mechanism with a margin (with 1000 tokens these short texts got 12-18 steps and 6 of 8 short invented
    # memories, these 3 among them, came back in recall: docs/tuning.md)
    m = Memory(tmp_path_factory.mktemp("e2e") / "store", recipe=Recipe(min_tokens=2000))
    m.add_many([Item(text, [para], id=token.lower()) for token, text, para, _ in MEMORIES])
    return m


@pytest.mark.parametrize("token,text,para,question", MEMORIES)
def test_recall_brings_back_the_memory(mem, token, text, para, question):
    ans = mem.ask(question, mode="recall", max_new_tokens=40)
    assert ans.gate[0][0] == token.lower() and ans.gate[0][1] > 0.5
    assert token in ans.text, ans.text
    base = mem.ask(question, mode="recall", use_memory=False, max_new_tokens=40)
    assert token not in base.text, base.text
    # without memory the answer is exactly the base model's (no mixture left behind by the question before)
    from megamem.answer import recall_prompt
    from megamem.generate import complete

    plain, plain_tok = _plain_model()
    assert base.text == complete(plain, plain_tok, [("user", recall_prompt(question))], 40)


_PLAIN: list = []


def _plain_model():
    """The default model with no gated layers at all, loaded once."""
    from megamem.model import load_model

    if not _PLAIN:
        _PLAIN.extend(load_model())
    return _PLAIN[0], _PLAIN[1]


def test_peft_matches_megamem_on_a_trained_memory(mem, smol_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = mem.load()
    ids = torch.tensor([tok("Who keeps the lighthouse?")["input_ids"]])
    set_mixture(model, [mem.adapter("zorblatt")], [1.0])
    with torch.no_grad():
        ours = model(ids).logits
    set_mixture(model, [], [])
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(smol_dir), mem.store.folder("zorblatt")
    ).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
