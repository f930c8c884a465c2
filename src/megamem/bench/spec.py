"""A bench method's name, parsed once: its family and the settings the name carries.

'full-l2@0.01' is full-l2 with penalty weight 0.01, 'full~3e-05' full fine-tuning at learning rate 3e-5,
'lora-l2@1~1e-04' both. The name itself (as given) stays the method's identity in config.json, metrics.jsonl
and the state folder; the spec is what the name means.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import MegamemError


@dataclass(frozen=True)
class MethodSpec:
    """A method family and the optional penalty weight ('@LAMBDA') and learning rate ('~LR') of a variant."""

    family: str
    lam: float | None = None
    lr: float | None = None

    def __str__(self) -> str:
        lam = f"@{self.lam:g}" if self.lam is not None else ""
        lr = f"~{self.lr:g}" if self.lr is not None else ""
        return self.family + lam + lr

    @classmethod
    def parse(cls, name: str) -> MethodSpec:
        """'NAME', 'NAME@LAMBDA', 'NAME~LR' or both; the numbers must be finite and non-negative."""
        family, *parts = re.split(r"(?=[@~])", name)
        settings: dict[str, float] = {}
        try:
            for part in parts:  # a setting given twice: the last one counts
                settings["lam" if part[0] == "@" else "lr"] = float(part[1:])
        except ValueError:
            raise MegamemError(f"bad method variant {name!r} (want NAME, NAME@LAMBDA, NAME~LR)") from None
        if any(not math.isfinite(x) or x < 0 for x in settings.values()):
            raise MegamemError(f"bad number in method variant {name!r}")
        return cls(family, **settings)
