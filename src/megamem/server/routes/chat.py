"""OpenAI's chat completions, answered through the library's answer pipeline (megamem.answer) and decoded by the
batching engine, so that a chat answers as Memory.ask does: the same mode (answer.DEFAULT_MODE unless the
request's `memory.mode` names another), the same prompts, the same mixture (its gated memories at their weights,
the caller's cortex standing in for its consolidated ones, the min-weight rule), the same greedy text at
temperature 0.

A request: the conversation (developer turns as system turns, tool results as tool turns), the caller's gate over
the memories in its scope (Server.scope, then Memory.gated), then answer.plan's steps. A step that is not the
last (irag's recall) is decoded whole and fed back into the plan; the last one is streamed or returned.

Fairness: a chat's max_tokens may not exceed the server's cap (400 naming the field), and each API key may
hold only so many chats and max_tokens in flight (429 with Retry-After; ServerConfig says why the defaults). A
client that goes away frees its row within an engine step: a streaming one when its stream is closed, a
non-streaming one (which starlette does not tell the handler about) by watching the connection while waiting,
irag's recall included.

Limits: irag's first chunk waits for the recall; the client's sampling settings (temperature, top_p, seed)
decode every step, its stop strings only the answer.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ... import answer, schema
from ...answer import Gated, Step, Turn
from ...checks import check_text
from ...errors import MegamemError
from ...memory import with_overrides
from ...model import chat_ids, context_length
from ...store import Record
from .. import formats
from ..auth import Caller, Ready
from ..engine import END, Logprob, Request
from ..errors import ApiError, invalid
from ..runtime import Server
from ..schemas import ChatRequest, MemoryOptions, Message
from ..tenants import Principal
from ..views import check_filters
from .health import served_models

# a chat's cap when the client gives none (OpenAI-compatible servers' usual default); the library's cap is
# answer.ANSWER_TOKENS (64) per answer turn, so a client that wants Memory.ask's answer sends max_tokens too
DEFAULT_MAX_TOKENS = 256
router = APIRouter()


def check_model(srv: Server, model: str) -> None:
    """404 for a model this server does not serve (its base model and the alias are served)."""
    base, alias = served_models(srv)
    if model not in (base, alias):
        raise ApiError(
            404,
            f"the model {model[:200]!r} does not exist; this server serves {base!r}",
            param="model",
            code="model_not_found",
        )


# what OpenAI's chat offers that this server does not do: a request asking for it is a 400 naming the field
# (silently ignoring one would be a wrong answer the application cannot see); field -> (asks for it?, why not)
NOT_HONOURED = {
    "functions": (lambda v: bool(v), "the legacy functions field is not supported; send tools"),
    "function_call": (lambda v: v not in (None, "none"), "the legacy function_call is not supported; send tool_choice"),
    "frequency_penalty": (lambda v: bool(v), "frequency_penalty is not supported; send 0 or leave it out"),
    "presence_penalty": (lambda v: bool(v), "presence_penalty is not supported; send 0 or leave it out"),
    "logit_bias": (lambda v: bool(v), "logit_bias is not supported; leave it out"),
    "modalities": (lambda v: v not in (None, ["text"]), "this server answers in text only"),
    "audio": (lambda v: v is not None, "this server answers in text only"),
    "prediction": (lambda v: v is not None, "predicted outputs are not supported; leave prediction out"),
    "web_search_options": (lambda v: v is not None, "this server does not search the web"),
    "reasoning_effort": (lambda v: v is not None, "the served model does not reason; leave reasoning_effort out"),
}


# OpenAI's fields that change nothing in the answer: accepted (the typed ones are read by ChatRequest)
HARMLESS = ("user", "metadata", "service_tier", "safety_identifier", "prompt_cache_key")


def refuse_unhonoured(body: ChatRequest) -> None:
    """400 naming the first field this server cannot honour (legacy functions, penalties, audio, n above 1, a
    stored completion, ...) or does not know (a field ignored without a word would be a wrong answer the
    application cannot see), and top_logprobs without logprobs (as OpenAI refuses it)."""
    extra = body.model_extra or {}
    for name, (asks, why) in NOT_HONOURED.items():
        if name in extra and asks(extra[name]):
            raise ApiError(400, why, param=name, code="unsupported_parameter")
    if body.n is not None and body.n > 1:
        raise ApiError(400, "n above 1 is not supported; ask once per choice", param="n", code="unsupported_parameter")
    if extra.get("store"):
        raise ApiError(
            400, "this server does not keep completions; send store false", param="store", code="unsupported_parameter"
        )
    for name in extra:
        if name not in NOT_HONOURED and name not in HARMLESS and name != "store":
            raise ApiError(400, f"unknown field {name[:100]!r}", param=name[:100], code="unsupported_parameter")
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")


def conversation(body: ChatRequest) -> list[Turn]:
    """The request's turns (role, text): developer turns as system turns, tool results as the chat template's
    'tool' turns (so a tool's answer reaches the model); every message reaches the tokenizer, so each is checked
    as stored text is."""
    for n, m in enumerate(body.messages):
        if isinstance(m.content, list) and (kinds := {part.type for part in m.content} - {"text"}):
            raise ApiError(
                400,
                f"messages[{n}]: this server reads text only, not {', '.join(sorted(kinds))} parts",
                param="messages",
                code="unsupported_parameter",
            )
    turns = [("system" if m.role == "developer" else m.role, _turn_text(m)) for m in body.messages]
    for n, (role, _) in enumerate(turns):
        if role == "tool" and (n == 0 or turns[n - 1][0] not in ("assistant", "tool")):
            raise ApiError(
                400,
                f"messages[{n}]: a tool message answers an assistant's tool call, so it follows one",
                param="messages",
            )
    for n, (_, text) in enumerate(turns):
        if text.strip():
            try:
                check_text(text, f"messages[{n}]")
            except MegamemError as exc:
                raise invalid(exc, "messages") from None
    return turns


def _turn_text(m: Message) -> str:
    """A message's text as the model reads it: an assistant's tool calls as it was told to write them."""
    if m.role == "assistant" and m.tool_calls:
        return "\n".join(t for t in (m.text(), formats.call_text(m.tool_calls)) if t)
    return m.text()


def gated(srv: Server, p: Principal, question: str, opts: MemoryOptions) -> tuple[Gated, dict[str, Record]]:
    """The pipeline's gate for the caller (Memory.gated, as Memory.ask takes it): only the memories in the
    caller's scope (its namespace, narrowed by the request's user, agent, ids and filters) take part, and the
    cortex is the caller's namespace's. Returns it with the scope's records by stored id (for their API ids).
    No question or memory disabled: nothing is scored (the filters are not even read), as before.

    Memories still being learned take part from the moment they are added (megamem.server.pending): in a context
    mode the best of them puts its text in context when it outscores the stored ones, reported at weight 0 until
    its adapter is trained and joins the mixture (Server.with_learning)."""
    allowed: list[Record] = []
    learning: list = []  # pending.Pending views: the scope's memories being learned
    with_gate = bool(question) and not opts.disable
    if with_gate:
        try:
            filters = check_filters(opts.filters) if opts.filters is not None else None
            ids = [schema.check_api_id(i) for i in opts.ids] if opts.ids is not None else None
        except MegamemError as exc:
            raise invalid(exc, "memory") from None
    cfg = with_overrides(srv.mem.gate, top_k=opts.top_k, threshold=opts.threshold)
    with srv.lock:
        if with_gate:
            scope = srv.scope(p, opts.user_id, opts.agent_id, ids, filters, pending=True)
            allowed, learning = srv.split_learning(scope)
        # an empty scope scores nothing: the mixture is then at most a cortex that holds forgotten memories
        g = srv.mem.gated(
            question,
            opts.mode,
            cfg,
            only=frozenset(r.id for r in allowed),
            namespace=p.namespace,
            use_memory=not opts.disable,
            min_weight=srv.cfg.min_weight,
        )
        if learning:
            g = srv.with_learning(g, question, opts.mode, cfg, allowed, learning)
    return g, {r.id: r for r in [*allowed, *learning]}


@dataclass
class Decoding:
    """One step in the engine: its request, the queue its text pieces (then END) arrive on, its prompt's length."""

    req: Request
    pieces: asyncio.Queue
    prompt_tokens: int


