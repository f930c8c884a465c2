"""A store's health: `verify` lists every problem, `repair` mends what it can and quarantines the rest.

Neither deletes anything megamem did not write: a damaged memory's folder and its record go to
quarantine/<stamp>/<id>/, a damaged manifest to quarantine/<stamp>/, and entries megamem does not
recognise are only reported. Each step of `repair` is a rename or one SQLite transaction, so a repair
killed at any point leaves a store that a second `repair` finishes.

    >>> [p.kind for p in verify("my-store")]       # doctest: +SKIP
    ['corrupt', 'unknown']
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..adapters import file_sha256
from ..errors import MegamemError
from . import cortex, intents
from .files import fsync_path, write_json_atomic, writer_gone, writer_token
from .manifest import (
    MANIFEST,
    MEMORY_FILE,
    ROOT_ENTRIES,
    ROOT_FOLDERS,
    SETTINGS_FILE,
    TMP_NAME,
    Record,
    Store,
    StoreDamaged,
    check_files,
    init_manifest,
    read_memory_file,
    record_from_memory_file,
)

# each makes verify fail; interrupted: a merge, split or consolidation whose process is gone (repair settles it)
PROBLEMS = ("manifest", "settings", "missing", "corrupt", "orphan", "unknown", "interrupted")
NOTES = ("leftover", "in-progress")  # harmless: the next writer clears a leftover


@dataclass(frozen=True)
class Problem:
    """One finding of `verify`: its kind, the path inside the store it concerns, and what is wrong."""

    kind: str
    path: str
    message: str

    @property
    def serious(self) -> bool:
        return self.kind in PROBLEMS

    def to_dict(self) -> dict:
        return asdict(self)


def _is_store(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST).exists() or (path / SETTINGS_FILE).is_file())


def read_settings_file(path: Path) -> dict | None:
    """The settings kept in settings.json, or None if it is missing or not megamem's."""
    try:
        doc = json.loads((path / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != "megamem-store" or not isinstance(doc.get("settings"), dict):
        return None
    return doc["settings"]


def verify(path: Path | str) -> list[Problem]:
    """Every problem of the store at `path` (reads every file and checks every checksum; changes nothing)."""
    path = Path(path)
    if not _is_store(path):
        raise MegamemError(f"no megamem store at {path}")
    found: list[Problem] = []
    settings = read_settings_file(path)
    try:
        store: Store | None = Store(path, check_layout=False)
    except StoreDamaged as exc:
        found.append(Problem("manifest", MANIFEST, str(exc)))
        store = None
    if settings is None:
        found.append(Problem("settings", SETTINGS_FILE, "missing or unreadable; `repair` writes it from the manifest"))
    elif store is not None and settings != store.settings():
        found.append(Problem("settings", SETTINGS_FILE, "differs from the manifest's settings; `repair` rewrites it"))
    for entry in sorted(path.iterdir()):
        if entry.name in ROOT_ENTRIES:
            continue
        m = TMP_NAME.fullmatch(entry.name)
        if m and entry.name.startswith(f".{SETTINGS_FILE}."):
            kind = "leftover" if writer_gone(m["writer"]) else "in-progress"
            found.append(Problem(kind, entry.name, "settings.json being replaced; the next write removes it"))
            continue
        if entry.name in ROOT_FOLDERS:
            if entry.is_symlink() or not entry.is_dir():
                found.append(Problem("corrupt", entry.name, "is not a folder"))
            continue
        found.append(Problem("unknown", entry.name, "not megamem's: left alone"))
    rows = {r.id: r for r in store.records()} if store is not None else {}
    pending = store.pending() if store is not None else {}
    for rec in rows.values():
        why = check_files(store.folder(rec.id), rec.files)
        if why is not None:
            kind = "missing" if "missing" in why else "corrupt"
            found.append(Problem(kind, f"memories/{rec.id}", f"{why}; `repair` quarantines its record"))
        elif _row_differs(store, rec):
            found.append(
                Problem(
                    "corrupt", f"memories/{rec.id}", "its manifest row differs from memory.json; `repair` restores it"
                )
            )
    memories = path / "memories"
    for entry in sorted(memories.iterdir()) if memories.is_dir() and not memories.is_symlink() else []:
        if entry.name in rows:
            continue
        if entry.name in pending:
            op, writer = pending[entry.name]
            if not writer_gone(writer):
                found.append(Problem("in-progress", f"memories/{entry.name}", f"a running process's {op}"))
            else:
                found.append(
                    Problem("leftover", f"memories/{entry.name}", f"an unfinished {op}; the next write rolls it back")
                )
            continue
        data = read_memory_file(entry) if entry.is_dir() and not entry.is_symlink() else None
        if data is None or data.get("id") != entry.name:
            found.append(Problem("unknown", f"memories/{entry.name}", "not megamem's: left alone"))
            continue
        why = _memory_file_problem(entry, data)
        what = "a whole memory with no manifest row" if why is None else f"a memory with no manifest row, {why}"
        found.append(Problem("orphan", f"memories/{entry.name}", f"{what}; `repair` {_fate(why)}"))
    tmp = path / "tmp"
    for entry in sorted(tmp.iterdir()) if tmp.is_dir() and not tmp.is_symlink() else []:
        m = TMP_NAME.fullmatch(entry.name)
        if m is None:
            found.append(Problem("unknown", f"tmp/{entry.name}", "not megamem's: left alone"))
        elif writer_gone(m["writer"]):
            found.append(
                Problem("leftover", f"tmp/{entry.name}", "left by a process that is gone; the next write removes it")
            )
        else:
            found.append(Problem("in-progress", f"tmp/{entry.name}", "being written by a running process"))
    for memory_id, (op, writer) in pending.items():
        if writer_gone(writer) and not (memories / memory_id).exists():
            found.append(
                Problem("leftover", MANIFEST, f"an unfinished {op} of {memory_id!r}; the next write rolls it back")
            )
    return found + _operations(path)


def _operations(path: Path) -> list[Problem]:
    """The intents of merges, splits and consolidations (megamem.store.intents), and every cortex's files."""
    found = []
    root = path / intents.INTENTS
    for entry in sorted(root.iterdir()) if root.is_dir() and not root.is_symlink() else []:
        rel = f"{intents.INTENTS}/{entry.name}"
        if TMP_NAME.fullmatch(entry.name):
            continue  # an intent being written (write_atomic's temporary): harmless, removed with its writer
        try:
            intent = intents.read(entry)
        except MegamemError as exc:
            found.append(Problem("corrupt", rel, f"{exc}; `repair` moves it to quarantine"))
            continue
        if intent.alive:
            found.append(Problem("in-progress", rel, f"{intent.describe()}, running"))
        else:
            found.append(
                Problem("interrupted", rel, f"{intent.describe()} was interrupted; `repair` finishes or rolls it back")
            )
    claimed = frozenset(intents.claimed(path, "versions"))
    found += [Problem(kind, where, message) for kind, where, message in cortex.check(path, claimed)]
    return found


def _row_differs(store: Store, rec: Record) -> bool:
    """Whether a row whose files all verify says something else than its memory.json (a damaged manifest row)."""
    if MEMORY_FILE not in rec.files:
        return False  # a store made before memory.json existed: nothing to compare with
    data = read_memory_file(store.folder(rec.id))
    try:
        kept = record_from_memory_file(data, rec.files[MEMORY_FILE]) if data else None
    except (KeyError, TypeError, ValueError):
        return True
    return kept is None or kept.to_dict() != rec.to_dict()


def _memory_file_problem(folder: Path, data: dict) -> str | None:
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        return "memory.json lists no files"
    return check_files(folder, files)


def _fate(why: str | None) -> str:
    return "re-lists it" if why is None else "quarantines it"


def repair(path: Path | str, displaced: dict | None = None) -> list[str]:
    """Mend the store at `path`; return what was done, one line an action. displaced: filled with the memories
    of each damaged cortex set aside, by namespace (the caller may learn them again: their adapters are gone).

    A damaged or missing manifest is rebuilt from settings.json and the memory folders; a memory whose files
    fail their checksums, or whose folder is gone, leaves the manifest and goes to quarantine/ with its record;
    whole memories with no row are listed again; what megamem does not recognise is left where it is.
    """
    path = Path(path)
    if not _is_store(path):
        raise MegamemError(f"no megamem store at {path}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    quarantine = path / "quarantine" / stamp
    done: list[str] = []
    had_settings = read_settings_file(path)  # before the layout is mended: a settings.json folder goes aside
    _mend_layout(path, quarantine, stamp, done)
    try:
        store = Store(path, check_layout=False)
    except StoreDamaged as exc:
        store = _rebuild_manifest(path, quarantine, str(exc), done)
    store.writable()  # sweeps the dead writers' leftovers
    lines, held = set_aside_cortexes(path, stamp)
    done += lines
    if displaced is not None:
        displaced.update(held)
    _mend_operations(store, quarantine, stamp, done)
    done += [f"left alone: {e} is not megamem's" for e in store.foreign_entries() if e.startswith("tmp/")]
    if had_settings != store.settings():
        write_json_atomic(path / SETTINGS_FILE, {"format": "megamem-store", "settings": store.settings()})
        done.append("wrote settings.json from the manifest" + (" (it was damaged or differed)" if had_settings else ""))
    settings = store.settings()
    for rec in store.records():
        folder = store.folder(rec.id)
        why = check_files(folder, rec.files)
        if why is None:
            if MEMORY_FILE not in rec.files:
                _upgrade(store, rec)
                done.append(f"memory {rec.id}: wrote memory.json (a store made before megamem 0.2)")
                continue
            if _row_differs(store, rec):
                data = read_memory_file(folder)
                try:
                    store.relist(record_from_memory_file(data, rec.files[MEMORY_FILE]), replace=True)
                    done.append(f"memory {rec.id}: its damaged manifest row was restored from memory.json")
                    continue
                except (KeyError, TypeError, ValueError):
                    why = "its manifest row and its memory.json disagree and memory.json is incomplete"
            else:
                continue
        target = quarantine / rec.id
        target.mkdir(parents=True, exist_ok=True)
        if folder.exists() or folder.is_symlink():
            os.rename(folder, target / "files")
            fsync_path(folder.parent)
        write_json_atomic(target / "record.json", rec.to_dict())
        store.drop_row(rec.id)
        done.append(f"memory {rec.id}: {why}; its record and files are in quarantine/{stamp}/{rec.id}/")
    _mend_folders(store, quarantine, stamp, settings, done)
    return done


def _mend_folders(store: Store, quarantine: Path, stamp: str, settings: dict, done: list[str]) -> None:
    """List again the whole memory folders that have no row; quarantine the others megamem wrote."""
    path = store.path
    rows = {r.id for r in store.records()}
    pending = {i: w for i, (_, w) in store.pending().items()}
    memories = path / "memories"
    for entry in sorted(memories.iterdir()):
        if entry.name in rows or (entry.name in pending and not writer_gone(pending[entry.name])):
            continue
        data = read_memory_file(entry) if entry.is_dir() and not entry.is_symlink() else None
        if data is None or data.get("id") != entry.name:
            done.append(f"left alone: memories/{entry.name} is not megamem's")
            continue
        why = _memory_file_problem(entry, data)
        if why is None:
            for key in ("key_function", "base_model"):
                if data.get(key) != settings.get(key):
                    why = f"it was made with {key} {data.get(key)!r}, the store uses {settings.get(key)!r}"
        if why is None:
            try:
                rec = record_from_memory_file(data, file_sha256(entry / MEMORY_FILE))
            except (KeyError, TypeError, ValueError) as exc:
                why = f"memory.json is incomplete ({exc})"
        if why is None:
            store.relist(rec)
            done.append(f"memory {entry.name}: listed again from its folder")
            continue
        quarantine.mkdir(parents=True, exist_ok=True)
        os.rename(entry, quarantine / entry.name)
        fsync_path(memories)
        done.append(f"memory {entry.name}: {why}; moved to quarantine/{stamp}/{entry.name}/")


def _mend_operations(store: Store, quarantine: Path, stamp: str, done: list[str]) -> None:
    """Settle interrupted merges, splits and consolidations; set damaged intents and cortexes aside (the memories
    a damaged cortex held are in its record, in quarantine: `set_aside_cortexes` returns them to bring back);
    remove the cortex versions no pointer names."""
    root = store.path / intents.INTENTS
    for entry in sorted(root.iterdir()) if root.is_dir() and not root.is_symlink() else []:
        try:
            intents.read(entry)
        except MegamemError as exc:
            if TMP_NAME.fullmatch(entry.name):
                continue
            quarantine.mkdir(parents=True, exist_ok=True)
            os.rename(entry, quarantine / entry.name)
            done.append(f"{exc}: moved to quarantine/{stamp}/{entry.name}")
    done += intents.settle(store)
    claimed = frozenset(intents.claimed(store.path, "versions"))
    for ns in cortex.namespaces(store.path, every=True):
        if cortex.live_version(store.path, ns) is None and cortex.pointer(store.path, ns).exists():
            continue  # a damaged pointer: set_aside_cortexes' to handle
        for name in cortex.remove_versions(store.path, ns, claimed):
            done.append(f"removed cortex version {name} of the {ns} namespace: no pointer names it")


def set_aside_cortexes(path: Path, stamp: str) -> tuple[list[str], dict[str, list[cortex.Consolidated]]]:
    """Mend every damaged cortex (a record or file that fails its checksum): its record restored from its copy, or
    the cortex moved to quarantine/<stamp>/; return what was done and, by namespace, the memories to bring back
    into the gate by learning them again (megamem.ops.consolidate.bring_back)."""
    done, held = [], {}
    for ns in cortex.damaged(path):
        line, held[ns] = cortex.mend(path, ns, path / "quarantine" / stamp)
        done.append(line)
    return done, held


def _mend_layout(path: Path, quarantine: Path, stamp: str, done: list[str]) -> None:
    """Put aside (to quarantine) whatever stands where the store's folders and settings.json belong, and make
    the folders again: a file named memories/, a folder named settings.json."""
    for name, folder in (("memories", True), ("tmp", True), (SETTINGS_FILE, False)):
        entry = path / name
        wrong = entry.is_symlink() or (entry.exists() and entry.is_dir() != folder)
        if wrong:
            quarantine.mkdir(parents=True, exist_ok=True)
            os.rename(entry, quarantine / name)
            fsync_path(path)
            done.append(f"{name} was not a {'folder' if folder else 'file'}: moved to quarantine/{stamp}/{name}")
        if folder and not entry.exists():
            entry.mkdir()
            if wrong:
                done.append(f"made a new, empty {name}/")


def _upgrade(store: Store, rec: Record) -> None:
    """Give a memory from an older store its memory.json and the checksums of all its files."""
    folder = store.folder(rec.id)
    files = {
        name: file_sha256(folder / name)
        for name in ("adapter_config.json", "adapter_model.safetensors", "keys.safetensors")
    }
    body = {"format": "megamem-memory", "version": 1, "nonce": uuid.uuid4().hex[:16], **rec.to_dict(), "files": files}
    write_json_atomic(folder / MEMORY_FILE, body)
    store.set_files(rec.id, {**files, MEMORY_FILE: file_sha256(folder / MEMORY_FILE)})


def _rebuild_manifest(path: Path, quarantine: Path, why: str, done: list[str]) -> Store:
    """Put a new, empty manifest in place of a damaged or missing one (the damaged one to quarantine)."""
    settings = read_settings_file(path)
    if settings is None:
        raise MegamemError(f"{why}; and settings.json is missing too, so there is nothing to rebuild the store from")
    new = path / "tmp" / f"manifest.{writer_token()}.{uuid.uuid4().hex[:16]}"
    init_manifest(new, settings)
    moved = []
    for name in (MANIFEST, f"{MANIFEST}-wal", f"{MANIFEST}-shm", f"{MANIFEST}-journal"):
        old = path / name
        if old.exists() or old.is_symlink():
            quarantine.mkdir(parents=True, exist_ok=True)
            os.rename(old, quarantine / name)
            moved.append(name)
    os.rename(new, path / MANIFEST)
    fsync_path(path)
    where = f"; the damaged one is in quarantine/{quarantine.name}/" if moved else ""
    done.append(f"rebuilt the manifest from settings.json and the memory folders{where}")
    return Store(path)
