"""megamem: long-term memory for a language model, stored in its weights as gated LoRA adapters (MEGa).

The public names load on first use (PEP 562), so that `megamem.entry` starts without importing torch: a
Ctrl-C while the command line starts up then ends in one clear line, not a traceback.
"""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata
from typing import TYPE_CHECKING

__all__ = ["Answer", "GateConfig", "Item", "LoraSpec", "MegamemError", "Memory", "Recipe"]
try:  # the one place the version is kept: the package's metadata (pyproject.toml)
    __version__ = _metadata.version("megamem")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_WHERE = {
    "Answer": "items",
    "GateConfig": "gate",
    "Item": "items",
    "LoraSpec": "adapters",
    "MegamemError": "errors",
    "Memory": "memory",
    "Recipe": "train",
}

if TYPE_CHECKING:
    from .adapters import LoraSpec
    from .errors import MegamemError
    from .gate import GateConfig
    from .memory import Answer, Item, Memory
    from .train import Recipe


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'megamem' has no attribute {name!r}")