def prompt_ids(srv: Server, step: Step) -> list[int]:
    """A step's prompt through the chat template; 422 if the template refuses the turns, 400 if the prompt and
    the step's token cap do not fit the model's context."""
    try:
        ids = chat_ids(srv.engine.tok, step.turns, generation_prompt=True)
    except Exception as exc:  # a template that refuses the conversation (roles out of order, ...)
        raise ApiError(422, f"messages: the chat template refused them ({exc})", param="messages") from None
    limit = context_length(srv.engine.model)
    if len(ids) + step.max_tokens > limit:
        raise ApiError(
            400,
            f"the conversation is {len(ids)} tokens; with max_tokens {step.max_tokens} it "
            f"exceeds the model's context of {limit}",
            param="messages",
            code="context_length_exceeded",
        )
    return ids


def submit(
    srv: Server,
    body: ChatRequest,
    step: Step,
    stop: list[str],
    on_end: Callable[[], None] | None = None,
    fmt: formats.Format | None = None,
) -> Decoding:
    """Hand a step to the engine with its mixture and the client's sampling; its pieces arrive on this event
    loop (call from the route's coroutine); on_end is called when the engine is done with it. The answer's step
    (fmt given) is decoded under the format's grammar and keeps logprobs if the client asked for them."""
    ids = prompt_ids(srv, step)
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    constraint = srv.engine.grammars().constraint(fmt.grammar) if fmt is not None and fmt.grammar else None
    req = srv.engine.submit(
        ids,
        list(step.mixture.adapters),
        list(step.mixture.weights),
        max_tokens=step.max_tokens,
        temperature=body.temperature or 0.0,
        top_p=body.top_p or 1.0,
        seed=body.seed,
        stop=stop,
        emit=lambda item: loop.call_soon_threadsafe(pieces.put_nowait, item),
        on_end=on_end,
        constraint=constraint,
        logprobs=(body.top_logprobs or 0) if body.logprobs and fmt is not None else None,
    )
    return Decoding(req, pieces, len(ids))


