"""The server's commands: serve, and keys create | list | revoke (the API keys it accepts; docs/server.md)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer

from ..backend import SERVE
from ..errors import MegamemError
from ..schema import check_namespace
from ..store import Store
from .context import JsonOpt, StoreOpt, emit, open_store, require_at, say, store_path

HostOpt = Annotated[str, typer.Option("--host", help="Address to listen on.")]
PortOpt = Annotated[int, typer.Option("--port", help="Port.")]
OpenOpt = Annotated[
    bool, typer.Option("--open", help="No API keys: every caller is the default namespace (loopback use).")
]
MaxBatchOpt = Annotated[int, typer.Option("--max-batch", help="Chat requests decoded together, at most.")]
NoBatchOpt = Annotated[bool, typer.Option("--no-batch", help="Decode one request at a time.")]
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    store: StoreOpt = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    open_access: OpenOpt = False,
    max_batch: MaxBatchOpt = 16,
    no_batch: NoBatchOpt = False,
) -> None:
    """Serve the store: OpenAI-compatible chat, the memory API, injection jobs and a web page (docs/server.md)."""
    import uvicorn

    from ..server.app import ServerConfig, create_app

    _check_port(host, port)
    path = store_path(store)
    require_at(path, SERVE, "serve")
    if max_batch < 1:
        raise MegamemError("--max-batch must be at least 1")
    if open_access and host not in LOOPBACK:
        raise MegamemError("--open serves without API keys; it only listens on loopback (127.0.0.1)")
    _check_access(path, open_access)
    cfg = ServerConfig(store=path, open_access=open_access, max_batch=max_batch, batched=not no_batch)
    uvicorn.run(create_app(cfg), host=host, port=port, log_level="warning")


def _check_port(host: str, port: int) -> None:
    """A port the server can listen on, or one error line: out of range, or already taken (checked by binding
    it for a moment, before the model loads)."""
    if not 1 <= port <= 65535:
        raise MegamemError(f"--port must be from 1 to 65535, got {port}")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise MegamemError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another server using it?)"
        ) from None


def _check_access(path: Path, open_access: bool) -> None:
    """Without --open the server needs a store with API keys: an error saying how to make one otherwise."""
    if Store.exists(path):
        from ..server import tenants

        if not tenants.has_keys(_connect(path)) and not open_access:
            raise MegamemError(
                f"the store has no API keys; `megamem keys create --store {path} --namespace NAME` makes one, or "
                "serve with --open (no keys, loopback only)"
            )
    elif not open_access:
        raise MegamemError(
            f"no megamem store at {path}; create keys first (`megamem keys create --store {path} ...`) or --open"
        )


def _connect(path: Path):
    """The server's database of the store at `path` (its API keys)."""
    from ..server import db as server_db

    return server_db.connect(path)


keys_app = typer.Typer(no_args_is_help=True, help="API keys of the server: each maps a caller to a namespace.")


def _keys_db(store: Path | None, create: bool):
    """The key database of the store; create: an empty store with the default settings if there is none."""
    path = store_path(store)
    if not Store.exists(path):
        if not create:
            raise MegamemError(f"no megamem store at {path}")
        open_store(path).prepare_store()  # an empty store with the default settings, ready for the server
    return _connect(path)


@keys_app.command("create")
def keys_create(
    namespace: Annotated[str, typer.Option("--namespace", help="The tenant this key acts for.")],
    store: StoreOpt = None,
    admin: Annotated[bool, typer.Option("--admin", help="May manage keys and act in any namespace.")] = False,
    name: Annotated[str, typer.Option("--name", help="A label for the key.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Make an API key (printed once; only its hash is stored). Creates an empty store if there is none."""
    from ..server import tenants

    check_namespace(namespace)
    key = tenants.create_key(_keys_db(store, create=True), namespace, admin, name)
    emit(as_json, {"key": key, "namespace": namespace, "admin": admin}, lambda: say(key))


@keys_app.command("list")
def keys_list(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """The keys (their first characters only), namespaces and labels."""
    from ..server import tenants

    rows = tenants.list_keys(_keys_db(store, create=False))

    def human() -> None:
        """One key a line: its prefix, namespace, admin flag and label."""
        for r in rows:
            say(f"{r['prefix']}…  {r['namespace']}{'  admin' if r['admin'] else ''}  {r['name']}")

    emit(as_json, rows, human)


@keys_app.command("revoke")
def keys_revoke(
    prefix: Annotated[str, typer.Argument(help="The key's first 10+ characters.")], store: StoreOpt = None
) -> None:
    """Revoke a key by its first characters (as `megamem keys list` shows them)."""
    from ..server import tenants

    n = tenants.revoke_key(_keys_db(store, create=False), prefix)
    if not n:
        raise MegamemError(f"no key starts with {prefix[:10]!r}")
    say(f"revoked {n} key(s)")
