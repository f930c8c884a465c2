"""The gate: turn memory scores into mixture weights.

A memory's score is the max over its keys of dot(q, k) or cos(q, k), computed by megamem.index.KeyIndex
(the one scorer, for the product and the bench alike); g = softmax(beta * score),
optionally over the top-k scores only (renormalised), and optionally only over memories whose score
reaches a threshold (none reaching it: every weight is 0 and the base model answers alone).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .checks import check_count, check_finite
from .errors import MegamemError


@dataclass(frozen=True)
class GateConfig:
    """similarity: 'cosine' or 'dot'; beta: softmax inverse temperature; top_k None = dense (the paper's).

    Default top_k 4: at beta 50 the dense gate already puts 0.999 on the right memory (docs/tuning.md),
    and only a bounded k keeps answering cost flat in the number of memories (docs/performance.md)."""

    similarity: str = "cosine"
    beta: float = 50.0
    top_k: int | None = 4
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.similarity not in ("cosine", "dot"):
            raise MegamemError(f"similarity must be 'cosine' or 'dot', got {self.similarity!r}")
        if self.top_k is not None:
            check_count(self.top_k, "top-k")
        check_finite(self.beta, "gate beta", minimum=0)
        if self.threshold is not None:
            check_finite(self.threshold, "gate threshold")

    def to_dict(self) -> dict:
        return asdict(self)


def gate_weights(scores: torch.Tensor, cfg: GateConfig) -> torch.Tensor:
    """(n,) mixture weights from memory scores: softmax(beta*s), top-k and threshold applied."""
    allowed = torch.isfinite(scores)
    if cfg.threshold is not None:
        allowed &= scores >= cfg.threshold
    if cfg.top_k is not None and int(allowed.sum()) > cfg.top_k:
        masked = torch.where(allowed, scores, torch.tensor(float("-inf")))
        keep = torch.zeros_like(allowed)
        keep[masked.topk(cfg.top_k).indices] = True
        allowed &= keep
    if not bool(allowed.any()):
        return torch.zeros_like(scores)
    logits = torch.where(allowed, cfg.beta * scores, torch.tensor(float("-inf")))
    return torch.softmax(logits, dim=0)