async def finish(srv: Server, d: Decoding, http: HttpRequest | None) -> str:
    """Wait for a step's whole text, count its tokens; 500 if the engine failed it. A client that goes away
    frees its row: starlette neither cancels a non-streaming handler nor tells it, so the connection is
    watched meanwhile; the engine ends the row at its next step, and the answer (499) goes nowhere. Without an
    HTTP request of its own (an MCP call) nothing is watched: a cancelled call cancels this task, which ends
    the row."""
    watcher = asyncio.create_task(watch(http, d.req)) if http is not None else None
    try:
        while (await d.pieces.get()) is not END:
            pass
    except asyncio.CancelledError:
        d.req.cancelled = True
        raise
    finally:
        if watcher is not None:
            watcher.cancel()
    srv.metrics.tokens.inc(d.req.completion_tokens)  # every token the engine decoded, irag's recall too
    if d.req.finish_reason == "cancelled":
        raise ApiError(499, "the client closed the request", code="client_closed_request")
    if d.req.error:
        raise ApiError(500, f"generation failed: {d.req.error}", "server_error")
    return d.req.text


async def watch(http: HttpRequest, req: Request) -> None:
    """Cancel `req` when the client disconnects. The body is read, so the next ASGI message is the disconnect
    (the wait StreamingResponse does; polling `is_disconnected` misses it behind the middleware's wrappers)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    req.cancelled = True


@dataclass
class Completion:
    """What the answer's JSON needs: the request, the completion's id and time, the memory extension, the last
    step's decoding and the format it was asked in."""

    body: ChatRequest
    id: str
    created: int
    memory: dict
    final: Decoding
    fmt: formats.Format
    token_bytes: Callable[[int], bytes]
    recall: str | None = None  # irag's recall, the step the answer continues

    def head(self, kind: str) -> dict:
        """The fields every answer and chunk starts with."""
        return {"id": self.id, "object": kind, "created": self.created, "model": self.body.model}

    def usage(self) -> dict:
        """Token counts. For irag the prompt is the last step's (recall, then the question): what the answer
        was decoded from; the recall's own decoding is not counted as completion tokens."""
        n, prompt = self.final.req.completion_tokens, self.final.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}

    def logprobs(self, start: int = 0, end: int | None = None) -> dict | None:
        """OpenAI's logprobs of the answer's tokens [start, end) (None if the client did not ask for them)."""
        if not self.body.logprobs:
            return None
        return {"content": [self._entry(lp) for lp in self.final.req.logprob_list[start:end]], "refusal": None}

    def _entry(self, lp: Logprob) -> dict:
        def one(token: int, logprob: float) -> dict:
            raw = self.token_bytes(token)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

        return one(lp.token, lp.logprob) | {"top_logprobs": [one(t, x) for t, x in lp.top]}

    def chunk(self, delta: dict, finish: str | None = None, extra: dict | None = None, logprobs=None) -> str:
        """One server-sent event of the stream."""
        c = self.head("chat.completion.chunk") | {
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]
        }
        return f"data: {json.dumps(c | (extra or {}), ensure_ascii=False)}\n\n"


