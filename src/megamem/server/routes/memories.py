"""mem0's memory routes: add (an injection job), list, get, delete (one, or a user's or agent's), search.

Every route acts in the caller's namespace only: Server.scope lists the caller's memories and Server.owned finds
one by API id, answering 404 for another tenant's as for a missing one.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query

from ... import schema
from ...checks import check_metadata, check_text, check_texts
from ...errors import MegamemError
from ...train import check_fits
from ..auth import Caller, Ready
from ..errors import ApiError, invalid
from ..schemas import AddMemory, Search
from ..views import check_filters, job_json, memory_json

router = APIRouter()
Text = Annotated[str | None, Query(max_length=200)]  # a user or agent id in a query string


def add_request(body: AddMemory, srv: Ready) -> tuple[str, dict, list[str]]:
    """(the memory's API id, the job's request but its replaces, the API ids it replaces) of an add, every field
    checked as the library checks them, and every text checked to fit the model's context (a job that could
    never train is refused now)."""
    text = body.text
    if text is None and body.messages:
        text = "\n".join(m.text() for m in body.messages if m.role in ("user", "assistant") and m.text())
    try:
        text = check_text(text if text is not None else "", "text")
        paraphrases = check_texts(body.paraphrases, "paraphrases")
        # 'paraphrases' is refused even without paraphrases: memory_json reads the field back from that key
        metadata = schema.check_user_fields(check_metadata(body.metadata), "metadata", paraphrases=True)
        api = schema.check_api_id(body.id) if body.id is not None else uuid.uuid4().hex[:24]
        replaces = [schema.check_api_id(i) for i in body.replaces]
        for t in [text, *paraphrases]:
            check_fits(srv.engine.tok, srv.engine.model, t)
    except MegamemError as exc:
        raise invalid(exc) from None
    request = {
        "id": body.id,  # the client's id or None: part of what an Idempotency-Key must match
        "text": text,
        "paraphrases": paraphrases,
        "metadata": metadata,
        "user_id": body.user_id,
        "agent_id": body.agent_id,
    }
    return api, request, replaces


@router.post("/v1/memories", status_code=202)
def add_memory(
    body: AddMemory, p: Caller, srv: Ready, idempotency_key: Annotated[str | None, Header(max_length=200)] = None
) -> dict:
    """Queue a job that learns the memory; 202 with the job (the same job again for a repeated Idempotency-Key)."""
    api, fields, replaces = add_request(body, srv)
    with srv.lock:
        request = fields | {"replaces": [srv.owned(p, i).id for i in replaces]}  # the caller's own, or 404
        job, _ = srv.queue.submit(p.namespace, schema.stored_id(p.namespace, api), request, idempotency_key)
    if srv.worker is not None:
        srv.worker.wake.set()
    return job_json(job, srv.worker) | {"job_id": job.id}


@router.get("/v1/memories")
def list_memories(
    p: Caller,
    srv: Ready,
    user_id: Text = None,
    agent_id: Text = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=300)] = None,
) -> dict:
    """The caller's memories, oldest first, a page at a time (the cursor is the last one's "created|id")."""
    with srv.lock:
        recs = sorted(srv.scope(p, user_id, agent_id), key=lambda r: (r.created, r.id))
    start = 0
    if cursor:
        keys = [f"{r.created}|{r.id}" for r in recs]
        start = next((i + 1 for i, k in enumerate(keys) if k == cursor), None)
        if start is None:
            start = sum(1 for k in keys if k <= cursor)  # the cursor's memory is gone: resume after its place
    page = recs[start : start + limit]
    more = start + limit < len(recs)
    nxt = f"{page[-1].created}|{page[-1].id}" if more and page else None
    return {"results": [memory_json(r) for r in page], "next_cursor": nxt}


@router.get("/v1/memories/{memory_id}")
def get_memory(memory_id: str, p: Caller, srv: Ready) -> dict:
    """One of the caller's memories."""
    with srv.lock:
        return memory_json(srv.owned(p, memory_id))


@router.delete("/v1/memories/{memory_id}")
def delete_memory(memory_id: str, p: Caller, srv: Ready) -> dict:
    """Forget one of the caller's memories for good."""
    with srv.lock:
        rec = srv.owned(p, memory_id)
        srv.mem.forget(rec.id)
    return {"id": schema.api_id(rec), "deleted": True}


@router.delete("/v1/memories")
def delete_memories(p: Caller, srv: Ready, user_id: Text = None, agent_id: Text = None) -> dict:
    """Forget a user's or an agent's memories in the caller's namespace (one of them is required: a whole
    namespace is never deleted by accident)."""
    if user_id is None and agent_id is None:
        raise ApiError(422, "give user_id or agent_id (deleting a whole namespace takes one of them)", param="user_id")
    with srv.lock:
        gone = []
        for rec in srv.scope(p, user_id, agent_id):
            srv.mem.forget(rec.id)
            gone.append(schema.api_id(rec))
    return {"deleted": gone}


@router.post("/v1/memories/search")
def search(body: Search, p: Caller, srv: Ready) -> dict:
    """The caller's memories closest to a query (the gate's score, no softmax), narrowed like a list."""
    try:
        query = check_text(body.query, "query")
        filters = check_filters(body.filters) if body.filters is not None else None
    except MegamemError as exc:
        raise invalid(exc) from None
    with srv.lock:
        allowed = {r.id: r for r in srv.scope(p, body.user_id, body.agent_id, None, filters)}
        if not allowed:
            return {"results": []}
        ranked = srv.mem.search(query, frozenset(allowed), body.limit)
    return {"results": [memory_json(allowed[i]) | {"score": round(s, 6)} for i, s in ranked]}
