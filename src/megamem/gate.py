"""The gate: turn memory scores into mixture weights, with the option of using no memory at all.

A memory's score is the max over its keys of dot(q, k) or cos(q, k), computed by megamem.index.KeyIndex
(the one scorer, for the product and the bench alike). A null memory, the base model itself, takes part
with the store's calibrated null score s0 (megamem.calibration): memories scoring below s0 take no part,
and the others share g = softmax(beta * [s_1, ..., s_k, s0]) with it, so the base model keeps the weight
g0 and W = W0 + sum_i g_i B_i A_i. A question about nothing stored thus gets exactly the base model, and
one barely about a memory gets a blend. The top-k (renormalised) and an explicit threshold apply on top.
Without a null score (null_rate None, or an empty store) this is the paper's gate.
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
    and only a bounded k keeps answering cost flat in the number of memories (docs/performance.md).
    null_rate: the null memory's score is the store's calibrated score that queries about nothing stored
    reach this share of the time (docs/tuning.md, "no memory"); None: no null memory (the paper's gate)."""

    similarity: str = "cosine"
    beta: float = 50.0
    top_k: int | None = 4
    threshold: float | None = None
    null_rate: float | None = 0.01
    # lexical: weight of BM25 (scaled by the best candidate's) added to the cosine of the top LEXICAL_CANDIDATES
    # memories that pass the null memory (megamem.lexical); 0: off. Routing at 10^4-10^5 memories: docs/scale.md
    lexical: float = 0.0
    # names: weight of the share of the question's names and numbers a candidate's texts contain, added to the
    # same candidates (megamem.lexical coverage); 0: off
    names: float = 0.0

    def __post_init__(self) -> None:
        if self.similarity not in ("cosine", "dot"):
            raise MegamemError(f"similarity must be 'cosine' or 'dot', got {self.similarity!r}")
        if self.top_k is not None:
            check_count(self.top_k, "top-k", maximum=None)  # more than the store holds: all of them
        check_finite(self.beta, "gate beta", minimum=0, maximum=1e6)  # beta * score must stay finite
        if self.threshold is not None:
            check_finite(self.threshold, "gate threshold")
        check_finite(self.lexical, "gate lexical weight", minimum=0, maximum=10)
        check_finite(self.names, "gate names weight", minimum=0, maximum=10)
        if self.null_rate is not None:
            check_finite(self.null_rate, "gate null rate", minimum=0)
            if self.null_rate >= 1:
                raise MegamemError(f"gate null rate must be below 1, got {self.null_rate!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def gate_weights(scores: torch.Tensor, cfg: GateConfig, null_score: float | None = None) -> torch.Tensor:
    """(n,) mixture weights from memory scores: softmax(beta*s) with top-k and threshold applied, and with the
    null memory at `null_score` (if given) both excluding lower scores and keeping its share of the softmax
    (so the weights sum to less than 1; the rest is the base model's)."""
    allowed = torch.isfinite(scores)
    if cfg.threshold is not None:
        allowed &= scores >= cfg.threshold
    if null_score is not None:
        allowed &= scores >= null_score
    if cfg.top_k is not None and int(allowed.sum()) > cfg.top_k:
        masked = torch.where(allowed, scores, torch.tensor(float("-inf")))
        keep = torch.zeros_like(allowed)
        keep[masked.topk(cfg.top_k).indices] = True
        allowed &= keep
    if not bool(allowed.any()):
        return torch.zeros_like(scores)
    logits = torch.where(allowed, cfg.beta * scores.float(), torch.tensor(float("-inf")))
    if null_score is None:
        return torch.softmax(logits, dim=0)
    with_null = torch.softmax(torch.cat([logits, torch.tensor([cfg.beta * float(null_score)])]), dim=0)
    return with_null[:-1]
