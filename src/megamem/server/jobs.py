"""Injection jobs: a queue persisted in the store's SQLite, and the one worker that trains them.

A job moves queued -> running -> succeeded | failed, or to cancelled when its memory is deleted (or updated again)
before it finishes: a cancelled job is never claimed, and a worker that was training it does not commit (the
commit re-reads the job's state: Server.train). The worker claims the oldest queued job (or a running one
whose lease expired: its process died) under the write lock, with a lease it renews while it trains. The memory
the job commits carries the job's id in its metadata, so a job claimed again after a crash between the
memory's commit and the job's own update is marked succeeded without training twice. A job that keeps failing
for reasons other than its input (a crash, an I/O error) is retried up to `max_attempts` claims.

    q = JobQueue(store_path)
    job, created = q.submit("acme", "acme--m1", {"text": "..."}, idempotency_key="k1")
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .. import schema
from ..errors import MegamemError
from .db import connect, write
from .history import Event, insert

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
UNFINISHED = ("queued", "running")


class QueueFull(MegamemError):
    """Too many jobs waiting; the caller should retry after `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"the injection queue is full ({waiting} jobs waiting); retry later")
        self.retry_after = retry_after


class Cancelled(MegamemError):
    """The job was cancelled while it trained (its memory deleted, or updated again): nothing is stored."""


class Conflict(MegamemError):
    """The request names something that already exists (a memory id, an idempotency key with another body)."""


@dataclass
class Job:
    id: str
    namespace: str
    memory_id: str  # the store's id
    state: str
    attempts: int
    request: dict
    error: str | None
    created: float
    updated: float

    @classmethod
    def from_row(cls, row: tuple) -> Job:
        i, ns, mid, state, attempts, request, error, created, updated = row
        return cls(i, ns, mid, state, attempts, json.loads(request), error, created, updated)


_COLS = "id, namespace, memory_id, state, attempts, request, error, created, updated"


class JobQueue:
    """The persisted queue. One instance per thread (each holds its own SQLite connection)."""

    def __init__(self, store: Path, lease_s: float = 60.0, max_attempts: int = 3, max_waiting: int = 64) -> None:
        self.db = connect(store)
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.max_waiting = max_waiting
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def submit(
        self,
        namespace: str,
        memory_id: str,
        request: dict,
        idempotency_key: str | None = None,
        event: Event | None = None,
        supersede: bool = False,
    ) -> tuple[Job, bool]:
        """Queue a job (or return the one this idempotency key already made: created False), recording `event` in
        the same transaction. An add's memory must be new; an update (request["update"]) learns a new version of
        a stored one. supersede: cancel the memory's unfinished job instead of refusing (an update of a memory
        still being learned: only the newest text is learned)."""
        body = json.dumps(request, sort_keys=True, ensure_ascii=False)
        now = time.time()
        with write(self.db) as db:
            if idempotency_key is not None:
                sql = f"SELECT {_COLS} FROM jobs WHERE namespace = ? AND idempotency_key = ?"
                row = db.execute(sql, (namespace, idempotency_key)).fetchone()
                if row is not None:
                    job = Job.from_row(row)
                    if json.dumps(job.request, sort_keys=True, ensure_ascii=False) != body:
                        raise Conflict("this Idempotency-Key was used with a different request body")
                    return job, False
            busy = db.execute(
                "SELECT 1 FROM jobs WHERE memory_id = ? AND state IN ('queued', 'running')", (memory_id,)
            ).fetchone()
            stored = db.execute("SELECT 1 FROM memories WHERE id = ?", (memory_id,)).fetchone()
            if (busy and not supersede) or (stored and not request.get("update")):
                raise Conflict("a memory with this id already exists or is being added")
            (waiting,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()
            if waiting - bool(busy) >= self.max_waiting:
                raise QueueFull(waiting, retry_after=max(1, int(waiting * 5 / 2)))
            if busy:
                self._cancel(db, memory_id, "superseded by a newer version before it was learned", now)
            job = Job(uuid.uuid4().hex, namespace, memory_id, "queued", 0, request, None, now, now)
            db.execute(
                "INSERT INTO jobs (id, namespace, memory_id, state, attempts, idempotency_key, request, created, "
                "updated) VALUES (?, ?, ?, 'queued', 0, ?, ?, ?, ?)",
                (job.id, namespace, memory_id, idempotency_key, body, now, now),
            )
            if event is not None:
                insert(db, replace(event, job_id=job.id), now)
        return job, True

    def cancel(self, memory_id: str, why: str, event: Event | None = None) -> int:
        """Cancel a memory's unfinished and failed jobs (it is deleted), recording `event` in the same transaction;
        how many were cancelled. A worker training one stops at its next check and never commits it."""
        now = time.time()
        with write(self.db) as db:
            n = self._cancel(db, memory_id, why, now, states=("queued", "running", "failed"))
            if event is not None:
                insert(db, event, now)
        return n

    @staticmethod
    def _cancel(db, memory_id: str, why: str, now: float, states: tuple[str, ...] = UNFINISHED) -> int:
        marks = ", ".join("?" * len(states))
        cur = db.execute(
            "UPDATE jobs SET state = 'cancelled', error = CASE WHEN error IS NULL THEN ? ELSE ? || ': ' || error END, "
            f"lease_owner = NULL, lease_until = NULL, updated = ? WHERE memory_id = ? AND state IN ({marks})",
            (why, why, now, memory_id, *states),
        )
        return cur.rowcount

    def latest(self, namespace: str, memory_id: str | None = None) -> list[Job]:
        """The namespace's memories' latest jobs (or one memory's) that are queued, running or failed: the
        memories being learned, and those whose learning failed (megamem.server.pending), oldest first."""
        sql = (
            f"SELECT {_COLS} FROM jobs j WHERE namespace = ? AND state IN ('queued', 'running', 'failed') "
            "AND created = (SELECT MAX(created) FROM jobs k WHERE k.memory_id = j.memory_id)"
        )
        args: tuple = (namespace,)
        if memory_id is not None:
            sql += " AND memory_id = ?"
            args += (memory_id,)
        rows = self.db.execute(sql + " ORDER BY created, rowid", args).fetchall()
        return [Job.from_row(r) for r in rows]

    def get(self, job_id: str) -> Job | None:
        row = self.db.execute(f"SELECT {_COLS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def state(self, job_id: str) -> str | None:
        """A job's state now (None: no such job)."""
        row = self.db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def waiting(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]

    def claim(self) -> Job | None:
        """Take the oldest queued job, or a running one whose lease expired, under a new lease."""
        now = time.time()
        with write(self.db) as db:
            row = db.execute(
                f"SELECT {_COLS} FROM jobs WHERE state = 'queued' OR (state = 'running' AND lease_until < ?) "
                "ORDER BY created LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            job = Job.from_row(row)
            if self._committed(db, job):  # its memory is stored: the last claim died before saying so
                db.execute(
                    "UPDATE jobs SET state = 'succeeded', error = NULL, lease_owner = NULL, updated = ? WHERE id = ?",
                    (now, job.id),
                )
                return None
            if job.attempts >= self.max_attempts:
                db.execute(
                    "UPDATE jobs SET state = 'failed', error = ?, lease_owner = NULL, updated = ? WHERE id = ?",
                    (f"gave up after {job.attempts} attempts (the last did not finish)", now, job.id),
                )
                return None  # given up; the caller claims again on its next turn
            db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?, lease_until = ?, "
                "updated = ? WHERE id = ?",
                (self.owner, now + self.lease_s, now, job.id),
            )
        job.state, job.attempts = "running", job.attempts + 1
        return job

    @staticmethod
    def _committed(db, job: Job) -> bool:
        """Whether the job's memory is in the manifest, committed by this job (its id in the metadata)."""
        row = db.execute("SELECT metadata FROM memories WHERE id = ?", (job.memory_id,)).fetchone()
        if row is None:
            return False
        try:
            return json.loads(row[0]).get(schema.JOB) == job.id
        except (ValueError, AttributeError):
            return False

    def renew(self, job: Job) -> None:
        with write(self.db) as db:
            db.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND lease_owner = ?",
                (time.time() + self.lease_s, job.id, self.owner),
            )

    def finish(self, job: Job, error: str | None = None, retry: bool = False) -> None:
        """Mark a claimed job succeeded (error None), failed, or queued again (retry)."""
        state = "queued" if retry else "succeeded" if error is None else "failed"
        with write(self.db) as db:
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, lease_owner = NULL, lease_until = NULL, updated = ? "
                "WHERE id = ? AND lease_owner = ?",
                (state, error, time.time(), job.id, self.owner),
            )

    def requeue_expired(self) -> int:
        """At start-up: running jobs whose lease expired (their process is gone) go back to the queue."""
        with write(self.db) as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_until = NULL WHERE state = 'running' "
                "AND lease_until < ?",
                (time.time(),),
            )
        return cur.rowcount

    def close(self) -> None:
        self.db.close()


class Worker(threading.Thread):
    """The training worker: claims jobs one at a time and runs `train(job, progress)` for each.

    train returns normally when the job's memory is committed; a MegamemError is the input's fault (failed, not
    retried); anything else is retried up to the queue's max_attempts. progress(step, total) is recorded in
    memory for GET /v1/jobs (a database write per training step would cost more than it tells).
    """

    def __init__(self, store: Path, train: Callable[[Job, Callable[[int, int], None]], None], **queue_kw) -> None:
        super().__init__(name="megamem-trainer", daemon=True)
        self.store = Path(store)
        self.train = train
        self.queue_kw = queue_kw
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.progress: dict[str, tuple[int, int]] = {}
        self.busy = False
        self.failures = 0

    def run(self) -> None:
        queue = JobQueue(self.store, **self.queue_kw)
        queue.requeue_expired()
        try:
            while not self.stop.is_set():
                try:
                    job = queue.claim()
                except MegamemError:
                    job = None
                if job is None:
                    self.wake.wait(1.0)
                    self.wake.clear()
                    continue
                self._run_one(queue, job)
        finally:
            queue.close()

    def _run_one(self, queue: JobQueue, job: Job) -> None:
        self.busy = True
        last_renew = time.time()

        def progress(step: int, total: int) -> None:
            nonlocal last_renew
            self.progress[job.id] = (step, total)
            if time.time() - last_renew > queue.lease_s / 3:
                queue.renew(job)
                last_renew = time.time()

        try:
            self.train(job, progress)
        except MegamemError as exc:
            queue.finish(job, str(exc))
        except Exception as exc:  # a crash of the training itself: retried while attempts remain
            self.failures += 1
            traceback.print_exc()
            queue.finish(job, f"{type(exc).__name__}: {exc}", retry=job.attempts < queue.max_attempts)
        else:
            queue.finish(job)
        finally:
            self.progress.pop(job.id, None)
            self.busy = False
