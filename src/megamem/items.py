"""What goes into a store and what comes out: an Item to add, an Answer to a question (every backend's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict

# progress callbacks every backend's add takes: a step learned (step, total, loss), a memory begun (index, count),
# a memory stored (its record)
OnStep = Callable[[int, int, float], None] | None
OnMemory = Callable[[int, int], None] | None
OnStored = Callable[[object], None] | None


class Progress(TypedDict, total=False):
    """The progress callbacks, as keyword arguments (Memory.learn(**progress))."""

    on_step: OnStep
    on_memory: OnMemory
    on_stored: OnStored


@dataclass
class Answer:
    """What `ask` returns: the answer text, the gate (memory id -> weight, heaviest first), and for
    recall/irag the reconstruction."""

    question: str
    mode: str
    text: str
    gate: list[tuple[str, float]] = field(default_factory=list)
    recall: str | None = None

    def to_dict(self) -> dict:
        return {
            "question": self.question,
            "mode": self.mode,
            "answer": self.text,
            "gate": [{"id": i, "weight": w} for i, w in self.gate],
            "recall": self.recall,
        }


@dataclass
class Item:
    """One memory to add: its text, optional paraphrases (extra training texts and keys), metadata, id.

    origin names where it came from ("notes.jsonl line 3") in error messages. replaces: older memories this
    one corrects or updates; while it is stored the gate leaves them out (forget it and they come back)."""

    text: str
    paraphrases: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    id: str | None = None
    origin: str | None = None
    replaces: list[str] = field(default_factory=list)  # ids of older memories this one supersedes
    # megamem's own metadata (keys 'megamem.*': the server's namespace, user and job), set by megamem's callers
    # and never taken from user input, which may not use those keys
    reserved: dict = field(default_factory=dict)
