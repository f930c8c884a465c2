"""The commands that check and mend a store's files: verify and repair (megamem.store.health)."""

from __future__ import annotations

import typer

from ..backend import HEALTH
from ..checks import printable_line
from .context import JsonOpt, StoreOpt, emit, require_at, say, store_path


def verify(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Check every file of the store against its checksum; list every problem (exit 1 if there is one)."""
    from ..store.health import verify as verify_store

    path = store_path(store)
    require_at(path, HEALTH, "verify")
    found = verify_store(path)
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
    fails its checksums to quarantine/ (nothing is deleted). Exit 1 if problems remain."""
    from ..store.health import repair as repair_store
    from ..store.health import verify as verify_store

    path = store_path(store)
    require_at(path, HEALTH, "repair")
    done = repair_store(path)
    left = [p for p in verify_store(path) if p.serious]

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
