"""A MemoryLLM store's health: `verify` lists every problem, `repair` mends what it can (megamem verify / repair).

`verify` checks every file against its checksum (megamem.memoryllm.files) and reports in the shape of
megamem.store.health's Problem: `settings` (memoryllm.json missing or damaged, a creation that did not finish),
`missing` / `corrupt` (the parameters, the pool, memories.json), `unknown` (anything megamem did not write), and
the harmless notes `leftover` (a dead writer's temporary file, which the next write removes; memories.json one
commit behind the pool) and `in-progress` (a running writer's).

`repair` never deletes what could hold a memory: a damaged file goes to quarantine/<stamp>/ before anything is
written in its place. In order, under the writers' lock:
  1. dead writers' temporary files are removed (nothing else is);
  2. memoryllm.json, if damaged or missing, is written again from its copy in memories.json (this also finishes
     a creation killed before its settings were written);
  3. params.safetensors, if damaged or missing, is restored from a file with the checksum the settings recorded:
     the parameters megamem ships for the base model, or the file the store was made from; if neither matches
     it cannot be mended, and the pool and its texts are left as they are;
  4. the list of memories is taken from the pool if it passes its checksum, else from memories.json (with any
     memories the damaged pool lists beyond it), else recovered from whichever copy still parses (said so);
  5. memories.json is written from that list, then the pool: kept if whole, written again with the list if only
     its list was damaged, otherwise re-written from the stored texts (every memory re-added in order into an
     empty pool with the stored parameters: a fresh pool).
Every step is a rename or an atomic write, so a repair killed at any point leaves a store a second one finishes.

    >>> [p.kind for p in verify("pool-store")]  # doctest: +SKIP
    ['corrupt']
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from ..adapters import file_sha256
from ..errors import MegamemError
from ..store import write_atomic
from ..store.files import fsync_path
from ..store.health import Problem
from .files import (
    LAYOUT,
    LOCK,
    MEMORIES,
    OWN,
    PARAMS,
    POOL,
    QUARANTINE,
    SETTINGS,
    FileDamaged,
    PoolCheck,
    PoolRecord,
    check_params,
    check_settings,
    inspect_pool,
    is_own_temp,
    locked,
    read_memories,
    read_settings,
    store_state,
    stored_records,
    sweep,
    temp_files,
    write_memories,
    write_pool,
    write_settings,
)
from .model import MemoryConfig, MemoryLLM
from .pool import Pool
from .store import shipped_params


# -- verify --------------------------------------------------------------------------------------------------------
def verify(path: Path | str) -> list[Problem]:
    """Every problem of the MemoryLLM store at `path` (reads every file, checks every checksum; changes nothing)."""
    path = Path(path)
    if store_state(path) is None:
        raise MegamemError(f"no MemoryLLM store at {path}")
    found = _entries(path)
    try:
        settings = read_settings(path)
    except FileDamaged as exc:
        copy = _settings_copy(path)
        found.append(Problem("settings", SETTINGS, _settings_message(path, exc, copy is not None)))
        if copy is None or not stored_records(path):  # an unfinished creation: the rest is not written yet
            return found
        settings = copy  # check the other files against the copy that repair would restore
    if settings.get("layout", 1) < LAYOUT:
        found.append(Problem("old", SETTINGS, "made before megamem checked MemoryLLM stores; `repair` adds checksums"))
    try:
        check_params(path, settings)
    except FileDamaged as exc:
        source = params_source(path, settings)
        mend = f"`repair` restores it from {source}" if source else _no_params(settings)
        found.append(Problem(exc.kind, PARAMS, f"{exc.why}; {mend}"))
    pool = inspect_pool(path, settings)
    if pool.problem is not None:
        found.append(Problem(pool.problem.kind, POOL, f"{pool.problem.why}; `repair` re-writes it from its texts"))
    elif not pool.checked and (path / POOL).exists():
        found.append(Problem("old", POOL, "written before checksums; `repair` adds them"))
    found += _memories_problems(path, settings, pool)
    return found


def _entries(path: Path) -> list[Problem]:
    """Temporary files (a dead writer's or a running one's) and entries megamem did not write."""
    found = []
    temps = dict(temp_files(path))
    for entry in sorted(path.iterdir()):
        name = entry.name
        if name in OWN or name in (LOCK, QUARANTINE):
            continue
        if name in temps:
            if temps[name]:
                found.append(Problem("leftover", name, "a killed write's temporary file; the next write removes it"))
            else:
                found.append(Problem("in-progress", name, "being written by a running process"))
        elif not is_own_temp(name):
            found.append(Problem("unknown", name, "not megamem's: left alone"))
    return found


def _settings_message(path: Path, exc: FileDamaged, has_copy: bool) -> str:
    if not stored_records(path) and not (path / SETTINGS).exists():
        how = "`repair` finishes it" if has_copy else f"`megamem add --backend memoryllm --store {path}` redoes it"
        return f"missing: the store's creation did not finish (nothing was stored); {how}"
    how = "`repair` writes it again from its copy in memories.json" if has_copy else "memories.json holds no copy"
    return f"{exc.why}; {how}"


def _memories_problems(path: Path, settings: dict, pool: PoolCheck) -> list[Problem]:
    """memories.json: damaged, missing, differing from the pool's list, or one commit behind it (a note)."""
    try:
        copy_settings, records = read_memories(path)
    except FileDamaged as exc:
        if exc.kind == "missing" and settings.get("layout", 1) < LAYOUT:
            return [Problem("old", MEMORIES, "not written yet (a store made before it); the next write writes it")]
        return [Problem(exc.kind, MEMORIES, f"{exc.why}; `repair` writes it again")]
    if copy_settings != settings and check_settings(copy_settings, MEMORIES) is None:
        why = "its copy of the settings differs from memoryllm.json; `repair` writes it again"
        return [Problem("corrupt", MEMORIES, why)]
    if not pool.records_ok or records == pool.records:
        return []
    behind = len(pool.records) - len(records)
    if behind > 0 and pool.records[: len(records)] == records:
        why = f"{behind} memory(ies) behind the pool (a write killed after its commit); the next write catches up"
        return [Problem("leftover", MEMORIES, why)]
    return [Problem("corrupt", MEMORIES, "differs from the pool's list of memories; `repair` writes it again")]


