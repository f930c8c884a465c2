"""`megamem mcp`: the memory tools over MCP's stdio transport, for a desktop assistant or an agent framework that
starts its tool servers as subprocesses (docs/integrations.md, "MCP").

The tools (megamem.server.mcp_tools, the same ones `megamem serve` offers at /mcp) act on one namespace of a local
store (--namespace; the default one unless named) through the library's Memory (mcp_actions.LibraryActions).
There are no keys: whoever can start the command can read the store's files anyway. The MCP SDK is imported
only when the command runs (it adds a second or two to every command's start otherwise).
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import schema
from ..backend import GATE
from ..store import Store
from .context import NamespaceOpt, Scope, StoreOpt, open_store, require_at, store_path

CreateOpt = Annotated[
    bool, typer.Option("--create", help="Make an empty store if --store holds none (its model loads first).")
]


def mcp(store: StoreOpt = None, namespace: NamespaceOpt = schema.DEFAULT_NAMESPACE, create: CreateOpt = False) -> None:
    """Serve the memory tools (add, search, ask, list, forget) to an MCP client over stdio."""
    from ..server.mcp_tools import build
    from .mcp_actions import LibraryActions

    path = store_path(store)
    schema.check_namespace(namespace)
    require_at(path, GATE, "mcp")  # search and ask need the gate: MEGa stores
    if create and not Store.exists(path):
        open_store(path).prepare_store()  # an empty store with the default settings, as serve --create makes
    scope = Scope.of(open_store(path, create=False), namespace)  # a mistyped path is an error, never a new store
    typer.echo(f"megamem mcp: namespace {namespace!r} of {path}, over stdio (for an MCP client)", err=True)
    build(LibraryActions(scope)).run("stdio")
