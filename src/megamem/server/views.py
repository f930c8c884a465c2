"""What the routes show of stored things (mem0's memory shape, the job shape) and the metadata filters they take.

A memory is shown as its namespace sees it: its API id (schema.api_id), the owner's metadata only
(schema.user_metadata), its paraphrases and user/agent lifted out of the metadata where megamem keeps them, and
its state (megamem.server.pending: learning, ready or failed, with the job's error when failed).
"""

from __future__ import annotations

from .. import schema
from ..errors import MegamemError
from .jobs import Job, Worker
from .pending import FAILED, LEARNING, READY, Pending, View, state_of

FILTER_OPS = ("eq", "in", "contains")
# the memory's state a job's status implies (a succeeded job's memory is ready while it is stored)
MEMORY_STATES = {"queued": LEARNING, "running": LEARNING, "failed": FAILED, "cancelled": "deleted"}


def memory_json(rec: View) -> dict:
    """A memory in mem0's shape, as its owner sees it: stored, or being learned (its job's request)."""
    meta = schema.user_metadata(rec.metadata)
    paraphrases = meta.pop(schema.PARAPHRASES, [])
    out = {
        "id": schema.api_id(rec),
        "memory": rec.text,
        "paraphrases": paraphrases,
        "metadata": meta,
        "user_id": rec.metadata.get(schema.USER),
        "agent_id": rec.metadata.get(schema.AGENT),
        "created_at": rec.created,
        "state": state_of(rec),
    }
    if isinstance(rec, Pending) and rec.state == FAILED:
        out["error"] = rec.job.error
    return out


def job_json(job: Job, worker: Worker | None, stored: bool = True) -> dict:
    """An injection job: its state, the training progress while it runs (the worker keeps that in memory), and
    the state of the memory it learns (stored: whether the memory is stored now, for a succeeded job)."""
    step, total = worker.progress.get(job.id, (0, 0)) if worker is not None else (0, 0)
    return {
        "job_id": job.id,
        "memory_id": job.memory_id.split(schema.SEPARATOR, 1)[-1]
        if job.namespace != schema.DEFAULT_NAMESPACE
        else job.memory_id,
        "status": job.state,
        "memory_state": MEMORY_STATES.get(job.state, READY if stored else "deleted"),
        "attempts": job.attempts,
        "error": job.error,
        "progress": {"step": step, "total": total} if job.state == "running" else None,
        "created_at": job.created,
        "updated_at": job.updated,
    }


def matches_filters(metadata: dict, filters: dict) -> bool:
    """AND of every field's condition: a value (eq), {"eq": v}, {"in": [...]} or {"contains": v} (a substring of
    a string, or an element of a list)."""
    for field, cond in filters.items():
        have = metadata.get(field)
        if isinstance(cond, dict) and len(cond) == 1 and next(iter(cond)) in FILTER_OPS:
            ((op, value),) = cond.items()
        else:
            op, value = "eq", cond
        if op == "eq" and have != value:
            return False
        if op == "in" and (not isinstance(value, list) or have not in value):
            return False
        if op == "contains" and not (
            (isinstance(have, str) and isinstance(value, str) and value in have)
            or (isinstance(have, list) and value in have)
        ):
            return False
    return True


def check_filters(filters: object) -> dict:
    """Filters as given, or an error naming the field whose condition is malformed (checked before any
    memory is read, so a typo is an error rather than an empty result)."""
    if not isinstance(filters, dict):
        raise MegamemError("filters must be an object of field -> condition")
    for field, cond in filters.items():
        if isinstance(cond, dict) and (len(cond) != 1 or next(iter(cond)) not in FILTER_OPS):
            raise MegamemError(f"filter on {field!r}: a condition is a value or one of eq / in / contains")
        if isinstance(cond, dict) and "in" in cond and not isinstance(cond["in"], list):
            raise MegamemError(f"filter on {field!r}: 'in' takes a list")
    return filters