# -- where a damaged file can come back from ----------------------------------------------------------------------
def _settings_copy(path: Path) -> dict | None:
    """The settings as memories.json keeps them, if it passes its checksum and they are whole."""
    try:
        copy = read_memories(path)[0]
    except FileDamaged:
        return None
    return copy if check_settings(copy, MEMORIES) is None else None


def params_source(path: Path, settings: dict) -> Path | None:
    """A file with exactly the parameters the store was made with (their recorded checksum): the ones megamem
    ships for its base model, or the file it was made from."""
    want = settings.get("params_sha256")
    for where in (shipped_params(settings["base_model"]), settings.get("params_from")):
        if where and want and Path(where).is_file() and file_sha256(Path(where)) == want:
            return Path(where)
    return None


def _no_params(settings: dict) -> str:
    return (
        f"cannot be mended: neither megamem's shipped parameters for {settings['base_model']} nor the file the store "
        f"was made from have its checksum; put back a copy of that file (sha256 {settings.get('params_sha256')})"
    )


# -- repair -----------------------------------------------------------------------------------------------------
class _Quarantine:
    """quarantine/<stamp>/ of one repair, made on first use: where damaged files are moved, never deleted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]

    def put(self, name: str) -> str:
        """Move the store's file `name` into quarantine; say where it went ('' if there was nothing)."""
        src = self.path / name
        if not (src.exists() or src.is_symlink()):
            return ""
        folder = self.path / QUARANTINE / self.stamp
        folder.mkdir(parents=True, exist_ok=True)
        os.rename(src, folder / name)
        fsync_path(self.path)
        return f"; the damaged file is in {QUARANTINE}/{self.stamp}/{name}"


