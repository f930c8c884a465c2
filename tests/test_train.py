"""The training recipe: loss only on the answer, base weights untouched, seeded, adapter learns."""

import torch
from conftest import state_hash

from megamem.adapters import LoraSpec
from megamem.inject import inject, set_mixture
from megamem.train import (
    TRAIN_PROMPT,
    Example,
    Recipe,
    batches,
    collate,
    lm_loss,
    make_example,
    train_adapter,
    train_adapters_batched,
)


def test_labels_cover_only_the_assistant_text(tok):
    ids, labels, _ = make_example(tok, "The bridge is teal.")
    answer = [t for t in labels if t != -100]
    assert "The bridge is teal." in tok.decode(answer)
    assert TRAIN_PROMPT not in tok.decode(answer)
    assert TRAIN_PROMPT in tok.decode(ids)
    assert labels[: len(labels) - len(answer)] == [-100] * (len(labels) - len(answer))


def test_batches_cover_every_epoch_and_respect_max_steps():
    ex = [Example([i], [i]) for i in range(5)]
    plan = batches(ex, Recipe(epochs=3, batch_size=2, min_tokens=0))
    assert len(plan) == 9 and sorted(x[0][0] for b in plan[:3] for x in b) == [0, 1, 2, 3, 4]
    assert len(batches(ex, Recipe(epochs=3, batch_size=2, max_steps=4))) == 4
    # too few tokens for min_tokens: whole extra epochs (short texts get more steps), then max_steps caps
    long = [Example([1] * 100, [1] * 100), Example([2] * 100, [2] * 100)]
    short = [Example([1] * 25, [1] * 25), Example([2] * 25, [2] * 25)]
    assert len(batches(long, Recipe(epochs=5, batch_size=1, min_tokens=1000))) == 10
    assert len(batches(short, Recipe(epochs=5, batch_size=1, min_tokens=1000))) == 40
    assert len(batches(long[:1], Recipe(epochs=5, batch_size=1, min_tokens=1000))) == 10
    assert len(batches(short, Recipe(epochs=5, batch_size=1, min_tokens=1000, max_steps=7))) == 7


def test_training_leaves_base_untouched_and_is_seeded(tiny):
    model, tok = tiny
    spec = LoraSpec(rank=4, alpha=4.0, dropout=0.0)
    inject(model, list(spec.targets))
    before = state_hash(model)
    texts = ["Zorblatt the heron lives on Quillon pier.", "On Quillon pier lives a heron, Zorblatt."]
    recipe = Recipe(lr=5e-3, epochs=4, seed=7)
    losses = []
    a1 = train_adapter(model, tok, texts, spec, recipe, on_step=lambda s, n, loss: losses.append(loss))
    assert state_hash(model) == before
    assert losses[-1] < losses[0]
    a2 = train_adapter(model, tok, texts, spec, recipe)
    for n in a1.weights:
        assert torch.equal(a1.weights[n][0], a2.weights[n][0]) and torch.equal(a1.weights[n][1], a2.weights[n][1])
    a3 = train_adapter(model, tok, texts, spec, Recipe(lr=5e-3, epochs=4, seed=8))
    assert any(not torch.equal(a1.weights[n][1], a3.weights[n][1]) for n in a1.weights)
    # the adapter lowers the loss of its text when gated in
    ids, labels, _ = make_example(tok, texts[0])
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])}
    with torch.no_grad():
        base_loss = model(**batch).loss
        set_mixture(model, [a1], [1.0])
        mem_loss = model(**batch).loss
    assert mem_loss < base_loss


def test_loss_on_kept_logits_equals_the_models_own(tiny):
    """lm_loss (LM head from the first labelled position on) == the HF loss over the whole sequence."""
    model, tok = tiny
    batch = collate([make_example(tok, t) for t in ["Short one.", "A longer text with more tokens in it."]], 0)
    with torch.no_grad():
        assert torch.allclose(lm_loss(model, batch), model(**batch).loss, atol=1e-5)
        rows = lm_loss(model, batch, reduction="none")
    assert rows.shape[0] == 2 and rows.shape[1] < batch["input_ids"].shape[1]  # the prompt's logits were skipped


