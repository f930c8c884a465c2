"""/mcp on `megamem serve`: the memory tools (mcp_tools) over MCP's streamable HTTP transport, acting through the
server's own code path, so that MCP answers as the REST API and chat do:

- the caller is resolved from its API key (`Authorization: Bearer KEY`, and an admin key's X-Megamem-Namespace)
  by the same functions as every route (auth.ready, auth.caller): 503 while the model loads, 401 without a valid
  key, in OpenAI's error shape; --open serves everyone as the default namespace. Every request is checked, so a
  revoked key stops working at once;
- add, search, list and forget call the memory routes' functions (routes/memories.py) as that caller, with their
  checks of scope and ownership (another namespace's memory is as absent as a missing one): an add is a job in
  the server's queue, learned by its training worker;
- ask is chat's pipeline (routes/chat.py): the caller's gate (chat.gated), answer.plan's steps, the batching
  engine (chat.submit), and the caller's limits on chats in flight.

The SDK's session manager runs stateless (every POST stands alone; no session to expire or to steal between
keys) while the app runs: McpEndpoint.run is entered by the app's lifespan. The server's HostCheck middleware
has already refused a foreign Host header, so the SDK's own DNS-rebinding check is off (it would refuse the
names --allowed-hosts adds); a browser page on another origin cannot POST JSON here without a CORS preflight,
which the server never grants.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio.to_thread
from mcp.server.mcpserver import Context
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from .. import answer
from ..checks import check_text
from ..errors import MegamemError
from . import auth, formats
from .errors import ApiError
from .mcp_tools import (
    AddResult,
    AskResult,
    ForgetResult,
    ListResult,
    SearchResult,
    ToolError,
    build,
    tool_error,
)
from .routes import chat, memories
from .runtime import Server
from .schemas import AddMemory, ChatRequest, MemoryOptions, Message, Search
from .tenants import Principal

PRINCIPAL = "megamem.principal"  # the ASGI scope key McpEndpoint puts the caller under, for the tools to read
T = TypeVar("T")


def caller_of(ctx: Context) -> Principal:
    """The caller of a tool call: what McpEndpoint resolved from the HTTP request that carried it."""
    request = ctx.request_context.request
    p = request.scope.get(PRINCIPAL) if request is not None else None
    if not isinstance(p, Principal):  # only a request that passed McpEndpoint reaches a tool
        raise ToolError("this call came without a caller; send it to /mcp with Authorization: Bearer KEY")
    return p


async def routed(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Call a route's function in a worker thread (it takes the server's lock and reads the store, as FastAPI
    runs it), its refusal (a 4xx ApiError, a full queue, a conflict) becoming the tool error."""
    try:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kw))
    except ApiError as exc:
        raise ToolError(exc.message) from None
    except MegamemError as exc:  # QueueFull, Conflict: what errors._megamem answers 429 and 409
        raise tool_error(exc) from None


def first_problem(exc: ValidationError) -> str:
    """A request body pydantic refused, as one line naming the field (as errors._validation words it)."""
    err = exc.errors()[0]
    where = ".".join(str(x) for x in err.get("loc", ()))
    return f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid"))


