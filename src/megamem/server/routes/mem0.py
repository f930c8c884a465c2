"""mem0's hosted API, as mem0ai's `MemoryClient(api_key=K, host=URL)` calls it (mem0ai 2.2.1, pinned in the dev
extra; its source is the reference), beside megamem's own /v1/memories routes, with the trailing slashes it sends:

    GET    /v1/ping/                      the client's constructor checks its key here (`Token KEY`: auth.caller)
    POST   /v3/memories/add/              add: messages, user_id / agent_id / run_id (top level or in filters), metadata
    POST   /v3/memories/search/           search: query, filters, top_k, threshold, fields
    POST   /v3/memories/?page=&page_size= get_all: filters -> {count, next, previous, results}
    GET    /v1/memories/{id}/             get
    PUT    /v1/memories/{id}/             update: text and/or metadata, learned as a new version under the same id
    DELETE /v1/memories/{id}/             delete
    DELETE /v1/memories/?user_id=&agent_id=&run_id=&filters=   delete_all (one condition at least)
    GET    /v1/memories/{id}/history/     history: its ADD / UPDATE / DELETE events, old and new text, times

What differs from hosted mem0 (docs/server.md says it too): an add stores the conversation's text (its user and
assistant turns joined) as one memory and learns it into an adapter; there is no LLM fact extraction (`infer:
true` is refused), so no ADD/UPDATE/DELETE decisions against older memories. A memory answers the moment it is
added (megamem.server.pending), so an add's answer already names the memory, with `state: "learning"` and the
job that learns it (hosted mem0 answers an event id to poll). Options of mem0's pipeline that megamem has no
counterpart for (app_id, categories, custom instructions, timestamps, expiry, reranking, keyword search, ...)
are refused with a 422 naming the field, never ignored. Every route acts in the caller's namespace: another
tenant's memory is a 404, as a missing one.

Filters (search, get_all, delete_all): a field's condition is a value (equals), "*" (present), or an object of
operators eq, ne, in, nin, gt, gte, lt, lte, contains, icontains (several are ANDed); fields are user_id,
agent_id, run_id, created_at, updated_at (ISO text, compared as text), `metadata` (an object of conditions on
the memory's metadata) or any other name (a metadata field); AND / OR take a list of filters, NOT one filter or
a list (none may hold).
"""

from __future__ import annotations

import ast
import hashlib
import json
import uuid
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query
from fastapi import Request as HttpRequest

from ... import schema
from ...checks import check_metadata, check_text
from ...errors import MegamemError
from ...train import check_fits
from .. import history
from ..auth import Caller, Ready
from ..errors import ApiError, invalid, not_found
from ..history import Event
from ..pending import Pending, View
from ..runtime import Server
from ..schemas import Mem0Add, Mem0List, Mem0Search, Mem0Update, Message
from ..tenants import Principal
from ..views import memory_json
from .memories import ranked_memories

router = APIRouter(tags=["mem0"])
ENTITIES = ("user_id", "agent_id", "run_id")
ENTITY_KEYS = {"user_id": schema.USER, "agent_id": schema.AGENT, "run_id": schema.RUN}
OPS = ("eq", "ne", "in", "nin", "gt", "gte", "lt", "lte", "contains", "icontains")
LOGIC = ("AND", "OR", "NOT")
FILTER_DEPTH = 8  # nesting of AND / OR / NOT: deeper is refused (a filter is a query, not a program)
FILTER_TERMS = 256  # conditions in one filter
MAX_FILTER_QUERY = 10_000  # characters of a `filters` query parameter (delete_all)
# mem0's options that megamem has nothing for, and why (the refusal's message)
UNSUPPORTED = {
    "app_id": "megamem scopes memories by user_id, agent_id and run_id (and the key's namespace), not by app",
    "custom_categories": "megamem does not categorise memories (no LLM in the add)",
    "categories": "megamem does not categorise memories (no LLM in the add)",
    "custom_instructions": "megamem stores the text as given (no LLM fact extraction)",
    "agent_custom_instructions": "megamem stores the text as given (no LLM fact extraction)",
    "structured_data_schema": "megamem stores the text as given (no LLM fact extraction)",
    "includes": "megamem stores the text as given (no LLM fact extraction)",
    "excludes": "megamem stores the text as given (no LLM fact extraction)",
    "timestamp": "a memory's time is when the server stored it",
    "expiration_date": "megamem memories do not expire",
    "start_date": "filter on created_at instead (e.g. {'created_at': {'gte': '2026-01-01'}})",
    "end_date": "filter on created_at instead (e.g. {'created_at': {'lte': '2026-12-31'}})",
    "reference_date": "megamem has no temporal reasoning in search",
    "org_id": "megamem has no organisations: the API key names the namespace",
    "project_id": "megamem has no projects: the API key names the namespace",
    "metadata": "search and list narrow by metadata through filters (e.g. {'metadata': {'topic': 'x'}})",
}


