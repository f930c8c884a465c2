"""What every command shares: the consoles, the common options, JSON and human output, the progress bar, opening a
store (and asking it for a capability), and the one place a megamem error becomes the command's warnings and one
`error:` line (`CommandGroup`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from typer.core import TyperGroup

from .. import schema
from ..backend import MEMORYLLM, Backend, require
from ..checks import check_id, printable, printable_line
from ..errors import MegamemError
from ..memory import Memory
from ..memoryllm.store import PoolMemory, is_pool_store
from ..store import default_store_path

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

StoreOpt = Annotated[Path | None, typer.Option("--store", help="Store folder (default: user data dir).")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Base model: HF path or name (new stores).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
StrictOpt = Annotated[
    bool, typer.Option("--strict", help="A damaged memory is an error (default: skipped with a warning).")
]
MemoryIdArg = Annotated[str, typer.Argument(help="Memory id.")]
NamespaceOpt = Annotated[
    str,
    typer.Option(
        "--namespace", help="Act on this namespace's memories only (a server tenant's; default: the default one)."
    ),
]

# the stores the running command opened: on an error their warnings are printed before the error line
_opened: ContextVar[list[Backend] | None] = ContextVar("megamem_cli_opened", default=None)


class CommandGroup(TyperGroup):
    """The app's command group: a command's MegamemError ends here, as the warnings its stores collected and then
    one `error:` line on stderr (exit 1), so the commands hold no error handling of their own and the app behaves
    the same whether the console entry or a test's CliRunner calls it."""

    def invoke(self, ctx: typer.Context) -> Any:
        """Run the command with a fresh list of opened stores; turn its megamem error into warnings + one line."""
        token = _opened.set([])
        try:
            return super().invoke(ctx)
        except MegamemError as exc:
            warn_opened()
            typer.echo(f"error: {printable_line(str(exc))}", err=True)
            raise typer.Exit(1) from None
        finally:
            _opened.reset(token)


def open_store(store: Path | None, model: str | None = None, key_function: str | None = None, **kw) -> Backend:
    """The store's backend (no model loads); read commands pass create=False, so a path without a store is an
    error. The command's error line is preceded by this store's warnings."""
    mem = Memory(store, model=model, key_function=key_function, **kw)
    opened = _opened.get()
    if opened is not None:  # None: called outside the app (a test calling a command function directly)
        opened.append(mem)
    return mem


def open_for(store: Path | None, capability: str, command: str, **kw) -> Backend:
    """An existing store for `megamem COMMAND`, refused (naming its kind) unless its backend has `capability`."""
    mem = open_store(store, create=False, **kw)
    require(mem, capability, f"megamem {command}")
    return mem


def backend_at(path: Path) -> type[Backend]:
    """The backend class Memory(path) opens (MEGa's where there is no store yet), told without opening the store."""
    return PoolMemory if is_pool_store(path) else Memory


def require_at(path: Path, capability: str, command: str) -> None:
    """Refuse `megamem COMMAND` on the store at `path` unless its backend has `capability`, without opening it:
    verify and repair must reach a store too damaged to open, and serve one that may not be made yet."""
    require(backend_at(path), capability, f"megamem {command}")


def store_path(store: Path | None) -> Path:
    """The store folder a command works on: --store, or the user data dir's default."""
    return store or default_store_path()


def say_warning(message: str) -> None:
    """One `warning:` line on stderr."""
    typer.echo(f"warning: {printable_line(message)}", err=True)


def warn(mem: Backend) -> None:
    """Print (and drain) the warnings a command collected: damaged memories skipped, entries left alone."""
    for message in mem.warnings:
        say_warning(message)
    mem.warnings.clear()


def warn_opened() -> None:
    """Print (and drain) the warnings of every store the running command opened."""
    for mem in _opened.get() or []:
        warn(mem)


def to_json(data: Any) -> str:
    """JSON for a terminal: non-ASCII text as it is, but C1 control characters escaped like the C0 ones."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    return "".join(f"\\u{ord(c):04x}" if "\x7f" <= c <= "\x9f" else c for c in text)


def emit(as_json: bool, data: Any, human: Callable[[], Any]) -> None:
    """The command's result: `data` as JSON with --json, else what `human` prints."""
    if as_json:
        print(to_json(data))
    else:
        human()


def say(text: str) -> None:
    """One line of human output, as it is (no rich markup)."""
    out.print(text, markup=False)


def print_fields(data: dict) -> None:
    """A record or a store's settings as `key: value` lines."""
    for k, v in data.items():
        say(f"{k}: {printable(str(v))}")


def short(text: str, n: int = 70) -> str:
    """`text` on one printable line of at most n characters (tables, one-line reports)."""
    text = printable_line(" ".join(text.split()))
    return text if len(text) <= n else text[: n - 1] + "…"


