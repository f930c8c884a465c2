"""The megamem command line: add, ask, list, show, forget, info, verify, repair, demo, bench (--json on all)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from transformers.utils import logging as transformers_logging

from . import schema
from .backend import KINDS
from .bench.methods import PROTOCOL_LORA
from .checks import printable, printable_line
from .errors import MegamemError
from .inputs import read_jsonl, read_text_file
from .memory import Item, Memory, with_overrides
from .memoryllm.store import is_pool_store
from .model import load_model
from .store import Record, Store, default_store_path
from .train import RECIPES

transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Long-term memory in a language model's weights.",
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

StoreOpt = Annotated[Path | None, typer.Option("--store", help="Store folder (default: user data dir).")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Base model: HF path or name (new stores).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
StrictOpt = Annotated[
    bool, typer.Option("--strict", help="A damaged memory is an error (default: skipped with a warning).")
]


def _fail(message: str) -> None:
    typer.echo(f"error: {printable_line(message)}", err=True)
    raise typer.Exit(1)


def _open(store: Path | None, model: str | None = None, key_function: str | None = None, **kw) -> Memory:
    """The store's Memory; read commands pass create=False, so a path without a store is an error."""
    try:
        return Memory(store, model=model, key_function=key_function, **kw)
    except MegamemError as exc:
        _fail(str(exc))
        raise  # unreachable


def _mega_only(path: Path, command: str) -> None:
    """Commands that only MEGa stores have: a clear error on a MemoryLLM store."""
    if is_pool_store(path):
        _fail(f"`megamem {command}` works on MEGa stores only; {path} is a MemoryLLM store (docs/memoryllm.md)")


def _warn(mem: Memory) -> None:
    """Print (and drain) the warnings a command collected: damaged memories skipped, entries left alone."""
    for message in mem.warnings:
        typer.echo(f"warning: {printable_line(message)}", err=True)
    mem.warnings.clear()


