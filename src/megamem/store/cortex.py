"""A namespace's cortex on disk: the adapter its consolidated memories were rehearsed into, and their record.

    STORE/cortex/current.json            the default namespace's live version and its memories
    STORE/cortex/<version>/              its adapter (PEFT files, bfloat16)
    STORE/cortex/<namespace>/...         another namespace's, laid out the same way

A version's name always holds a '-' and a namespace's never does, so the two cannot collide. A new version is
written beside the old one, then current.json is switched to it (the commit: a crash before leaves the old
cortex live), then every other version is removed (the old one, and any a killed consolidation left). The
record holds the sha256 of each of the version's files and its own (`record_sha256`, over the record without
it), so a flipped byte anywhere is found by `read_cortex` and by `check` (megamem verify). megamem.ops.consolidate
trains what is written here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..adapters import Adapter, file_sha256, load_adapter, save_adapter
from ..checks import check_id
from ..errors import MegamemError
from ..schema import DEFAULT_NAMESPACE, check_namespace
from .files import crash_point, fsync_path, write_json_atomic

CORTEX = "cortex"  # the store's folder for every namespace's cortex
POINTER = "current.json"  # names the live version's folder
FORMAT = "megamem-cortex"
FILES = ("adapter_config.json", "adapter_model.safetensors")
COPY = "record.json"  # a version's copy of its record (current.json's checksummed twin)


@dataclass(frozen=True)
class Consolidated:
    """A memory the cortex holds: its id, stored text, the text its adapter recalled, metadata, when it was added."""

    id: str
    text: str
    recalled: str
    metadata: dict
    created: str


def folder(store_path: Path, namespace: str = DEFAULT_NAMESPACE) -> Path:
    """The folder of a namespace's cortex."""
    root = Path(store_path) / CORTEX
    return root if namespace == DEFAULT_NAMESPACE else root / check_namespace(namespace)


def pointer(store_path: Path, namespace: str = DEFAULT_NAMESPACE) -> Path:
    """The file that names a namespace's live cortex version (absent: it has none)."""
    return folder(store_path, namespace) / POINTER


def namespaces(store_path: Path, every: bool = False) -> list[str]:
    """The namespaces that have a cortex in the store (the default one first); every: also the folders of
    namespaces that hold versions but no pointer (what a killed first consolidation leaves)."""
    root = Path(store_path) / CORTEX
    has = (lambda p: p.is_dir()) if every else (lambda p: (p / POINTER).is_file())
    found = [DEFAULT_NAMESPACE] if (root / POINTER).is_file() or (every and root.is_dir()) else []
    if root.is_dir():
        found += sorted(p.name for p in root.iterdir() if "-" not in p.name and p.name != POINTER and has(p))
    return found


def _digest(record: dict) -> str:
    """The sha256 of a record without its own checksum (canonical JSON)."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_record(store_path: Path, namespace: str = DEFAULT_NAMESPACE) -> dict | None:
    """A namespace's cortex record, checked against its own checksum (records written before megamem 0.3 have
    none); None when it has no cortex; MegamemError naming the file when it is damaged."""
    where = pointer(store_path, namespace)
    if not where.is_file():
        return None
    try:
        record = json.loads(where.read_text(encoding="utf-8"))
        check_id(record["version"], "cortex version")
        if "record_sha256" in record and record["record_sha256"] != _digest(record):
            raise ValueError("the record does not match its checksum")
        [Consolidated(**m) for m in record["memories"]]  # noqa: B018 (every entry complete)
    except (OSError, ValueError, KeyError, TypeError, MegamemError) as exc:
        raise MegamemError(f"the store's cortex ({where}) is damaged: {exc}; `megamem repair` sets it aside") from None
    return record


def live_version(store_path: Path, namespace: str = DEFAULT_NAMESPACE) -> str | None:
    """The version a namespace's pointer names (None: no cortex, or a pointer that cannot be read)."""
    try:
        record = read_record(store_path, namespace)
    except MegamemError:
        return None
    return record["version"] if record else None


def held_ids(store_path: Path) -> dict[str, str]:
    """Every id the store's cortexes hold, with its namespace (a record that cannot be read holds none)."""
    out = {}
    for ns in namespaces(store_path):
        try:
            record = read_record(store_path, ns) or {}
        except MegamemError:
            continue
        out.update({m["id"]: ns for m in record.get("memories", [])})
    return out


