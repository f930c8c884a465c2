"""The bench's one conversation builder: every prompt a method answers (recall, QA, irag, RAG) is built here.

The gated methods' conversations are the answer pipeline's own steps (megamem.answer.plan), so the bench measures
what `megamem ask` asks; the RAG baseline is the paper's: the passages before the mode's prompt.
"""

from __future__ import annotations

from typing import Literal

from ..answer import Mixture, plan, qa_prompt, recall_prompt, with_context
from .infer import Turns


def conversation(
    mode: Literal["recall", "qa"], question: str, passages: list[str] | None = None, recall: str | None = None
) -> Turns:
    """The conversation that asks `question` in `mode` ('recall' or 'qa'): with `passages` in context (rag), or
    for QA after the method's own `recall` of the question (irag: recall, then answer, in one conversation)."""
    if passages:
        return [("user", with_context(recall_prompt(question) if mode == "recall" else qa_prompt(question), passages))]
    steps = plan(question, "irag" if recall is not None else mode, Mixture())
    step = next(steps)
    return (steps.send(recall) if recall is not None else step).turns
