"""The commands on memories: add, ask, list, show, export, forget and info.

Each acts on one namespace's memories, the default one unless --namespace names another (context.Scope): the
server's tenants share a store with the command line, and neither sees or routes to the other's memories.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.progress import Progress, TaskID
from rich.table import Table
from rich.text import Text

from .. import schema
from ..backend import CONSOLIDATE, EXPORT, KINDS, MEGA, MEMORYLLM, Backend, require
from ..checks import check_id, printable
from ..errors import MegamemError
from ..inputs import read_jsonl, read_text_file
from ..memory import Item, with_overrides
from ..store import Record
from ..store.cortex import Consolidated, read_record
from ..train import RECIPES, Recipe
from .context import (
    JsonOpt,
    MemoryIdArg,
    ModelOpt,
    NamespaceOpt,
    Scope,
    StoreOpt,
    StrictOpt,
    backend_at,
    check_namespace_of,
    emit,
    on_step_of,
    open_for,
    open_store,
    out,
    print_fields,
    progress,
    say,
    short,
    store_path,
    warn,
    warn_opened,
)

# -- add's options ----------------------------------------------------------------------------------------------
TextArg = Annotated[str | None, typer.Argument(help="The memory's text.")]
FileOpt = Annotated[Path | None, typer.Option("--file", help="A UTF-8 text file: one memory.")]
JsonlOpt = Annotated[Path | None, typer.Option("--jsonl", help="JSON lines: one memory a line.")]
ParaphraseOpt = Annotated[list[str] | None, typer.Option("--paraphrase", "-p", help="A paraphrase (repeatable).")]
IdOpt = Annotated[str | None, typer.Option("--id", help="Memory id (default: random).")]
ReplacesOpt = Annotated[
    list[str] | None,
    typer.Option("--replaces", help="An older memory this one corrects: the gate then prefers this (repeatable)."),
]
KeyFunctionOpt = Annotated[str | None, typer.Option("--key-function", help="embedder | activation (new stores).")]
RecipeOpt = Annotated[
    str,
    typer.Option(
        "--recipe", help="fast: the passage + its first paraphrase, ~1000 tokens | paper: all paraphrases, 10 epochs."
    ),
]
EpochsOpt = Annotated[int | None, typer.Option(help="Training epochs (at least 1).")]
LrOpt = Annotated[float | None, typer.Option(help="Learning rate (above 0).")]
SeedOpt = Annotated[int, typer.Option(help="Training seed.")]
KeepGoingOpt = Annotated[
    bool, typer.Option("--keep-going", help="Store the good lines of a JSONL, skipping (and naming) bad ones.")
]
BackendOpt = Annotated[
    str | None,
    typer.Option("--backend", help="mega (adapters, the default) | memoryllm (one latent pool; new stores)."),
]
AdapterDtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--adapter-dtype", help="bfloat16 (default) | int8 (half the bytes) | float16 | float32 (new stores)."
    ),
]
RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray", help="Learn on a Ray cluster: local (a new one here) | auto (the running one) | its ADDRESS."
    ),
]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", help="Ray workers, one thread each (default: the cluster's CPUs).")
]


def add(
    text: TextArg = None,
    file: FileOpt = None,
    jsonl: JsonlOpt = None,
    paraphrase: ParaphraseOpt = None,
    id: IdOpt = None,
    replaces: ReplacesOpt = None,
    key_function: KeyFunctionOpt = None,
    recipe_name: RecipeOpt = "fast",
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = 0,
    keep_going: KeepGoingOpt = False,
    backend: BackendOpt = None,
    adapter_dtype: AdapterDtypeOpt = None,
    ray: RayOpt = None,
    workers: WorkersOpt = None,
    namespace: NamespaceOpt = schema.DEFAULT_NAMESPACE,
    store: StoreOpt = None,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Learn new memories: TEXT, --file FILE or --jsonl FILE (all checked before any training)."""
    if sum(x is not None for x in (text, file, jsonl)) != 1:
        raise MegamemError("give exactly one of TEXT, --file or --jsonl")
    pool_store = _pool_store(recipe_name, backend, store)
    check_namespace_of(MEMORYLLM if pool_store else MEGA, namespace)
    training = recipe_name != "fast" or epochs is not None or lr is not None or seed != 0
    _check_settings(pool_store, training, adapter_dtype, ray, workers)
    stored: list[Record] = []
    try:
        recipe = _recipe(recipe_name, epochs, lr, seed)
        if jsonl is not None and (paraphrase or id or replaces):
            raise MegamemError("--paraphrase, --id and --replaces go with TEXT or --file; put them in the JSONL lines")
        items, bad_lines = _read_items(text, file, jsonl, paraphrase, id, replaces, keep_going)
        settings = (
            {"backend": MEMORYLLM}
            if pool_store
            else {"recipe": recipe, "backend": backend, "adapter_dtype": adapter_dtype}
        )
        mem = open_store(store, model, key_function, **settings)
        scope = Scope.of(mem, namespace)
        items = _into_namespace(scope, items, keep_going, bad_lines)
        mem.warnings += [f"skipped {m}" for m in bad_lines]
        _learn(mem, items, ray, workers, keep_going, as_json, stored)
    except (MegamemError, KeyboardInterrupt) as exc:
        _failed_after(stored, exc)
    skipped = [w for w in mem.warnings if w.startswith("skipped ")]
    warn(mem)
    added = [scope.shown(r) for r in stored]
    emit(as_json, added, lambda: [say(f"added {r['id']}: {short(r['text'])}") for r in added])
    if skipped:
        were = "y was" if len(skipped) == 1 else "ies were"
        raise MegamemError(f"{len(skipped)} memor{were} not stored (see the warnings)")


