"""The commands that reshape stored memories: consolidate, merge and split (megamem.ops)."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Annotated

import typer

from ..backend import CONSOLIDATE, MERGE, Backend
from ..errors import MegamemError
from ..schema import MERGED
from .context import JsonOpt, StoreOpt, emit, on_step_of, open_for, progress, say, warn

IdsOpt = Annotated[list[str] | None, typer.Option("--ids", help="A memory to consolidate (repeatable).")]
OlderThanOpt = Annotated[
    str | None, typer.Option("--older-than", help="Every memory older than this: 90s, 30m, 12h, 7d.")
]
KeepAdaptersOpt = Annotated[
    bool, typer.Option("--keep-adapters", help="Keep their adapters in the gate too (nothing retired).")
]
CortexEpochsOpt = Annotated[int | None, typer.Option(help="Cortex training epochs (default 4).")]
CortexRankOpt = Annotated[int | None, typer.Option(help="Cortex LoRA rank (default 64).")]
DriftOpt = Annotated[float | None, typer.Option(help="Weight of the drift penalty on generic questions.")]


def consolidate(
    ids: IdsOpt = None,
    older_than: OlderThanOpt = None,
    keep_adapters: KeepAdaptersOpt = False,
    epochs: CortexEpochsOpt = None,
    rank: CortexRankOpt = None,
    drift: DriftOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rehearse memories into the store's shared cortex adapter, then retire their own adapters."""
    from ..ops.consolidate import ConsolidationConfig
    from ..ops.consolidate import consolidate as run

    if (ids is None) == (older_than is None):
        raise MegamemError("give --ids or --older-than")
    base = ConsolidationConfig()
    cfg = replace(
        base,
        epochs=base.epochs if epochs is None else epochs,
        rank=base.rank if rank is None else rank,
        drift=base.drift if drift is None else drift,
    )
    cutoff = None if older_than is None else datetime.now(timezone.utc) - timedelta(seconds=_age_seconds(older_than))
    mem = open_for(store, CONSOLIDATE, "consolidate")
    chosen = list(ids) if ids else [r.id for r in mem.list() if datetime.fromisoformat(r.created) < cutoff]
    if not chosen:
        raise MegamemError(f"no memory is older than {older_than}")
    with progress(as_json) as bar:
        task = bar.add_task(f"consolidating {len(chosen)}", total=None, loss=0.0)
        report = run(mem, chosen, cfg, keep_adapters, on_step=on_step_of(bar, task))
    warn(mem)
    emit(
        as_json,
        report,
        lambda: say(
            f"consolidated {len(report['consolidated'])} (the cortex holds {report['held']}) in {report['seconds']} s; "
            f"freed {report['bytes_freed']} bytes, cortex {report['cortex_bytes']} bytes"
        ),
    )


MAX_AGE_S = 36500 * 86400  # a hundred years


def _age_seconds(text: str) -> float:
    """'90s', '30m', '12h', '7d' -> seconds; anything else is an error line."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text or "")
    if not m:
        raise MegamemError(f"--older-than must be a number and a unit s, m, h or d (like 7d), got {text!r}")
    seconds = float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
    if seconds > MAX_AGE_S:  # beyond it a date cannot be counted back (and nothing is that old)
        raise MegamemError(f"--older-than {text.strip()} is longer than megamem counts back (at most 36500d)")
    return seconds


MergeIdsArg = Annotated[list[str] | None, typer.Argument(help="Memories to merge (two or more).")]
NewIdOpt = Annotated[str | None, typer.Option("--id", help="The merged memory's id (default: a new one).")]
SuggestOpt = Annotated[
    bool,
    typer.Option("--suggest", help="Only list groups that look like one subject, and merged ones that diverged."),
]
CosineOpt = Annotated[float, typer.Option(help="--suggest: least best key cosine of a pair.")]
NamesOpt = Annotated[float, typer.Option(help="--suggest: least name overlap of a pair.")]


def merge(
    ids: MergeIdsArg = None,
    new_id: NewIdOpt = None,
    suggest: SuggestOpt = False,
    cosine: CosineOpt = 0.6,
    names: NamesOpt = 0.5,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Learn memories about one subject into one adapter (their texts joined), then forget them (docs/scale.md)."""
    from ..ops.merge import check_ids

    if suggest == bool(ids):
        raise MegamemError("give two or more memory ids, or --suggest")
    if not suggest:
        check_ids(list(ids))
    mem = open_for(store, MERGE, "merge")
    data = _suggestions(mem, cosine, names) if suggest else _merged(mem, list(ids), new_id, as_json)
    warn(mem)
    emit(as_json, data, lambda: _print_merge(data, suggest))


def _suggestions(mem: Backend, cosine: float, names: float) -> dict:
    """Groups that look like one subject, and merged memories whose members no longer do (megamem.ops.merge)."""
    from ..ops.merge import diverged, subjects

    return {
        "subjects": subjects(mem, cosine, names),
        "diverged": [{"id": i, "groups": g} for i, g in diverged(mem, cosine, names)],
    }


def _merged(mem: Backend, ids: list[str], new_id: str | None, as_json: bool) -> dict:
    """Merge `ids` into one memory (a progress bar while it learns): its id and its members' ids."""
    from ..ops.merge import merge as run

    with progress(as_json) as bar:
        task = bar.add_task(f"merging {len(ids)}", total=None, loss=0.0)
        rec = run(mem, ids, new_id, on_step=on_step_of(bar, task))
    return {"id": rec.id, "members": [m["id"] for m in rec.metadata[MERGED]]}


def _print_merge(data: dict, suggest: bool) -> None:
    """What merge did, or what --suggest found (or that it found nothing)."""
    if not suggest:
        say(f"merged {', '.join(data['members'])} into {data['id']}")
        return
    for g in data["subjects"]:
        say("one subject: " + " ".join(g))
    for d in data["diverged"]:
        say(f"diverged: {d['id']} -> " + " | ".join(" ".join(g) for g in d["groups"]))
    if not data["subjects"] and not data["diverged"]:
        say("nothing to merge or split")


def split(
    memory_id: Annotated[str, typer.Argument(help="A merged memory.")], store: StoreOpt = None, as_json: JsonOpt = False
) -> None:
    """Store a merged memory's members again, each in its own adapter, then forget the merged one."""
    from ..ops.merge import split as run

    mem = open_for(store, MERGE, "split")
    mem.show(memory_id)  # a memory that is not there: an error before the progress bar
    with progress(as_json) as bar:
        task = bar.add_task(f"splitting {memory_id}", total=None, loss=0.0)
        recs = run(mem, memory_id, on_step=on_step_of(bar, task))
    warn(mem)
    data = {"split": memory_id, "ids": [r.id for r in recs]}
    emit(as_json, data, lambda: say(f"split {memory_id} into {', '.join(data['ids'])}"))
