"""Batched inference for the bench: generation, answer log-probs and last-token logits, many prompts at once.

Each row of a batch may carry its own gate: row b computes W0·x + Σ_i w[b, i]·s_i·B_i·A_i·x, the same
sum `inject.set_mixture` builds for one question, with the gate weights broadcast per row. That lets a
whole step's questions run as a few batched calls instead of one `generate` per question.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..generate import greedy
from ..inject import clear, set_mixture
from ..model import chat_ids

Turns = list[tuple[str, str]]


def set_rows(model: PreTrainedModel, adapters: list, weights: torch.Tensor | None) -> None:
    """Activate a per-row mixture: `weights` is (batch, len(adapters)); None or no adapters = base model."""
    set_mixture(model, adapters if weights is not None else [], weights if weights is not None else [])


def _chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    convs: list[Turns],
    max_new_tokens: int,
    adapters: list | None = None,
    weights: torch.Tensor | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to conversations ending in a user turn, left-padded batches sorted by length."""
    ids = [chat_ids(tok, c, generation_prompt=True) for c in convs]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    try:
        for chunk in _chunks(order, batch_size):
            width = max(len(ids[i]) for i in chunk)
            x = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, i in enumerate(chunk):
                x[r, width - len(ids[i]) :] = torch.tensor(ids[i])
                mask[r, width - len(ids[i]) :] = 1
            set_rows(model, adapters or [], weights[chunk] if weights is not None else None)
            y = greedy(model, tok, x, mask, max_new_tokens)
            for r, i in enumerate(chunk):
                out[i] = tok.decode(y[r, width:], skip_special_tokens=True).strip()
    finally:
        clear(model)
    return out


def _right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    x = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(x)
    for r, s in enumerate(seqs):
        x[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    return x, mask


def _hidden(model: PreTrainedModel, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states: the LM head is applied only where logits are needed (vocab is big)."""
    return model.get_decoder()(input_ids=x, attention_mask=mask).last_hidden_state


def _head(model: PreTrainedModel, h: torch.Tensor) -> torch.Tensor:
    """Float logits of hidden states through the model's output embedding."""
    return model.get_output_embeddings()(h).float()


@torch.no_grad()
def answer_logprobs(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    convs: list[Turns],
    answers: list[str],
    adapters: list | None = None,
    weights: torch.Tensor | None = None,
    batch_size: int = 16,
) -> list[float]:
    """Teacher-forced log p(answer | conversation) summed over the answer's tokens, with each row's gate."""
    seqs, spans = [], []
    for c, a in zip(convs, answers, strict=True):
        prefix = chat_ids(tok, c, generation_prompt=True)
        target = tok(a, add_special_tokens=False)["input_ids"]
        seqs.append(prefix + target)
        spans.append((len(prefix), len(prefix) + len(target)))
    out = [0.0] * len(seqs)
    try:
        for chunk in _chunks(list(range(len(seqs))), batch_size):
            x, mask = _right_pad([seqs[i] for i in chunk], tok.pad_token_id)
            set_rows(model, adapters or [], weights[chunk] if weights is not None else None)
            hidden = _hidden(model, x, mask)
            for r, i in enumerate(chunk):
                a, b = spans[i]
                logp = torch.log_softmax(_head(model, hidden[r, a - 1 : b - 1]), dim=-1)
                out[i] = float(logp.gather(-1, x[r, a:b, None]).sum())
    finally:
        clear(model)
    return out


@torch.no_grad()
def last_logits(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    seqs: list[list[int]],
    adapters: list | None = None,
    weights: torch.Tensor | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """(n, vocab) next-token logits after each token sequence (multiple-choice scoring)."""
    rows = []
    try:
        for chunk in _chunks(list(range(len(seqs))), batch_size):
            x, mask = _right_pad([seqs[i] for i in chunk], tok.pad_token_id)
            set_rows(model, adapters or [], weights[chunk] if weights is not None else None)
            last = mask.sum(dim=1) - 1
            rows.append(_head(model, _hidden(model, x, mask)[torch.arange(len(chunk)), last]))
    finally:
        clear(model)
    return torch.cat(rows) if rows else torch.zeros(0)


@torch.no_grad()
def token_logprobs(
    model: PreTrainedModel,
    seqs: list[list[int]],
    pad_id: int,
    adapters: list | None = None,
    weights: torch.Tensor | None = None,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """Per sequence, (len-1, vocab) next-token log-probs over its real tokens (for the KL probe)."""
    out: list[torch.Tensor] = [torch.zeros(0)] * len(seqs)
    try:
        for chunk in _chunks(list(range(len(seqs))), batch_size):
            x, mask = _right_pad([seqs[i] for i in chunk], pad_id)
            set_rows(model, adapters or [], weights[chunk] if weights is not None else None)
            logp = torch.log_softmax(model(input_ids=x, attention_mask=mask).logits.float(), dim=-1)
            for r, i in enumerate(chunk):
                out[i] = logp[r, : len(seqs[i]) - 1]
    finally:
        clear(model)
    return out