def _pool_store(recipe_name: str, backend: str | None, store: Path | None) -> bool:
    """Whether add writes a MemoryLLM store (--backend memoryllm, or the store is one); checks the names given."""
    if recipe_name not in RECIPES:
        raise MegamemError(f"unknown recipe {recipe_name!r}; choose one of {', '.join(RECIPES)}")
    if backend is not None and backend not in KINDS:
        raise MegamemError(f"unknown backend {backend!r}; choose one of {', '.join(KINDS)}")
    return (backend or backend_at(store_path(store)).kind) == MEMORYLLM


def _check_settings(
    pool_store: bool, training: bool, adapter_dtype: str | None, ray: str | None, workers: int | None
) -> None:
    """Refuse settings the store's backend has no use for (training: a training option was given), and --workers
    without --ray or below 1, before anything is read or loaded."""
    if pool_store and training:
        raise MegamemError(
            "--recipe, --epochs, --lr and --seed train MEGa adapters; a MemoryLLM store trains nothing per memory"
        )
    if pool_store and adapter_dtype is not None:
        raise MegamemError("--adapter-dtype sets how MEGa stores adapters; a MemoryLLM store keeps one pool")
    if pool_store and ray is not None:
        raise MegamemError(
            "--ray spreads adapter training; a MemoryLLM store writes its one pool in order, on this machine"
        )
    if workers is not None and ray is None:
        raise MegamemError("--workers goes with --ray")
    if workers is not None and workers < 1:
        raise MegamemError(f"--workers must be at least 1, got {workers}")


def _recipe(name: str, epochs: int | None, lr: float | None, seed: int) -> Recipe:
    """The named recipe with the rate and seed given; --epochs means exactly this many epochs."""
    base = RECIPES[name]
    recipe = replace(base, lr=base.lr if lr is None else lr, seed=seed)
    return recipe if epochs is None else replace(recipe, epochs=epochs, min_tokens=0)


def _read_items(
    text: str | None,
    file: Path | None,
    jsonl: Path | None,
    paraphrase: list[str] | None,
    id: str | None,
    replaces: list[str] | None,
    keep_going: bool,
) -> tuple[list[Item], list[str]]:
    """The items to learn and the JSONL lines skipped (keep_going): a JSONL file's lines, or one TEXT or --file."""
    if jsonl is not None:
        return read_jsonl(jsonl, keep_going=keep_going)
    body = read_text_file(file) if file is not None else text
    meta = {"source": str(file)} if file else {}
    return [Item(body or "", list(paraphrase or []), meta, id, replaces=list(replaces or []))], []


def _into_namespace(scope: Scope, items: list[Item], keep_going: bool, bad_lines: list[str]) -> list[Item]:
    """The items as the scope's namespace's memories, stored the way the server stores a tenant's (its id
    schema.stored_id(namespace, id), a fresh one when none is given, and the namespace under schema.NAMESPACE):
    an id holds no '--', and `replaces` names the namespace's own memories. A bad item is an error, or with
    keep_going skipped and named in `bad_lines`. A MemoryLLM store has no namespaces: its items go in as given."""
    if not scope.namespaced:
        return items
    default = scope.namespace == schema.DEFAULT_NAMESPACE
    reserved = {} if default else {schema.NAMESPACE: scope.namespace}
    out = []
    for item in items:
        try:
            olds = [scope.stored_id(schema.check_api_id(check_id(old, "replaces id"))) for old in item.replaces]
            if item.id is not None:
                memory_id = scope.stored_id(schema.check_api_id(item.id))
            else:  # the store's own fresh id would lack the namespace's prefix
                memory_id = None if default else scope.stored_id(uuid.uuid4().hex[:12])
        except MegamemError as exc:
            if not keep_going:
                raise MegamemError(f"{item.origin or 'the memory'}: {exc}") from None
            bad_lines.append(f"{item.origin or 'a memory'}: {exc}")
            continue
        out.append(replace(item, id=memory_id, replaces=olds, reserved={**item.reserved, **reserved}))
    return out