def repair(path: Path | str) -> list[str]:
    """Mend the MemoryLLM store at `path` (the module docstring says how); return what was done, a line an action."""
    path = Path(path)
    if store_state(path) is None:
        raise MegamemError(f"no MemoryLLM store at {path}")
    if store_state(path) == "unfinished" and not stored_records(path) and _settings_copy(path) is None:
        return [  # nothing to finish from; nothing changed (not even a lock file), so the next add writes it anew
            f"{SETTINGS} is missing and so is its copy in {MEMORIES}: the store's creation stopped before anything "
            f"was stored; `megamem add --backend memoryllm --store {path} TEXT` creates it again"
        ]
    quarantine = _Quarantine(path)
    done: list[str] = []
    with locked(path):
        done += [f"removed {name}: a killed write's temporary file" for name in sweep(path)]
        settings = _mend_settings(path, quarantine, done)
        if settings is None or not _mend_params(path, settings, quarantine, done):
            return done
        if settings.get("layout", 1) < LAYOUT or "sha256" not in settings:
            settings = write_settings(path, settings)
            done.append(f"{SETTINGS}: added its checksum (a store made before megamem checked MemoryLLM stores)")
        found = inspect_pool(path, settings)
        records = _choose_records(path, found, done)
        _mend_memories(path, settings, records, quarantine, done)
        records = _mend_pool(path, settings, records, found, quarantine, done)
        _mend_memories(path, settings, records, quarantine, done)  # the update numbers of a re-written pool
    return done


def _mend_settings(path: Path, quarantine: _Quarantine, done: list[str]) -> dict | None:
    """The store's settings; damaged or missing ones written again from memories.json's copy (None: cannot)."""
    try:
        return read_settings(path)
    except FileDamaged as exc:
        damage = exc
    copy = _settings_copy(path)
    if copy is None:
        done.append(f"{damage.why}, and {MEMORIES} holds no whole copy of it: cannot be mended")
        return None
    where = quarantine.put(SETTINGS)
    settings = write_settings(path, copy)
    what = "damaged" if where else "missing (a creation that did not finish, or a lost file)"
    done.append(f"{SETTINGS} was {what}: written again from its copy in {MEMORIES}{where}")
    return settings


def _mend_params(path: Path, settings: dict, quarantine: _Quarantine, done: list[str]) -> bool:
    """Whether the parameters are whole, after restoring damaged or missing ones from a file with their checksum."""
    try:
        check_params(path, settings)
        return True
    except FileDamaged as exc:
        damage = exc
    source = params_source(path, settings)
    if source is None:
        done.append(f"{damage.why}: {_no_params(settings)}; the pool and its texts are left as they are")
        return False
    where = quarantine.put(PARAMS)
    write_atomic(path / PARAMS, lambda tmp: shutil.copyfile(source, tmp))
    done.append(f"{PARAMS} {damage.why.removeprefix(str(path / PARAMS) + ' ')}; restored from {source}{where}")
    return True


def _choose_records(path: Path, found: PoolCheck, done: list[str]) -> list[PoolRecord]:
    """The list of memories to keep: the pool's if it passes its checksum, else memories.json's (with what the
    damaged pool lists beyond it), else whatever copy still parses (said in `done`)."""
    if found.records_ok:
        return _to_records(found.records or [], POOL, done)
    try:
        copy = read_memories(path)[1]
    except FileDamaged:
        copy = None
    if copy is not None:
        extra = found.records[len(copy) :] if found.records and found.records[: len(copy)] == copy else []
        if extra:
            done.append(
                f"{len(extra)} memory(ies) that memories.json did not list yet kept from the damaged pool's list: "
                "check their texts (`megamem list`)"
            )
        return _to_records(copy + extra, MEMORIES, done)
    raw, source = _parse_raw(path / MEMORIES), MEMORIES
    if found.records is not None:
        raw, source = found.records, POOL
    done.append(
        f"the list of memories failed its checksum in both {POOL} and {MEMORIES}: kept the {len(raw or [])} "
        f"memories as {source} lists them; their texts may hold the damage (`megamem list` shows them; the damaged "
        "files go to quarantine)"
    )
    return _to_records(raw or [], source, done)


