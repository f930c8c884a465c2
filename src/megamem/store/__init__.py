"""The store: memories on disk, each file checksummed, written so that a crash never loses or halves one.

manifest.py  the SQLite manifest and one folder a memory (Store, Record): adding, forgetting, reading
files.py     atomic writes and the writer tokens that prove a crashed writer gone
cortex.py    each namespace's cortex (consolidated memories) and its record
intents.py   what a merge, split or consolidation is doing, so the next writer finishes or undoes it
health.py    verify and repair
"""

from .files import write_atomic, write_json_atomic
from .manifest import (
    BUSY_TIMEOUT_S,
    MANIFEST,
    MemoryDamaged,
    Record,
    Store,
    StoreDamaged,
    default_store_path,
)

__all__ = [
    "BUSY_TIMEOUT_S",
    "MANIFEST",
    "MemoryDamaged",
    "Record",
    "Store",
    "StoreDamaged",
    "default_store_path",
    "write_atomic",
    "write_json_atomic",
]