def refuse(field: str, why: str) -> ApiError:
    """A 422 naming a field this server cannot honour, and why."""
    return ApiError(422, f"{field} is not supported by this server: {why}", param=field, code="unsupported_parameter")


def refuse_extra(extra: dict[str, Any] | None, allowed_none: tuple[str, ...] = ()) -> None:
    """422 for the first field of a body that megamem has no counterpart for (None is let through for the
    fields in allowed_none: mem0 sends them as null to mean "none", which is what megamem has)."""
    for name, value in (extra or {}).items():
        if value is None and name in allowed_none:
            continue
        raise refuse(name, UNSUPPORTED.get(name, "mem0 option unknown to megamem"))


def no_encoded_slash(request: HttpRequest, memory_id: str) -> None:
    """404 for a memory id holding an encoded slash ("m1%2F"): Starlette routes on the decoded path, where it
    would read as mem0's trailing slash and name memory m1 (an id never holds a slash)."""
    if b"%2f" in request.scope.get("raw_path", b"").lower():
        raise not_found("memory", memory_id + "/")


OneMemory = Depends(no_encoded_slash)


# -- the memory's shape ---------------------------------------------------------------------------------------------
def mem0_json(rec: View, fields: list[str] | None = None) -> dict:
    """A memory in mem0's shape (megamem's, plus run_id, hash, categories, updated_at: a version's time), as its
    owner sees it; fields: only those (mem0's `fields` option)."""
    out = memory_json(rec) | {
        "run_id": rec.metadata.get(schema.RUN),
        "app_id": None,
        "hash": hashlib.md5(rec.text.encode()).hexdigest(),  # noqa: S324  (mem0's content hash, not a secret)
        "categories": [],
        "updated_at": rec.created,
    }
    return {k: v for k, v in out.items() if k in fields} if fields else out


# -- filters --------------------------------------------------------------------------------------------------------
Predicate = Callable[[dict], bool]


