"""Who is calling: the dependencies every route names. `Ready` is the Server once it has loaded (503 before),
`Caller` the Principal an API key maps to (sent as `Bearer KEY`, or `Token KEY` as mem0's client sends it; 401
without a valid one; an admin key may act in a namespace it names with X-Megamem-Namespace), `Admin` a caller
with an admin key (403 otherwise).

The Server is the app's (`request.app.state.server`, set by create_app), so routes are plain module functions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from fastapi import Depends, Header, Request

from .. import schema
from ..errors import MegamemError
from . import tenants
from .errors import ApiError, invalid
from .runtime import Server
from .tenants import Principal

KEY_SCHEMES = ("bearer", "token")  # Authorization schemes that carry an API key: OpenAI's, and mem0's


def server(request: Request) -> Server:
    """The app's Server, loaded or not (for the routes that answer while it loads: health, metrics)."""
    return request.app.state.server


def ready(srv: Annotated[Server, Depends(server)]) -> Server:
    """The Server once loaded; 503 while the model loads (with Retry-After) or when it could not start."""
    if srv.failed:
        raise ApiError(503, f"the server could not start: {srv.failed}", "server_error", code="not_ready")
    if not srv.ready.is_set():
        raise ApiError(
            503, "the model is loading; try again shortly", "server_error", code="loading", headers={"Retry-After": "5"}
        )
    return srv


Ready = Annotated[Server, Depends(ready)]


def caller(
    s: Ready,
    authorization: Annotated[str | None, Header()] = None,
    x_megamem_namespace: Annotated[str | None, Header()] = None,
) -> Principal:
    """The caller by its key, sent as `Bearer KEY` (OpenAI's clients) or `Token KEY` (mem0's MemoryClient) (open
    access: everyone is the default namespace)."""
    if s.cfg.open_access:
        return Principal(schema.DEFAULT_NAMESPACE)
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() not in KEY_SCHEMES or not key.strip():
        raise ApiError(401, "no API key: send Authorization: Bearer KEY (or Token KEY)", code="missing_api_key")
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
    """A caller with an admin key (the key routes are the admin's)."""
    if not p.admin:
        raise ApiError(403, "this route needs an admin key", code="forbidden")
    return p


Admin = Annotated[Principal, Depends(admin)]
