"""The job route: an injection job's state and progress, and its memory's state, for the namespace that submitted it."""

from __future__ import annotations

from fastapi import APIRouter

from ..auth import Caller, Ready
from ..errors import not_found
from ..views import job_json

router = APIRouter()


@router.get("/v1/jobs/{job_id}")
def get_job(job_id: str, p: Caller, srv: Ready) -> dict:
    """A job of the caller's namespace (another namespace's is a 404, as a missing one)."""
    with srv.lock:
        job = srv.queue.get(job_id[:64])
        stored = job is not None and srv.mem.store.get(job.memory_id, missing_ok=True) is not None
    if job is None or job.namespace != p.namespace:
        raise not_found("job", job_id)
    return job_json(job, srv.worker, stored)
