"""Evaluation data in the MEGa release's JSON-lines layout (see ../shared/data/README.md).

Each record: {"passage": str, "qa"?: [{"question", "answer"}], "paraphrases"?: [str], "theme"|"character"?}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MegamemError


@dataclass
class Record:
    """One memory of a benchmark partition."""

    passage: str
    qa: list[tuple[str, str]] = field(default_factory=list)
    paraphrases: list[str] = field(default_factory=list)
    name: str = ""


def partition_files(folder: Path | str) -> list[Path]:
    files = sorted(Path(folder).glob("*.jsonl"))
    if not files:
        raise MegamemError(f"no .jsonl partition files in {folder}")
    return files


def load_partition(folder: Path | str, index: int, limit: int | None = None) -> list[Record]:
    """The `index`-th partition file of `folder` (sorted by name), first `limit` records, in file order."""
    files = partition_files(folder)
    if not 0 <= index < len(files):
        raise MegamemError(f"partition {index} out of range: {folder} has {len(files)}")
    out = []
    for n, line in enumerate(files[index].read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(
                Record(
                    passage=d["passage"],
                    qa=[(q["question"], q["answer"]) for q in d.get("qa", [])],
                    paraphrases=list(d.get("paraphrases", [])),
                    name=d.get("theme") or d.get("character", ""),
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise MegamemError(f"{files[index]} line {n}: not a benchmark record ({exc})") from None
        if limit is not None and len(out) >= limit:
            break
    return out