def completion_json(c: Completion) -> dict:
    """The non-streamed answer (OpenAI's chat.completion, with megamem's `memory` extension): the text as content,
    or as a tool call when the request had tools and the reply is one."""
    req = c.final.req
    message, finish_reason = formats.reply(req.text, c.fmt, req.finish_reason)
    choice = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": c.logprobs()}
    return c.head("chat.completion") | {"choices": [choice], "usage": c.usage(), "memory": c.memory}


async def events(srv: Server, c: Completion):
    """The streamed answer: a first chunk with the role and the memory extension, the text as it is decoded
    (each piece with its tokens' logprobs if asked), the finish chunk, the usage chunk if asked for, [DONE].
    Under tools a reply that starts with "{" is a call: it is held back and sent whole as one tool_calls delta
    (its arguments are only known valid once the grammar has closed them); text streams as it comes."""
    req = c.final.req
    sent = 0  # tokens whose logprobs have been sent
    held: list[str] | None = None  # a tool call's pieces, held back
    try:
        yield c.chunk({"role": "assistant", "content": ""}, extra={"memory": c.memory})
        while (item := await c.final.pieces.get()) is not END:
            if c.fmt.tools is not None and (held is not None or (not req.text.strip() or req.text.lstrip()[0] == "{")):
                held = [*(held or []), item]  # a call, or text that has not shown its first character yet
                if req.text.strip() and req.text.lstrip()[0] != "{":  # it is text after all: send what was held
                    item, held = "".join(held), None
                else:
                    continue
            upto = getattr(item, "tokens", None) or len(req.logprob_list)
            yield c.chunk({"content": item}, logprobs=c.logprobs(sent, upto))
            sent = upto
        message, finish_reason = formats.reply(req.text, c.fmt, req.finish_reason)
        if "tool_calls" in message:
            calls = [{"index": 0} | call for call in message["tool_calls"]]
            yield c.chunk({"tool_calls": calls}, logprobs=c.logprobs(sent))
        elif held:  # a call cut short (max_tokens): what was decoded, as text
            yield c.chunk({"content": "".join(held)}, logprobs=c.logprobs(sent))
        yield c.chunk({}, finish_reason if finish_reason != "error" else "stop")
        if c.body.stream_options and c.body.stream_options.include_usage:
            yield f"data: {json.dumps(c.head('chat.completion.chunk') | {'choices': [], 'usage': c.usage()})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        req.cancelled = True  # a client that went away frees its row
        srv.metrics.tokens.inc(req.completion_tokens)


def token_cap(srv: Server, body: ChatRequest) -> int:
    """The chat's max_tokens (the server's default if it gives none); 400 naming the field above the server's
    cap (ServerConfig.max_tokens_cap, never more than the model's context): nothing is silently shortened."""
    cap = min(srv.cfg.max_tokens_cap, context_length(srv.engine.model))
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    asked = body.max_completion_tokens or body.max_tokens
    if asked is None:
        return min(DEFAULT_MAX_TOKENS, cap)
    if asked > cap:
        raise ApiError(400, f"{field} is {asked}; this server allows at most {cap}", param=field, code="invalid_value")
    return asked


