"""The bundled demo: inject five invented memories and compare base-model and megamem answers."""

from __future__ import annotations

import json
import tempfile
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import MegamemError
from .judge import contains_answer
from .memory import Item, Memory


def demo_items() -> list[dict]:
    """The five shipped demo memories, each with a question and its short answer."""
    text = resources.files("megamem").joinpath("data/demo.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _reuse(mem: Memory, demo_ids: set[str]) -> None:
    """Make an earlier demo's store ready to be filled again by forgetting its demo memories; refuse anything
    else (a store with other memories is the user's, and a folder that is not a store is never emptied)."""
    held = {r.id for r in mem.list()}
    others = sorted(held - demo_ids)
    if others:
        raise MegamemError(
            f"{mem.path} holds memories that are not the demo's ({', '.join(others[:3])}...); "
            "give the demo a new folder or its own store"
        )
    for memory_id in sorted(held):
        mem.forget(memory_id)


def run_demo(store: Path | None = None, progress: bool = True) -> list[dict]:
    """Build a fresh demo store, ask each question with and without memory, print a table; return rows."""
    console = Console(stderr=not progress)
    path = Path(store) if store is not None else Path(tempfile.mkdtemp(prefix="megamem-demo-")) / "store"
    items = demo_items()
    mem = Memory(path)
    _reuse(mem, {d["id"] for d in items})
    console.print(f"[bold]megamem demo[/bold]: learning {len(items)} memories into {path}")
    with console.status("") as status:

        def on_memory(i: int, n: int) -> None:
            status.update(f"learning memory {i + 1}/{n}: {items[i]['id']}")

        mem.add_many(
            [Item(d["text"], d["paraphrases"], {"question": d["question"]}, d["id"]) for d in items],
            on_memory=on_memory,
        )
    rows = []
    for d in items:
        base = mem.ask(d["question"], use_memory=False).text
        ans = mem.ask(d["question"])
        top_id, top_w = ans.gate[0] if ans.gate else ("-", 0.0)
        rows.append(
            {
                "question": d["question"],
                "expected": d["answer"],
                "top_memory": top_id,
                "gate_weight": top_w,
                "base_answer": base,
                "megamem_answer": ans.text,
                "base_correct": contains_answer(base, d["answer"]),
                "megamem_correct": contains_answer(ans.text, d["answer"]),
            }
        )
    table = Table("question", "top memory (gate)", "base model", "megamem", show_lines=True)
    for r in rows:
        mark = lambda ok: "[green]✓[/green]" if ok else "[red]✗[/red]"  # noqa: E731
        table.add_row(
            r["question"],
            f"{r['top_memory']} ({r['gate_weight']:.2f})",
            f"{mark(r['base_correct'])} {r['base_answer']}",
            f"{mark(r['megamem_correct'])} {r['megamem_answer']}",
        )
    console.print(table)
    console.print(
        f"answers holding the injected fact: base model {sum(r['base_correct'] for r in rows)}/{len(rows)}, "
        f"megamem {sum(r['megamem_correct'] for r in rows)}/{len(rows)}"
    )
    return rows
