"""Tenants: API keys that map a caller to a namespace, and the namespace rules every route applies.

A key is `mm-` + 32 random bytes (URL-safe base64); only its SHA-256 is stored (a key that random needs no
slow hash: there is nothing to guess). An admin key manages keys and may act in any namespace it names;
other keys act in their own namespace only. A memory belongs to a namespace by its metadata
(`megamem.namespace`; none = the CLI's "default" namespace), and its stored id is the API id prefixed with
`NAMESPACE--` (plain in the default namespace), so one tenant cannot even name another's memory. mem0's
server does not check the owner on GET/PUT/DELETE by id; every route here does.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass

from ..checks import check_id
from ..errors import MegamemError
from ..store import Record
from .db import write

DEFAULT_NAMESPACE = "default"
NAMESPACE_KEY = "megamem.namespace"
USER_KEY = "megamem.user_id"
AGENT_KEY = "megamem.agent_id"
JOB_KEY = "megamem.job"
SEPARATOR = "--"
_NAMESPACE = re.compile(r"[a-z0-9][a-z0-9_]{0,39}")


@dataclass(frozen=True)
class Principal:
    """Who is calling: their namespace, and whether the key is an admin key."""

    namespace: str
    admin: bool = False
    key_prefix: str = ""


def check_namespace(name: object) -> str:
    """A namespace: 1-40 lower-case letters, digits and '_', starting with a letter or digit."""
    if not isinstance(name, str) or not _NAMESPACE.fullmatch(name):
        raise MegamemError(
            f"namespace {name!r} must be 1-40 lower-case letters, digits and '_', starting with a letter or digit"
        )
    return name


def check_api_id(memory_id: object) -> str:
    """A memory id as the API sees it: a memory id without the namespace separator '--'."""
    memory_id = check_id(memory_id)
    if SEPARATOR in memory_id:
        raise MegamemError(f"memory id {memory_id!r} may not contain {SEPARATOR!r}")
    return memory_id


def stored_id(namespace: str, api_id: str) -> str:
    """The store's id of a namespace's memory (plain in the default namespace)."""
    return api_id if namespace == DEFAULT_NAMESPACE else f"{namespace}{SEPARATOR}{api_id}"


def api_id(rec: Record) -> str:
    """The id the API shows for a stored memory: without its namespace prefix."""
    ns = namespace_of(rec)
    prefix = f"{ns}{SEPARATOR}"
    return rec.id[len(prefix) :] if ns != DEFAULT_NAMESPACE and rec.id.startswith(prefix) else rec.id


def namespace_of(rec: Record) -> str:
    return rec.metadata.get(NAMESPACE_KEY, DEFAULT_NAMESPACE)


def owns(namespace: str, rec: Record) -> bool:
    """Whether a stored memory is the namespace's: both its metadata and its id's prefix must say so."""
    if namespace_of(rec) != namespace:
        return False
    if namespace == DEFAULT_NAMESPACE:
        return SEPARATOR not in rec.id
    return rec.id.startswith(f"{namespace}{SEPARATOR}")


def user_metadata(rec: Record) -> dict:
    """A memory's metadata as its owner gave it (megamem's reserved keys left out)."""
    return {k: v for k, v in rec.metadata.items() if not k.startswith("megamem.")}


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