def progress(as_json: bool) -> Progress:
    """The training progress bar (on stderr; off with --json): step count, loss and time left."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
        console=err,
        disable=as_json,
    )


def on_step_of(bar: Progress, task: TaskID) -> Callable[[int, int, float], None]:
    """An on_step callback (step, total, loss) that moves `task` of `bar`."""
    return lambda step, total, loss: bar.update(task, completed=step, total=total, loss=loss)


# -- namespaces -------------------------------------------------------------------------------------------------
def check_namespace_of(kind: str, namespace: str) -> str:
    """A well-formed namespace for a store of backend `kind`: a MemoryLLM store has none but the default."""
    schema.check_namespace(namespace)
    if kind == MEMORYLLM and namespace != schema.DEFAULT_NAMESPACE:
        raise MegamemError(
            f"a MemoryLLM store has no namespaces: --namespace {namespace} needs a MEGa store (one pool holds "
            "every memory)"
        )
    return namespace


@dataclass(frozen=True)
class Scope:
    """The namespace a command acts on in its store, by megamem.schema's rule as the server applies it: the user
    names a memory by its id in the namespace (the store writes another namespace's as NAMESPACE--ID, see
    schema.stored_id), sees only the namespace's memories, and is told when an id is another namespace's. A
    MemoryLLM store has no namespaces: every memory in it is the default namespace's, named as stored."""

    mem: Backend
    namespace: str = schema.DEFAULT_NAMESPACE

    @classmethod
    def of(cls, mem: Backend, namespace: str) -> Scope:
        """The scope of `namespace` in the opened store `mem` (checked before anything loads)."""
        return cls(mem, check_namespace_of(mem.kind, namespace))

    @property
    def namespaced(self) -> bool:
        """Whether the store keeps namespaces (a MEGa store does, a MemoryLLM store does not)."""
        return self.mem.kind != MEMORYLLM

    def stored_id(self, memory_id: str) -> str:
        """The store's id of the namespace's memory `memory_id` (an id as the user gives it: no '--')."""
        check_id(memory_id)
        if not self.namespaced:
            return memory_id
        if schema.SEPARATOR in memory_id:
            raise MegamemError(
                f"no memory with id {memory_id!r} in namespace {self.namespace!r}: an id holds no "
                f"{schema.SEPARATOR!r} (the store writes namespace N's memory ID as N{schema.SEPARATOR}ID; name it "
                "as ID with --namespace N)"
            )
        return schema.stored_id(self.namespace, memory_id)

    def shown_id(self, stored: str) -> str:
        """The id the user sees for a stored id of the namespace: without its NAMESPACE-- prefix."""
        prefix = f"{self.namespace}{schema.SEPARATOR}"
        keep = self.namespaced and self.namespace != schema.DEFAULT_NAMESPACE and stored.startswith(prefix)
        return stored[len(prefix) :] if keep else stored

    def owns(self, record) -> bool:
        """Whether a stored memory (anything with .id and .metadata) is the namespace's."""
        return not self.namespaced or schema.owns(self.namespace, record)

    def records(self) -> list:
        """The namespace's stored memories, oldest first."""
        return [r for r in self.mem.list() if self.owns(r)]

    def find(self, memory_id: str):
        """The namespace's stored memory `memory_id`, or None when it has none by that id."""
        stored = self.stored_id(memory_id)
        return next((r for r in self.records() if r.id == stored), None)

    def get(self, memory_id: str):
        """The namespace's stored memory `memory_id`, or an error naming the namespace (and the one that has it)."""
        rec = self.find(memory_id)
        if rec is None:
            raise self.missing(memory_id)
        return rec

    def missing(self, memory_id: str) -> MegamemError:
        """The error for an id the namespace has no memory by: which namespaces do, or how to name another."""
        where = f"no memory with id {memory_id!r} in namespace {self.namespace!r}"
        if not self.namespaced:
            return MegamemError(f"{where} ({self.mem.path})")
        others = sorted(
            {
                schema.namespace_of(r)
                for r in self.mem.list()
                if not self.owns(r) and schema.owns(schema.namespace_of(r), r) and schema.api_id(r) == memory_id
            }
        )
        if others:
            flags = " or ".join(f"--namespace {ns}" for ns in others)
            return MegamemError(f"{where}; namespace {' and '.join(map(repr, others))} has one: give {flags}")
        return MegamemError(f"{where} (another namespace's memory takes --namespace NAME)")

    def shown(self, record) -> dict:
        """A stored memory as the namespace shows it: its record, under the id the user names it by (state
        'consolidated' when its adapter was retired into the cortex, which answers for it)."""
        state = {"state": "consolidated"} if schema.is_consolidated(record) else {}
        return {**record.to_dict(), "id": self.shown_id(record.id), **state}