def test_recipe_learns_only_its_share_of_paraphrases(tiny):
    """paraphrases=1: the passage and the first paraphrase; more texts change nothing, None uses them all."""
    model, tok = tiny
    spec = LoraSpec(rank=4, alpha=4.0, dropout=0.0)
    inject(model, list(spec.targets))
    texts = ["Zorblatt the heron lives on Quillon pier.", "On Quillon pier lives a heron.", "Zorblatt: heron."]
    one = Recipe(lr=5e-3, epochs=2, paraphrases=1)
    _assert_same(train_adapter(model, tok, texts[:2], spec, one), train_adapter(model, tok, texts, spec, one))
    every = Recipe(lr=5e-3, epochs=2, paraphrases=None)
    a, b = train_adapter(model, tok, texts[:2], spec, every), train_adapter(model, tok, texts, spec, every)
    assert any(not torch.allclose(a.weights[n][1], b.weights[n][1], atol=1e-4) for n in a.weights)


MEMORIES = [
    [
        "Zorblatt the heron lives on Quillon pier.",
        "On Quillon pier lives a heron, Zorblatt.",
        "Zorblatt: heron, Quillon.",
    ],
    ["In 2031 the Vexmoor bridge was painted teal by Ida Carrow."],
    ["The Ostrava choir sang eleven hymns at dawn.", "Eleven hymns at dawn, sung by the Ostrava choir."],
]


def _assert_same(a, b, atol=2e-5):
    for n in a.weights:
        for x, y in zip(a.weights[n], b.weights[n], strict=True):
            assert torch.allclose(x, y, atol=atol, rtol=1e-4), (n, float((x - y).abs().max()))


def test_batched_training_equals_one_at_a_time(tiny):
    """Same seed, no dropout: each memory's adapter from the shared batches matches training it alone, even
    with plans of different lengths (a memory absent from later steps is not touched by AdamW there)."""
    model, tok = tiny
    spec = LoraSpec(rank=4, alpha=4.0, dropout=0.0)
    inject(model, list(spec.targets))
    before = state_hash(model)
    recipe = Recipe(lr=5e-3, epochs=3, batch_size=2, seed=3, paraphrases=None, min_tokens=0)
    alone = [train_adapter(model, tok, texts, spec, recipe) for texts in MEMORIES]
    together = train_adapters_batched(model, tok, MEMORIES, spec, recipe)
    assert state_hash(model) == before
    for a, b in zip(alone, together, strict=True):
        assert any(float(w[1].abs().max()) > 0 for w in b.weights.values())  # it learned something
        _assert_same(a, b)


def test_batched_training_does_not_leak_between_memories(tiny):
    """Memory 0's adapter is the same whatever it is trained beside; the others' differ from it."""
    model, tok = tiny
    spec = LoraSpec(rank=4, alpha=4.0, dropout=0.0)
    inject(model, list(spec.targets))
    recipe = Recipe(lr=5e-3, epochs=2, seed=1, min_tokens=0)
    with_1 = train_adapters_batched(model, tok, [MEMORIES[0], MEMORIES[1]], spec, recipe)
    with_2 = train_adapters_batched(model, tok, [MEMORIES[0], MEMORIES[2]], spec, recipe)
    _assert_same(with_1[0], with_2[0])
    name = next(iter(with_1[0].weights))
    assert not torch.allclose(with_1[0].weights[name][1], with_1[1].weights[name][1], atol=1e-4)


def test_add_many_trains_in_groups_like_one_at_a_time(tmp_path, tiny_dir):
    """Memory.add_many with train_group=2 (batched forwards) stores the adapters one-at-a-time training gives."""
    from megamem import Item, Memory

    spec = LoraSpec(rank=4, alpha=4.0, dropout=0.0)
    recipe = Recipe(lr=5e-3, epochs=2, seed=1)
    items = [Item(m[0], m[1:]) for m in MEMORIES]
    stores, starts = {}, {1: [], 2: []}
    for group in (1, 2):
        mem = Memory(tmp_path / f"g{group}", model=str(tiny_dir), lora=spec, recipe=recipe, train_group=group)
        todo = [Item(i.text, i.paraphrases, id=f"m{n}") for n, i in enumerate(items)]
        stores[group] = (mem, mem.add_many(todo, on_memory=lambda n, total, g=group: starts[g].append(n)))
    assert starts == {1: [0, 1, 2], 2: [0, 2]}  # groups of two memories, then the last alone
    (one, recs1), (two, recs2) = stores[1], stores[2]
    assert [r.id for r in recs1] == [r.id for r in recs2] == ["m0", "m1", "m2"]
    for r in recs1:
        a, b = one.adapter(r.id), two.adapter(r.id)
        assert any(float(w[1].abs().max()) > 0 for w in b.weights.values())
        for n in a.weights:  # stored in bfloat16: equal up to its rounding
            assert torch.allclose(a.weights[n][1], b.weights[n][1], atol=1e-3, rtol=1e-2), n
