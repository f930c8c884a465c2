"""megamem: long-term memory for a language model, stored in its weights as gated LoRA adapters (MEGa)."""

from .adapters import LoraSpec
from .errors import MegamemError
from .gate import GateConfig
from .memory import Answer, Item, Memory
from .train import Recipe

__all__ = ["Answer", "GateConfig", "Item", "LoraSpec", "MegamemError", "Memory", "Recipe"]
__version__ = "0.1.0"
