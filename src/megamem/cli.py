"""The megamem command line: add, ask, list, show, forget, info, demo. --json on every command."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from transformers.utils import logging as transformers_logging

from .errors import MegamemError
from .inputs import read_jsonl, read_text_file
from .memory import Item, Memory, with_overrides
from .train import Recipe

transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Long-term memory in a language model's weights.")
out = Console()
err = Console(stderr=True)

StoreOpt = Annotated[Path | None, typer.Option("--store", help="Store folder (default: user data dir).")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Base model: HF path or name (new stores).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _open(store: Path | None, model: str | None = None, key_function: str | None = None, **kw) -> Memory:
    try:
        return Memory(store, model=model, key_function=key_function, **kw)
    except MegamemError as exc:
        _fail(str(exc))
        raise  # unreachable


def _emit(as_json: bool, data, human) -> None:
    if as_json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
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
    key_function: Annotated[
        str | None, typer.Option("--key-function", help="embedder | activation (new stores).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    store: StoreOpt = None,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Learn new memories: TEXT, --file FILE or --jsonl FILE."""
    given = [x is not None for x in (text, file, jsonl)]
    if sum(given) != 1:
        _fail("give exactly one of TEXT, --file or --jsonl")
    try:
        if jsonl is not None:
            if paraphrase or id:
                _fail("--paraphrase and --id go with TEXT or --file; put them in the JSONL lines")
            items = read_jsonl(jsonl)
        else:
            body = read_text_file(file) if file is not None else text
            items = [Item(body or "", list(paraphrase or []), {"source": str(file)} if file else {}, id)]
        base = Recipe()
        recipe = Recipe(lr=lr or base.lr, epochs=epochs or base.epochs, seed=seed)
        mem = _open(store, model, key_function, recipe=recipe)
        items = mem.validate(items)
        with _progress(as_json) as bar:
            task = bar.add_task("learning", total=None, loss=0.0)

            def on_memory(i: int, n: int) -> None:
                bar.update(task, description=f"memory {i + 1}/{n}", completed=0, total=None)

            def on_step(step: int, total: int, loss: float) -> None:
                bar.update(task, completed=step, total=total, loss=loss)

            records = mem.add_many(items, on_step=on_step, on_memory=on_memory)
    except MegamemError as exc:
        _fail(str(exc))
    _emit(
        as_json,
        [r.to_dict() for r in records],
        lambda: [out.print(f"added {r.id}: {_short(r.text)}", highlight=False) for r in records],
    )


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    mode: Annotated[str, typer.Option(help="qa | recall | irag")] = "qa",
    show_gate: Annotated[bool, typer.Option("--show-gate", help="Print the gate weights.")] = False,
    no_memory: Annotated[bool, typer.Option("--no-memory", help="Answer with the base model alone.")] = False,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Mix only the k best memories.")] = None,
    beta: Annotated[float | None, typer.Option(help="Gate softmax inverse temperature.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Use no memory scoring below this.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Longest answer in tokens (qa 64, recall 256).")] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer a question with the memories the gate picks."""
    mem = _open(store)
    try:
        gate = with_overrides(mem.gate, top_k=top_k, beta=beta, threshold=threshold)
        ans = mem.ask(question, mode=mode, gate=gate, max_new_tokens=max_new_tokens, use_memory=not no_memory)
    except MegamemError as exc:
        _fail(str(exc))

    def human() -> None:
        if mode == "irag" and ans.recall:
            out.print(f"[dim]recall: {ans.recall}[/dim]", highlight=False)
        out.print(ans.text, highlight=False)
        if show_gate:
            table = Table("memory", "weight", "text")
            for mid, w in ans.gate[:10]:
                table.add_row(mid, f"{w:.3f}", _short(mem.show(mid).text))
            out.print(table if ans.gate else "[dim]gate: no memory used[/dim]")

    _emit(as_json, ans.to_dict(), human)


@app.command("list")
def list_(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List the stored memories."""
    mem = _open(store)
    recs = mem.list()

    def human() -> None:
        table = Table("id", "created", "text")
        for r in recs:
            table.add_row(r.id, r.created, _short(r.text))
        out.print(table)

    _emit(as_json, [r.to_dict() for r in recs], human)


@app.command()
def show(
    memory_id: Annotated[str, typer.Argument(help="Memory id.")], store: StoreOpt = None, as_json: JsonOpt = False
) -> None:
    """Show one memory in full."""
    mem = _open(store)
    try:
        rec = mem.show(memory_id)
    except MegamemError as exc:
        _fail(str(exc))
    _emit(as_json, rec.to_dict(), lambda: [out.print(f"{k}: {v}", highlight=False) for k, v in rec.to_dict().items()])


@app.command()
def forget(
    memory_id: Annotated[str, typer.Argument(help="Memory id.")], store: StoreOpt = None, as_json: JsonOpt = False
) -> None:
    """Remove a memory for good."""
    mem = _open(store)
    try:
        rec = mem.forget(memory_id)
    except MegamemError as exc:
        _fail(str(exc))
    _emit(as_json, {"forgotten": rec.id}, lambda: out.print(f"forgot {rec.id}"))


@app.command()
def info(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Show the store's settings and size."""
    mem = _open(store)
    data = mem.info()
    _emit(as_json, data, lambda: [out.print(f"{k}: {v}", highlight=False) for k, v in data.items()])


@app.command()
def demo(
    store: Annotated[Path | None, typer.Option("--store", help="Demo store folder (rebuilt).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Inject the bundled demo memories and compare the base model's answers with megamem's."""
    from .demo import run_demo

    try:
        rows = run_demo(store, progress=not as_json)
    except MegamemError as exc:
        _fail(str(exc))
    _emit(as_json, rows, lambda: None)


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