def read_cortex(
    store_path: Path, namespace: str = DEFAULT_NAMESPACE
) -> tuple[Adapter, list[Consolidated], dict] | None:
    """A namespace's cortex (its files checked against the recorded checksums), its memories and record; None
    when it has none."""
    record = read_record(store_path, namespace)
    if record is None:
        return None
    where = pointer(store_path, namespace)
    version = where.parent / record["version"]
    try:
        problem = _files_problem(version, record)
        if problem:
            raise MegamemError(problem)
        adapter = load_adapter(version, checksum=record["adapter_sha256"])
    except (OSError, ValueError, KeyError, TypeError, MegamemError) as exc:
        raise MegamemError(f"the store's cortex ({where}) is damaged: {exc}; `megamem repair` sets it aside") from None
    return adapter, [Consolidated(**m) for m in record["memories"]], record


def _files_problem(version: Path, record: dict) -> str | None:
    """What is wrong with a version's files against the record's checksums (None: nothing)."""
    files = record.get("files") or {"adapter_model.safetensors": record["adapter_sha256"]}
    for name, sha in files.items():
        if not (version / name).is_file():
            return f"{version.name}/{name} is missing"
        if file_sha256(version / name) != sha:
            return f"{version.name}/{name} does not match its checksum"
    return None


def new_version() -> str:
    """A fresh version name (it holds a '-', which a namespace never does)."""
    return f"v{datetime.now(timezone.utc):%Y%m%d%H%M%S}-{uuid.uuid4().hex[:8]}"


def write_cortex(
    store_path: Path,
    adapter: Adapter,
    memories: list[Consolidated],
    config: dict,
    base_model: str,
    namespace: str = DEFAULT_NAMESPACE,
    version: str | None = None,
    keep: frozenset[str] = frozenset(),
) -> dict:
    """Write a new version of a namespace's cortex beside the old one, then switch its current.json to it (the
    commit), then remove every other version but `keep` (the old one, and orphans of killed consolidations).
    config: how it was trained (kept in the record); version: its name, if the caller chose it already."""
    root = folder(store_path, namespace)
    root.mkdir(parents=True, exist_ok=True)
    version = version or new_version()
    save_adapter(adapter, root / version, base_model, torch.bfloat16)
    for name in FILES:
        fsync_path(root / version / name)
    fsync_path(root / version)
    fsync_path(root)
    crash_point("consolidate:written")
    record = {
        "format": FORMAT,
        "version": version,
        "namespace": namespace,
        "adapter_sha256": file_sha256(root / version / "adapter_model.safetensors"),
        "files": {name: file_sha256(root / version / name) for name in FILES},
        "config": config,
        "memories": [asdict(m) for m in memories],
        "withdrawn": [],
    }
    switch(store_path, record, namespace)
    crash_point("consolidate:switched")
    remove_versions(store_path, namespace, keep)
    return record


def switch(store_path: Path, record: dict, namespace: str = DEFAULT_NAMESPACE) -> None:
    """Make `record` the namespace's live one: with its checksum, a copy into its version's folder (what repair
    restores a damaged current.json from), then one atomic write of current.json (the commit)."""
    body = {**record, "record_sha256": _digest(record)}
    write_json_atomic(folder(store_path, namespace) / record["version"] / COPY, body)
    write_json_atomic(pointer(store_path, namespace), body)


def _verified(path: Path) -> dict | None:
    """A record file that is whole: megamem's format, its checksum right, every memory complete; else None."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        ok = record.get("format") == FORMAT and record.get("record_sha256") == _digest(record)
        [Consolidated(**m) for m in record["memories"]]  # noqa: B018 (every entry complete)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return record if ok else None


def recover(store_path: Path, namespace: str = DEFAULT_NAMESPACE) -> dict | None:
    """The namespace's newest whole record: current.json if it verifies, else the copy in the version it names,
    else the newest version's copy that verifies (None: no whole record anywhere)."""
    root = folder(store_path, namespace)
    found = _verified(root / POINTER)
    if found is not None:
        return found
    try:
        named = json.loads((root / POINTER).read_text(encoding="utf-8"))["version"]
        found = _verified(root / check_id(named) / COPY)
    except (OSError, ValueError, KeyError, TypeError, MegamemError):
        found = None
    if found is not None:
        return found
    for p in sorted((p for p in root.iterdir() if "-" in p.name), reverse=True) if root.is_dir() else []:
        if (found := _verified(p / COPY)) is not None:
            return found
    return None