def _learn(
    mem: Backend,
    items: list[Item],
    ray: str | None,
    workers: int | None,
    keep_going: bool,
    as_json: bool,
    stored: list[Record],
) -> None:
    """Check the items, then learn them here or on Ray; each one is committed (and put in `stored`) when done."""
    items = mem.validate(items, keep_going=keep_going)
    mem.prepare_store()  # a new store is created here: its model has loaded
    with progress(as_json) as bar:
        task = bar.add_task("learning", total=None, loss=0.0)
        if ray is None:
            mem.add_many(
                items,
                on_step=on_step_of(bar, task),
                on_memory=_on_memory(bar, task, mem.train_group),
                on_stored=stored.append,
                keep_going=keep_going,
            )
            return
        from ..ops.distributed import add_many_ray

        bar.update(task, description=f"learning {len(items)} on Ray", completed=0, total=len(items))

        def on_stored(r: Record) -> None:
            """Count a memory a worker stored."""
            stored.append(r)
            bar.update(task, completed=len(stored))

        add_many_ray(mem, items, ray, workers, keep_going=keep_going, on_stored=on_stored)


def _on_memory(bar: Progress, task: TaskID, group: int) -> Callable[[int, int], None]:
    """An on_memory callback naming the memories now learned (add_many trains `group` memories per batched pass)."""

    def on_memory(i: int, n: int) -> None:
        """Name memory i (or memories i..i+group) of n and restart the step count."""
        last = min(i + group, n)
        what = f"memory {i + 1}/{n}" if last == i + 1 else f"memories {i + 1}-{last}/{n}"
        bar.update(task, description=what, completed=0, total=None)

    return on_memory


def _failed_after(stored: list[Record], exc: BaseException) -> NoReturn:
    """An add that failed or was interrupted: its warnings, then which memories made it (each one commits on its
    own), then the error (an interrupt too is one error line, exit 1)."""
    warn_opened()
    if stored:
        typer.echo(f"stored before the failure: {', '.join(r.id for r in stored)}", err=True)
    if isinstance(exc, KeyboardInterrupt):
        raise MegamemError("interrupted") from None
    raise exc


# -- reading ----------------------------------------------------------------------------------------------------
ModeOpt = Annotated[
    str | None,
    typer.Option(
        help="mega+rag (adapters + the memory's text; MEGa's default) | qa (the paper's; MemoryLLM's default) | "
        "recall | irag | rag | mega"
    ),
]
ShowGateOpt = Annotated[bool, typer.Option("--show-gate", help="Print the gate weights.")]
NoMemoryOpt = Annotated[bool, typer.Option("--no-memory", help="Answer with the base model alone.")]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="Mix the k best memories (0: dense).")]
BetaOpt = Annotated[float | None, typer.Option(help="Gate softmax inverse temperature (finite, >= 0).")]
ThresholdOpt = Annotated[float | None, typer.Option(help="Use no memory scoring below this.")]
NullRateOpt = Annotated[
    float | None,
    typer.Option("--null-rate", help="The null memory's calibrated rate (default 0.01; docs/tuning.md)."),
]
NoNullOpt = Annotated[
    bool, typer.Option("--no-null", help="No null memory: every question goes to some memory (the paper's gate).")
]
LexicalOpt = Annotated[
    float | None,
    typer.Option("--lexical", help="Re-rank the gate's candidates with BM25 at this weight (0.3; docs/scale.md)."),
]
NamesOpt = Annotated[
    float | None,
    typer.Option("--names", help="Add the share of the question's names the candidate holds at this weight (0.3)."),
]
MaxNewTokensOpt = Annotated[int | None, typer.Option(help="Longest answer in tokens, at least 1 (qa 64, recall 256).")]


