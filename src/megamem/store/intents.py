"""Intent records: what a merge, split or consolidation is about to do, written before it starts, so that one
interrupted at any step is finished or rolled back by the next writer, and never loses a member.

    STORE/intents/<op>-<nonce>.json     {"format": "megamem-intent", "op", "writer", "started", "plan": {...}}

An operation writes its intent (atomically, fsynced), does its steps (each one a commit of the store or of a
cortex), then removes the intent. While its writer runs, the intent is "in progress" and nobody touches it.
Once the writer is proven gone (megamem.store.files.writer_gone), the next process that writes to the store
(Memory.prepare_store, `megamem repair`) settles it from what the store shows, with no model:

- merge {ids, merged}: the merged memory committed -> finish (forget the members still stored; the merged
  record holds each of them); not committed -> roll back (the members were never touched).
- split {merged, members}: every member stored again -> finish (forget the merged memory); otherwise roll back
  (forget the members stored so far: the merged memory still holds them), and `split` can run again.
- consolidate {namespace, ids, version, keep_adapters, forget}: the cortex's pointer names the new version ->
  finish (retire the adapters of the consolidated memories, or with forget forget those still stored; remove
  older versions); otherwise roll back (remove the new version's folder: the old cortex never stopped being
  live, and every memory still has its adapter).

Each settling step is itself a commit of the store, so settling killed part-way is settled again next time.
`megamem.store.files.crash_point` is where the fault suite kills an operation between two steps (hooked, not
only random kills).

    >>> plan = {"ids": ["a", "b"], "merged": "ab"}
    >>> sorted(plan)
    ['ids', 'merged']
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MegamemError
from ..schema import CONSOLIDATED, MERGED
from .cortex import folder as cortex_folder
from .cortex import live_version, remove_versions
from .files import fsync_path, write_json_atomic, writer_gone, writer_token
from .manifest import ADAPTER_FILES

if TYPE_CHECKING:
    from .manifest import Store

INTENTS = "intents"  # the store's folder of intent records
FORMAT = "megamem-intent"
OPS = ("merge", "split", "consolidate")


@dataclass(frozen=True)
class Intent:
    """One operation's record: what it is, who runs it, and its plan (the ids it touches)."""

    path: Path
    op: str
    writer: str
    started: str
    plan: dict

    @property
    def alive(self) -> bool:
        """Whether its writer may still be running (then nobody settles it)."""
        return not writer_gone(self.writer)

    def describe(self) -> str:
        """One line naming the operation and the memories it touches."""
        p = self.plan
        if self.op == "merge":
            return f"a merge of {', '.join(p['ids'])} into {p['merged']}"
        if self.op == "split":
            return f"a split of {p['merged']} into {', '.join(p['members'])}"
        return f"a consolidation of {', '.join(p['ids']) or 'nothing new'} into the {p['namespace']} cortex"


def folder(store_path: Path) -> Path:
    return Path(store_path) / INTENTS


def begin(store_path: Path, op: str, plan: dict) -> Intent:
    """Write an operation's intent before its first step (the folder is made and fsynced if new)."""
    if op not in OPS:
        raise ValueError(op)
    root = folder(store_path)
    if not root.is_dir():
        root.mkdir()
        fsync_path(root.parent)
    intent = Intent(
        root / f"{op}-{uuid.uuid4().hex[:16]}.json",
        op,
        writer_token(),
        datetime.now(timezone.utc).isoformat(timespec="seconds"),
        plan,
    )
    body = {"format": FORMAT, "op": op, "writer": intent.writer, "started": intent.started, "plan": plan}
    write_json_atomic(intent.path, body)
    return intent


def end(intent: Intent) -> None:
    """The operation is whole: remove its record."""
    intent.path.unlink(missing_ok=True)
    fsync_path(intent.path.parent)


