"""The FastAPI application: OpenAI's chat routes, mem0's memory routes, jobs, keys, health, metrics, the page.

Built as a recipe: `Server` (runtime.py) holds the parts (the serving Memory and its lock, the engine, the job
queue and worker, the key table, the metrics), the routers (routes/) act on it, and `create_app` wires them
with the error handlers (errors.py) and the middleware. Every route that touches a memory resolves the caller's
namespace first (auth.py) and checks ownership (schema.owns); the gate only ever scores the caller's memories.
Errors everywhere have OpenAI's shape {"error": {"message", "type", "param", "code"}}. The outermost
middleware checks the Host header (ServerConfig.allowed_hosts): a page that rebinds its own DNS name to
127.0.0.1 still sends that name, and is refused before any route runs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from .. import __version__
from . import errors
from .errors import BodyLimit, error_response
from .mcp_http import McpEndpoint
from .routes import chat, embeddings, health, jobs, keys, mem0, memories
from .runtime import Server, ServerConfig

__all__ = ["Server", "ServerConfig", "create_app"]


def create_app(cfg: ServerConfig, server: Server | None = None) -> FastAPI:
    """The application for a store; the model loads in the background when it starts (create_app itself
    touches no store and loads nothing, so the schema can be read from an app that never starts)."""
    srv = server or Server(cfg)
    mcp = McpEndpoint(srv)  # /mcp: the memory tools over MCP's streamable HTTP (mcp_http.py)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """Load in a thread (healthz answers 503 meanwhile); stop and wait for the engine and worker on shutdown."""
        srv.start()
        async with mcp.run():  # the MCP SDK's session manager runs while the app does
            yield
        srv.close()

    app = FastAPI(
        title="megamem",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible chat with memories in gated LoRA adapters, and a memory API.",
    )
    app.state.server = srv
    errors.install(app)
    app.add_middleware(BodyLimit, limit=cfg.max_body)  # outermost but for the metrics below
    app.middleware("http")(observe)
    if cfg.allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=cfg.allowed_hosts)  # outermost: before the body or the metrics
    for router in (health.router, chat.router, embeddings.router, memories.router, jobs.router, keys.router):
        app.include_router(router)
    app.include_router(mem0.router)  # mem0's hosted API, as mem0ai's MemoryClient calls it (routes/mem0.py)
    app.add_route("/mcp", mcp, include_in_schema=False)  # an ASGI app: MCP's JSON-RPC is not an OpenAPI route
    return app


async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Count every request and its latency by route template (not by path: ids would explode the labels)."""
    t = time.perf_counter()
    response = await call_next(request)
    route = request.scope.get("route")
    name = getattr(route, "path", "unmatched")
    m = request.app.state.server.metrics
    m.requests.labels(name, str(response.status_code)).inc()
    m.latency.labels(name).observe(time.perf_counter() - t)
    return response


def host_name(host: str) -> str:
    """A Host header's name without its port, lower-case, IPv6 literals without brackets: "[::1]:8000" ->
    "::1", "LocalHost:80" -> "localhost"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class HostCheck:
    """ASGI middleware: serve only requests whose Host header names an allowed host (any port); "*" allows
    every host. Others are answered 400 in OpenAI's shape, naming the host and the option that allows it."""

    def __init__(self, app, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.any = "*" in allowed
        self.allowed = {host_name(h) for h in allowed}

    async def __call__(self, scope, receive, send) -> None:
        """Pass lifespan traffic and allowed hosts through; refuse the rest before the app sees them."""
        if self.any or scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if host_name(raw) in self.allowed:
            return await self.app(scope, receive, send)
        message = (
            f"host {raw[:200]!r} is not allowed; serve with --allowed-hosts to allow it"
            if raw
            else "the request has no Host header"
        )
        await error_response(400, message, param="Host", code="host_not_allowed")(scope, receive, send)
