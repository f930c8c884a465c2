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
    """A frozen Linear plus the adapters attached to it and their mixture; it owns that state.

    attach() stacks the adapters in use into one low-rank path; mix() sets their weights, one per adapter (N,)
    for the whole batch or one row per batch row (B, N), so every row of a batch can carry its own gated
    mixture (the server decodes many questions at once this way); detach() returns the layer to W0.
    train_one() / train_rows() put trainable weights in place for learning (train.py).
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        # (A (R, in), B (out, R)): the attached adapters' A_i stacked and B_i side by side, R = the sum of ranks.
        # A plain tuple, not attributes: trainable tensors assigned to a Module would register as its parameters.
        self.path: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ranks: list[int] = []  # each attached adapter's rank, in order
        self.scalings: torch.Tensor | None = None  # (N,): each adapter's LoRA scaling
        self.s: torch.Tensor | None = None  # (R,) or (B, 1, R): weight x scaling, repeated over each rank
        self.dropout: nn.Module = nn.Identity()
        # training only (train.train_adapters_batched): one adapter per batch row, (A_i, B_i) pairs + row -> pair
        self.per_row: tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int], float] | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def attach(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], scalings: list[float]) -> None:
        """Stack adapters (A_i (r_i, in), B_i (out, r_i)) as the layer's path, in the base weight's dtype; no
        mixture yet (mix() sets it)."""
        self.detach()
        if not pairs:
            return
        dtype = self.base.weight.dtype
        self.path = (
            torch.cat([a for a, _ in pairs], dim=0).to(dtype),
            torch.cat([b for _, b in pairs], dim=1).to(dtype),
        )
        self.ranks = [a.shape[0] for a, _ in pairs]
        self.scalings = torch.tensor(scalings, dtype=torch.float32)

    def mix(self, weights: torch.Tensor) -> None:
        """Set the attached adapters' gate weights: (N,) for every row, or (B, N) one mixture per batch row."""
        if self.path is None:
            return
        w = weights.float() * self.scalings  # (N,) or (B, N)
        s = torch.repeat_interleave(w, torch.tensor(self.ranks), dim=-1).to(self.path[0].dtype)  # (R,) or (B, R)
        self.s = s if s.dim() == 1 else s[:, None, :]  # (B, 1, R) broadcasts over the sequence

    def detach(self) -> None:
        """Back to the frozen base function W0·x."""
        self.path = self.s = self.scalings = None
        self.ranks = []
        self.per_row = None
        self.dropout = nn.Identity()

    def train_one(self, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float) -> None:
        """One trainable adapter (a, b) on the path at weight 1, with LoRA dropout (train.train_adapter)."""
        self.detach()
        self.path, self.ranks = (a, b), [a.shape[0]]
        self.s = torch.full((a.shape[0],), scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def train_rows(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]], rows: list[int], scaling: float, dropout: float
    ) -> None:
        """Row i of the next batch goes through adapter pairs[rows[i]] only (train.train_adapters_batched)."""
        self.per_row = (pairs, rows, scaling)
        if not isinstance(self.dropout, nn.Dropout) or self.dropout.p != dropout:
            self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.per_row is not None:
            return y + self._per_row(x)
        if self.path is None or self.s is None:
            return y
        a, b = self.path
        # (B, T, in) -> (B, T, R) scaled per rank row (and per batch row) -> (B, T, out)
        return y + F.linear(F.linear(self.dropout(x), a) * self.s, b)

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
        m.detach()


def set_mixture(model: nn.Module, adapters: list, weights: list[float] | torch.Tensor) -> None:
    """Activate a weighted mixture of adapters (objects with `.weights` {name: (A, B)} and `.scaling`).

    `weights`: one per adapter (N,), or one row per batch row (B, N) so each row has its own mixture.
    Adapters no row weighs are left out (the cost follows the gate's top-k, not the store's size); a layer
    no adapter touches gets no path; no adapter or no weight at all is the base model.
    """
    clear(model)
    w = torch.as_tensor(weights, dtype=torch.float32) if len(adapters) else torch.zeros(0)
    if w.numel() == 0:
        return
    used = (w != 0).reshape(-1, len(adapters)).any(dim=0).nonzero().flatten().tolist()
    if not used:
        return
    for name, layer in gated_layers(model).items():
        here = [i for i in used if name in adapters[i].weights]
        if here:
            layer.attach([adapters[i].weights[name] for i in here], [adapters[i].scaling for i in here])
            layer.mix(w[..., here])
