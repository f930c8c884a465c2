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
from .context import JsonOpt, StoreOpt, emit, open_store, require_at, say, say_warning, store_path

HostOpt = Annotated[str, typer.Option("--host", help="Address to listen on.")]
PortOpt = Annotated[int, typer.Option("--port", help="Port.")]
OpenOpt = Annotated[
    bool, typer.Option("--open", help="No API keys: every caller is the default namespace (loopback use).")
]
MaxBatchOpt = Annotated[int, typer.Option("--max-batch", help="Chat requests decoded together, at most.")]
NoBatchOpt = Annotated[bool, typer.Option("--no-batch", help="Decode one request at a time.")]
CreateOpt = Annotated[bool, typer.Option("--create", help="With --open: make an empty store if PATH holds none.")]
HostsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--allowed-hosts",
        help="Host names clients may use besides the loopback ones (repeat or comma-separate; * allows any).",
    ),
]
CapOpt = Annotated[int, typer.Option("--max-tokens-cap", help="The largest max_tokens a chat may ask.")]
KeyChatsOpt = Annotated[int, typer.Option("--key-chats", help="Chats one API key may have in flight.")]
KeyTokensOpt = Annotated[int, typer.Option("--key-tokens", help="max_tokens one API key may have in flight.")]
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # server.runtime.LOOPBACK_HOSTS (its modules load only to serve)
WILDCARD = ("0.0.0.0", "::", "")


def serve(
    store: StoreOpt = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    open_access: OpenOpt = False,
    create: CreateOpt = False,
    allowed_hosts: HostsOpt = None,
    max_batch: MaxBatchOpt = 16,
    no_batch: NoBatchOpt = False,
    max_tokens_cap: CapOpt = 4096,
    key_chats: KeyChatsOpt = 8,
    key_tokens: KeyTokensOpt = 16_384,
) -> None:
    """Serve the store: OpenAI-compatible chat, the memory API, injection jobs and a web page (docs/server.md)."""
    import uvicorn

    from ..server.app import ServerConfig, create_app

    _check_port(host, port)
    path = store_path(store)
    require_at(path, SERVE, "serve")
    limits = {"--max-batch": max_batch, "--max-tokens-cap": max_tokens_cap, "--key-chats": key_chats}
    for name, value in (limits | {"--key-tokens": key_tokens}).items():
        if value < 1:
            raise MegamemError(f"{name} must be at least 1, got {value}")
    if open_access and host not in LOOPBACK:
        raise MegamemError("--open serves without API keys; it only listens on loopback (127.0.0.1)")
    _check_access(path, open_access, create)
    cfg = ServerConfig(
        store=path,
        open_access=open_access,
        max_batch=max_batch,
        batched=not no_batch,
        max_tokens_cap=max_tokens_cap,
        key_chats=key_chats,
        key_tokens=key_tokens,
        allowed_hosts=served_hosts(host, allowed_hosts or []),
    )
    uvicorn.run(create_app(cfg), host=host, port=port, log_level="warning")


def served_hosts(host: str, extra: list[str]) -> tuple[str, ...]:
    """The Host names the server answers (any port): the loopback names, --allowed-hosts (repeated or
    comma-separated), and the --host address itself when it is a concrete non-loopback one (clients that reach
    it by address name it). A wildcard --host (0.0.0.0, ::) names no host: without --allowed-hosts only
    loopback clients are served, which a warning says."""
    names = [h.strip() for item in extra for h in item.split(",") if h.strip()]
    for h in names:
        if any(c in h for c in "/ @") or h.count(":") == 1:
            raise MegamemError(f"--allowed-hosts takes host names without scheme or port, got {h!r}")
    if host not in LOOPBACK and host not in WILDCARD:
        names.append(host)
    if host in WILDCARD and not names:
        say_warning(
            f"listening on {host or '*'} but serving only the loopback host names; clients elsewhere need "
            "--allowed-hosts with the names they use"
        )
    return (*LOOPBACK, *names)


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


def _check_access(path: Path, open_access: bool, create: bool) -> None:
    """Without --open the server needs a store with API keys, with --open a store (or --create to make one): an
    error saying how to make one otherwise (a mistyped path is never served as a new, empty store)."""
    if Store.exists(path):
        from ..server import tenants

        if not tenants.has_keys(_connect(path)) and not open_access:
            raise MegamemError(
                f"the store has no API keys; `megamem keys create --store {path} --namespace NAME` makes one, or "
                "serve with --open (no keys, loopback only)"
            )
    elif not open_access:
        raise MegamemError(
            f"no megamem store at {path}; create keys first (`megamem keys create --store {path} ...`) or "
            "serve --open --create"
        )
    elif not create:
        raise MegamemError(f"no megamem store at {path}; serve --create to make one")


def _connect(path: Path):
    """The server's database of the store at `path` (its API keys)."""
    from ..server import db as server_db

    return server_db.connect(path)


keys_app = typer.Typer(no_args_is_help=True, help="API keys of the server: each maps a caller to a namespace.")


def _keys_db(store: Path | None, create: bool):
    """The key database of the store; create: an empty store with the default settings if there is none. A store
    that cannot be served (a MemoryLLM one) has no keys: one error saying so, before anything is written."""
    from ..backend import supports
    from .context import backend_at

    path = store_path(store)
    backend = backend_at(path)
    if not supports(backend, SERVE):
        raise MegamemError(
            f"{path} is a {backend.kind} store, which `megamem serve` cannot serve, so it has no API keys "
            "(keys and serve are for MEGa stores; docs/memoryllm.md)"
        )
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