def _json(data) -> str:
    """JSON for a terminal: non-ASCII text as it is, but C1 control characters escaped like the C0 ones."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    return "".join(f"\\u{ord(c):04x}" if "\x7f" <= c <= "\x9f" else c for c in text)


def _emit(as_json: bool, data, human) -> None:
    if as_json:
        print(_json(data))
    else:
        human()


def _progress(as_json: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
        console=err,
        disable=as_json,
    )


@app.command()
def add(
    text: Annotated[str | None, typer.Argument(help="The memory's text.")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="A UTF-8 text file: one memory.")] = None,
    jsonl: Annotated[Path | None, typer.Option("--jsonl", help="JSON lines: one memory a line.")] = None,
    paraphrase: Annotated[
        list[str] | None, typer.Option("--paraphrase", "-p", help="A paraphrase (repeatable).")
    ] = None,
    id: Annotated[str | None, typer.Option("--id", help="Memory id (default: random).")] = None,
    replaces: Annotated[
        list[str] | None,
        typer.Option("--replaces", help="An older memory this one corrects: the gate then prefers this (repeatable)."),
    ] = None,
    key_function: Annotated[
        str | None, typer.Option("--key-function", help="embedder | activation (new stores).")
    ] = None,
    recipe_name: Annotated[
        str,
        typer.Option(
            "--recipe",
            help="fast: the passage + its first paraphrase, ~1000 tokens | paper: all paraphrases, 10 epochs.",
        ),
    ] = "fast",
    epochs: Annotated[int | None, typer.Option(help="Training epochs (at least 1).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (above 0).")] = None,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    keep_going: Annotated[
        bool, typer.Option("--keep-going", help="Store the good lines of a JSONL, skipping (and naming) bad ones.")
    ] = False,
    backend: Annotated[
        str | None,
        typer.Option("--backend", help="mega (adapters, the default) | memoryllm (one latent pool; new stores)."),
    ] = None,
    adapter_dtype: Annotated[
        str | None,
        typer.Option(
            "--adapter-dtype", help="bfloat16 (default) | int8 (half the bytes) | float16 | float32 (new stores)."
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray", help="Learn on a Ray cluster: local (a new one here) | auto (the running one) | its ADDRESS."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Ray workers, one thread each (default: the cluster's CPUs).")
    ] = None,
    store: StoreOpt = None,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Learn new memories: TEXT, --file FILE or --jsonl FILE (all checked before any training)."""
    given = [x is not None for x in (text, file, jsonl)]
    if sum(given) != 1:
        _fail("give exactly one of TEXT, --file or --jsonl")
    if recipe_name not in RECIPES:
        _fail(f"unknown recipe {recipe_name!r}; choose one of {', '.join(RECIPES)}")
    if backend is not None and backend not in KINDS:
        _fail(f"unknown backend {backend!r}; choose one of {', '.join(KINDS)}")
    pool_store = backend == "memoryllm" or (backend is None and is_pool_store(store or default_store_path()))
    if pool_store and (recipe_name != "fast" or epochs is not None or lr is not None or seed != 0):
        _fail("--recipe, --epochs, --lr and --seed train MEGa adapters; a MemoryLLM store trains nothing per memory")
    if pool_store and adapter_dtype is not None:
        _fail("--adapter-dtype sets how MEGa stores adapters; a MemoryLLM store keeps one pool")
    if pool_store and ray is not None:
        _fail("--ray spreads adapter training; a MemoryLLM store writes its one pool in order, on this machine")
    if workers is not None and ray is None:
        _fail("--workers goes with --ray")
    if workers is not None and workers < 1:
        _fail(f"--workers must be at least 1, got {workers}")
    stored: list[Record] = []
    mem = None
    try:
        base = RECIPES[recipe_name]
        recipe = replace(base, lr=base.lr if lr is None else lr, seed=seed)
        if epochs is not None:  # exactly this many epochs
            recipe = replace(recipe, epochs=epochs, min_tokens=0)
        if jsonl is not None:
            if paraphrase or id or replaces:
                _fail("--paraphrase, --id and --replaces go with TEXT or --file; put them in the JSONL lines")
            items, bad_lines = read_jsonl(jsonl, keep_going=keep_going)
        else:
            body = read_text_file(file) if file is not None else text
            meta = {"source": str(file)} if file else {}
            items, bad_lines = [Item(body or "", list(paraphrase or []), meta, id, replaces=list(replaces or []))], []
        settings = (
            {"backend": "memoryllm"}
            if pool_store
            else {"recipe": recipe, "backend": backend, "adapter_dtype": adapter_dtype}
        )
        mem = _open(store, model, key_function, **settings)
        mem.warnings += [f"skipped {m}" for m in bad_lines]
        items = mem.validate(items, keep_going=keep_going)
        mem.prepare_store()  # a new store is created here: its model has loaded
        with _progress(as_json) as bar:
            task = bar.add_task("learning", total=None, loss=0.0)

            def on_memory(i: int, n: int) -> None:
                last = min(i + mem.train_group, n)  # add_many trains train_group memories per batched forward
                what = f"memory {i + 1}/{n}" if last == i + 1 else f"memories {i + 1}-{last}/{n}"
                bar.update(task, description=what, completed=0, total=None)

            def on_step(step: int, total: int, loss: float) -> None:
                bar.update(task, completed=step, total=total, loss=loss)

            if ray is not None:
                bar.update(task, description=f"learning {len(items)} on Ray", completed=0, total=len(items))

                def on_stored(r: Record) -> None:
                    stored.append(r)
                    bar.update(task, completed=len(stored))

                from .ops.distributed import add_many_ray

                add_many_ray(mem, items, ray, workers, keep_going=keep_going, on_stored=on_stored)
            else:
                mem.add_many(
                    items, on_step=on_step, on_memory=on_memory, on_stored=stored.append, keep_going=keep_going
                )
    except (MegamemError, KeyboardInterrupt) as exc:
        if mem is not None:
            _warn(mem)
        if stored:  # memories commit one by one: say which made it before the failure
            typer.echo(f"stored before the failure: {', '.join(r.id for r in stored)}", err=True)
        _fail("interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc))
    skipped = [w for w in mem.warnings if w.startswith("skipped ")]
    _warn(mem)
    _emit(
        as_json,
        [r.to_dict() for r in stored],
        lambda: [out.print(f"added {r.id}: {_short(r.text)}", markup=False) for r in stored],
    )
    if skipped:
        _fail(f"{len(skipped)} memor{'y was' if len(skipped) == 1 else 'ies were'} not stored (see the warnings)")


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    mode: Annotated[
        str | None,
        typer.Option(
            help="mega+rag (adapters + the memory's text; MEGa's default) | qa (the paper's; MemoryLLM's default) | "
            "recall | irag | rag"
        ),
    ] = None,
    show_gate: Annotated[bool, typer.Option("--show-gate", help="Print the gate weights.")] = False,
    no_memory: Annotated[bool, typer.Option("--no-memory", help="Answer with the base model alone.")] = False,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Mix the k best memories (0: dense).")] = None,
    beta: Annotated[float | None, typer.Option(help="Gate softmax inverse temperature (finite, >= 0).")] = None,
    threshold: Annotated[float | None, typer.Option(help="Use no memory scoring below this.")] = None,
    null_rate: Annotated[
        float | None,
        typer.Option("--null-rate", help="The null memory's calibrated rate (default 0.01; docs/tuning.md)."),
    ] = None,
    no_null: Annotated[
        bool, typer.Option("--no-null", help="No null memory: every question goes to some memory (the paper's gate).")
    ] = False,
    lexical: Annotated[
        float | None,
        typer.Option("--lexical", help="Re-rank the gate's candidates with BM25 at this weight (0.3; docs/scale.md)."),
    ] = None,
    names: Annotated[
        float | None,
        typer.Option("--names", help="Add the share of the question's names the candidate holds at this weight (0.3)."),
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Longest answer in tokens, at least 1 (qa 64, recall 256).")
    ] = None,
    strict: StrictOpt = False,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer a question with the memories the gate picks."""
    mem = _open(store, create=False, strict=strict)
    try:
        if top_k is not None and top_k < 0:
            raise MegamemError(f"--top-k must be 0 (dense) or more, got {top_k}")
        gate = with_overrides(
            mem.gate,
            top_k=top_k or None,
            beta=beta,
            threshold=threshold,
            null_rate=null_rate,
            lexical=lexical,
            names=names,
        )
        if top_k == 0:
            gate = replace(gate, top_k=None)
        if no_null:
            gate = replace(gate, null_rate=None)
        modes = {"mode": mode} if mode is not None else {}  # the backend's own default otherwise
        ans = mem.ask(question, gate=gate, max_new_tokens=max_new_tokens, use_memory=not no_memory, **modes)
        texts = {mid: mem.show(mid).text for mid, _ in ans.gate[:10]} if show_gate else {}
    except MegamemError as exc:
        _warn(mem)
        _fail(str(exc))
    warnings = list(mem.warnings)
    _warn(mem)

    def human() -> None:
        if ans.mode == "irag" and ans.recall:
            out.print(f"recall: {printable(ans.recall)}", style="dim", markup=False)
        out.print(printable(ans.text), markup=False)
        if show_gate:
            table = Table("memory", "weight", "text")
            for mid, w in ans.gate[:10]:
                table.add_row(Text(mid), f"{w:.3f}", Text(_short(texts[mid])))
            base_share = 1.0 - sum(w for _, w in ans.gate)
            if ans.gate and base_share > 5e-4:
                table.add_row(Text("(no memory)"), f"{base_share:.3f}", Text("the base model's share (null memory)"))
            out.print(table if ans.gate else Text("gate: no memory used", style="dim"))

    _emit(as_json, {**ans.to_dict(), "warnings": warnings}, human)


@app.command("list")
def list_(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List the stored memories."""
    mem = _open(store, create=False)
    try:
        recs = mem.list()
    except MegamemError as exc:
        _fail(str(exc))
    _warn(mem)

    def human() -> None:
        table = Table("id", "created", "text")
        for r in recs:
            table.add_row(Text(r.id), r.created, Text(_short(r.text)))
        out.print(table)

    _emit(as_json, [r.to_dict() for r in recs], human)


def _print_fields(data: dict) -> None:
    for k, v in data.items():
        out.print(f"{k}: {printable(str(v))}", markup=False)


@app.command()
def show(
    memory_id: Annotated[str, typer.Argument(help="Memory id.")], store: StoreOpt = None, as_json: JsonOpt = False
) -> None:
    """Show one memory in full."""
    mem = _open(store, create=False)
    try:
        rec = mem.show(memory_id)
    except MegamemError as exc:
        _fail(str(exc))
    _emit(as_json, rec.to_dict(), lambda: _print_fields(rec.to_dict()))


@app.command()
def export(
    memory_id: Annotated[str, typer.Argument(help="Memory id.")],
    out_dir: Annotated[Path, typer.Option("--out", help="A new or empty folder for the PEFT adapter.")],
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")] = "float32",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write one memory's adapter as a plain PEFT folder (any stored dtype, int8 included)."""
    path = store or default_store_path()
    _mega_only(path, "export")
    mem = _open(store, create=False)
    try:
        folder = mem.export(memory_id, out_dir, dtype)
    except MegamemError as exc:
        _fail(str(exc))
    _emit(
        as_json, {"exported": memory_id, "folder": str(folder)}, lambda: out.print(f"exported {memory_id} to {folder}")
    )


def _age_seconds(text: str) -> float:
    """'90s', '30m', '12h', '7d' -> seconds; anything else is an error line."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text or "")
    if not m:
        _fail(f"--older-than must be a number and a unit s, m, h or d (like 7d), got {text!r}")
    return float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


@app.command()
def consolidate(
    ids: Annotated[list[str] | None, typer.Option("--ids", help="A memory to consolidate (repeatable).")] = None,
    older_than: Annotated[
        str | None, typer.Option("--older-than", help="Every memory older than this: 90s, 30m, 12h, 7d.")
    ] = None,
    keep_adapters: Annotated[
        bool, typer.Option("--keep-adapters", help="Keep their adapters in the gate too (nothing retired).")
    ] = False,
    epochs: Annotated[int | None, typer.Option(help="Cortex training epochs (default 4).")] = None,
    rank: Annotated[int | None, typer.Option(help="Cortex LoRA rank (default 64).")] = None,
    drift: Annotated[float | None, typer.Option(help="Weight of the drift penalty on generic questions.")] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rehearse memories into the store's shared cortex adapter, then retire their own adapters."""
    from datetime import datetime, timedelta, timezone

    from .ops.consolidate import ConsolidationConfig
    from .ops.consolidate import consolidate as run

    if (ids is None) == (older_than is None):
        _fail("give --ids or --older-than")
    path = store or default_store_path()
    _mega_only(path, "consolidate")
    base = ConsolidationConfig()
    try:
        cfg = replace(
            base,
            epochs=base.epochs if epochs is None else epochs,
            rank=base.rank if rank is None else rank,
            drift=base.drift if drift is None else drift,
        )
    except MegamemError as exc:
        _fail(str(exc))
    cutoff = None if older_than is None else datetime.now(timezone.utc) - timedelta(seconds=_age_seconds(older_than))
    mem = _open(store, create=False)
    try:
        chosen = list(ids) if ids else [r.id for r in mem.list() if datetime.fromisoformat(r.created) < cutoff]
        if not chosen:
            _fail(f"no memory is older than {older_than}")
        with _progress(as_json) as bar:
            task = bar.add_task(f"consolidating {len(chosen)}", total=None, loss=0.0)
            report = run(
                mem,
                chosen,
                cfg,
                keep_adapters,
                on_step=lambda s, n, loss: bar.update(task, completed=s, total=n, loss=loss),
            )
    except MegamemError as exc:
        _warn(mem)
        _fail(str(exc))
    _warn(mem)
    _emit(
        as_json,
        report,
        lambda: out.print(
            f"consolidated {len(report['consolidated'])} (the cortex holds {report['held']}) in {report['seconds']} s; "
            f"freed {report['bytes_freed']} bytes, cortex {report['cortex_bytes']} bytes",
            markup=False,
        ),
    )


@app.command()
def merge(
    ids: Annotated[list[str] | None, typer.Argument(help="Memories to merge (two or more).")] = None,
    new_id: Annotated[str | None, typer.Option("--id", help="The merged memory's id (default: a new one).")] = None,
    suggest: Annotated[
        bool,
        typer.Option("--suggest", help="Only list groups that look like one subject, and merged ones that diverged."),
    ] = False,
    cosine: Annotated[float, typer.Option(help="--suggest: least best key cosine of a pair.")] = 0.6,
    names: Annotated[float, typer.Option(help="--suggest: least name overlap of a pair.")] = 0.5,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Learn memories about one subject into one adapter (their texts joined), then forget them (docs/scale.md)."""
    from .ops.merge import check_ids, diverged, subjects
    from .ops.merge import merge as run

    path = store or default_store_path()
    _mega_only(path, "merge")
    if suggest == bool(ids):
        _fail("give two or more memory ids, or --suggest")
    if not suggest:
        try:
            check_ids(list(ids))
        except MegamemError as exc:
            _fail(str(exc))
    mem = _open(store, create=False)
    try:
        if suggest:
            data = {
                "subjects": subjects(mem, cosine, names),
                "diverged": [{"id": i, "groups": g} for i, g in diverged(mem, cosine, names)],
            }
        else:
            with _progress(as_json) as bar:
                task = bar.add_task(f"merging {len(ids)}", total=None, loss=0.0)
                rec = run(
                    mem, list(ids), new_id, on_step=lambda s, n, loss: bar.update(task, completed=s, total=n, loss=loss)
                )
            data = {"id": rec.id, "members": [m["id"] for m in rec.metadata["megamem.merged"]]}
    except MegamemError as exc:
        _warn(mem)
        _fail(str(exc))
    _warn(mem)

    def human() -> None:
        if not suggest:
            out.print(f"merged {', '.join(data['members'])} into {data['id']}", markup=False)
            return
        for g in data["subjects"]:
            out.print("one subject: " + " ".join(g), markup=False)
        for d in data["diverged"]:
            out.print(f"diverged: {d['id']} -> " + " | ".join(" ".join(g) for g in d["groups"]), markup=False)
        if not data["subjects"] and not data["diverged"]:
            out.print("nothing to merge or split", markup=False)

    _emit(as_json, data, human)


@app.command()
def split(
    memory_id: Annotated[str, typer.Argument(help="A merged memory.")], store: StoreOpt = None, as_json: JsonOpt = False
) -> None:
    """Store a merged memory's members again, each in its own adapter, then forget the merged one."""
    from .ops.merge import split as run

    path = store or default_store_path()
    _mega_only(path, "split")
    mem = _open(store, create=False)
    try:
        mem.show(memory_id)  # a memory that is not there: an error before the progress bar
        with _progress(as_json) as bar:
            task = bar.add_task(f"splitting {memory_id}", total=None, loss=0.0)
            recs = run(mem, memory_id, on_step=lambda s, n, loss: bar.update(task, completed=s, total=n, loss=loss))
    except MegamemError as exc:
        _warn(mem)
        _fail(str(exc))
    _warn(mem)
    data = {"split": memory_id, "ids": [r.id for r in recs]}
    _emit(as_json, data, lambda: out.print(f"split {memory_id} into {', '.join(data['ids'])}", markup=False))


@app.command()
def forget(
    memory_id: Annotated[str, typer.Argument(help="Memory id.")], store: StoreOpt = None, as_json: JsonOpt = False
) -> None:
    """Remove a memory for good."""
    mem = _open(store, create=False)
    try:
        rec = mem.forget(memory_id)
    except MegamemError as exc:
        _warn(mem)
        _fail(str(exc))
    _warn(mem)
    _emit(as_json, {"forgotten": rec.id}, lambda: out.print(f"forgot {rec.id}", markup=False))


@app.command()
def info(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Show the store's settings and size."""
    mem = _open(store, create=False)
    try:
        data = mem.info()
    except MegamemError as exc:
        _fail(str(exc))
    _warn(mem)
    _emit(as_json, data, lambda: _print_fields(data))


@app.command()
def verify(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Check every file of the store against its checksum; list every problem (exit 1 if there is one)."""
    from .store.health import verify as verify_store

    path = store or default_store_path()
    _mega_only(path, "verify")
    try:
        found = verify_store(path)
    except MegamemError as exc:
        _fail(str(exc))
    serious = [p for p in found if p.serious]

    def human() -> None:
        for p in found:
            out.print(f"{p.kind:<11} {printable_line(p.path)}: {printable_line(p.message)}", markup=False)
        out.print(f"{len(serious)} problem(s) in {path}" if serious else f"ok: {path}", markup=False)

    _emit(as_json, {"store": str(path), "ok": not serious, "problems": [p.to_dict() for p in found]}, human)
    if serious:
        raise typer.Exit(1)


@app.command()
def repair(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Mend the store: rebuild a damaged manifest from the memory folders, re-list whole memories, move what
    fails its checksums to quarantine/ (nothing is deleted). Exit 1 if problems remain."""
    from .store.health import repair as repair_store
    from .store.health import verify as verify_store

    path = store or default_store_path()
    _mega_only(path, "repair")
    try:
        done = repair_store(path)
        left = [p for p in verify_store(path) if p.serious]
    except MegamemError as exc:
        _fail(str(exc))

    def human() -> None:
        for line in done:
            out.print(printable_line(line), markup=False)
        for p in left:
            out.print(f"still: {p.kind} {printable_line(p.path)}: {printable_line(p.message)}", markup=False)
        out.print(f"{len(left)} problem(s) left" if left else f"ok: {path}", markup=False)

    _emit(as_json, {"store": str(path), "done": done, "problems": [p.to_dict() for p in left]}, human)
    if left:
        raise typer.Exit(1)


@app.command()
def serve(
    store: StoreOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port.")] = 8000,
    open_access: Annotated[
        bool, typer.Option("--open", help="No API keys: every caller is the default namespace (loopback use).")
    ] = False,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Chat requests decoded together, at most.")] = 16,
    no_batch: Annotated[bool, typer.Option("--no-batch", help="Decode one request at a time.")] = False,
) -> None:
    """Serve the store: OpenAI-compatible chat, the memory API, injection jobs and a web page (docs/server.md)."""
    import uvicorn

    from .server.app import ServerConfig, create_app

    path = store or default_store_path()
    _mega_only(path, "serve")
    if max_batch < 1:
        _fail("--max-batch must be at least 1")
    if open_access and host not in ("127.0.0.1", "localhost", "::1"):
        _fail("--open serves without API keys; it only listens on loopback (127.0.0.1)")
    if Store.exists(path):
        from .server import db as server_db
        from .server import tenants

        try:
            has = tenants.has_keys(server_db.connect(path))
        except MegamemError as exc:
            _fail(str(exc))
        if not has and not open_access:
            _fail(f"the store has no API keys; `megamem keys create --store {path} --namespace NAME` makes one, or "
                  "serve with --open (no keys, loopback only)")  # fmt: skip
    elif not open_access:
        _fail(f"no megamem store at {path}; create keys first (`megamem keys create --store {path} ...`) or --open")
    cfg = ServerConfig(store=path, open_access=open_access, max_batch=max_batch, batched=not no_batch)
    uvicorn.run(create_app(cfg), host=host, port=port, log_level="warning")


keys_app = typer.Typer(no_args_is_help=True, help="API keys of the server: each maps a caller to a namespace.")
app.add_typer(keys_app, name="keys")


def _keys_db(store: Path | None, create: bool):
    from .server import db as server_db

    path = store or default_store_path()
    if not Store.exists(path):
        if not create:
            _fail(f"no megamem store at {path}")
        _open(path).prepare_store()  # an empty store with the default settings, ready for the server
    try:
        return server_db.connect(path)
    except MegamemError as exc:
        _fail(str(exc))


@keys_app.command("create")
def keys_create(
    namespace: Annotated[str, typer.Option("--namespace", help="The tenant this key acts for.")],
    store: StoreOpt = None,
    admin: Annotated[bool, typer.Option("--admin", help="May manage keys and act in any namespace.")] = False,
    name: Annotated[str, typer.Option("--name", help="A label for the key.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Make an API key (printed once; only its hash is stored). Creates an empty store if there is none."""
    from .server import tenants

    try:
        schema.check_namespace(namespace)
        db = _keys_db(store, create=True)
        key = tenants.create_key(db, namespace, admin, name)
    except MegamemError as exc:
        _fail(str(exc))
    _emit(as_json, {"key": key, "namespace": namespace, "admin": admin}, lambda: out.print(key, markup=False))


@keys_app.command("list")
def keys_list(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """The keys (their first characters only), namespaces and labels."""
    from .server import tenants

    rows = tenants.list_keys(_keys_db(store, create=False))

    def human() -> None:
        for r in rows:
            out.print(f"{r['prefix']}…  {r['namespace']}{'  admin' if r['admin'] else ''}  {r['name']}", markup=False)

    _emit(as_json, rows, human)


@keys_app.command("revoke")
def keys_revoke(
    prefix: Annotated[str, typer.Argument(help="The key's first 10+ characters.")], store: StoreOpt = None
) -> None:
    """Revoke a key by its first characters (as `megamem keys list` shows them)."""
    from .server import tenants

    try:
        n = tenants.revoke_key(_keys_db(store, create=False), prefix)
    except MegamemError as exc:
        _fail(str(exc))
    if not n:
        _fail(f"no key starts with {prefix[:10]!r}")
    out.print(f"revoked {n} key(s)", markup=False)


@app.command("train-memoryllm")
def train_memoryllm(
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder: checkpoint, params, log, loss plot.")] = Path(
        "bench-runs/memoryllm-train"
    ),
    data: Annotated[Path, typer.Option("--data", help="The data folder (mega-wiki2024/, mega-fictional/).")] = Path(
        "../shared/data"
    ),
    partitions: Annotated[str, typer.Option(help="Training partitions, comma-separated.")] = "5,6,7,8,9",
    heldout: Annotated[int, typer.Option(help="The partition of the held-out continuation check.")] = 4,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1000,
    accum: Annotated[int, typer.Option(help="Episodes per step.")] = 2,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Steps between held-out checks and saves.")] = 200,
    model: ModelOpt = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
) -> None:
    """Train MemoryLLM's memory-use parameters (resumable: run it again with the same --out to go on)."""
    from .memoryllm import MemoryLLM
    from .memoryllm.recipe import TrainConfig, plot_curve, train

    try:
        parts = [int(p) for p in partitions.split(",") if p.strip()]
    except ValueError:
        _fail(f"--partitions must be comma-separated numbers, got {partitions!r}")
    for name, value in (("--steps", steps), ("--accum", accum), ("--eval-every", eval_every), ("--threads", threads)):
        if value is not None and value < 1:
            _fail(f"{name} must be at least 1, got {value}")
    for kind in ("mega-wiki2024", "mega-fictional"):
        files = sorted((data / kind).glob("*.jsonl")) if (data / kind).is_dir() else []
        if not files:
            _fail(f"{data} has no {kind}/ partitions (see ../shared/data/README.md)")
        missing = [p for p in [*parts, heldout] if not 0 <= p < len(files)]
        if missing:
            _fail(f"{data / kind} has {len(files)} partitions; there is no partition {missing[0]}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg = TrainConfig(
        data=str(data), partitions=parts, steps=steps, accum=accum, eval_every=eval_every, heldout=heldout
    )
    try:
        mllm = MemoryLLM(*load_model(model))
        with _progress(False) as bar:
            task = bar.add_task("training", total=steps, loss=0.0)
            last = train(mllm, cfg, out_dir, on_step=lambda s, n, row: bar.update(task, completed=s, loss=row["loss"]))
    except MegamemError as exc:
        _fail(str(exc))
    try:
        plot = str(plot_curve(out_dir))
    except MegamemError as exc:  # the plot is the bench extra's; the trained parameters are saved without it
        typer.echo(f"warning: {exc}", err=True)
        plot = "not drawn"
    out.print(f"held-out continuation loss: {last.get('heldout')}", markup=False)
    out.print(f"parameters: {out_dir / 'params.safetensors'}; loss curve: {plot}", markup=False)


@app.command()
def demo(
    store: Annotated[
        Path | None, typer.Option("--store", help="Demo store folder: new, empty, or an earlier demo's store.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Inject the bundled demo memories and compare the base model's answers with megamem's."""
    from .demo import run_demo

    try:
        rows = run_demo(store, progress=not as_json)
    except MegamemError as exc:
        _fail(str(exc))
    _emit(as_json, rows, lambda: None)


def _floats(text: str | None, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()] if text else []
    except ValueError:
        _fail(f"{what} takes comma-separated numbers, got {text!r}")
        raise  # unreachable


@app.command()
def bench(
    data: Annotated[Path, typer.Option("--data", help="Folder of partition-NN.jsonl files.")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run folder (default bench-runs/DATA-pP).")] = None,
    partitions: Annotated[str, typer.Option(help="Partitions, comma-separated.")] = "0",
    memories: Annotated[int | None, typer.Option(help="First N memories of each partition.")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods, or all.")] = "all",
    model: ModelOpt = None,
    epochs: Annotated[int, typer.Option(help="Training epochs per memory (all methods).")] = 10,
    max_steps: Annotated[int | None, typer.Option(help="Cap on optimiser steps per memory.")] = None,
    lr: Annotated[
        list[str] | None, typer.Option("--lr", help="METHOD=RATE, or METHOD=R1,R2 for a sweep (repeatable).")
    ] = None,
    eval_every: Annotated[int, typer.Option(help="Test all seen memories every N memories.")] = 1,
    rank: Annotated[
        int | None,
        typer.Option(
            help=f"LoRA rank (mega, irag, lora, lora-l2; default: the pinned protocol's, {PROTOCOL_LORA.rank})."
        ),
    ] = None,
    targets: Annotated[str, typer.Option(help="mlp | attn | all | early | mid | late (MLP thirds).")] = "mlp",
    key_function: Annotated[str, typer.Option("--key-function", help="embedder | activation.")] = "embedder",
    beta: Annotated[float | None, typer.Option(help="Gate softmax inverse temperature.")] = None,
    l2_lambda: Annotated[str | None, typer.Option(help="full-l2 lambdas to sweep, comma-separated.")] = None,
    ewc_lambda: Annotated[str | None, typer.Option(help="full-ewc lambdas to sweep, comma-separated.")] = None,
    lora_l2_lambda: Annotated[str | None, typer.Option(help="lora-l2 lambdas to sweep, comma-separated.")] = None,
    mmlu: Annotated[str | None, typer.Option(help="Local MMLU folder (CSV release or HF parquet).")] = None,
    mmlu_subjects: Annotated[str | None, typer.Option(help="MMLU subjects, comma-separated.")] = None,
    mmlu_limit: Annotated[int | None, typer.Option(help="MMLU questions per subject.")] = 20,
    judge_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint for an LLM judge.")] = None,
    judge_model: Annotated[str | None, typer.Option(help="The LLM judge's model name.")] = None,
    mcq_limit: Annotated[int | None, typer.Option(help="Use only the first N shipped MCQ questions.")] = None,
    text_paragraphs: Annotated[int, typer.Option(help="General-text paragraphs for the KL probe.")] = 16,
    general_qa: Annotated[
        int, typer.Option(help="General questions whose answers are compared with the base model's (0: off).")
    ] = 60,
    batch_size: Annotated[int, typer.Option(help="Prompts per batched generation.")] = 16,
    threads: Annotated[
        int | None, typer.Option(help="Torch CPU threads (1 is far faster on a machine shared with other jobs).")
    ] = None,
    compositional: Annotated[
        bool, typer.Option("--compositional", help="Two-passage questions (Table 2): mega, irag, rag, full-batch.")
    ] = False,
    estimate: Annotated[
        bool, typer.Option("--estimate", help="Print the expected CPU time (measured steps) and stop.")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
) -> None:
    """Continual-learning benchmark: learn memories one at a time, test all seen so far, write a run folder."""
    try:  # the bench's own packages are an extra: a missing one is a MegamemError naming it
        from .bench.compositional import METHODS as COMPOSITIONAL
        from .bench.compositional import run_compositional
        from .bench.config import BenchConfig, expand_methods
        from .bench.run import run_bench
        from .bench.spec import MethodSpec

        names = expand_methods([m.strip() for m in methods.split(",") if m.strip()])
        if compositional:
            names = [m for m in names if m in COMPOSITIONAL]
        for fam, text, flag in (
            ("full-l2", l2_lambda, "--l2-lambda"),
            ("full-ewc", ewc_lambda, "--ewc-lambda"),
            ("lora-l2", lora_l2_lambda, "--lora-l2-lambda"),
        ):
            lams = _floats(text, flag)
            if lams:
                names = [m for m in names if m != fam] + [str(MethodSpec(fam, lam=x)) for x in lams]
        lrs = {}
        for item in lr or []:  # METHOD=RATE sets a rate; METHOD=R1,R2,... sweeps: one variant METHOD~R each
            key, _, val = item.partition("=")
            rates = _floats(val, "--lr")
            if not rates:
                _fail(f"--lr takes METHOD=RATE[,RATE...], got {item!r}")
            if len(rates) == 1:
                lrs[key.strip()] = rates[0]
            else:
                spec = MethodSpec.parse(key.strip())
                names = [m for m in names if m != key.strip()] + [str(replace(spec, lr=x)) for x in rates]
        try:
            parts = [int(x) for x in partitions.split(",") if x.strip()]
        except ValueError:
            _fail(f"--partitions takes comma-separated integers, got {partitions!r}")
        cfg = BenchConfig(
            data=str(data),
            partitions=parts,
            memories=memories,
            methods=names,
            model=model,
            epochs=epochs,
            max_steps=max_steps,
            lrs=lrs,
            rank=rank,
            targets=targets,
            key_function=key_function,
            beta=beta,
            eval_every=eval_every,
            mmlu=mmlu,
            mmlu_limit=mmlu_limit,
            judge_url=judge_url,
            judge_model=judge_model,
            mmlu_subjects=[s.strip() for s in mmlu_subjects.split(",")] if mmlu_subjects else None,
            batch_size=batch_size,
            mcq_limit=mcq_limit,
            text_paragraphs=text_paragraphs,
            general_qa=general_qa,
            threads=threads,
        )
        if compositional:
            folder = out_dir or Path("bench-runs") / f"{data.name}-compositional"
            run_compositional(cfg, folder, console=err, progress=not no_progress)
        else:
            folder = out_dir or Path("bench-runs") / f"{data.name}-p{'-'.join(map(str, parts))}"
            run_bench(cfg, folder, console=err, progress=not no_progress, estimate_only=estimate)
    except MegamemError as exc:
        _fail(str(exc))
    if estimate:
        return
    out.print(f"results: {folder / ('compositional.md' if compositional else 'results.md')}", highlight=False)


def _short(text: str, n: int = 70) -> str:
    text = printable_line(" ".join(text.split()))
    return text if len(text) <= n else text[: n - 1] + "…"


if __name__ == "__main__":  # pragma: no cover
    from .entry import main

    main()
