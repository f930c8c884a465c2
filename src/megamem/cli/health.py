"""The commands that check and mend a store's files: verify and repair (megamem.store.health for a MEGa store,
megamem.memoryllm.health for a MemoryLLM one)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import typer

from ..backend import HEALTH, MEMORYLLM
from ..checks import printable_line
from .context import (
    JsonOpt,
    StoreOpt,
    backend_at,
    emit,
    on_step_of,
    open_store,
    progress,
    require_at,
    say,
    store_path,
)


def health_of(path: Path) -> ModuleType:
    """The module whose verify(path) and repair(path) check and mend the store at `path`, by its kind."""
    if backend_at(path).kind == MEMORYLLM:
        from ..memoryllm import health
    else:
        from ..store import health
    return health


def verify(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Check every file of the store against its checksum; list every problem (exit 1 if there is one)."""
    path = store_path(store)
    require_at(path, HEALTH, "verify")
    found = health_of(path).verify(path)
    serious = [p for p in found if p.serious]

    def human() -> None:
        """Every problem on its own line, then the count (or ok)."""
        for p in found:
            say(f"{p.kind:<11} {printable_line(p.path)}: {printable_line(p.message)}")
        say(f"{len(serious)} problem(s) in {path}" if serious else f"ok: {path}")

    emit(as_json, {"store": str(path), "ok": not serious, "problems": [p.to_dict() for p in found]}, human)
    if serious:
        raise typer.Exit(1)


def repair(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Mend the store: rebuild a damaged manifest from the memory folders, re-list whole memories, move what
    fails its checksums to quarantine/ (nothing is deleted); a MemoryLLM store's pool is re-written from its
    stored texts. Exit 1 if problems remain."""
    path = store_path(store)
    require_at(path, HEALTH, "repair")
    health = health_of(path)
    displaced: dict = {}
    done = health.repair(path, displaced) if backend_at(path).kind != MEMORYLLM else health.repair(path)
    done += _bring_back(path, displaced, as_json)
    left = [p for p in health.verify(path) if p.serious]

    def human() -> None:
        """What repair did, what it could not mend, then the count (or ok)."""
        for line in done:
            say(printable_line(line))
        for p in left:
            say(f"still: {p.kind} {printable_line(p.path)}: {printable_line(p.message)}")
        say(f"{len(left)} problem(s) left" if left else f"ok: {path}")

    emit(as_json, {"store": str(path), "done": done, "problems": [p.to_dict() for p in left]}, human)
    if left:
        raise typer.Exit(1)


def _bring_back(path: Path, displaced: dict, as_json: bool) -> list[str]:
    """Learn again the memories a damaged cortex held (repair set it aside; their adapters are long gone), so they
    are back in the gate: one line each namespace."""
    from ..ops.consolidate import bring_back

    lines = []
    mem = open_store(path, create=False) if any(displaced.values()) else None
    for namespace, memories in displaced.items():
        if not memories:
            continue
        with progress(as_json) as bar:
            task = bar.add_task(f"learning {len(memories)} memories again", total=None, loss=0.0)
            back = bring_back(mem, memories, on_step=on_step_of(bar, task))
        lines.append(
            f"the {namespace} cortex's {len(back)} of {len(memories)} memories are back in the gate, learned again "
            "from its record"
        )
    lines += [f"warning: {w}" for w in (mem.warnings if mem is not None else [])]
    return lines