def read(path: Path) -> Intent:
    """One intent record; MegamemError naming the file if it is not one."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        if body.get("format") != FORMAT or body["op"] not in OPS or not isinstance(body["plan"], dict):
            raise ValueError("not an intent record")
        return Intent(path, body["op"], str(body["writer"]), str(body["started"]), body["plan"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MegamemError(f"{INTENTS}/{path.name} is damaged ({exc})") from None


def pending(store_path: Path) -> list[Intent]:
    """Every readable intent of the store, oldest first (damaged records are verify's to report)."""
    root = folder(store_path)
    if not root.is_dir() or root.is_symlink():
        return []
    out = []
    for p in sorted(root.glob("*.json")):
        try:
            out.append(read(p))
        except MegamemError:
            continue
    return sorted(out, key=lambda i: i.started)


def claimed(store_path: Path, what: str, namespace: str | None = None) -> set[str]:
    """What the live intents are working on: 'ids' (every memory id they touch) or 'versions' (cortex versions
    being written, of `namespace` if given)."""
    out: set[str] = set()
    for i in pending(store_path):
        if not i.alive:
            continue
        if what == "versions":
            if i.op == "consolidate" and (namespace is None or i.plan["namespace"] == namespace):
                out.add(i.plan["version"])
        else:
            out |= touched(i)
    return out


def interrupted(store_path: Path, op: str, ids: list[str]) -> Intent | None:
    """The interrupted (writer gone) `op` on exactly these ids (a merge's ids, a split's merged memory, a
    consolidation's ids), if there is one: running the same command again settles it first, so its ids need not
    all be stored any more, and the command reports what the settling did."""
    for i in pending(store_path):
        own = [i.plan["merged"]] if i.op == "split" else i.plan["ids"]
        if i.op == op and not i.alive and set(own) == set(ids):
            return i
    return None


def touched(intent: Intent) -> set[str]:
    """The memory ids an operation touches."""
    p = intent.plan
    if intent.op == "merge":
        return {*p["ids"], p["merged"]}
    if intent.op == "split":
        return {p["merged"], *p["members"]}
    return set(p["ids"])


# -- settling what a dead writer left -------------------------------------------------------------------------
def settle(store: Store) -> list[str]:
    """Finish or roll back every operation whose writer is gone; one line per operation settled."""
    done = []
    for intent in pending(store.path):
        if intent.alive:
            continue
        done.append(_SETTLE[intent.op](store, intent))
        end(intent)
    return done


def _forget_if_stored(store: Store, memory_id: str) -> bool:
    if store.get(memory_id, missing_ok=True) is None:
        return False
    store.forget(memory_id)
    return True


def _retire_if_stored(store: Store, memory_id: str) -> bool:
    """Finish retiring a consolidated memory's adapter (Store.retire_adapter is idempotent)."""
    rec = store.get(memory_id, missing_ok=True)
    if rec is None or (not rec.adapter_sha256 and CONSOLIDATED in rec.metadata and not _adapter_left(store, rec)):
        return False
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    store.retire_adapter(memory_id, {CONSOLIDATED: rec.metadata.get(CONSOLIDATED, stamp)})
    return True


def _adapter_left(store: Store, rec) -> bool:
    return any((store.folder(rec.id) / name).exists() for name in ADAPTER_FILES)


def _settle_merge(store: Store, intent: Intent) -> str:
    p = intent.plan
    merged = store.get(p["merged"], missing_ok=True)
    if merged is not None and {m["id"] for m in merged.metadata.get(MERGED, [])} >= set(p["members"]):
        gone = [i for i in p["ids"] if _forget_if_stored(store, i)]
        return f"finished {intent.describe()} (forgot {', '.join(gone) or 'nothing left'})"
    return f"rolled back {intent.describe()}: it never committed; its members are stored as they were"


def _settle_split(store: Store, intent: Intent) -> str:
    p = intent.plan
    merged = store.get(p["merged"], missing_ok=True)
    parts = {m["id"]: m for m in merged.metadata.get(MERGED, [])} if merged is not None else {}
    stored = [i for i in p["members"] if store.get(i, missing_ok=True) is not None]
    if merged is None or len(stored) == len(p["members"]):
        if merged is not None:
            store.forget(p["merged"])
        return f"finished {intent.describe()}"
    back = []
    for i in stored:  # only a member stored as the merged memory holds it (so nothing of the user's goes)
        if i in parts and store.get(i).text == parts[i]["text"]:
            store.forget(i)
            back.append(i)
    return (
        f"rolled back {intent.describe()} (forgot the members stored so far: {', '.join(back) or 'none'}); "
        f"{p['merged']} still holds every member: `megamem split {p['merged']}` splits it again"
    )


def _settle_consolidate(store: Store, intent: Intent) -> str:
    p = intent.plan
    if live_version(store.path, p["namespace"]) == p["version"]:
        if p.get("keep_adapters"):
            done, what = [], "kept"
        elif p.get("forget", True):  # intents written before retiring existed forgot
            done, what = [i for i in p["ids"] if _forget_if_stored(store, i)], "forgot"
        else:
            done, what = [i for i in p["ids"] if _retire_if_stored(store, i)], "retired the adapters of"
        remove_versions(store.path, p["namespace"])
        return f"finished {intent.describe()} ({what} {', '.join(done) or 'nothing left'})"
    shutil.rmtree(cortex_folder(store.path, p["namespace"]) / p["version"], ignore_errors=True)
    return f"rolled back {intent.describe()}: the cortex was never switched; its memories are stored as they were"


_SETTLE = {"merge": _settle_merge, "split": _settle_split, "consolidate": _settle_consolidate}
