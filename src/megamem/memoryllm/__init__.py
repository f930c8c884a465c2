"""MemoryLLM (Wang et al., ICML 2024, arXiv 2402.04624): a fixed-size latent memory pool inside every layer."""

from .model import MemoryConfig, MemoryLLM
from .pool import Pool

__all__ = ["MemoryConfig", "MemoryLLM", "Pool"]
