"""Greedy decoding with a mixture active: the library's decoder of the answer pipeline (megamem.answer)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .answer import Step
from .inject import clear, set_mixture
from .model import chat_ids


@torch.no_grad()
def greedy(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
) -> torch.Tensor:
    """Greedy decoding (the paper's) of a batch of prompts; returns prompts + continuations."""
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )


@torch.no_grad()
def complete(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, turns: list[tuple[str, str]], max_new_tokens: int
) -> str:
    """Greedy continuation of a conversation ending in a user turn, with whatever mixture is active."""
    ids = torch.tensor([chat_ids(tok, turns, generation_prompt=True)])
    out = greedy(model, tok, ids, torch.ones_like(ids), max_new_tokens)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def decode(model: PreTrainedModel, tok: PreTrainedTokenizerBase, step: Step) -> str:
    """The library's decoder for the answer pipeline (megamem.answer): one step's turns, continued greedily with
    its mixture set in the model's gated layers (and cleared after)."""
    set_mixture(model, list(step.mixture.adapters), list(step.mixture.weights))
    try:
        return complete(model, tok, step.turns, step.max_tokens)
    finally:
        clear(model)
