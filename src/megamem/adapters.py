"""One memory's LoRA adapter: its shape (LoraSpec), its weights, and PEFT-format files on disk.

Files are PEFT's own (adapter_config.json + adapter_model.safetensors), so
`peft.PeftModel.from_pretrained(base, folder)` loads any single memory.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .checks import check_count, check_finite
from .errors import MegamemError

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSpec:
    """Where and how large an adapter is. Defaults: see docs/tuning.md for the sweep behind them."""

    targets: tuple[str, ...] = ("up_proj", "down_proj")
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.05
    rslora: bool = False
    layers: tuple[int, ...] | None = None  # explicit decoder layers; None: the top `upper` share of them
    upper: float = 0.5  # share of the decoder layers, from the last one down, that carry adapters (1 = all)

    def __post_init__(self) -> None:
        check_count(self.rank, "LoRA rank", maximum=65536)
        check_finite(self.alpha, "LoRA alpha")
        check_finite(self.dropout, "LoRA dropout", minimum=0, maximum=0.99)
        if not isinstance(self.targets, (tuple, list)) or not all(isinstance(t, str) and t for t in self.targets):
            raise MegamemError(f"LoRA targets must be module names, got {self.targets!r}")
        if not self.targets:
            raise MegamemError("LoRA needs at least one target module")
        check_finite(self.upper, "LoRA upper share of layers")
        if not 0 < self.upper <= 1:
            raise MegamemError(f"LoRA upper share of layers must be in (0, 1], got {self.upper}")
        if self.layers is not None and (
            not isinstance(self.layers, (tuple, list))
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)
        ):
            raise MegamemError(f"LoRA layers must be layer numbers, got {self.layers!r}")

    def resolved(self, n_layers: int) -> LoraSpec:
        """This spec with `layers` made explicit for a model of `n_layers` decoder layers."""
        if self.layers is not None or self.upper >= 1:
            return self
        k = max(1, round(self.upper * n_layers))
        return replace(self, layers=tuple(range(n_layers - k, n_layers)))

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LoraSpec:
        d = dict(d)
        d["targets"] = tuple(d["targets"])
        d.setdefault("upper", 1.0)  # stores made before `upper` existed put adapters on every layer
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        return cls(**d)


@dataclass
class Adapter:
    """Low-rank weights {module name: (A (r, in), B (out, r))} and the spec that shaped them."""

    spec: LoraSpec
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.spec.scaling

    def num_params(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.weights.values())


def new_adapter(layers: dict[str, nn.Module], spec: LoraSpec, generator: torch.Generator) -> Adapter:
    """Fresh trainable weights with PEFT's initialisation: A Kaiming-uniform, B zero (so it starts as a no-op)."""
    weights = {}
    for name, layer in layers.items():
        a = torch.empty(spec.rank, layer.in_features)
        bound = 1.0 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
        a.uniform_(-bound, bound, generator=generator)
        b = torch.zeros(layer.out_features, spec.rank)
        weights[name] = (nn.Parameter(a), nn.Parameter(b))
    return Adapter(spec, weights)


def _peft_config(spec: LoraSpec, base_model: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "target_modules": list(spec.targets),
        "layers_to_transform": list(spec.layers) if spec.layers is not None else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }


INT8 = "int8"  # a storage dtype that is not a torch dtype: int8 weights with one fp32 scale per rank component
_SCALE = "_scale"  # suffix of an int8 tensor's scales: "...lora_A.weight_scale"


def quantize_int8(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scales): symmetric absmax over `dim`, so each slice along the other axis (one rank
    component: a row of A (r, in), a column of B (out, r)) keeps its own scale. t ~= values * scales.

        >>> q, s = quantize_int8(torch.tensor([[0.5, -1.0], [2.0, 0.0]]), dim=1)
        >>> (q * s).tolist()
        [[0.5, -1.0], [2.0, 0.0]]
    """
    scale = t.float().abs().amax(dim=dim, keepdim=True).clamp(min=1e-12) / 127.0
    return (t.float() / scale).round().clamp(-127, 127).to(torch.int8), scale


def save_adapter(adapter: Adapter, folder: Path, base_model: str, dtype: torch.dtype | str = torch.float32) -> str:
    """Write the adapter in PEFT's format into `folder`; return the sha256 of its weights file.

    dtype INT8 ("int8") stores int8 weights and their scales (half the bytes of bfloat16; recall and QA
    unchanged, docs/performance.md section 4): megamem reads it; for PEFT, write it again in a float dtype
    (`megamem export ID --out DIR`, or save_adapter(load_adapter(folder), out, base_model))."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in adapter.weights.items():
        for part, t, dim in (("lora_A", a, 1), ("lora_B", b, 0)):
            key = f"{_PREFIX}{name}.{part}.weight"
            if dtype == INT8:
                tensors[key], tensors[key + _SCALE] = quantize_int8(t.detach(), dim)
            else:
                tensors[key] = t.detach().to(dtype).contiguous()
    weights_path = folder / "adapter_model.safetensors"
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(_peft_config(adapter.spec, base_model), indent=2))
    return file_sha256(weights_path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_adapter(folder: Path, checksum: str | None = None) -> Adapter:
    """Read a PEFT-format adapter; if `checksum` is given, a file that does not match it is an error."""
    weights_path = folder / "adapter_model.safetensors"
    config_path = folder / "adapter_config.json"
    if not weights_path.is_file() or not config_path.is_file():
        raise MegamemError(f"adapter files missing in {folder}")
    if checksum is not None and file_sha256(weights_path) != checksum:
        raise MegamemError(f"adapter file {weights_path} is corrupted (checksum mismatch)")
    cfg = json.loads(config_path.read_text())
    layers = cfg.get("layers_to_transform")
    spec = LoraSpec(
        targets=tuple(cfg["target_modules"]),
        rank=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        rslora=bool(cfg.get("use_rslora", False)),
        layers=tuple(layers) if layers is not None else None,
        upper=LoraSpec.upper if layers is not None else 1.0,  # no layer list: every layer
    )
    try:
        raw = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types on a damaged header
        raise MegamemError(f"adapter file {weights_path} is unreadable: {exc}") from exc

    def value(key: str) -> torch.Tensor:  # a float tensor, int8 ones times their scales
        t = raw[key]
        return t.float() * raw[key + _SCALE] if t.dtype == torch.int8 else t.float()

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for key in raw:
            if key.endswith(".lora_A.weight"):
                name = key[len(_PREFIX) : -len(".lora_A.weight")]
                weights[name] = (value(key), value(f"{_PREFIX}{name}.lora_B.weight"))
    except KeyError as exc:
        raise MegamemError(f"adapter file {weights_path} lacks the tensor {exc}") from None
    return Adapter(spec, weights)