def mend(store_path: Path, namespace: str, quarantine: Path) -> tuple[str, list[Consolidated]]:
    """Mend a damaged cortex: restore current.json from a whole copy of its record when the version's files
    verify; otherwise move the cortex (pointer and versions) into `quarantine` and return the memories a whole
    record names, to learn again. Returns one line saying what was done, and those memories."""
    record = recover(store_path, namespace)
    root = folder(store_path, namespace)
    if record is not None and _files_problem(root / record["version"], record) is None:
        switch(store_path, {k: v for k, v in record.items() if k != "record_sha256"}, namespace)  # both copies whole
        return f"the {namespace} cortex's record was damaged: restored from a whole copy ({record['version']})", []
    held = [Consolidated(**m) for m in record["memories"]] if record is not None else []
    target = quarantine / (CORTEX if namespace == DEFAULT_NAMESPACE else f"{CORTEX}-{namespace}")
    target.mkdir(parents=True, exist_ok=True)
    for p in sorted(root.iterdir()):
        if p.name == POINTER or "-" in p.name:
            os.rename(p, target / p.name)
    fsync_path(root)
    named = (
        f"its {len(held)} memories are learned again from its record"
        if record
        else "no whole record names its memories"
    )
    return f"the {namespace} cortex is damaged: moved to {target.relative_to(store_path)}/; {named}", held


def remove_versions(
    store_path: Path, namespace: str = DEFAULT_NAMESPACE, keep: frozenset[str] = frozenset()
) -> list[str]:
    """Remove every version folder of a namespace but the live one and `keep`; the names removed."""
    root = folder(store_path, namespace)
    live = live_version(store_path, namespace)
    gone = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if "-" in p.name and p.is_dir() and not p.is_symlink() and p.name != live and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def withdraw(store_path: Path, memory_id: str, namespace: str = DEFAULT_NAMESPACE) -> Consolidated:
    """Take one memory out of a namespace's cortex record (its text leaves the store; the weights keep what they
    learned until the cortex is retrained); noted under 'withdrawn'. MegamemError if it holds no such memory."""
    record = read_record(store_path, namespace)
    held = [Consolidated(**m) for m in (record or {}).get("memories", [])]
    found = [m for m in held if m.id == memory_id]
    if not found:
        raise MegamemError(f"no consolidated memory {memory_id!r} in the {namespace} cortex")
    gone = {"id": memory_id, "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    record = {k: v for k, v in record.items() if k != "record_sha256"}
    record["memories"] = [asdict(m) for m in held if m.id != memory_id]
    record["withdrawn"] = [*record.get("withdrawn", []), gone]
    switch(store_path, record, namespace)
    return found[0]


def remove(store_path: Path, namespace: str = DEFAULT_NAMESPACE) -> None:
    """Remove a namespace's cortex: its pointer (the commit: from then on it has none), then its versions."""
    where = pointer(store_path, namespace)
    where.unlink(missing_ok=True)
    fsync_path(where.parent)
    remove_versions(store_path, namespace)


def check(store_path: Path, claimed: frozenset[str] = frozenset()) -> list[tuple[str, str, str]]:
    """Every problem of the store's cortexes as (kind, path, message): a damaged record or file ('corrupt',
    'missing'), a version no pointer names ('leftover'; 'in-progress' if a running consolidation writes it:
    `claimed`). Reads every file; changes nothing."""
    return [p for ns in namespaces(store_path, every=True) for p in check_one(store_path, ns, claimed)]


def damaged(store_path: Path) -> list[str]:
    """The namespaces whose live cortex is damaged (its record or a file fails its checksum, or is missing)."""
    return [
        ns
        for ns in namespaces(store_path, every=True)
        if any(kind in ("corrupt", "missing") for kind, _, _ in check_one(store_path, ns))
    ]


def check_one(store_path: Path, namespace: str, claimed: frozenset[str] = frozenset()) -> list[tuple[str, str, str]]:
    """One namespace's cortex problems (see `check`)."""
    found = []
    root = folder(store_path, namespace)
    rel = root.relative_to(store_path).as_posix()
    live = None
    try:
        record = read_record(store_path, namespace)
    except MegamemError as exc:
        found.append(("corrupt", f"{rel}/{POINTER}", str(exc)))
        record = None
    if record is not None:
        live = record["version"]
        problem = _files_problem(root / live, record)
        if problem is None and "record_sha256" in record and _verified(root / live / COPY) is None:
            problem = f"{live}/{COPY}, the record's copy, is missing or damaged"
        if problem:
            kind = "missing" if "missing" in problem else "corrupt"
            found.append((kind, f"{rel}/{live}", f"{problem}; `megamem repair` sets the cortex aside"))
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if "-" in p.name and p.name != live:
            kind = "in-progress" if p.name in claimed else "leftover"
            why = "being written by a running consolidation" if p.name in claimed else "a version no pointer names"
            found.append((kind, f"{rel}/{p.name}", f"{why}; the next consolidation (or repair) removes it"))
    return found
