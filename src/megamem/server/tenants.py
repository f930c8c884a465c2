"""Tenants: API keys that map a caller to a namespace, and the namespace rules every route applies.

A key is `mm-` + 32 random bytes (URL-safe base64); only its SHA-256 is stored (a key that random needs no
slow hash: there is nothing to guess). An admin key manages keys and may act in any namespace it names;
other keys act in their own namespace only. Which memories a namespace owns, and how their ids are formed,
is the record schema's rule (megamem.schema.owns, stored_id). mem0's server does not check the owner on
GET/PUT/DELETE by id; every route here does.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass

from ..errors import MegamemError
from ..schema import check_namespace
from .db import write


@dataclass(frozen=True)
class Principal:
    """Who is calling: their namespace, and whether the key is an admin key."""

    namespace: str
    admin: bool = False
    key_prefix: str = ""


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(db: sqlite3.Connection, namespace: str, admin: bool = False, name: str = "") -> str:
    """A new API key for `namespace` (returned once; only its hash is kept)."""
    check_namespace(namespace)
    key = "mm-" + secrets.token_urlsafe(32)
    with write(db):
        db.execute(
            "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?)",
            (_hash(key), key[:10], namespace, int(admin), name, time.time()),
        )
    return key


def list_keys(db: sqlite3.Connection) -> list[dict]:
    rows = db.execute("SELECT prefix, namespace, admin, name, created FROM api_keys ORDER BY created").fetchall()
    return [{"prefix": p, "namespace": n, "admin": bool(a), "name": nm, "created": c} for p, n, a, nm, c in rows]


def revoke_key(db: sqlite3.Connection, prefix: str) -> int:
    """Revoke the keys starting with `prefix` (at least its first 10 characters, as list_keys shows them)."""
    if not isinstance(prefix, str) or len(prefix) < 10:
        raise MegamemError("give at least the first 10 characters of the key (as `megamem keys list` shows them)")
    with write(db):
        cur = db.execute("DELETE FROM api_keys WHERE prefix = ?", (prefix[:10],))
    return cur.rowcount


def has_keys(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None


def resolve(db: sqlite3.Connection, key: str) -> Principal | None:
    """The caller a key names, or None for an unknown key."""
    row = db.execute("SELECT namespace, admin, prefix FROM api_keys WHERE hash = ?", (_hash(key),)).fetchone()
    return Principal(row[0], bool(row[1]), row[2]) if row else None
