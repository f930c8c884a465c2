"""Gated LoRA layers: exact mixtures, no change to the base function when off, injection by name."""

import torch

from megamem.adapters import Adapter, LoraSpec
from megamem.inject import clear, gated_layers, inject, set_mixture


def _random_adapter(layers, spec, seed):
    g = torch.Generator().manual_seed(seed)
    w = {
        n: (
            torch.randn(spec.rank, m.in_features, generator=g) * 0.1,
            torch.randn(m.out_features, spec.rank, generator=g) * 0.1,
        )
        for n, m in layers.items()
    }
    return Adapter(spec, w)


def test_injects_only_named_modules(tiny):
    model, _ = tiny
    layers = inject(model, ["up_proj", "down_proj"])
    assert sorted(layers) == sorted(f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("up_proj", "down_proj"))
    assert inject(model, ["up_proj", "down_proj"]).keys() == layers.keys()  # idempotent: no double wrap
    assert not any(type(g.base).__name__ == "GatedLoRALinear" for g in layers.values())
    only = inject(model, ["o_proj"], layers=[1])
    assert list(only) == ["model.layers.1.self_attn.o_proj"]


def test_mixture_equals_merged_weights(tiny):
    model, tok = tiny
    layers = inject(model, ["up_proj", "down_proj", "q_proj"])
    specs = [LoraSpec(rank=4, alpha=8.0), LoraSpec(rank=2, alpha=2.0, rslora=True), LoraSpec(rank=3, alpha=3.0)]
    adapters = [_random_adapter(layers, s, i) for i, s in enumerate(specs)]
    ids = torch.tensor([tok("the quick brown fox jumps over")["input_ids"]])
    for trial in range(3):
        g = torch.softmax(torch.randn(3, generator=torch.Generator().manual_seed(trial)) * 3, 0).tolist()
        set_mixture(model, adapters, g)
        with torch.no_grad():
            gated = model(ids).logits
        clear(model)
        originals = {n: m.base.weight.detach().clone() for n, m in layers.items()}
        with torch.no_grad():
            for n, m in layers.items():
                for a, w in zip(adapters, g, strict=True):
                    A, B = a.weights[n]
                    m.base.weight += w * a.scaling * (B @ A)
            merged = model(ids).logits
            for n, m in layers.items():
                m.base.weight.copy_(originals[n])
        assert torch.allclose(gated, merged, atol=1e-4, rtol=1e-4), (gated - merged).abs().max()
        assert not torch.allclose(gated, model(ids).logits, atol=1e-3)  # the mixture did something


def test_clear_restores_base_function(tiny):
    model, tok = tiny
    ids = torch.tensor([tok("hello there")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
        layers = inject(model, ["up_proj", "down_proj"])
        set_mixture(model, [_random_adapter(layers, LoraSpec(rank=2), 0)], [1.0])
        assert not torch.allclose(model(ids).logits, before)
        clear(model)
        assert torch.equal(model(ids).logits, before)
        assert all(m.path is None and m.s is None for m in gated_layers(model).values())


def test_zero_weight_adapters_are_left_out(tiny):
    model, _ = tiny
    layers = inject(model, ["up_proj"])
    spec = LoraSpec(rank=2)
    set_mixture(model, [_random_adapter(layers, spec, 0), _random_adapter(layers, spec, 1)], [0.0, 1.0])
    assert all(m.path[0].shape[0] == 2 and m.ranks == [2] for m in layers.values())


def test_a_per_row_mixture_gives_each_row_its_own_single_question_answer(tiny):
    """(B, N) weights: row b of one batched forward equals that row run alone with its own (N,) mixture."""
    model, tok = tiny
    layers = inject(model, ["up_proj", "down_proj"])
    spec = LoraSpec(rank=2)
    adapters = [_random_adapter(layers, spec, i) for i in range(3)]
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.3, 0.7], [0.0, 0.0, 0.0]])
    ids = torch.tensor([tok("hello there friend")["input_ids"]] * 3)
    with torch.no_grad():
        set_mixture(model, adapters, rows)
        together = model(ids).logits
        for b in range(3):
            set_mixture(model, adapters, rows[b].tolist())
            assert torch.allclose(together[b], model(ids[:1]).logits[0], atol=1e-5)
        clear(model)
        base = model(ids[:1]).logits[0]
    assert torch.allclose(together[2], base, atol=1e-6)  # a row with no memory is the base model
    assert not torch.allclose(together[0], together[1])