def requested_format(srv: Server, body: ChatRequest) -> formats.Format:
    """The request's response_format and tools as a Format (compiled against the serving tokenizer, whose index
    is built on the first request that needs it); logprobs need that tokenizer too, for each token's bytes."""
    needs = body.tools or (body.response_format and body.response_format.type != "text") or body.logprobs
    if not needs and body.tool_choice in (None, "none"):
        return formats.Format()
    return formats.requested(srv.engine.grammars(), body.response_format, body.tools, body.tool_choice)


def caller_key(p: Principal) -> str:
    """Whose limits a chat counts against: its API key (by the prefix the key table keeps); under --open every
    caller is one."""
    return p.key_prefix or "open"


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, p: Caller, srv: Ready, http: HttpRequest) -> Response:
    """A chat completion through the answer pipeline, streamed or not, with the memories the gate selected."""
    check_model(srv, body.model)
    refuse_unhonoured(body)
    opts = body.memory or MemoryOptions()
    turns = conversation(body)
    max_tokens = token_cap(srv, body)
    fmt = await run_in_threadpool(requested_format, srv, body)  # a schema that cannot compile: 400, before the gate
    try:
        release = srv.limits.admit(caller_key(p), max_tokens, srv.engine.rate())
    except ApiError:
        srv.metrics.refused.inc()
        raise
    try:  # the caller's limits are held until the answer's row ends (release is called by the engine then)
        return await answer_chat(srv, body, p, http, turns, opts, max_tokens, fmt, release)
    except BaseException:
        release()
        raise


async def answer_chat(
    srv: Server,
    body: ChatRequest,
    p: Principal,
    http: HttpRequest,
    turns: list[Turn],
    opts: MemoryOptions,
    max_tokens: int,
    fmt: formats.Format,
    release: Callable[[], None],
) -> Response:
    """The answer, whole or streamed (its row calls `release` as it ends)."""
    c = await start_answer(srv, body, p, http, turns, opts, max_tokens, fmt, release)
    if not body.stream:
        await finish(srv, c.final, http)
        return JSONResponse(completion_json(c))
    return StreamingResponse(events(srv, c), media_type="text/event-stream")


async def start_answer(
    srv: Server,
    body: ChatRequest,
    p: Principal,
    http: HttpRequest | None,
    turns: list[Turn],
    opts: MemoryOptions,
    max_tokens: int | None,
    fmt: formats.Format,
    release: Callable[[], None],
) -> Completion:
    """The gate, irag's recall if the mode has one, then the answer's row handed to the engine (which calls
    `release` as it ends): every interface that answers a question from the server (chat, MCP's ask) starts
    here. max_tokens None: the pipeline's own caps (Memory.ask's)."""
    g, scope = await run_in_threadpool(gated, srv, p, answer.question_of(turns), opts)
    steps = answer.plan(turns, opts.mode, g.mixture, g.passages, max_tokens)
    step, recall = next(steps), None
    while not step.final:  # irag's recall: decoded whole, then the conversation the answer continues
        recall = (await finish(srv, submit(srv, body, step, []), http)).strip()
        step = steps.send(recall)  # stripped as generate.complete strips it: both sides continue alike
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    step = replace(step, turns=fmt.turns(step.turns))  # the format's instruction: the answer's step only
    final = submit(srv, body, step, stops[:4], on_end=release, fmt=fmt)
    routed = [(schema.api_id(scope[i]), s, w) for i, s, w in g.routed if i in scope]
    memory = {"selected": [{"id": i, "score": round(s, 6), "weight": round(w, 6)} for i, s, w in routed]}
    decode = srv.engine.grammars().tokenizer.decode_bytes if body.logprobs else bytes  # built by requested_format
    cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    return Completion(body, cid, now, memory, final, fmt, lambda t: decode([t]), recall)
