"""Learning a memory: its texts -> a frozen adapter and its keys. The one recipe behind every way a memory is
made (an add, a merge, a split, a Ray worker), so they all learn exactly alike.

    >>> learned = learn(model, tok, [["Ada Quimbleton designed the tower."]], spec, Recipe(), "embedding")
    ...                                                    # doctest: +SKIP
    >>> learned[0].adapter, learned[0].keys.shape          # doctest: +SKIP

Limits: the model must carry gated layers for the spec (inject.inject_for); several memories are trained
together in one batched forward (train.train_adapters_batched), one alone by train.train_adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .adapters import Adapter, LoraSpec
from .keys import compute_keys
from .train import Recipe, train_adapter, train_adapters_batched


class Learned(NamedTuple):
    """One learned memory: its adapter (frozen) and its keys (n_texts, d)."""

    adapter: Adapter
    keys: torch.Tensor


def learn(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    texts: list[list[str]],
    spec: LoraSpec,
    recipe: Recipe,
    key_function: str,
    on_step: Callable[[int, int, float], None] | None = None,
    key_texts: list[list[str]] | None = None,
) -> list[Learned]:
    """Learn one adapter per memory (each a list of texts: the passage and its paraphrases) and key each memory
    on its texts (or on key_texts, where a memory is found by more than it learns: a merged memory's members)."""
    if len(texts) == 1:
        adapters = [train_adapter(model, tok, texts[0], spec, recipe, on_step)]
    else:
        adapters = train_adapters_batched(model, tok, texts, spec, recipe, on_step)
    keyed = key_texts or texts
    return [Learned(a, compute_keys(key_function, k, model, tok)) for a, k in zip(adapters, keyed, strict=True)]
