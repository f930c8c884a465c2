"""The commands that reshape stored memories: consolidate, merge and split (megamem.ops).

Each acts on one namespace's memories, the default one unless --namespace names another (context.Scope): a
merge, a split or a cortex never takes in another namespace's memory.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Annotated

import typer

from ..backend import CONSOLIDATE, MERGE
from ..errors import MegamemError
from ..schema import DEFAULT_NAMESPACE, MERGED, is_consolidated
from ..store.cortex import read_record
from ..store.intents import interrupted
from .context import JsonOpt, NamespaceOpt, Scope, StoreOpt, emit, on_step_of, open_for, progress, say, warn

if TYPE_CHECKING:
    from ..ops.consolidate import ConsolidationConfig

IdsOpt = Annotated[list[str] | None, typer.Option("--ids", help="A memory to consolidate (repeatable).")]
OlderThanOpt = Annotated[
    str | None, typer.Option("--older-than", help="Every memory older than this: 90s, 30m, 12h, 7d.")
]
RetrainOpt = Annotated[
    bool,
    typer.Option(
        "--retrain", help="Retrain the namespace's cortex from the memories its record still holds (after a forget)."
    ),
]
KeepAdaptersOpt = Annotated[
    bool, typer.Option("--keep-adapters", help="Keep their adapters in the gate too (nothing retired).")
]
ForgetOpt = Annotated[
    bool,
    typer.Option(
        "--forget",
        help="Forget them from the store (their text stays only in the cortex's record) instead of keeping their "
        "text and keys for the gate; the cortex is then in every answer.",
    ),
]
CortexEpochsOpt = Annotated[int | None, typer.Option(help="Cortex training epochs (default 4).")]
CortexRankOpt = Annotated[int | None, typer.Option(help="Cortex LoRA rank (default 64).")]
DriftOpt = Annotated[float | None, typer.Option(help="Weight of the drift penalty on generic questions.")]


def consolidate(
    ids: IdsOpt = None,
    older_than: OlderThanOpt = None,
    retrain: RetrainOpt = False,
    keep_adapters: KeepAdaptersOpt = False,
    forget: ForgetOpt = False,
    epochs: CortexEpochsOpt = None,
    rank: CortexRankOpt = None,
    drift: DriftOpt = None,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rehearse the namespace's memories into its shared cortex adapter, then retire their own adapters: they keep
    their text and keys, the gate routes to them and the cortex answers for them (--forget: out of the store
    entirely; --retrain: train its cortex again from what its record holds, as after a forget)."""
    from ..ops.consolidate import consolidate as run

    if retrain and (ids is not None or older_than is not None or keep_adapters or forget):
        raise MegamemError(
            "--retrain trains the cortex from what it holds: give no --ids, --older-than, --keep-adapters or --forget"
        )
    if forget and keep_adapters:
        raise MegamemError("--forget and --keep-adapters contradict each other; choose one")
    if not retrain and (ids is None) == (older_than is None):
        raise MegamemError("give --ids or --older-than (or --retrain)")
    cfg = _cortex_config(epochs, rank, drift)
    cutoff = None if older_than is None else datetime.now(timezone.utc) - timedelta(seconds=_age_seconds(older_than))
    scope = Scope.of(open_for(store, CONSOLIDATE, "consolidate"), namespace)
    mem = scope.mem
    chosen = _to_consolidate(scope, ids, older_than, cutoff, retrain)
    with progress(as_json) as bar:
        what = f"retraining the {namespace} cortex" if retrain else f"consolidating {len(chosen)}"
        task = bar.add_task(what, total=None, loss=0.0)
        step = on_step_of(bar, task)
        report = run(mem, chosen, cfg, keep_adapters, step, namespace, retrain, forget)
    report = {**report, "consolidated": [scope.shown_id(i) for i in report["consolidated"]]}
    warn(mem)
    emit(as_json, report, lambda: say(_consolidated_line(report, retrain)))


def _consolidated_line(report: dict, retrain: bool) -> str:
    """What a consolidation did, on one line: how many it took in, or that it retrained (or removed) the cortex."""
    if report.get("removed"):
        return f"removed the {report['namespace']} cortex: it held no memory; freed {report['bytes_freed']} bytes"
    did = "retrained the cortex" if retrain else f"consolidated {len(report['consolidated'])}"
    return (
        f"{did} (the cortex holds {report['held']}) in {report['seconds']} s; "
        f"freed {report['bytes_freed']} bytes, cortex {report['cortex_bytes']} bytes"
    )


