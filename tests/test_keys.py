"""Key functions: the paper's activation keys and the sentence-embedder keys, and routing with them."""

import pytest
import torch

from megamem.errors import MegamemError
from megamem.keys import _user_span, activation_keys, compute_keys, embedder_keys


def test_user_span_starts_at_the_text(tok):
    ids, start = _user_span(tok, "Vexmoor bridge")
    assert tok.decode(ids[start:]).startswith("Vexmoor bridge")
    assert "system" in tok.decode(ids[:start])


def test_activation_keys_are_last_mlp_input_means(tiny):
    model, tok = tiny
    captured = []
    h = model.model.layers[-1].post_attention_layernorm.register_forward_hook(lambda m, a, o: captured.append(o))
    keys = activation_keys(model, tok, ["one text", "another, longer text"])
    h.remove()
    assert keys.shape == (2, model.config.hidden_size)
    ids, start = _user_span(tok, "another, longer text")
    assert torch.allclose(keys[1], captured[1][0, start:].mean(0), atol=1e-6)
    assert torch.equal(activation_keys(model, tok, ["one text"])[0], keys[0])


def test_embedder_routes_question_to_its_passage():
    passages = [
        "The Vexmoor bridge was painted teal in 2031.",
        "An axolotl named Pim is the school's mascot.",
        "The lantern festival is held every March.",
    ]
    keys = embedder_keys(passages)
    q = embedder_keys(["What colour is the Vexmoor bridge?", "Which animal is the mascot?", "When is the festival?"])
    sims = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T
    assert sims.argmax(1).tolist() == [0, 1, 2]


def test_unknown_key_function():
    with pytest.raises(MegamemError, match="unknown key function"):
        compute_keys("bm25", ["x"])


def test_embedder_loads_offline_whatever_was_imported_first(monkeypatch):
    """HF_HUB_OFFLINE set after the hub is imported does nothing; the embedder must ask for local files itself."""
    import sentence_transformers

    from megamem import keys

    seen = {}

    class Spy:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", Spy)
    keys._sentence_model.cache_clear()
    try:
        keys._sentence_model()
    finally:
        keys._sentence_model.cache_clear()
    assert seen.get("local_files_only") is True