def _parse_raw(path: Path) -> list | None:
    """memories.json's list as it parses, checksum or not (None: it does not parse)."""
    try:
        records = json.loads(path.read_text(encoding="utf-8", errors="replace")).get("records")
    except (OSError, ValueError, AttributeError):
        return None
    return records if isinstance(records, list) else None


def _to_records(raw: list, source: str, done: list[str]) -> list[PoolRecord]:
    """PoolRecords from parsed entries; one that is not a whole record is left out (said in `done`)."""
    out = []
    for n, r in enumerate(raw, 1):
        try:
            rec = PoolRecord(**r)
            if not isinstance(rec.text, str) or not isinstance(rec.id, str):
                raise TypeError
        except TypeError:
            done.append(f"entry {n} of {source}'s list is not a whole memory: left out (the file goes to quarantine)")
            continue
        out.append(rec)
    return out


def _mend_memories(
    path: Path, settings: dict, records: list[PoolRecord], quarantine: _Quarantine, done: list[str]
) -> None:
    """Write memories.json from the list kept, the old one to quarantine if it holds a memory the list lacks."""
    want = [r.to_dict() for r in records]
    try:
        copy_settings, copy = read_memories(path)
        if copy_settings == settings and copy == want:
            return
        what = "was behind the pool" if copy == want[: len(copy)] else "differed from the pool's list"
        lost = [r for r in copy if r not in want]
    except FileDamaged as exc:
        what, lost = exc.why.removeprefix(str(path / MEMORIES) + " "), [True]
    where = quarantine.put(MEMORIES) if lost else ""
    write_memories(path, settings, records)
    done.append(f"{MEMORIES} {what}; written again from the list of memories kept{where}")


def _mend_pool(
    path: Path,
    settings: dict,
    records: list[PoolRecord],
    found: PoolCheck,
    quarantine: _Quarantine,
    done: list[str],
) -> list[PoolRecord]:
    """Keep a whole pool, write one whose list alone was damaged again with the list, re-write any other from the
    stored texts; return the list as the pool now holds it."""
    want = [r.to_dict() for r in records]
    last = records[-1].update if records else 0
    if found.pool is not None and found.records_ok and found.records == want:
        if not found.checked:
            write_pool(path, found.pool, records)
            done.append(f"{POOL}: added its checksums (written before megamem checked MemoryLLM pools)")
        return records
    if found.pool is not None and found.checked and found.pool.updates == last:
        where = quarantine.put(POOL)
        write_pool(path, found.pool, records)
        done.append(f"{POOL}: its list of memories was damaged, its pool whole: written again with the list{where}")
        return records
    why = found.problem.why.removeprefix(str(path / POOL) + " ") if found.problem else "did not match its list"
    where = quarantine.put(POOL)
    pool, records = _rewrite(path, settings, records)
    write_pool(path, pool, records)
    done.append(f"{POOL} {why}; re-written from the {len(records)} stored text(s), each re-added in order{where}")
    return records


def _rewrite(path: Path, settings: dict, records: list[PoolRecord]) -> tuple[Pool, list[PoolRecord]]:
    """A fresh pool: every memory's text re-added in order into an empty pool with the store's parameters."""
    pool = Pool.empty(seed=int(settings["seed"]))
    if not records:
        return pool, []
    from ..model import load_model

    model, tok = load_model(settings["base_model"])
    mllm = MemoryLLM(model, tok, MemoryConfig.from_meta(settings["config"]))
    mllm.load_params(path / PARAMS)
    out = []
    for rec in records:
        pool = mllm.inject(pool, rec.text)
        out.append(replace(rec, update=pool.updates))
    return pool, out