def compile_filters(filters: object, where: str = "filters") -> Predicate:
    """mem0's filter language (the module's docstring) as a predicate over a memory's mem0 shape; a 422 naming the
    part that is malformed (checked before any memory is read, so a typo is an error, not an empty result)."""
    terms = 0

    def node(f: object, path: str, depth: int) -> Predicate:
        nonlocal terms
        if depth > FILTER_DEPTH:
            raise ApiError(422, f"{path}: filters nest deeper than {FILTER_DEPTH}", param="filters")
        if not isinstance(f, dict):
            raise ApiError(422, f"{path}: a filter is an object of field -> condition", param="filters")
        parts: list[Predicate] = []
        for key, cond in f.items():
            if key in LOGIC:
                subs = cond if isinstance(cond, list) else [cond] if key == "NOT" else None
                if subs is None or not subs:
                    raise ApiError(422, f"{path}.{key}: takes a non-empty list of filters", param="filters")
                compiled = [node(s, f"{path}.{key}[{n}]", depth + 1) for n, s in enumerate(subs)]
                parts.append(combine(key, compiled))
            elif key == "metadata" and isinstance(cond, dict):
                for mk, mc in cond.items():
                    parts.append(field(("metadata", str(mk)), mc, f"{path}.metadata.{mk}"))
            elif key == "app_id":
                raise refuse(f"{path}.app_id", UNSUPPORTED["app_id"])
            elif key in (*ENTITIES, "created_at", "updated_at"):
                parts.append(field((key,), cond, f"{path}.{key}"))
            else:  # any other name: a field of the memory's metadata (as mem0's simple filters)
                parts.append(field(("metadata", str(key)), cond, f"{path}.{key}"))
            terms += 1
            if terms > FILTER_TERMS:
                raise ApiError(422, f"{where}: more than {FILTER_TERMS} conditions", param="filters")
        return lambda m: all(p(m) for p in parts)

    def field(key: tuple[str, ...], cond: object, path: str) -> Predicate:
        conds = [("eq", cond)] if not isinstance(cond, dict) else list(cond.items())
        if isinstance(cond, dict) and (not cond or any(op not in OPS for op in cond)):
            raise ApiError(
                422, f"{path}: a condition is a value, '*' or an object of {', '.join(OPS)}", param="filters"
            )
        for op, value in conds:
            if op in ("in", "nin") and not isinstance(value, list):
                raise ApiError(422, f"{path}: '{op}' takes a list", param="filters")
            if op in ("gt", "gte", "lt", "lte") and not (is_number(value) or isinstance(value, str)):
                raise ApiError(422, f"{path}: '{op}' takes a number or a string", param="filters")
            if op == "icontains" and not isinstance(value, str):
                raise ApiError(422, f"{path}: 'icontains' takes a string", param="filters")

        def test(m: dict) -> bool:
            have = m.get(key[0]) if len(key) == 1 else (m.get("metadata") or {}).get(key[1])
            return all(holds(op, have, value) for op, value in conds)

        return test

    return node(filters, where, 0)


def combine(logic: str, parts: list[Predicate]) -> Predicate:
    """AND / OR / NOT (none holds) of compiled filters."""
    if logic == "AND":
        return lambda m: all(p(m) for p in parts)
    if logic == "OR":
        return lambda m: any(p(m) for p in parts)
    return lambda m: not any(p(m) for p in parts)


def is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def holds(op: str, have: object, value: object) -> bool:
    """Whether a field's value `have` meets one operator's condition (a missing field meets only ne and nin)."""
    if op == "eq":
        return have is not None if value == "*" else have == value
    if op == "ne":
        return have != value
    if op == "in":
        return have in value
    if op == "nin":
        return have not in value
    if op in ("gt", "gte", "lt", "lte"):
        if not ((is_number(have) and is_number(value)) or (isinstance(have, str) and isinstance(value, str))):
            return False
        return {"gt": have > value, "gte": have >= value, "lt": have < value, "lte": have <= value}[op]
    if op == "contains":
        return (isinstance(have, str) and isinstance(value, str) and value in have) or (
            isinstance(have, list) and value in have
        )
    # icontains: a case-insensitive substring, or a list element equal but for case
    low = value.lower()
    return (isinstance(have, str) and low in have.lower()) or (
        isinstance(have, list) and any(isinstance(x, str) and x.lower() == low for x in have)
    )


def scoped(body_entities: dict[str, str | None], filters: dict | None) -> Predicate:
    """The predicate of a request's filters and its top-level entity ids (ANDed)."""
    parts = [compile_filters(filters)] if filters is not None else []
    for name, value in body_entities.items():
        if value is not None:
            parts.append(lambda m, n=name, v=value: m.get(n) == v)
    return lambda m: all(p(m) for p in parts)


def matching(srv: Server, p: Principal, pred: Predicate, failed: bool) -> list[tuple[View, dict]]:
    """The caller's memories (being learned too; failed ones if asked) that meet a predicate, with their mem0
    shape, oldest first. Call under the lock."""
    out = []
    for rec in srv.scope(p, pending=True, failed=failed):
        shown = mem0_json(rec)
        if pred(shown):
            out.append((rec, shown))
    return sorted(out, key=lambda rs: (rs[0].created, rs[0].id))


