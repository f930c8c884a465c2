"""Gated LoRA layers: wrap a model's Linear modules (by name, as PEFT does) with a low-rank side path.

Every wrapped layer computes W0·x + B·(s ⊙ A·x), where A stacks the rows of every active adapter's
A_i, B stacks the columns of their B_i, and s holds each adapter's gate weight times its LoRA
scaling, repeated over its rank. That is exactly W0·x + Σ g_i·scale_i·B_i·A_i·x, done as one
batched low-rank product and never by merging anything into W0.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MegamemError
from .model import num_layers


class GatedLoRALinear(nn.Module):
    """A frozen Linear plus one low-rank path (A, B, s) that holds all the adapters in use."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.path: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.dropout: nn.Module = nn.Identity()
        # training only (train.train_adapters_batched): one adapter per batch row, (A_i, B_i) pairs + row -> pair
        self.per_row: tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int], float] | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.per_row is not None:
            return y + self._per_row(x)
        if self.path is None:
            return y
        a, b, s = self.path
        return y + F.linear(F.linear(self.dropout(x), a) * s, b)

    def _per_row(self, x: torch.Tensor) -> torch.Tensor:
        """Row i of the batch goes through its own adapter only: scale * B_j (A_j x_i) with j = rows[i].

        Only the adapters named in `rows` enter the graph, so the others get no gradient at all."""
        pairs, rows, scale = self.per_row
        a = torch.stack([pairs[j][0] for j in rows])  # (batch, r, in)
        b = torch.stack([pairs[j][1] for j in rows])  # (batch, out, r)
        h = torch.bmm(self.dropout(x), a.transpose(1, 2)) * scale
        return torch.bmm(h, b.transpose(1, 2))


def layer_index(name: str) -> int | None:
    """The decoder-layer number in a module name such as 'model.layers.12.mlp.up_proj'."""
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def matches(name: str, targets: tuple[str, ...] | list[str], layers: tuple[int, ...] | list[int] | None) -> bool:
    """Whether a module name is one of `targets` (matched on its last parts, as PEFT does) in `layers`."""
    if not any(name == t or name.endswith("." + t) for t in targets):
        return False
    return layers is None or layer_index(name) in layers


def inject(model: nn.Module, targets: list[str], layers: list[int] | None = None) -> dict[str, GatedLoRALinear]:
    """Wrap every Linear named by `targets` (optionally only in `layers`) in a GatedLoRALinear; idempotent.

    Returns the gated layers that match, by the name of the Linear they wrap.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not name.endswith(".base") and matches(name, targets, layers):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, GatedLoRALinear(module))
    wanted = {n: m for n, m in gated_layers(model).items() if matches(n, targets, layers)}
    if not wanted:
        raise MegamemError(f"no Linear module of the model matches the target modules {list(targets)}")
    return wanted


def inject_for(model: nn.Module, spec) -> dict[str, GatedLoRALinear]:
    """inject() exactly the layers an adapter of `spec` (a LoraSpec) uses on this model: its target modules in
    its layers (the top `spec.upper` share of the decoder layers unless it lists them)."""
    spec = spec.resolved(num_layers(model))
    return inject(model, list(spec.targets), list(spec.layers) if spec.layers is not None else None)


def gated_layers(model: nn.Module) -> dict[str, GatedLoRALinear]:
    """Every gated layer in the model, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GatedLoRALinear)}


def clear(model: nn.Module) -> None:
    """Switch every low-rank path off: the model computes exactly its base function again."""
    for m in gated_layers(model).values():
        m.path = None
        m.per_row = None
        m.dropout = nn.Identity()


def set_mixture(model: nn.Module, adapters: list, weights: list[float]) -> None:
    """Activate a weighted mixture of adapters (objects with `.weights` {name: (A, B)} and `.scaling`).

    Adapters with weight 0 are left out; a layer no adapter touches gets no path.
    """
    clear(model)
    live = [(a, float(w)) for a, w in zip(adapters, weights, strict=True) if w != 0.0]
    if not live:
        return
    for name, layer in gated_layers(model).items():
        parts = [(a.weights[name], w * a.scaling) for a, w in live if name in a.weights]
        if not parts:
            continue
        ref = layer.base.weight
        a_cat = torch.cat([ab[0] for ab, _ in parts], dim=0).to(ref.dtype)
        b_cat = torch.cat([ab[1] for ab, _ in parts], dim=1).to(ref.dtype)
        s = torch.cat([torch.full((ab[0].shape[0],), c, dtype=ref.dtype) for ab, c in parts])
        layer.path = (a_cat, b_cat, s)
