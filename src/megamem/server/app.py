"""The FastAPI application: OpenAI's chat routes, mem0's memory routes, jobs, keys, health, metrics, the page.

Built as a recipe: `Server` holds the parts (the serving Memory and its lock, the engine, the job queue and
worker, the key table), `create_app` wires routes to them. Every route that touches a memory resolves the
caller's namespace first and checks ownership (schema.owns); the gate only ever scores the caller's memories.
Errors everywhere have OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import schema
from ..answer import MEGA_RAG_SCALE, qa_prompt, with_context
from ..checks import check_metadata, check_text, check_texts
from ..errors import MegamemError
from ..memory import Item, Memory
from ..model import chat_ids, context_length
from ..store import Record
from ..train import Recipe, check_fits
from . import tenants
from .db import connect
from .engine import END, Engine
from .jobs import Conflict, Job, JobQueue, QueueFull, Worker
from .schemas import AddMemory, ChatRequest, MemoryOptions, NewKey, Search
from .tenants import Principal

log = logging.getLogger("megamem.server")
MODEL_ALIAS = "megamem"


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_
        self.param, self.code, self.headers = param, code, headers


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def not_found(what: str, ident: object) -> ApiError:
    return ApiError(404, f"no {what} {str(ident)[:200]!r}", code="not_found")


def invalid(exc: MegamemError, param: str | None = None) -> ApiError:
    return ApiError(422, str(exc), param=param, code="invalid_value")


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs. open_access: no API keys, every caller is the default namespace (loopback use)."""

    store: Path
    open_access: bool = False
    max_batch: int = 16
    batched: bool = True
    window_s: float = 0.005
    min_weight: float = 1e-3
    max_body: int = 1_000_000
    max_waiting_jobs: int = 64
    lease_s: float = 60.0
    train_pause_s: float = 2.0  # the longest one training step waits for the engine to go idle
    worker: bool = True
    recipe: Recipe | None = None  # how jobs learn (default: the product's recipe)