# -- the routes -----------------------------------------------------------------------------------------------------
@router.get("/v1/ping/")
def ping(p: Caller) -> dict:
    """What MemoryClient's constructor reads: the key is valid (401 otherwise), and an organisation and project,
    which it requires: "megamem" and the key's namespace (no project routes are served). No e-mail."""
    return {"status": "ok", "org_id": "megamem", "project_id": p.namespace, "user_email": None}


def conversation_text(messages: list[Message]) -> str:
    """The memory's text: the user and assistant turns joined (megamem's add does the same with `messages`)."""
    return "\n".join(m.text() for m in messages if m.role in ("user", "assistant") and m.text())


def entity_ids(body: Mem0Add) -> dict[str, str | None]:
    """user_id / agent_id / run_id from the top level or from `filters` (where mem0 puts them); 422 if the two
    disagree or the filters hold anything else."""
    out: dict[str, str | None] = {e: getattr(body, e) for e in ENTITIES}
    for key, value in (body.filters or {}).items():
        if key not in ENTITIES:
            raise ApiError(
                422, f"filters.{key}: an add's filters name its user_id, agent_id or run_id only", param="filters"
            )
        if not isinstance(value, str) or not value or len(value) > 200:
            raise ApiError(422, f"filters.{key}: an id is a string of 1-200 characters", param="filters")
        if out[key] not in (None, value):
            raise ApiError(422, f"{key} is given twice with different values", param=key)
        out[key] = value
    return out


@router.post("/v3/memories/add/")
def add(
    body: Mem0Add, p: Caller, srv: Ready, idempotency_key: Annotated[str | None, Header(max_length=200)] = None
) -> dict:
    """Store the conversation as one memory: a job learns it, and it answers from its text meanwhile."""
    refuse_extra(body.model_extra)
    if body.infer:
        raise refuse("infer", "megamem stores the text as given (no LLM fact extraction); send infer=false")
    ids = entity_ids(body)
    try:
        text = check_text(conversation_text(body.messages), "messages")
        metadata = schema.check_user_fields(check_metadata(body.metadata or {}), "metadata", paraphrases=True)
        check_fits(srv.engine.tok, srv.engine.model, text)
    except MegamemError as exc:
        raise invalid(exc) from None
    request = {"id": None, "text": text, "paraphrases": [], "metadata": metadata, "replaces": []}
    request |= {"user_id": ids["user_id"], "agent_id": ids["agent_id"]}
    if ids["run_id"]:
        request["run_id"] = ids["run_id"]
    sid = schema.stored_id(p.namespace, uuid.uuid4().hex[:24])
    messages = [m.model_dump(include={"role", "content"}) for m in body.messages]
    event = Event(p.namespace, sid, "ADD", None, text, None, ids["user_id"], messages, metadata)
    with srv.lock:
        job, _ = srv.queue.submit(p.namespace, sid, request, idempotency_key, event)
        shown = current(srv, p, job.memory_id) or Pending.of(job)  # (a replayed key's job names its own memory)
    if srv.worker is not None:
        srv.worker.wake.set()
    result = mem0_json(shown) | {"event": "ADD", "job_id": job.id}
    message = "the memory answers from its text now; its adapter is being learned (see state and job_id)"
    return {"results": [result], "message": message, "status": "PENDING", "event_id": job.id}


def current(srv: Server, p: Principal, sid: str) -> View | None:
    """A memory as the routes show it now, by stored id (None if it is gone). Call under the lock."""
    try:
        return srv.view(p, sid.split(schema.SEPARATOR, 1)[-1] if p.namespace != schema.DEFAULT_NAMESPACE else sid)
    except ApiError:
        return None


