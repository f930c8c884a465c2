"""Reading memories to add from files: plain text (one memory a file) and JSON lines (many)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MegamemError
from .memory import Item, clean_text


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


def read_jsonl(path: Path) -> list[Item]:
    """Items from a JSON-lines file: {"text" or "passage": str, "paraphrases"?: [str], "metadata"?: {}, "id"?: str}.

    Any malformed line is an error naming its line number; blank lines are skipped.
    """
    items = []
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MegamemError(f"{path} line {n}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise MegamemError(f"{path} line {n}: expected a JSON object")
        text = obj.get("text", obj.get("passage"))
        if text is None:
            raise MegamemError(f'{path} line {n}: no "text" (or "passage") field')
        paras = obj.get("paraphrases", [])
        meta = obj.get("metadata", {})
        if not isinstance(paras, list):
            raise MegamemError(f'{path} line {n}: "paraphrases" must be a list of strings')
        if not isinstance(meta, dict):
            raise MegamemError(f'{path} line {n}: "metadata" must be an object')
        try:
            item = Item(clean_text(text, "text"), [clean_text(p, "paraphrase") for p in paras], meta, obj.get("id"))
        except MegamemError as exc:
            raise MegamemError(f"{path} line {n}: {exc}") from None
        items.append(item)
    if not items:
        raise MegamemError(f"{path} holds no memories")
    return items