def _cortex_config(epochs: int | None, rank: int | None, drift: float | None) -> ConsolidationConfig:
    """The default consolidation settings with the ones given (each checked by ConsolidationConfig)."""
    from ..ops.consolidate import ConsolidationConfig

    base = ConsolidationConfig()
    return replace(
        base,
        epochs=base.epochs if epochs is None else epochs,
        rank=base.rank if rank is None else rank,
        drift=base.drift if drift is None else drift,
    )


def _to_consolidate(
    scope: Scope, ids: list[str] | None, older_than: str | None, cutoff: datetime | None, retrain: bool
) -> list[str]:
    """The store's ids of the namespace's memories to consolidate: those of --ids (each the namespace's), or
    its memories older than the cutoff; none for --retrain, which needs the namespace to have a cortex."""
    if retrain:
        if read_record(scope.mem.path, scope.namespace) is None:
            raise MegamemError(f"namespace {scope.namespace!r} has no cortex to retrain (nothing was consolidated)")
        return []
    if ids and interrupted(scope.mem.path, "consolidate", [scope.stored_id(i) for i in ids]):
        return [scope.stored_id(i) for i in ids]  # consolidate settles the interrupted one and says what it did
    if ids:
        return [scope.get(i).id for i in ids]
    chosen = [
        r.id
        for r in scope.records()
        if datetime.fromisoformat(r.created) < cutoff and not is_consolidated(r)  # not twice
    ]
    if not chosen:
        raise MegamemError(f"no memory is older than {older_than} in namespace {scope.namespace!r}")
    return chosen


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
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Learn memories about one subject into one adapter (their texts joined), then forget them (docs/scale.md)."""
    from ..ops.merge import check_ids

    if suggest == bool(ids):
        raise MegamemError("give two or more memory ids, or --suggest")
    if not suggest:
        check_ids(list(ids))
    scope = Scope.of(open_for(store, MERGE, "merge"), namespace)
    data = _suggestions(scope, cosine, names) if suggest else _merged(scope, list(ids), new_id, as_json)
    warn(scope.mem)
    emit(as_json, data, lambda: _print_merge(data, suggest))


def _suggestions(scope: Scope, cosine: float, names: float) -> dict:
    """The namespace's groups that look like one subject, and its merged memories whose members no longer do
    (megamem.ops.merge), under the ids the namespace names them by."""
    from ..ops.merge import diverged, subjects

    ns, shown = scope.namespace, scope.shown_id
    return {
        "subjects": [[shown(i) for i in g] for g in subjects(scope.mem, cosine, names, namespace=ns)],
        "diverged": [
            {"id": shown(i), "groups": [[shown(m) for m in g] for g in groups]}
            for i, groups in diverged(scope.mem, cosine, names, namespace=ns)
        ],
    }


def _merged(scope: Scope, ids: list[str], new_id: str | None, as_json: bool) -> dict:
    """Merge the namespace's memories `ids` into one of its memories (a progress bar while it learns): its id and
    its members' ids. Every id is checked to be the namespace's before anything loads."""
    from ..ops.merge import merge as run

    if interrupted(scope.mem.path, "merge", [scope.stored_id(i) for i in ids]):
        stored = [scope.stored_id(i) for i in ids]  # the merge settles the interrupted one and says what it did
    else:
        stored = [scope.get(i).id for i in ids]
    if new_id is not None:
        target = scope.stored_id(new_id)
    else:  # the store's own fresh id would lack a namespace's prefix
        target = None if scope.namespace == DEFAULT_NAMESPACE else scope.stored_id(uuid.uuid4().hex[:12])
    with progress(as_json) as bar:
        task = bar.add_task(f"merging {len(ids)}", total=None, loss=0.0)
        rec = run(scope.mem, stored, target, on_step=on_step_of(bar, task))
    return {"id": scope.shown_id(rec.id), "members": [scope.shown_id(m["id"]) for m in rec.metadata[MERGED]]}


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
    memory_id: Annotated[str, typer.Argument(help="A merged memory.")],
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Store a merged memory's members again, each in its own adapter, then forget the merged one."""
    from ..ops.merge import split as run

    scope = Scope.of(open_for(store, MERGE, "split"), namespace)
    mem = scope.mem
    if interrupted(mem.path, "split", [scope.stored_id(memory_id)]):
        target = scope.stored_id(memory_id)  # the split settles the interrupted one and says what it did
    else:
        target = scope.get(memory_id).id  # a memory that is not the namespace's: an error before the progress bar
    with progress(as_json) as bar:
        task = bar.add_task(f"splitting {memory_id}", total=None, loss=0.0)
        recs = run(mem, target, on_step=on_step_of(bar, task))
    warn(mem)
    data = {"split": memory_id, "ids": [scope.shown_id(r.id) for r in recs]}
    emit(as_json, data, lambda: say(f"split {memory_id} into {', '.join(data['ids'])}"))
