"""The server's tables (API keys, jobs, memory events) live in the store's own SQLite manifest, beside the memories.

Why there and not in a file of their own: a job's state and the memory it commits are then in one database,
under one WAL and one write lock, so "committed once" can be checked in one place, and `megamem verify`
already watches that file. Each thread opens its own connection (sqlite3 connections are not shared).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from ..errors import MegamemError
from ..store import BUSY_TIMEOUT_S, MANIFEST

TABLES = (
    """CREATE TABLE IF NOT EXISTS api_keys (
    hash TEXT PRIMARY KEY,
    prefix TEXT NOT NULL,
    namespace TEXT NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0,
    name TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    memory_id TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL,
    idempotency_key TEXT,
    request TEXT NOT NULL,
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (namespace, idempotency_key)",
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created)",
    # a memory's latest job (what the memory views read: megamem.server.pending)
    "CREATE INDEX IF NOT EXISTS jobs_memory ON jobs (memory_id, created)",
    # what happened to each memory, for its history (megamem.server.history): ADD / UPDATE / DELETE
    """CREATE TABLE IF NOT EXISTS memory_events (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    memory_id TEXT NOT NULL,
    event TEXT NOT NULL,
    old_memory TEXT,
    new_memory TEXT,
    job_id TEXT,
    user_id TEXT,
    input TEXT,
    metadata TEXT,
    created REAL NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS memory_events_memory ON memory_events (memory_id, created)",
)


def connect(store: Path) -> sqlite3.Connection:
    """A connection to the store's manifest with the server's tables made if missing (WAL, FULL sync)."""
    manifest = Path(store) / MANIFEST
    if not manifest.is_file():
        raise MegamemError(f"no megamem store at {store}")
    db = sqlite3.connect(
        f"file:{quote(str(manifest.resolve()))}?mode=rw",
        uri=True,
        timeout=BUSY_TIMEOUT_S,
        isolation_level=None,
        check_same_thread=False,
    )
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    with write(db):
        for sql in TABLES:
            db.execute(sql)
    return db


@contextmanager
def write(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction under SQLite's write lock; "database is locked" becomes a retry, then a clear
    error (never the raw sqlite message)."""
    for attempt in range(5):
        try:
            db.execute("BEGIN IMMEDIATE")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise MegamemError(f"the store's database failed: {exc}") from None
            time.sleep(0.05 * 2**attempt)
    else:
        raise MegamemError("the store's database stayed busy (another writer holds it); try again")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
