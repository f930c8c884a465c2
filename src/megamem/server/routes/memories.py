"""megamem's memory routes: add (an injection job), list, get, delete (one, or a user's or agent's), search.

Every route acts in the caller's namespace only: Server.scope lists the caller's memories and Server.view finds
one by API id, answering 404 for another tenant's as for a missing one. A memory answers from the moment it is
added: list, get and search show it while its job learns it (megamem.server.pending), each with its state. Adds
and deletes record the memory's history (megamem.server.history), which mem0's history route reads.
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
from ..history import Event
from ..pending import View, scores
from ..runtime import Server
from ..schemas import AddMemory, Search
from ..tenants import Principal
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
    sid = schema.stored_id(p.namespace, api)
    messages = [m.model_dump(include={"role", "content"}) for m in body.messages or []] if body.text is None else []
    with srv.lock:
        request = fields | {"replaces": [srv.owned(p, i).id for i in replaces]}  # the caller's own, or 404
        event = added(p, sid, request, messages)
        job, _ = srv.queue.submit(p.namespace, sid, request, idempotency_key, event)
    if srv.worker is not None:
        srv.worker.wake.set()
    return job_json(job, srv.worker) | {"job_id": job.id}


def added(p: Principal, sid: str, request: dict, messages: list[dict]) -> Event:
    """The ADD event of an add (recorded with its job: JobQueue.submit)."""
    meta = request["metadata"]
    return Event(p.namespace, sid, "ADD", None, request["text"], None, request.get("user_id"), messages, meta)


@router.get("/v1/memories")
def list_memories(
    p: Caller,
    srv: Ready,
    user_id: Text = None,
    agent_id: Text = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=300)] = None,
) -> dict:
    """The caller's memories, oldest first, a page at a time (the cursor is the last one's "created|id"): stored
    ones, those being learned and those whose learning failed, each with its state."""
    with srv.lock:
        recs = sorted(srv.scope(p, user_id, agent_id, pending=True, failed=True), key=lambda r: (r.created, r.id))
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
    """One of the caller's memories (stored, being learned, or failed)."""
    with srv.lock:
        return memory_json(srv.view(p, memory_id))


@router.delete("/v1/memories/{memory_id}")
def delete_memory(memory_id: str, p: Caller, srv: Ready) -> dict:
    """Forget one of the caller's memories for good (one being learned too: its job is cancelled)."""
    with srv.lock:
        rec = srv.view(p, memory_id)
        srv.delete(p, rec)
    return {"id": schema.api_id(rec), "deleted": True}


@router.delete("/v1/memories")
def delete_memories(p: Caller, srv: Ready, user_id: Text = None, agent_id: Text = None) -> dict:
    """Forget a user's or an agent's memories in the caller's namespace (one of them is required: a whole
    namespace is never deleted by accident)."""
    if user_id is None and agent_id is None:
        raise ApiError(422, "give user_id or agent_id (deleting a whole namespace takes one of them)", param="user_id")
    with srv.lock:
        gone = []
        for rec in srv.scope(p, user_id, agent_id, pending=True, failed=True):
            srv.delete(p, rec)
            gone.append(schema.api_id(rec))
    return {"deleted": gone}


@router.post("/v1/memories/search")
def search(body: Search, p: Caller, srv: Ready) -> dict:
    """The caller's memories closest to a query (the gate's score, no softmax), narrowed like a list; memories
    being learned take part from the moment they are added."""
    try:
        query = check_text(body.query, "query")
        filters = check_filters(body.filters) if body.filters is not None else None
    except MegamemError as exc:
        raise invalid(exc) from None
    with srv.lock:
        scope = srv.scope(p, body.user_id, body.agent_id, None, filters, pending=True)
        ranked = ranked_memories(srv, query, scope, body.limit)
    return {"results": [memory_json(r) | {"score": round(s, 6)} for r, s in ranked]}


def ranked_memories(srv: Server, query: str, scope: list[View], limit: int) -> list[tuple[View, float]]:
    """The `limit` memories of a scope closest to a query by the gate's score, best first: the stored ones by
    Memory.search (the recency rule leaves out those a newer one replaces, a memory being learned included), those
    being learned by the same score on the keys they will have (pending.scores). Call under the lock."""
    listed, learning = srv.split_learning(scope)
    stored = {r.id: r for r in listed}
    out: list[tuple[View, float]] = []
    if stored:
        out += [(stored[i], s) for i, s in srv.mem.search(query, frozenset(stored), limit)]
    if learning:
        keys = srv.learning_keys.get(srv.mem, learning)
        out += zip(learning, scores(srv.mem, query, keys, srv.mem.gate.similarity), strict=True)
    return sorted(out, key=lambda rs: -rs[1])[:limit]
