"""Adapter files: PEFT format, round trip, checksums, and equality with PEFT's own forward."""

import json

import pytest
import torch

from megamem.adapters import LoraSpec, load_adapter, new_adapter, save_adapter
from megamem.errors import MegamemError
from megamem.inject import inject, layer_index, set_mixture
from megamem.train import Recipe, train_adapter


def _trained_like(layers, spec, seed=0):
    adapter = new_adapter(layers, spec, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    adapter.weights = {
        n: (a.detach(), torch.randn(b.shape, generator=g) * 0.05) for n, (a, b) in adapter.weights.items()
    }
    return adapter


def test_round_trip_and_config(tiny, tmp_path):
    model, _ = tiny
    spec = LoraSpec(rank=4, alpha=16.0, rslora=True, layers=(1,))
    layers = inject(model, list(spec.targets), list(spec.layers))
    adapter = _trained_like(layers, spec)
    sha = save_adapter(adapter, tmp_path, "some/model")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_rslora"] is True
    assert cfg["layers_to_transform"] == [1] and cfg["base_model_name_or_path"] == "some/model"
    back = load_adapter(tmp_path, checksum=sha)
    assert back.spec == spec and back.scaling == pytest.approx(16.0 / 2.0)
    for n, (a, b) in adapter.weights.items():
        assert torch.equal(back.weights[n][0], a) and torch.equal(back.weights[n][1], b)


def test_upper_share_resolves_to_the_top_layers(tiny):
    model, tok = tiny  # 2 decoder layers
    assert LoraSpec(upper=0.5).resolved(30).layers == tuple(range(15, 30))
    assert LoraSpec(upper=0.1).resolved(2).layers == (1,)  # at least one layer
    assert LoraSpec(upper=1.0).resolved(30).layers is None and LoraSpec(layers=(3,)).resolved(30).layers == (3,)
    with pytest.raises(MegamemError, match="upper"):
        LoraSpec(upper=0.0)
    # a store written before `upper` existed keeps adapters on every layer
    old = {k: v for k, v in LoraSpec().to_dict().items() if k != "upper"}
    assert LoraSpec.from_dict(old).upper == 1.0
    # the default trains only the top half, and its file says which layers (PEFT's layers_to_transform)
    inject(model, list(LoraSpec.targets))
    adapter = train_adapter(model, tok, ["A short text."], LoraSpec(rank=2), Recipe(epochs=1, min_tokens=0))
    assert {layer_index(n) for n in adapter.weights} == {1} and adapter.spec.layers == (1,)


def test_corrupted_file_is_named(tiny, tmp_path):
    model, _ = tiny
    layers = inject(model, ["up_proj"])
    sha = save_adapter(_trained_like(layers, LoraSpec(rank=2, targets=("up_proj",))), tmp_path, "m")
    path = tmp_path / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(MegamemError, match="adapter_model.safetensors is corrupted"):
        load_adapter(tmp_path, checksum=sha)


def test_peft_loads_same_logits(tiny_dir, tiny, tmp_path):
    """peft.PeftModel.from_pretrained on one memory == megamem with that memory gated at weight 1."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    spec = LoraSpec(rank=4, alpha=8.0)
    layers = inject(model, list(spec.targets))
    adapter = _trained_like(layers, spec)
    save_adapter(adapter, tmp_path, str(tiny_dir))
    ids = torch.tensor([tok("memories in weights")["input_ids"]])
    with torch.no_grad():
        base = model(ids).logits
    set_mixture(model, [adapter], [1.0])
    with torch.no_grad():
        ours = model(ids).logits
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert not torch.allclose(ours, base, atol=1e-4)  # the adapter matters, so equality means something
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_bad_spec_rejected():
    with pytest.raises(MegamemError, match="rank"):
        LoraSpec(rank=0)


def test_int8_files_hold_int8_weights_within_one_step_of_the_original(tiny, tmp_path):
    model, _ = tiny
    spec = LoraSpec(rank=4)
    adapter = _trained_like(inject(model, list(spec.targets)), spec)
    save_adapter(adapter, tmp_path / "f32", "m")
    save_adapter(adapter, tmp_path / "i8", "m", "int8")
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "i8" / "adapter_model.safetensors"))
    assert {t.dtype for k, t in raw.items() if k.endswith(".weight")} == {torch.int8}
    back = load_adapter(tmp_path / "i8")
    for n, (a, b) in adapter.weights.items():
        # one int8 step per rank component: a row of A, a column of B
        assert ((back.weights[n][0] - a).abs() <= a.abs().amax(1, keepdim=True) / 254 + 1e-7).all()
        assert ((back.weights[n][1] - b).abs() <= b.abs().amax(0, keepdim=True) / 254 + 1e-7).all()
    f32 = load_file(str(tmp_path / "f32" / "adapter_model.safetensors"))
    nbytes = lambda d: sum(t.numel() * t.element_size() for t in d.values())  # noqa: E731
    assert nbytes(raw) < 0.3 * nbytes(f32)  # a quarter of float32 (half of bfloat16) plus the scales


def test_an_int8_store_exports_an_adapter_peft_loads_with_the_same_logits(tiny_dir, tmp_path):
    """megamem export of an int8 memory == what megamem itself computes with that memory at weight 1."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megamem import Memory

    mem = Memory(
        tmp_path / "store", model=str(tiny_dir), recipe=Recipe(epochs=1, min_tokens=0, lr=5e-2), adapter_dtype="int8"
    )
    mem.add("The Quillon ferry leaves at dawn.", id="ferry")
    assert mem.info()["adapter_dtype"] == "int8"
    model, tok = mem.load()
    ids = torch.tensor([tok("memories in weights")["input_ids"]])
    set_mixture(model, [mem.adapter("ferry")], [1.0])
    with torch.no_grad():
        ours = model(ids).logits
    set_mixture(model, [], [])
    with torch.no_grad():
        base = model(ids).logits
    folder = mem.export("ferry", tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), folder).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert not torch.allclose(ours, base, atol=1e-4)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    with pytest.raises(MegamemError, match="not an empty folder"):
        mem.export("ferry", folder)
    with pytest.raises(MegamemError, match="built with adapter_dtype"):
        Memory(tmp_path / "store", adapter_dtype="bfloat16")