class Server:
    """The parts: loaded in the background (healthz says 503 until `ready`)."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.ready = threading.Event()
        self.failed: str | None = None
        self.lock = threading.RLock()  # the serving Memory and the shared connections are not thread-safe
        self.mem: Memory | None = None
        self.engine: Engine | None = None
        self.worker: Worker | None = None
        self.db = None
        self.queue: JobQueue | None = None
        self.registry = CollectorRegistry()
        r = self.registry
        self.m_requests = Counter("megamem_requests", "HTTP requests", ["route", "status"], registry=r)
        self.m_latency = Histogram("megamem_request_seconds", "request latency", ["route"], registry=r)
        self.m_tokens = Counter("megamem_generated_tokens", "completion tokens generated", registry=r)
        self.m_decode = Counter("megamem_decode_seconds", "seconds the engine spent decoding", registry=r)
        self.m_tps = Gauge("megamem_tokens_per_second", "generated tokens per decoding second", registry=r)
        self.m_queue = Gauge("megamem_job_queue_depth", "injection jobs queued or running", registry=r)
        self.m_engine = Gauge("megamem_engine_queue_depth", "chat requests waiting for the engine", registry=r)
        self.m_batch = Histogram(
            "megamem_batch_rows", "rows per decoded batch", registry=r, buckets=(1, 2, 4, 8, 16, 32)
        )

    # -- start-up -----------------------------------------------------------------------------------------------
    def load(self) -> None:
        try:
            mem = Memory(self.cfg.store)
            if mem.key_function == "activation":  # its keys run the serving model, which the engine owns
                raise MegamemError("megamem serve needs a store keyed by the sentence embedder, not 'activation'")
            model, tok = mem.load()
            mem.prepare_store()
            self.db = connect(self.cfg.store)
            if not self.cfg.open_access and not tenants.has_keys(self.db):
                raise MegamemError(
                    f"the store has no API keys; create one (`megamem keys create --store {self.cfg.store} "
                    "--namespace NAME`) or serve with --open (no keys, loopback only)"
                )
            self.queue = JobQueue(self.cfg.store, self.cfg.lease_s, max_waiting=self.cfg.max_waiting_jobs)
            self.mem = mem
            self.engine = Engine(
                model, tok, self.cfg.max_batch, self.cfg.window_s, self.cfg.min_weight, self.cfg.batched
            )
            self.engine.on_batch = self._observe_batch
            self.engine.start()
            if self.cfg.worker:
                self.worker = Worker(self.cfg.store, self.train, lease_s=self.cfg.lease_s)
                self.worker.start()
            self.ready.set()
        except Exception as exc:  # reported by /healthz and the first request
            self.failed = str(exc) if isinstance(exc, MegamemError) else f"{type(exc).__name__}: {exc}"
            log.error("megamem serve could not start: %s", self.failed)

    def _observe_batch(self, rows: int, tokens: int, seconds: float) -> None:
        self.m_batch.observe(rows)
        self.m_decode.inc(seconds)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop_flag.set()
        if self.worker is not None:
            self.worker.stop.set()
            self.worker.wake.set()

    # -- the training worker's job ------------------------------------------------------------------------------
    _trainer: Memory | None = None

    def train(self, job: Job, progress) -> None:
        """Learn a job's memory with the worker's own Memory (its own model copy, so the engine's model state is
        never touched), pausing between steps while the engine decodes (chat stays responsive)."""
        if self._trainer is None:
            self._trainer = Memory(self.cfg.store, recipe=self.cfg.recipe)
        trainer = self._trainer
        rec = trainer.store.get(job.memory_id, missing_ok=True) if trainer.store is not None else None
        if rec is not None:  # (one this job committed is marked succeeded by JobQueue.claim, never handed here)
            raise MegamemError(f"a memory with id {schema.api_id(rec)!r} already exists")
        req = job.request
        item = Item(
            req["text"],
            req.get("paraphrases", []),
            req.get("metadata", {}),
            job.memory_id,
            origin=f"job {job.id}",
            replaces=req.get("replaces", []),
            reserved={schema.NAMESPACE: job.namespace, schema.JOB: job.id}
            | ({schema.USER: req["user_id"]} if req.get("user_id") else {})
            | ({schema.AGENT: req["agent_id"]} if req.get("agent_id") else {}),
        )

        def on_step(step: int, total: int, loss: float) -> None:
            progress(step, total)
            if self.engine is not None:
                self.engine.idle.wait(self.cfg.train_pause_s)

        trainer.add_many([item], on_step=on_step)

    # -- what a namespace may see ---------------------------------------------------------------------------------
    def scope(
        self,
        p: Principal,
        user_id: str | None = None,
        agent_id: str | None = None,
        ids: list[str] | None = None,
        filters: dict | None = None,
    ) -> list[Record]:
        """The caller's memories, narrowed by user, agent, ids and metadata filters (call under the lock)."""
        wanted = {schema.stored_id(p.namespace, i) for i in ids} if ids is not None else None
        out = []
        for r in self.mem.list():
            if not schema.owns(p.namespace, r):
                continue
            if user_id is not None and r.metadata.get(schema.USER) != user_id:
                continue
            if agent_id is not None and r.metadata.get(schema.AGENT) != agent_id:
                continue
            if wanted is not None and r.id not in wanted:
                continue
            if filters and not matches_filters(schema.user_metadata(r.metadata), filters):
                continue
            out.append(r)
        return out

    def owned(self, p: Principal, memory_id: str) -> Record:
        """The caller's memory by API id, or 404 (another namespace's memory is as absent as a missing one)."""
        try:
            api = schema.check_api_id(memory_id)
        except MegamemError:
            raise not_found("memory", memory_id) from None
        rec = self.mem.store.get(schema.stored_id(p.namespace, api), missing_ok=True) if self.mem.store else None
        if rec is None or not schema.owns(p.namespace, rec):
            raise not_found("memory", memory_id)
        return rec


