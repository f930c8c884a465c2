"""Durable files: atomic writes (a reader sees the old file or the whole new one) and the writer tokens that
prove a crashed writer gone, so its leftovers may be cleared. Every file of a store is written through here."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path


# -- who wrote it: a process proven gone --------------------------------------------------------------------
def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux /proc), 0 where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[19])  # field 22; the fields after "(comm)" start at field 3
    except (OSError, ValueError, IndexError):
        return 0


def writer_token(pid: int | None = None) -> str:
    """This process as a writer: 'pid-starttime', so that a recycled pid is not mistaken for the writer."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{_start_time(pid)}"


def writer_gone(token: str) -> bool:
    """True when the process named by `token` has certainly exited (no such pid, or another start time)."""
    try:
        pid, start = (int(x) for x in token.split("-"))
    except ValueError:
        return False  # not a token megamem writes: never treated as a dead writer's
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    now = _start_time(pid)
    return start != 0 and now != 0 and now != start


# -- durable files ------------------------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """fsync one file or folder (a folder's entry list is what a rename changes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) to a temporary file beside `path` (megamem's own naming), fsync and rename: a reader sees the
    old file or the whole new one, and a failed write leaves no temporary file."""
    tmp = path.with_name(f".{path.name}.{writer_token()}.{uuid.uuid4().hex[:16]}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to `path` atomically (write_atomic)."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8"))


# -- fault injection --------------------------------------------------------------------------------------
CRASH_ENV = "MEGAMEM_CRASH_AT"  # the fault suite: SIGKILL this process at the crash point of that name
crash_hook: Callable[[str], None] | None = None  # tests: called at every crash point (may raise to interrupt)


def crash_point(name: str) -> None:
    """A step boundary of a multi-step operation (e.g. 'merge:committed'): nothing in normal use; the fault
    suite kills the process here (MEGAMEM_CRASH_AT=name) or interrupts it (crash_hook)."""
    if crash_hook is not None:
        crash_hook(name)
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
