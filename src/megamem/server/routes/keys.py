"""The key routes (admin keys only): make an API key for a namespace, list the keys (never a key or its hash)."""

from __future__ import annotations

from fastapi import APIRouter

from ...errors import MegamemError
from .. import tenants
from ..auth import Admin, Ready
from ..errors import invalid
from ..schemas import NewKey

router = APIRouter()


@router.post("/v1/keys", status_code=201)
def new_key(body: NewKey, p: Admin, srv: Ready) -> dict:
    """A new key; the only time the key itself is shown."""
    try:
        with srv.lock:
            key = tenants.create_key(srv.db, body.namespace, body.admin, body.name)
    except MegamemError as exc:
        raise invalid(exc, "namespace") from None
    return {"key": key, "namespace": body.namespace, "admin": body.admin}


@router.get("/v1/keys")
def keys(p: Admin, srv: Ready) -> dict:
    """Every key's prefix, namespace, admin flag, name and creation time."""
    with srv.lock:
        return {"data": tenants.list_keys(srv.db)}
