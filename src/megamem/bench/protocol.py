"""The bench's pinned training protocol, in a module of its own so that the command line's help can name its
rank without loading the bench's methods (megamem.bench.methods uses it)."""

from __future__ import annotations

from ..adapters import LoraSpec
from ..train import PAPER_RECIPE

# The paper's protocol, re-tuned for the default model (docs/tuning.md): adapters on every layer's MLP, rank
# 32, 10 epochs over the passage and all its paraphrases, batch 2. The bench keeps it fixed whatever the
# product's faster defaults (Recipe(), LoraSpec(); docs/performance.md) are, so runs stay comparable.
PROTOCOL_LORA = LoraSpec(rank=32, alpha=32.0, dropout=0.05, upper=1.0)
PROTOCOL_RECIPE = PAPER_RECIPE