def matches_filters(metadata: dict, filters: dict) -> bool:
    """AND of every field's condition: a value (eq), {"eq": v}, {"in": [...]} or {"contains": v} (a substring of
    a string, or an element of a list)."""
    for field, cond in filters.items():
        have = metadata.get(field)
        if isinstance(cond, dict) and len(cond) == 1 and next(iter(cond)) in ("eq", "in", "contains"):
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
    if not isinstance(filters, dict):
        raise MegamemError("filters must be an object of field -> condition")
    for field, cond in filters.items():
        if isinstance(cond, dict) and (len(cond) != 1 or next(iter(cond)) not in ("eq", "in", "contains")):
            raise MegamemError(f"filter on {field!r}: a condition is a value or one of eq / in / contains")
        if isinstance(cond, dict) and "in" in cond and not isinstance(cond["in"], list):
            raise MegamemError(f"filter on {field!r}: 'in' takes a list")
    return filters


def memory_json(rec: Record) -> dict:
    meta = schema.user_metadata(rec.metadata)
    paraphrases = meta.pop("paraphrases", [])
    return {
        "id": schema.api_id(rec),
        "memory": rec.text,
        "paraphrases": paraphrases,
        "metadata": meta,
        "user_id": rec.metadata.get(schema.USER),
        "agent_id": rec.metadata.get(schema.AGENT),
        "created_at": rec.created,
    }


