"""A memory's history: what the server did to it (ADD, UPDATE, DELETE), with the text before and after and when,
in the `memory_events` table of the store's manifest (megamem.server.db).

Every route that changes a memory records its event: the adds and updates in the same transaction as their job
(JobQueue.submit: a replayed Idempotency-Key records nothing twice), the deletes in the transaction that cancels
the memory's unfinished jobs (Server.delete). Events are the server's: the CLI and the Python API record none.

    insert(db, Event("acme", "acme--m1", "ADD", None, "The bridge is teal."))
    events(db, "acme", "acme--m1")   # [{"event": "ADD", "new_memory": "The bridge is teal.", ...}]
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .. import schema

EVENTS = ("ADD", "UPDATE", "DELETE")


@dataclass(frozen=True)
class Event:
    """One change to a memory (memory_id is the store's id). input: the messages it came from ([] for a text)."""

    namespace: str
    memory_id: str
    event: str
    old_memory: str | None
    new_memory: str | None
    job_id: str | None = None
    user_id: str | None = None
    input: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


def iso(t: float) -> str:
    """A time as the store writes its own (UTC ISO 8601 with microseconds), so the two sort and compare alike."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds")


def insert(db: sqlite3.Connection, e: Event, now: float | None = None) -> None:
    """Record an event (inside the caller's write transaction: it commits with whatever caused it)."""
    if e.event not in EVENTS:
        raise ValueError(f"unknown memory event {e.event!r}")
    db.execute(
        "INSERT INTO memory_events (id, namespace, memory_id, event, old_memory, new_memory, job_id, user_id, input, "
        "metadata, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            uuid.uuid4().hex,
            e.namespace,
            e.memory_id,
            e.event,
            e.old_memory,
            e.new_memory,
            e.job_id,
            e.user_id,
            json.dumps(e.input, ensure_ascii=False),
            json.dumps(e.metadata, ensure_ascii=False),
            time.time() if now is None else now,
        ),
    )


def events(db: sqlite3.Connection, namespace: str, memory_id: str) -> list[dict]:
    """A namespace's memory's events, oldest first, in mem0's history shape (memory_id as the namespace sees it)."""
    rows = db.execute(
        "SELECT id, event, old_memory, new_memory, job_id, user_id, input, metadata, created FROM memory_events "
        "WHERE namespace = ? AND memory_id = ? ORDER BY created, rowid",
        (namespace, memory_id),
    ).fetchall()
    api = memory_id.split(schema.SEPARATOR, 1)[-1] if namespace != schema.DEFAULT_NAMESPACE else memory_id
    return [
        {
            "id": i,
            "memory_id": api,
            "event": event,
            "old_memory": old,
            "new_memory": new,
            "job_id": job,
            "user_id": user,
            "input": json.loads(inp) if inp else [],
            "metadata": json.loads(meta) if meta else {},
            "created_at": iso(created),
            "updated_at": iso(created),
        }
        for i, event, old, new, job, user, inp, meta, created in rows
    ]
