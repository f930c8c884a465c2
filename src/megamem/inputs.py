"""Reading memories to add from files: plain text (one memory a file) and JSON lines (many)."""

from __future__ import annotations

import json
from pathlib import Path

from .checks import check_id, check_metadata, check_text, check_texts, sift
from .errors import MegamemError
from .items import Item


def read_text_file(path: Path) -> str:
    """A file's UTF-8 text; unreadable or non-UTF-8 files are a clear error."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise MegamemError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MegamemError(f"{path} is not UTF-8 text (bad byte at offset {exc.start})") from exc


def _item(obj: object, where: str) -> Item:
    """One JSONL line's memory, every field checked (types, id, text, metadata); errors start with `where`."""
    if not isinstance(obj, dict):
        raise MegamemError(f"{where}: expected a JSON object")
    text = obj.get("text", obj.get("passage"))
    if text is None:
        raise MegamemError(f'{where}: no "text" (or "passage") field')
    paras = obj.get("paraphrases", [])
    if not isinstance(paras, list):
        raise MegamemError(f'{where}: "paraphrases" must be a list of strings')
    memory_id = obj.get("id")
    replaces = obj.get("replaces", [])
    replaces = [replaces] if isinstance(replaces, str) else replaces
    if not isinstance(replaces, list):
        raise MegamemError(f'{where}: "replaces" must be a memory id or a list of them')
    try:
        return Item(
            check_text(text, "text"),
            check_texts(paras, "paraphrases"),
            check_metadata(obj.get("metadata", {})),
            None if memory_id is None else check_id(memory_id, "id"),
            where,
            [check_id(r, "replaces id") for r in replaces],
        )
    except MegamemError as exc:
        raise MegamemError(f"{where}: {exc}") from None


def read_jsonl(path: Path, keep_going: bool = False) -> tuple[list[Item], list[str]]:
    """Items from a JSON-lines file: {"text" or "passage": str, "paraphrases"?: [str], "metadata"?: {}, "id"?: str,
    "replaces"?: id or [ids]}.

    Every line is checked before anything is returned; blank lines are skipped. A bad line (malformed JSON, a
    wrong type, a bad or repeated id) is an error naming its line number, or with keep_going one message in
    the second list while the good lines are returned.
    """
    first_use: dict[str, str] = {}
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise MegamemError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def parse(n: int, line_bytes: bytes) -> Item | None:
        where = f"{path} line {n}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MegamemError(f"{where}: not UTF-8 text (bad byte at column {exc.start + 1})") from None
        if not line.strip():
            return None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MegamemError(f"{where}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise MegamemError(f"{where}: JSON nested too deeply") from None
        item = _item(obj, where)
        if item.id is not None:
            if item.id in first_use:
                raise MegamemError(f"{where}: id {item.id!r} is used twice (also by {first_use[item.id]})")
            first_use[item.id] = where
        return item

    # JSON lines are separated by "\n" alone: U+2028 or U+0085 inside a line are text, not line ends
    items, bad = sift(raw.split(b"\n"), parse, keep_going)
    if not items:
        raise MegamemError(f"{path} holds no memories" if not bad else f"{path} holds no good memory: {bad[0]}")
    return items, bad
