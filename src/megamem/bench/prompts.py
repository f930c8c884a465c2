"""The bench's one conversation builder: every prompt a method answers (recall, QA, irag, RAG) is built here.

The prompts are the product's (`generate.recall_prompt`, `qa_prompt`, `with_context`), so the bench measures what
`megamem ask` asks.
"""

from __future__ import annotations

from typing import Literal

from ..generate import qa_prompt, recall_prompt, with_context
from .infer import Turns


def conversation(
    mode: Literal["recall", "qa"], question: str, passages: list[str] | None = None, recall: str | None = None
) -> Turns:
    """The conversation that asks `question` in `mode` ('recall' or 'qa'): with `passages` in context (rag), or
    for QA after the method's own `recall` of the question (irag: recall, then answer, in one conversation)."""
    prompt = recall_prompt(question) if mode == "recall" else qa_prompt(question)
    if passages:
        prompt = with_context(prompt, passages)
    if recall is not None:
        return [("user", recall_prompt(question)), ("assistant", recall), ("user", prompt)]
    return [("user", prompt)]