def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    mode: ModeOpt = None,
    show_gate: ShowGateOpt = False,
    no_memory: NoMemoryOpt = False,
    top_k: TopKOpt = None,
    beta: BetaOpt = None,
    threshold: ThresholdOpt = None,
    null_rate: NullRateOpt = None,
    no_null: NoNullOpt = False,
    lexical: LexicalOpt = None,
    names: NamesOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    strict: StrictOpt = False,
    namespace: NamespaceOpt = schema.DEFAULT_NAMESPACE,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer a question with the memories the gate picks (the namespace's only, and its cortex)."""
    mem = open_store(store, create=False, strict=strict)
    scope = Scope.of(mem, namespace)
    if top_k is not None and top_k < 0:
        raise MegamemError(f"--top-k must be 0 (dense) or more, got {top_k}")
    gate = with_overrides(
        mem.gate, top_k=top_k or None, beta=beta, threshold=threshold, null_rate=null_rate, lexical=lexical, names=names
    )
    if top_k == 0:
        gate = replace(gate, top_k=None)
    if no_null:
        gate = replace(gate, null_rate=None)
    modes = {"mode": mode} if mode is not None else {}  # the backend's own default otherwise
    if scope.namespaced:  # the gate scores the namespace's memories alone; the cortex mixed in is its own
        modes["namespace"] = namespace
    ans = mem.ask(question, gate=gate, max_new_tokens=max_new_tokens, use_memory=not no_memory, **modes)
    texts = {scope.shown_id(mid): mem.show(mid).text for mid, _ in ans.gate[:10]} if show_gate else {}
    ans = replace(ans, gate=[(scope.shown_id(mid), w) for mid, w in ans.gate])
    warnings = list(mem.warnings)
    warn(mem)

    def human() -> None:
        """The answer (irag's recall first, dimmed), and with --show-gate the ten heaviest memories."""
        if ans.mode == "irag" and ans.recall:
            out.print(f"recall: {printable(ans.recall)}", style="dim", markup=False)
        say(printable(ans.text))
        if show_gate:
            out.print(_gate_table(ans.gate, texts) if ans.gate else Text("gate: no memory used", style="dim"))

    emit(as_json, {**ans.to_dict(), "warnings": warnings}, human)


def _gate_table(gate: list[tuple[str, float]], texts: dict[str, str]) -> Table:
    """The ten heaviest memories of a gate with their weights, and the base model's share when it has one."""
    table = Table("memory", "weight", "text")
    for mid, w in gate[:10]:
        table.add_row(Text(mid), f"{w:.3f}", Text(short(texts[mid])))
    base_share = 1.0 - sum(w for _, w in gate)
    if base_share > 5e-4:
        table.add_row(Text("(no memory)"), f"{base_share:.3f}", Text("the base model's share (null memory)"))
    return table


ConsolidatedOpt = Annotated[
    bool, typer.Option("--consolidated", help="List the memories the namespace's cortex holds (consolidated).")
]


def list_(
    consolidated: ConsolidatedOpt = False,
    namespace: NamespaceOpt = schema.DEFAULT_NAMESPACE,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the namespace's stored memories (--consolidated: those its cortex holds instead)."""
    mem = open_store(store, create=False)
    scope = Scope.of(mem, namespace)
    if consolidated:
        _list_consolidated(scope, as_json)
        return
    recs = [scope.shown(r) for r in scope.records()]
    held = _held_count(scope)
    warn(mem)

    def human() -> None:
        """A table of ids, dates and the start of each text; then how many the cortex holds, if any."""
        out.print(_table(recs))
        if held:
            flag = "" if namespace == schema.DEFAULT_NAMESPACE else f" --namespace {namespace}"
            say(f"{held} consolidated memor{'y' if held == 1 else 'ies'} (list --consolidated{flag})")

    emit(as_json, recs, human)


def _table(rows: list[dict], title: str | None = None) -> Table:
    """Memories as a table of ids, dates and the start of each text (and the state, where one is consolidated)."""
    states = any("state" in r for r in rows)
    table = Table("id", "created", *(["state"] if states else []), "text", title=title)
    for r in rows:
        state = [r.get("state", "")] if states else []
        table.add_row(Text(r["id"]), r["created"], *state, Text(short(r["text"])))
    return table


def _list_consolidated(scope: Scope, as_json: bool) -> None:
    """The memories the namespace's cortex holds, oldest first, in list's shape (JSON: show's fields for each)."""
    require(scope.mem, CONSOLIDATE, "megamem list --consolidated")
    rows = [_consolidated_fields(scope, m) for m in scope.mem.consolidated(scope.namespace)]
    warn(scope.mem)
    title = f"consolidated memories: held by the {scope.namespace} namespace's cortex"
    emit(as_json, rows, lambda: out.print(_table(rows, title)))


def _held_count(scope: Scope) -> int:
    """How many memories the namespace's cortex holds that are no longer stored (consolidated with --forget), from
    its record alone (no adapter is read); a damaged record is a warning here (`megamem verify` names it) and
    counts none."""
    if not scope.namespaced:
        return 0
    try:
        record = read_record(scope.mem.path, scope.namespace)
    except MegamemError as exc:
        scope.mem.warnings.append(str(exc))
        return 0
    stored = {r.id for r in scope.records()}
    return len([m for m in record["memories"] if m["id"] not in stored]) if record else 0


def _held(scope: Scope, memory_id: str) -> Consolidated | None:
    """The namespace's consolidated memory `memory_id` (held by its cortex, no longer stored), or None."""
    if not scope.namespaced:
        return None
    stored = scope.stored_id(memory_id)
    return next((m for m in scope.mem.consolidated(scope.namespace) if m.id == stored), None)


def _consolidated_fields(scope: Scope, held: Consolidated) -> dict:
    """A consolidated memory as show prints it: its fields, state 'consolidated' and the text the cortex
    rehearsed (what its adapter recalled)."""
    return {
        "id": scope.shown_id(held.id),
        "text": held.text,
        "created": held.created,
        "metadata": held.metadata,
        "state": "consolidated",
        "recalled": held.recalled,
    }


def show(
    memory_id: MemoryIdArg,
    namespace: NamespaceOpt = schema.DEFAULT_NAMESPACE,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one of the namespace's memories in full, stored or held by its cortex (consolidated)."""
    scope = Scope.of(open_store(store, create=False), namespace)
    rec = scope.find(memory_id)
    if rec is not None:
        data = scope.shown(rec)
    else:
        held = _held(scope, memory_id)
        if held is None:
            raise scope.missing(memory_id)
        data = _consolidated_fields(scope, held)
    emit(as_json, data, lambda: print_fields(data))


def export(
    memory_id: MemoryIdArg,
    out_dir: Annotated[Path, typer.Option("--out", help="A new or empty folder for the PEFT adapter.")],
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")] = "float32",
    namespace: NamespaceOpt = schema.DEFAULT_NAMESPACE,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write one memory's adapter as a plain PEFT folder (any stored dtype, int8 included)."""
    scope = Scope.of(open_for(store, EXPORT, "export"), namespace)
    folder = scope.mem.export(scope.get(memory_id).id, out_dir, dtype)
    emit(
        as_json, {"exported": memory_id, "folder": str(folder)}, lambda: out.print(f"exported {memory_id} to {folder}")
    )


def forget(
    memory_id: MemoryIdArg,
    namespace: NamespaceOpt = schema.DEFAULT_NAMESPACE,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove one of the namespace's memories for good; a consolidated one leaves its cortex's record."""
    mem = open_store(store, create=False)
    scope = Scope.of(mem, namespace)
    rec = scope.find(memory_id)
    if rec is None and _held(scope, memory_id) is not None:
        _withdraw(scope, memory_id, as_json)
        return
    if rec is None:
        raise scope.missing(memory_id)
    mem.forget(rec.id)
    warn(mem)
    data = {"forgotten": memory_id}
    if schema.is_consolidated(rec):
        flag = "" if scope.namespace == schema.DEFAULT_NAMESPACE else f" --namespace {scope.namespace}"
        data["note"] = (
            "it also left the cortex's record; what the cortex learned from it stays in its weights until "
            f"`megamem consolidate --retrain{flag}`"
        )
    emit(as_json, data, lambda: say(f"forgot {memory_id}" + (f"; {data['note']}" if "note" in data else "")))


def _withdraw(scope: Scope, memory_id: str, as_json: bool) -> None:
    """Take a consolidated memory out of its cortex's record (megamem.ops.consolidate.withdraw), and say plainly
    what stays: the cortex's weights keep what they learned from it until the cortex is retrained."""
    from ..ops.consolidate import withdraw

    withdraw(scope.mem, scope.stored_id(memory_id), scope.namespace)
    warn(scope.mem)
    flag = "" if scope.namespace == schema.DEFAULT_NAMESPACE else f" --namespace {scope.namespace}"
    note = (
        f"removed {memory_id} from the cortex's record: its text is gone from the store, but what the cortex "
        "learned from it stays in the cortex's weights until it is retrained; "
        f"`megamem consolidate --retrain{flag}` retrains the cortex from the memories it still holds"
    )
    emit(as_json, {"withdrawn": memory_id, "namespace": scope.namespace, "note": note}, lambda: say(note))


def info(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Show the store's settings and size."""
    mem = open_store(store, create=False)
    data = mem.info()
    warn(mem)
    emit(as_json, data, lambda: print_fields(data))
