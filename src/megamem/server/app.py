"""The FastAPI application: OpenAI's chat routes, mem0's memory routes, jobs, keys, health, metrics, the page.

Built as a recipe: `Server` (runtime.py) holds the parts (the serving Memory and its lock, the engine, the job
queue and worker, the key table, the metrics), the routers (routes/) act on it, and `create_app` wires them
with the error handlers (errors.py) and the middleware. Every route that touches a memory resolves the caller's
namespace first (auth.py) and checks ownership (schema.owns); the gate only ever scores the caller's memories.
Errors everywhere have OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from .. import __version__
from . import errors
from .errors import BodyLimit
from .routes import chat, health, jobs, keys, memories
from .runtime import Server, ServerConfig

__all__ = ["Server", "ServerConfig", "create_app"]


def create_app(cfg: ServerConfig, server: Server | None = None) -> FastAPI:
    """The application for a store; the model loads in the background when it starts (create_app itself
    touches no store and loads nothing, so the schema can be read from an app that never starts)."""
    srv = server or Server(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """Load in a thread (healthz answers 503 meanwhile); stop the engine and worker on shutdown."""
        threading.Thread(target=srv.load, name="megamem-load", daemon=True).start()
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
    for router in (health.router, chat.router, memories.router, jobs.router, keys.router):
        app.include_router(router)
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
