"""The run log: metrics.jsonl, one row per method x step x memory, then the 'step' row that closes the step.

Several bench commands (processes) may fill one run folder; its files are read and written under one lock.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import missing_extra

try:
    from filelock import FileLock
except ModuleNotFoundError as exc:
    raise missing_extra(exc) from None


def read_rows(path: Path) -> list[dict]:
    """metrics.jsonl rows; a torn last line (killed mid-write) is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def closed_steps(rows: list[dict], partition: int, method: str) -> set[int]:
    """Steps of a method whose 'step' row was written (the step finished)."""
    return {r["step"] for r in rows if r["kind"] == "step" and r["partition"] == partition and r["method"] == method}


def drop_open_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Rewrite metrics.jsonl without the rows of steps that never closed (a run killed mid-step)."""
    closed = {(r["partition"], r["method"], r["step"]) for r in rows if r["kind"] == "step"}
    keep = [r for r in rows if (r["partition"], r["method"], r["step"]) in closed]
    if len(keep) != len(rows) or (path.is_file() and len(path.read_text().splitlines()) != len(rows)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
        tmp.replace(path)
    return keep


def folder_lock(out: Path) -> FileLock:
    """The run folder's lock: several bench commands (processes) may fill one folder with different methods;
    config.json, metrics.jsonl and the report are read and written under it."""
    out.mkdir(parents=True, exist_ok=True)
    return FileLock(str(out / ".lock"))


def read_closed_rows(out: Path) -> list[dict]:
    """The folder's rows, without those of steps that never closed (dropped from the file too)."""
    path = out / "metrics.jsonl"
    with folder_lock(out):
        return drop_open_rows(path, read_rows(path))


def append_rows(path: Path, rows: list[dict]) -> None:
    with folder_lock(path.parent), open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