def job_json(job: Job, worker: Worker | None) -> dict:
    step, total = worker.progress.get(job.id, (0, 0)) if worker is not None else (0, 0)
    return {
        "job_id": job.id,
        "memory_id": job.memory_id.split(schema.SEPARATOR, 1)[-1] if job.namespace != "default" else job.memory_id,
        "status": job.state,
        "attempts": job.attempts,
        "error": job.error,
        "progress": {"step": step, "total": total} if job.state == "running" else None,
        "created_at": job.created,
        "updated_at": job.updated,
    }


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is answered 413 before the app reads it whole."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = error_response(413, f"the request body is over {self.limit} bytes", code="request_too_large")
        try:
            if declared is not None and int(declared) > self.limit:
                return await too_big(scope, receive, send)
        except ValueError:
            return await error_response(400, "bad Content-Length header")(scope, receive, send)
        # Read the body first (it is at most `limit` bytes, or refused), then replay it to the app: an exception
        # raised while the app reads would reach FastAPI's body parser and come back as a 400.
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)
                break
            seen += len(message.get("body", b""))
            if seen > self.limit:
                return await too_big(scope, receive, send)
            chunks.append(message)
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in chunks if m["type"] == "http.request")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(cfg: ServerConfig, server: Server | None = None) -> FastAPI:
    """The application for a store; the model loads in the background when it starts."""
    srv = server or Server(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=srv.load, name="megamem-load", daemon=True).start()
        yield
        srv.close()

    app = FastAPI(
        title="megamem",
        version="0.2",
        lifespan=lifespan,
        description="OpenAI-compatible chat with memories in gated LoRA adapters, and a memory API.",
    )
    app.state.server = srv

    # -- errors in OpenAI's shape ------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":  # OpenAI answers 400 for a body that is not JSON
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return error_response(422, msg, param=where or None, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(MegamemError)
    async def _megamem(request: Request, exc: MegamemError):
        if isinstance(exc, QueueFull):
            return error_response(
                429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": str(exc.retry_after)}
            )
        if isinstance(exc, Conflict):
            return error_response(409, str(exc), code="conflict")
        return error_response(400, str(exc), code="invalid_value")

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unexpected error")
        return error_response(500, f"internal error ({type(exc).__name__})", "server_error")

    app.add_middleware(BodyLimit, limit=cfg.max_body)  # outermost but for the metrics below

    @app.middleware("http")
    async def _metrics(request: Request, call_next):
        t = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        srv.m_requests.labels(name, str(response.status_code)).inc()
        srv.m_latency.labels(name).observe(time.perf_counter() - t)
        return response

    # -- who is calling ------------------------------------------------------------------------------------------
    def ready() -> Server:
        if srv.failed:
            raise ApiError(503, f"the server could not start: {srv.failed}", "server_error", code="not_ready")
        if not srv.ready.is_set():
            raise ApiError(
                503,
                "the model is loading; try again shortly",
                "server_error",
                code="loading",
                headers={"Retry-After": "5"},
            )
        return srv

    def caller(
        s: Annotated[Server, Depends(ready)],
        authorization: Annotated[str | None, Header()] = None,
        x_megamem_namespace: Annotated[str | None, Header()] = None,
    ) -> Principal:
        if s.cfg.open_access:
            return Principal(schema.DEFAULT_NAMESPACE)
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "no API key: send Authorization: Bearer KEY", code="missing_api_key")
        with s.lock:
            p = tenants.resolve(s.db, key.strip())
        if p is None:
            raise ApiError(401, "the API key is not valid", code="invalid_api_key")
        if x_megamem_namespace is not None:  # an admin key may act in a namespace it names
            if not p.admin:
                raise ApiError(403, "only an admin key may name another namespace", code="forbidden")
            try:
                return replace(p, namespace=schema.check_namespace(x_megamem_namespace))
            except MegamemError as exc:
                raise invalid(exc, "X-Megamem-Namespace") from None
        return p

    Caller = Annotated[Principal, Depends(caller)]

    def admin(p: Caller) -> Principal:
        if not p.admin:
            raise ApiError(403, "this route needs an admin key", code="forbidden")
        return p

    # -- health, metrics, models, the page -------------------------------------------------------------------------
    @app.get("/healthz")
    def healthz():
        if srv.failed:
            return error_response(503, srv.failed, "server_error", code="not_ready")
        if not srv.ready.is_set():
            return error_response(503, "loading the model", "server_error", code="loading")
        return {"status": "ok"}  # no counts: any caller may ask, and a store's size is its tenants' business

    @app.get("/metrics")
    def metrics():
        if srv.ready.is_set():
            with srv.lock:
                srv.m_queue.set(srv.queue.waiting())
            srv.m_engine.set(srv.engine.depth())
            st = srv.engine.stats
            srv.m_tps.set(st["tokens"] / st["decode_s"] if st["decode_s"] else 0.0)
        return Response(generate_latest(srv.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return resources.files("megamem.server").joinpath("page.html").read_text(encoding="utf-8")

    def base_model() -> str:
        return srv.mem.model_name

    Admin = Annotated[Principal, Depends(admin)]

    @app.get("/v1/models")
    def models(p: Caller):
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "megamem"} for m in (base_model(), MODEL_ALIAS)]
        return {"object": "list", "data": data}

    # -- chat -------------------------------------------------------------------------------------------------------
    def gate(p: Principal, question: str | None, opts: MemoryOptions) -> list[tuple[Record, float, float]]:
        """(record, score, weight) of the memories the caller's gate passes for the last user message."""
        if opts.disable or not question:
            return []
        try:
            filters = check_filters(opts.filters) if opts.filters is not None else None
            ids = [schema.check_api_id(i) for i in opts.ids] if opts.ids is not None else None
        except MegamemError as exc:
            raise invalid(exc, "memory") from None
        with srv.lock:
            allowed = srv.scope(p, opts.user_id, opts.agent_id, ids, filters)
            if not allowed:
                return []
            cfg = srv.mem.gate
            if opts.top_k is not None or opts.threshold is not None:
                cfg = replace(
                    cfg,
                    top_k=opts.top_k or cfg.top_k,
                    threshold=opts.threshold if opts.threshold is not None else cfg.threshold,
                )
            by_id = {r.id: r for r in allowed}
            routed = srv.mem.scored(question, cfg, frozenset(by_id))
            return [(by_id[i], s, w) for i, s, w in routed if i in by_id]

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, p: Caller):
        if body.model not in (base_model(), MODEL_ALIAS):
            raise ApiError(
                404,
                f"the model {body.model[:200]!r} does not exist; this server serves {base_model()!r}",
                param="model",
                code="model_not_found",
            )
        opts = body.memory or MemoryOptions()
        turns = [("system" if m.role == "developer" else m.role, m.text()) for m in body.messages if m.role != "tool"]
        users = [i for i, (r, _) in enumerate(turns) if r == "user"]
        question = turns[users[-1]][1].strip() if users else None
        for n, (_, text) in enumerate(turns):  # every message reaches the tokenizer: checked like stored text
            if text.strip():
                try:
                    check_text(text, f"messages[{n}]")
                except MegamemError as exc:
                    raise invalid(exc, "messages") from None
        routed = await run_in_threadpool(gate, p, question, opts)
        with srv.lock:
            adapters = [srv.mem.adapter(r.id) for r, _, _ in routed]
        weights = [w for _, _, w in routed]
        if users and routed and opts.mode in ("qa", "rag", "mega+rag"):
            u = users[-1]
            prompt = qa_prompt(question) if opts.mode == "qa" else question
            if opts.mode in ("rag", "mega+rag"):
                prompt = with_context(prompt, [routed[0][0].text])
            turns[u] = ("user", prompt)
        if opts.mode == "rag":
            adapters, weights = [], []
        elif opts.mode == "mega+rag":  # the context leads, the adapters help (generate.MEGA_RAG_SCALE)
            weights = [w * MEGA_RAG_SCALE for w in weights]
        tok = srv.engine.tok
        try:
            prompt_ids = chat_ids(tok, turns, generation_prompt=True)
        except Exception as exc:  # a template that refuses the conversation (roles out of order, ...)
            raise ApiError(422, f"messages: the chat template refused them ({exc})", param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        limit = context_length(srv.engine.model)
        if len(prompt_ids) + max_tokens > limit:
            raise ApiError(
                400,
                f"the conversation is {len(prompt_ids)} tokens; with max_tokens {max_tokens} it "
                f"exceeds the model's context of {limit}",
                param="messages",
                code="context_length_exceeded",
            )
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req = srv.engine.submit(
            prompt_ids,
            adapters,
            weights,
            max_tokens=max_tokens,
            temperature=body.temperature or 0.0,
            top_p=body.top_p or 1.0,
            seed=body.seed,
            stop=stops[:4],
            emit=lambda item: loop.call_soon_threadsafe(q.put_nowait, item),
        )
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        selected = {
            "selected": [{"id": schema.api_id(r), "score": round(s, 6), "weight": round(w, 6)} for r, s, w in routed]
        }

        def usage() -> dict:
            n = req.completion_tokens
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        def note_tokens() -> None:
            srv.m_tokens.inc(req.completion_tokens)

        if not body.stream:
            try:
                while (await q.get()) is not END:
                    pass
            except asyncio.CancelledError:
                req.cancelled = True
                raise
            note_tokens()
            if req.error:
                raise ApiError(500, f"generation failed: {req.error}", "server_error")
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": req.text},
                        "finish_reason": req.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": usage(),
                "memory": selected,
            }

        def chunk(delta: dict, finish: str | None = None, extra: dict | None = None) -> str:
            c = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            return f"data: {json.dumps(c | (extra or {}), ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""}, extra={"memory": selected})
                while (item := await q.get()) is not END:
                    yield chunk({"content": item})
                yield chunk({}, req.finish_reason if req.finish_reason != "error" else "stop")
                if body.stream_options and body.stream_options.include_usage:
                    u = {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": body.model,
                        "choices": [],
                        "usage": usage(),
                    }
                    yield f"data: {json.dumps(u)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                req.cancelled = True  # a client that went away frees its row
                note_tokens()

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- memories ---------------------------------------------------------------------------------------------------
    @app.post("/v1/memories", status_code=202)
    def add_memory(body: AddMemory, p: Caller, idempotency_key: Annotated[str | None, Header(max_length=200)] = None):
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
        with srv.lock:
            old = [srv.owned(p, i).id for i in replaces]
            request = {
                "id": body.id,  # the client's id or None: part of what an Idempotency-Key must match
                "text": text,
                "paraphrases": paraphrases,
                "metadata": metadata,
                "user_id": body.user_id,
                "agent_id": body.agent_id,
                "replaces": old,
            }
            job, _ = srv.queue.submit(p.namespace, schema.stored_id(p.namespace, api), request, idempotency_key)
        if srv.worker is not None:
            srv.worker.wake.set()
        return job_json(job, srv.worker) | {"job_id": job.id}

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, p: Caller):
        with srv.lock:
            job = srv.queue.get(job_id[:64])
        if job is None or job.namespace != p.namespace:
            raise not_found("job", job_id)
        return job_json(job, srv.worker)

    @app.get("/v1/memories")
    def list_memories(
        p: Caller,
        user_id: Annotated[str | None, Query(max_length=200)] = None,
        agent_id: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: Annotated[str | None, Query(max_length=300)] = None,
    ):
        with srv.lock:
            recs = sorted(srv.scope(p, user_id, agent_id), key=lambda r: (r.created, r.id))
        start = 0
        if cursor:
            keys = [f"{r.created}|{r.id}" for r in recs]
            start = next((i + 1 for i, k in enumerate(keys) if k == cursor), None)
            if start is None:
                start = sum(1 for k in keys if k <= cursor)  # the cursor's memory is gone: resume after its place
        page_ = recs[start : start + limit]
        more = start + limit < len(recs)
        nxt = f"{page_[-1].created}|{page_[-1].id}" if more and page_ else None
        return {"results": [memory_json(r) for r in page_], "next_cursor": nxt}

    @app.get("/v1/memories/{memory_id}")
    def get_memory(memory_id: str, p: Caller):
        with srv.lock:
            return memory_json(srv.owned(p, memory_id))

    @app.delete("/v1/memories/{memory_id}")
    def delete_memory(memory_id: str, p: Caller):
        with srv.lock:
            rec = srv.owned(p, memory_id)
            srv.mem.forget(rec.id)
        return {"id": schema.api_id(rec), "deleted": True}

    @app.delete("/v1/memories")
    def delete_memories(
        p: Caller,
        user_id: Annotated[str | None, Query(max_length=200)] = None,
        agent_id: Annotated[str | None, Query(max_length=200)] = None,
    ):
        if user_id is None and agent_id is None:
            raise ApiError(
                422, "give user_id or agent_id (deleting a whole namespace takes one of them)", param="user_id"
            )
        with srv.lock:
            gone = []
            for rec in srv.scope(p, user_id, agent_id):
                srv.mem.forget(rec.id)
                gone.append(schema.api_id(rec))
        return {"deleted": gone}

    @app.post("/v1/memories/search")
    def search(body: Search, p: Caller):
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

    # -- keys (admin) -------------------------------------------------------------------------------------------------
    @app.post("/v1/keys", status_code=201)
    def new_key(body: NewKey, p: Admin):
        try:
            with srv.lock:
                key = tenants.create_key(srv.db, body.namespace, body.admin, body.name)
        except MegamemError as exc:
            raise invalid(exc, "namespace") from None
        return {"key": key, "namespace": body.namespace, "admin": body.admin}

    @app.get("/v1/keys")
    def keys(p: Admin):
        with srv.lock:
            return {"data": tenants.list_keys(srv.db)}

    return app
