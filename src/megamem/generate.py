"""Gated generation: the paper's prompts for each mode and greedy decoding with a mixture active."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .checks import check_count
from .errors import MegamemError
from .inject import clear, set_mixture
from .model import chat_ids

MODES = ("qa", "recall", "irag", "rag", "mega+rag")
DEFAULT_MODE = "mega+rag"  # the best answers on held-out data (docs/results.md); "qa" is the paper's QA mode
# qa / recall / irag: the paper's three modes, from the adapters alone. rag: the heaviest gated memory's stored text
# in context, no adapter. mega+rag: both, the adapters mixed and that text in context (PRAG, arXiv 2501.15915).
RECALL_SUFFIX = " Reconstruct the entire story that is related to the above question."
QA_SUFFIX = " Answer should be no more than one sentence."
# mega+rag mixes the adapters at this share of their gate weights: at full weight they pull the answer towards
# reciting the passage's opening, which the text in context already gives; at 0.3 the context leads and the
# adapters help (wiki partitions 0-1, 300 questions: docs/results.md, "QA against plain RAG")
MEGA_RAG_SCALE = 0.3


def recall_prompt(question: str) -> str:
    return question + RECALL_SUFFIX


def qa_prompt(question: str) -> str:
    return question + QA_SUFFIX


def with_context(prompt: str, passages: list[str]) -> str:
    """A RAG user turn: the passages, then the question prompt (the bench's RAG baseline and the rag modes)."""
    ctx = "\n\n".join(passages)
    return f"Context:\n{ctx}\n\n{prompt}"


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


def check_mode(mode: str) -> str:
    """One of MODES, or an error naming them."""
    if mode not in MODES:
        raise MegamemError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def answer(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    question: str,
    mode: str,
    adapters: list,
    weights: list[float],
    max_new_tokens: int | None = None,
    passages: list[str] | None = None,
    always: list | None = None,
) -> tuple[str, str | None]:
    """Answer `question` in `mode` with the adapters mixed at `weights`; returns (answer, recall or None).

    irag is the paper's two-turn form: the model first reconstructs the related story, then answers
    the QA prompt with that reconstruction in the conversation; one gate serves both turns. rag and
    mega+rag put `passages` (the gated memories' texts, heaviest first) in the QA turn; rag without
    the adapters, mega+rag with them at MEGA_RAG_SCALE of their weights. max_new_tokens caps each turn
    (default: 64 for an answer, 256 for a recall). always: adapters mixed at weight 1 in every mode, beside
    the gated ones (the store's cortex: megamem.consolidate).
    """
    check_mode(mode)
    if max_new_tokens is not None:
        check_count(max_new_tokens, "max new tokens")
    qa_tokens = 64 if max_new_tokens is None else max_new_tokens
    scale = MEGA_RAG_SCALE if mode == "mega+rag" else 1.0
    fixed = list(always or [])
    gated, gated_w = ([], []) if mode == "rag" else (list(adapters), [w * scale for w in weights])
    set_mixture(model, fixed + gated, [1.0] * len(fixed) + gated_w)
    try:
        if mode in ("rag", "mega+rag"):
            prompt = with_context(qa_prompt(question), passages) if passages else qa_prompt(question)
            return complete(model, tok, [("user", prompt)], qa_tokens), None
        if mode == "qa":
            return complete(model, tok, [("user", qa_prompt(question))], qa_tokens), None
        recall = complete(
            model, tok, [("user", recall_prompt(question))], 256 if max_new_tokens is None else max_new_tokens
        )
        if mode == "recall":
            return recall, recall
        turns = [("user", recall_prompt(question)), ("assistant", recall), ("user", qa_prompt(question))]
        return complete(model, tok, turns, qa_tokens), recall
    finally:
        clear(model)