@router.post("/v3/memories/search/")
def search(body: Mem0Search, p: Caller, srv: Ready) -> dict:
    """The caller's memories closest to the query (the gate's score, as megamem's search), narrowed by filters."""
    refuse_extra(body.model_extra)
    for name, ok in (("rerank", True), ("keyword_search", True)):
        if getattr(body, name) is ok:
            raise refuse(name, "megamem ranks by the gate's score only")
    if body.latest_only is False:
        raise refuse("latest_only", "an update replaces a memory in place, so only latest versions exist")
    try:
        query = check_text(body.query.strip(), "query")
    except MegamemError as exc:
        raise invalid(exc, "query") from None
    pred = scoped({e: getattr(body, e) for e in ENTITIES}, body.filters)
    with srv.lock:
        scope = [rec for rec, shown in matching(srv, p, pred, failed=False)]
        ranked = ranked_memories(srv, query, scope, body.top_k)
    if body.threshold is not None:
        ranked = [(r, s) for r, s in ranked if s >= body.threshold]
    return {"results": [mem0_json(r, body.fields) | {"score": round(s, 6)} for r, s in ranked]}


@router.post("/v3/memories/")
def get_all(
    body: Mem0List,
    p: Caller,
    srv: Ready,
    request: HttpRequest,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict:
    """The caller's memories that meet the filters, oldest first, a page at a time: {count, next, previous,
    results}, next and previous as the URLs of those pages (None at the ends)."""
    refuse_extra(body.model_extra)
    if body.latest_only is False:
        raise refuse("latest_only", "an update replaces a memory in place, so only latest versions exist")
    pred = scoped({e: getattr(body, e) for e in ENTITIES}, body.filters)
    with srv.lock:
        found = matching(srv, p, pred, failed=True)
    start = (page - 1) * page_size
    chunk = found[start : start + page_size]

    def url(n: int) -> str:
        return str(request.url.include_query_params(page=n, page_size=page_size))

    return {
        "count": len(found),
        "next": url(page + 1) if start + page_size < len(found) else None,
        "previous": url(page - 1) if page > 1 else None,
        "results": [mem0_json(r, body.fields) for r, _ in chunk],
    }


@router.get("/v1/memories/{memory_id}/", dependencies=[OneMemory])
def get(memory_id: str, p: Caller, srv: Ready) -> dict:
    """One of the caller's memories (stored, being learned, or failed)."""
    with srv.lock:
        return mem0_json(srv.view(p, memory_id))


@router.put("/v1/memories/{memory_id}/", dependencies=[OneMemory])
def update(memory_id: str, body: Mem0Update, p: Caller, srv: Ready) -> dict:
    """Learn a new version of a memory under the same id: the new text (or the old one with new metadata) is the
    memory from now on (it answers from its text while it learns); the old version's adapter is replaced when
    the new one is committed. A version still being learned is superseded: only the newest is learned."""
    refuse_extra(body.model_extra, allowed_none=("expiration_date",))
    if body.text is None and body.metadata is None:
        raise ApiError(422, "give text, metadata or both", param="text")
    try:
        new_text = check_text(body.text, "text") if body.text is not None else None
        new_meta = check_metadata(body.metadata, "metadata") if body.metadata is not None else None
        if new_meta is not None:
            schema.check_user_fields(new_meta, "metadata", paraphrases=True)
        if new_text is not None:
            check_fits(srv.engine.tok, srv.engine.model, new_text)
    except MegamemError as exc:
        raise invalid(exc) from None
    with srv.lock:
        old = srv.view(p, memory_id)
        meta = schema.user_metadata(old.metadata)
        paraphrases = meta.pop(schema.PARAPHRASES, [])
        text = new_text if new_text is not None else old.text
        request = {
            "id": schema.api_id(old),
            "text": text,
            "paraphrases": paraphrases if text == old.text else [],  # paraphrases of an older text would mislead
            "metadata": new_meta if new_meta is not None else meta,
            "user_id": old.metadata.get(schema.USER),
            "agent_id": old.metadata.get(schema.AGENT),
            "replaces": schema.replaced_by(old.metadata),
            # a stored version is replaced by the new one; otherwise (being learned, or failed) it is an add again
            "update": srv.mem.store.get(old.id, missing_ok=True) is not None,
        }
        if old.metadata.get(schema.RUN):
            request["run_id"] = old.metadata[schema.RUN]
        event = Event(p.namespace, old.id, "UPDATE", old.text, text, None, request["user_id"], [], request["metadata"])
        job, _ = srv.queue.submit(p.namespace, old.id, request, None, event, supersede=True)
        shown = srv.view(p, memory_id)
    if srv.worker is not None:
        srv.worker.wake.set()
    return mem0_json(shown) | {"text": text, "event": "UPDATE", "job_id": job.id}


@router.delete("/v1/memories/{memory_id}/", dependencies=[OneMemory])
def delete(memory_id: str, p: Caller, srv: Ready, delete_linked: Annotated[bool | None, Query()] = None) -> dict:
    """Forget one of the caller's memories for good (one being learned: its job is cancelled). delete_linked
    deletes nothing more here: an update replaces a memory in place, so no older version is linked to it."""
    with srv.lock:
        rec = srv.view(p, memory_id)
        srv.delete(p, rec)
    return {"message": "Memory deleted successfully!", "id": schema.api_id(rec)}


def query_filters(raw: str | None) -> dict | None:
    """delete_all's `filters` query parameter: JSON, or the Python literal that MemoryClient sends for a dict
    (httpx writes a dict parameter with str()); 422 for anything else."""
    if raw is None:
        return None
    if len(raw) > MAX_FILTER_QUERY:
        raise ApiError(422, f"filters: over {MAX_FILTER_QUERY} characters", param="filters")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # (deeply nested brackets exhaust the decoder's recursion)
        try:
            value = ast.literal_eval(raw)  # literals only: never evaluates code
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = None
    if not isinstance(value, dict):
        raise ApiError(422, "filters: an object of field -> condition (JSON)", param="filters")
    return value


@router.delete("/v1/memories/")
def delete_all(
    request: HttpRequest,
    p: Caller,
    srv: Ready,
    user_id: Annotated[str | None, Query(max_length=200)] = None,
    agent_id: Annotated[str | None, Query(max_length=200)] = None,
    run_id: Annotated[str | None, Query(max_length=200)] = None,
    filters: Annotated[str | None, Query()] = None,
) -> dict:
    """Forget every memory of the caller that meets the conditions (at least one: a whole namespace is never
    deleted by accident), those being learned and failed included."""
    known = {"user_id", "agent_id", "run_id", "filters"}
    for name in request.query_params:
        if name not in known:
            raise refuse(name, UNSUPPORTED.get(name, "mem0 option unknown to megamem"))
    given = query_filters(filters)
    entities = {"user_id": user_id, "agent_id": agent_id, "run_id": run_id}
    if not given and all(v is None for v in entities.values()):
        raise ApiError(
            422, "give user_id, agent_id, run_id or filters (deleting a whole namespace takes one)", param="filters"
        )
    pred = scoped(entities, given)
    with srv.lock:
        gone = []
        for rec, _ in matching(srv, p, pred, failed=True):
            srv.delete(p, rec)
            gone.append(schema.api_id(rec))
    return {"message": "Memories deleted successfully!", "deleted": gone}


@router.get("/v1/memories/{memory_id}/history/", dependencies=[OneMemory])
def memory_history(memory_id: str, p: Caller, srv: Ready) -> list[dict]:
    """A memory's events, oldest first (a deleted memory's too); 404 for a memory the caller never had."""
    try:
        api = schema.check_api_id(memory_id)
    except MegamemError:
        raise not_found("memory", memory_id) from None
    sid = schema.stored_id(p.namespace, api)
    with srv.lock:
        events = history.events(srv.queue.db, p.namespace, sid)
        if not events:
            srv.view(p, memory_id)  # a memory stored before events were kept has an empty history; else 404
    return events
