"""Health, metrics, the page and the model list: what a load balancer, Prometheus, a browser and an OpenAI
client ask first. /healthz and /metrics answer while the model loads (and need no key)."""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..auth import Caller, Ready, server
from ..errors import error_response
from ..runtime import Server

MODEL_ALIAS = "megamem"  # the model name every server answers to, beside its base model's own id
router = APIRouter()


@router.get("/healthz")
def healthz(srv: Annotated[Server, Depends(server)]) -> JSONResponse:
    """200 once loaded, 503 while loading or when start-up failed (with why)."""
    if srv.failed:
        return error_response(503, srv.failed, "server_error", code="not_ready")
    if not srv.ready.is_set():
        return error_response(503, "loading the model", "server_error", code="loading")
    return JSONResponse({"status": "ok"})  # no counts: any caller may ask, and a store's size is its tenants' business


@router.get("/metrics")
def metrics(srv: Annotated[Server, Depends(server)]) -> Response:
    """Prometheus text; the queue depths and the decode rate are read now, the counters kept as they happen."""
    m = srv.metrics
    if srv.ready.is_set():
        with srv.lock:
            m.queue.set(srv.queue.waiting())
        m.engine.set(srv.engine.depth())
        st = srv.engine.stats
        m.tps.set(st["tokens"] / st["decode_s"] if st["decode_s"] else 0.0)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> str:
    """The web page (chat, memories, jobs), shipped with the package."""
    return resources.files("megamem.server").joinpath("page.html").read_text(encoding="utf-8")


def served_models(srv: Server) -> tuple[str, str]:
    """The model names a request may use: the store's base model and the alias."""
    return srv.mem.model_name, MODEL_ALIAS


@router.get("/v1/models")
def models(p: Caller, srv: Ready) -> dict:
    """OpenAI's model list: the base model and the alias."""
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "megamem"} for m in served_models(srv)]
    return {"object": "list", "data": data}