class ServerActions:
    """The tools as the serving Server does them, for the caller of each call."""

    add_note = (
        "The server learns its adapter in a training worker: the call returns at once with the job's id and "
        "status 'queued', as POST /v1/memories does. The memory is listed and searched at once (state 'learning') "
        "and its text can answer questions as context; its adapter joins when the job ends."
    )

    def __init__(self, srv: Server) -> None:
        self.srv = srv

    async def add(
        self,
        ctx: Context,
        text: str,
        paraphrases: list[str],
        metadata: dict[str, Any],
        user_id: str | None,
        agent_id: str | None,
        id: str | None,
        replaces: list[str],
    ) -> AddResult:
        """POST /v1/memories: a job in the queue (every field checked first, and the text to fit the model)."""
        fields = {"paraphrases": paraphrases, "metadata": metadata, "user_id": user_id, "agent_id": agent_id}
        try:
            body = AddMemory(text=text, id=id, replaces=replaces, **fields)
        except ValidationError as exc:
            raise ToolError(first_problem(exc)) from None
        job = await routed(memories.add_memory, body, caller_of(ctx), self.srv)
        note = f"queued: job {job['job_id']} learns memory {job['memory_id']!r} in the server's training worker"
        return AddResult(id=job["memory_id"], status=job["status"], job_id=job["job_id"], note=note)

    async def search(
        self, ctx: Context, query: str, user_id: str | None, agent_id: str | None, limit: int
    ) -> SearchResult:
        """POST /v1/memories/search."""
        body = Search(query=query, user_id=user_id, agent_id=agent_id, limit=limit)
        return SearchResult.model_validate(await routed(memories.search, body, caller_of(ctx), self.srv))

    async def list(
        self, ctx: Context, user_id: str | None, agent_id: str | None, limit: int, cursor: str | None
    ) -> ListResult:
        """GET /v1/memories."""
        page = await routed(
            memories.list_memories,
            caller_of(ctx),
            self.srv,
            user_id=user_id,
            agent_id=agent_id,
            limit=limit,
            cursor=cursor,
        )
        return ListResult.model_validate(page)

    async def forget(self, ctx: Context, id: str) -> ForgetResult:
        """DELETE /v1/memories/{id}: the caller's own memory, or no memory at all."""
        return ForgetResult.model_validate(await routed(memories.delete_memory, id, caller_of(ctx), self.srv))

    async def ask(self, ctx: Context, question: str, mode: str, max_tokens: int | None) -> AskResult:
        """A chat of one question through chat's pipeline, as the caller (its gate, its limits)."""
        try:  # the question checked as Memory.ask checks it (a chat lets a blank message through; a question is not)
            return await answer_question(self.srv, caller_of(ctx), check_text(question, "question"), mode, max_tokens)
        except ApiError as exc:
            raise ToolError(exc.message) from None
        except MegamemError as exc:
            raise tool_error(exc) from None


async def answer_question(srv: Server, p: Principal, question: str, mode: str, max_tokens: int | None) -> AskResult:
    """What POST /v1/chat/completions answers to one user message, through chat's own start (chat.start_answer:
    the caller's gate, the plan, irag's recall fed back, the answer's row) decoded whole. max_tokens None: the
    pipeline's own caps (Memory.ask's), not chat's default of 256."""
    body = ChatRequest(
        model="megamem",
        messages=[Message(role="user", content=question)],
        max_tokens=max_tokens,
        memory=MemoryOptions(mode=mode),
    )
    turns = chat.conversation(body)  # the text checked as every message is
    cap = chat.token_cap(srv, body) if max_tokens is not None else None  # 400 above the server's cap
    try:  # the caller's limits on chats in flight, as chat admits them (the longest step's cap as its tokens)
        release = srv.limits.admit(chat.caller_key(p), cap or answer.RECALL_TOKENS, srv.engine.rate())
    except ApiError:
        srv.metrics.refused.inc()
        raise
    try:
        c = await chat.start_answer(srv, body, p, None, turns, body.memory, cap, formats.Format(), release)
        text = (await chat.finish(srv, c.final, None)).strip()  # as Memory.ask answers
    finally:
        release()  # the row's end releases it too; a second release is a no-op
    selected = [{"id": s["id"], "weight": s["weight"]} for s in c.memory["selected"]]
    recall = text if mode == "recall" else c.recall
    return AskResult(answer=text, mode=mode, recall=recall, selected=selected)


class McpEndpoint:
    """The ASGI app at /mcp: the caller checked as every route checks it, then the SDK's session manager."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.mcp = build(ServerActions(srv))
        self.manager: StreamableHTTPSessionManager | None = None

    @asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        """Run the SDK's session manager while the app runs. A manager runs once only, so each run of the app
        gets a fresh one (streamable_http_app makes it; its Starlette app is not used: /mcp is this object)."""
        self.mcp.streamable_http_app(
            stateless_http=True,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
            max_request_body_size=self.srv.cfg.max_body,
        )
        manager = self.mcp.session_manager
        async with manager.run():
            self.manager = manager
            try:
                yield
            finally:
                self.manager = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Resolve the caller (in a thread: the key lookup takes the server's lock), then serve the request."""
        headers = Headers(scope=scope)
        try:
            if self.manager is None:
                raise ApiError(503, "the MCP endpoint is not running", "server_error", code="not_ready")
            p = await anyio.to_thread.run_sync(
                self.authorize, headers.get("authorization"), headers.get("x-megamem-namespace")
            )
        except ApiError as exc:
            await exc.response()(scope, receive, send)
            return
        await self.manager.handle_request({**scope, PRINCIPAL: p}, receive, send)

    def authorize(self, authorization: str | None, namespace: str | None) -> Principal:
        """The caller by the server's rules (auth.ready, then auth.caller)."""
        return auth.caller(auth.ready(self.srv), authorization, namespace)
