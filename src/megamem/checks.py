"""Checks on user input, done before any work: memory ids, texts, metadata and numeric options.

Every check raises MegamemError with a message that names the value and the rule it broke, so the
CLI prints one `error:` line and nothing is trained or stored. Text that reaches a terminal goes
through `printable`, so even a store written by another tool cannot drive the user's terminal.

    >>> check_id("trip-2031")
    'trip-2031'
    >>> printable("bell\\x07 and \\x1b[31mred")
    'bell\\\\x07 and \\\\x1b[31mred'
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from typing import TypeVar

from .errors import MegamemError

T = TypeVar("T")
R = TypeVar("R")

MAX_ID_LENGTH = 128  # a folder name with room for the temp-folder suffix under every file system's 255 bytes
MAX_METADATA_BYTES = 64 * 1024
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# C0 controls but tab, newline and carriage return; DEL; C1 controls (0x9b is a one-byte CSI on some terminals).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def check_id(memory_id: object, what: str = "memory id") -> str:
    """A memory id: a string of 1-128 ASCII letters, digits, '-' and '_', starting with a letter or digit.

    It names a folder, so nothing that a file system or a shell could read differently ('..', '/', spaces).
    """
    if not isinstance(memory_id, str):
        raise MegamemError(f"{what} must be a string, got {type(memory_id).__name__} {_short_repr(memory_id)}")
    if len(memory_id) > MAX_ID_LENGTH:
        raise MegamemError(f"{what} is {len(memory_id)} characters long; at most {MAX_ID_LENGTH} are allowed")
    if not _ID.fullmatch(memory_id):
        raise MegamemError(
            f"{what} {_short_repr(memory_id)} may hold only ASCII letters, digits, '-' and '_' "
            "and must start with a letter or digit"
        )
    return memory_id


def check_text(text: object, what: str = "text") -> str:
    """A stripped, non-empty string without control characters (tab, newline and carriage return are fine).

    Control characters are refused rather than stored: a stored text is printed back to terminals and fed to
    the model, and neither has a use for a NUL or an escape sequence.
    """
    if not isinstance(text, str):
        raise MegamemError(f"{what} must be a string, got {type(text).__name__}")
    bad = _CONTROL.search(text)
    if bad:
        raise MegamemError(
            f"{what} holds a control character ({ascii(bad.group())} at offset {bad.start()}); "
            "only tab, newline and carriage return are allowed"
        )
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise MegamemError(f"{what} holds a lone surrogate (not valid Unicode text)")
    if "\ufffd" in text:  # so that a stored U+FFFD always means a damaged manifest row (megamem verify)
        raise MegamemError(f"{what} holds U+FFFD, the replacement character: it was mis-decoded before it got here")
    text = text.strip()
    if not text:
        raise MegamemError(f"{what} is empty")
    return text


def check_metadata(metadata: object, what: str = "metadata") -> dict:
    """A JSON object with string keys, only finite numbers, at most 64 KiB as JSON; returned as a plain copy."""
    if not isinstance(metadata, dict):
        raise MegamemError(f"{what} must be an object (a dict), got {type(metadata).__name__}")
    if any(not isinstance(k, str) for k in metadata):
        raise MegamemError(f"{what} keys must be strings")
    try:
        encoded = json.dumps(metadata, allow_nan=False, ensure_ascii=False)
    except RecursionError:
        raise MegamemError(f"{what} is nested too deeply") from None
    except (TypeError, ValueError) as exc:
        raise MegamemError(f"{what} must be plain JSON (strings, finite numbers, lists, objects): {exc}") from None
    try:
        size = len(encoded.encode("utf-8"))
    except UnicodeEncodeError:
        raise MegamemError(f"{what} holds a lone surrogate (not valid Unicode text)") from None
    if size > MAX_METADATA_BYTES:
        raise MegamemError(f"{what} is larger than {MAX_METADATA_BYTES // 1024} KiB as JSON")
    return json.loads(encoded)


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MegamemError(f"{what} must be a number, got {type(value).__name__} {_short_repr(value)}")
    try:
        return float(value)
    except OverflowError:
        raise MegamemError(f"{what} is too large, got {_short_repr(value)}") from None


def check_positive(value: float, what: str, maximum: float | None = None) -> float:
    """A finite number > 0 (and <= maximum, if given)."""
    x = _number(value, what)
    if not math.isfinite(x) or x <= 0:
        raise MegamemError(f"{what} must be a finite number above 0, got {value!r}")
    if maximum is not None and x > maximum:
        raise MegamemError(f"{what} must be at most {maximum:g}, got {value!r}")
    return value


def check_finite(value: float, what: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite number, within [minimum, maximum] where given."""
    x = _number(value, what)
    if not math.isfinite(x):
        raise MegamemError(f"{what} must be a finite number, got {value!r}")
    if minimum is not None and x < minimum:
        raise MegamemError(f"{what} must be at least {minimum:g}, got {value!r}")
    if maximum is not None and x > maximum:
        raise MegamemError(f"{what} must be at most {maximum:g}, got {value!r}")
    return value


def check_count(value: int, what: str, minimum: int = 1, maximum: int | None = 2**63 - 1) -> int:
    """An integer in [minimum, maximum] (the default maximum: what a 64-bit seed or size holds; None: no bound)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MegamemError(f"{what} must be an integer of at least {minimum}, got {_short_repr(value)}")
    if maximum is not None and value > maximum:
        raise MegamemError(f"{what} must be at most {maximum}, got {_short_repr(value)}")
    return value


def check_texts(texts: object, what: str = "paraphrases") -> list[str]:
    """A list (or tuple) of texts, each checked by `check_text`."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise MegamemError(f"{what} must be a list of strings, got {type(texts).__name__}")
    return [check_text(t, what.rstrip("s")) for t in texts]


def printable(text: str) -> str:
    """`text` with control characters (newline and tab kept) written as escapes, safe to print to a terminal."""
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)


def printable_line(text: str) -> str:
    """`printable`, with newlines escaped too: for one-line fields (ids, table cells, error messages)."""
    return printable(text).replace("\n", "\\n").replace("\t", "\\t")


def _short_repr(value: object, n: int = 60) -> str:
    r = ascii(value)
    return r if len(r) <= n else r[: n - 1] + "…"


def first_of(bad: list[str]) -> MegamemError:
    """The error for a batch with bad items: the first one's message and how many more there are."""
    return MegamemError(bad[0] + (f" (and {len(bad) - 1} more bad)" if len(bad) > 1 else ""))


def sift(things: Iterable[T], check: Callable[[int, T], R | None], keep_going: bool) -> tuple[list[R], list[str]]:
    """check(n, thing) each thing (n from 1): the results that are not None, and the message of each check that
    raised a MegamemError (keep_going; otherwise that error is raised). A batch's "all or the good ones" rule.

    >>> sift(["1", "x", "3"], lambda n, s: int(s) if s.isdigit() else check_text("", f"line {n}"), True)
    ([1, 3], ['line 2 is empty'])
    """
    kept: list[R] = []
    bad: list[str] = []
    for n, thing in enumerate(things, 1):
        try:
            out = check(n, thing)
        except MegamemError as exc:
            if not keep_going:
                raise
            bad.append(str(exc))
            continue
        if out is not None:
            kept.append(out)
    return kept, bad
