"""What a memory backend is: the interface MEGa's `Memory` and the MemoryLLM store both implement, and the
capabilities each one has, so that the CLI and the server ask a store what it can do instead of its class.

    >>> from megamem.memory import Memory
    >>> MEGA in Memory.capabilities and FORGET in Memory.capabilities
    True

Capabilities (a backend lists the ones it has in `capabilities`):

    forget       one memory can be removed for good
    replace      a memory can replace older ones (the gate prefers it)
    paraphrases  extra training texts beside a memory's own
    gate         a gate routes each question to some memories (gate settings, modes rag and mega+rag)
    export       a memory's adapter can be written as a PEFT folder
    merge        memories can be merged and split (megamem.ops.merge)
    consolidate  memories can be consolidated into a cortex (megamem.ops.consolidate)
    health       `verify` and `repair` check and mend the store
    serve        `megamem serve` can serve the store
    cluster      memories can be learned on a Ray cluster (megamem.ops.distributed)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from .errors import MegamemError
from .items import Answer, Item

MEGA = "mega"  # MEGa's gated adapters (megamem.memory.Memory)
MEMORYLLM = "memoryllm"  # MemoryLLM's latent pool (megamem.memoryllm.store.PoolMemory)
KINDS = (MEGA, MEMORYLLM)

FORGET, REPLACE, PARAPHRASES, GATE, EXPORT = "forget", "replace", "paraphrases", "gate", "export"
MERGE, CONSOLIDATE, HEALTH, SERVE, CLUSTER = "merge", "consolidate", "health", "serve", "cluster"
CAPABILITIES = (FORGET, REPLACE, PARAPHRASES, GATE, EXPORT, MERGE, CONSOLIDATE, HEALTH, SERVE, CLUSTER)


@runtime_checkable
class Backend(Protocol):
    """A store of memories and the model that answers from them: what every interface may call on any backend."""

    kind: str  # one of KINDS
    capabilities: frozenset[str]  # what it can do beyond the calls below (CAPABILITIES)
    modes: tuple[str, ...]  # the answer modes it takes (megamem.answer.MODES or a subset)
    default_mode: str
    path: Path
    model_name: str
    warnings: list[str]  # what it skipped or noticed, newest last

    def check(self, items: list[Item]) -> tuple[list[Item], list[str]]:
        """Cleaned copies of the good items and one message a bad one, before anything loads."""

    def add_many(self, items: list[Item], **progress) -> list:
        """Learn or write items, each committed as soon as it is done. progress: on_step (step, total, loss),
        on_memory (index, count), on_stored (record) (megamem.items' OnStep, OnMemory, OnStored), keep_going
        (skip bad items instead of refusing the batch)."""

    def ask(
        self, question: str, mode: str = ..., gate=None, max_new_tokens: int | None = None, use_memory: bool = True
    ) -> Answer: ...

    def list(self) -> Iterable: ...

    def show(self, memory_id: str): ...

    def forget(self, memory_id: str): ...

    def info(self) -> dict: ...


def supports(backend: Backend | type, capability: str) -> bool:
    """Whether a backend (or backend class) has a capability."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}")
    return capability in backend.capabilities


def require(backend: Backend | type, capability: str, doing: str) -> None:
    """An error saying that `doing` (a command or call) needs a capability this backend lacks."""
    if not supports(backend, capability):
        where = f" ({backend.path})" if isinstance(getattr(backend, "path", None), Path) else ""
        has = ", ".join(sorted(backend.capabilities))
        raise MegamemError(
            f"{doing} works on stores that have {capability!r}; this is a {backend.kind} store{where}, which "
            + (f"has only {has}" if has else "has none of the optional capabilities")
            + " (docs/memoryllm.md)"
        )
