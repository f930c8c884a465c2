"""The files of a MemoryLLM store and the checks made when they are read (the store, verify and repair share them).

    STORE/memoryllm.json      the settings, with their own checksum and the checksum of the parameters
    STORE/params.safetensors  the memory-use parameters (checked against the settings' params_sha256)
    STORE/pool.safetensors    the pool; its metadata holds the list of memories (texts included) and two
                              checksums: `records_sha256` of that list and `sha256` of the pool itself
    STORE/memories.json       a copy of the list of memories and of the settings, written after each commit:
                              what `repair` re-writes the pool from when the pool or its list is damaged

The pool file stays the one commit point (its rename): memories.json is written after it and may lag it by the
memory whose write was killed in between, never lead it; the next write brings it up to date.

Checked on every read: the settings (a few hundred bytes) when the store opens; the parameters before the model
loads (5.8 MB: a few ms); the pool and its list whenever the pool is (re)loaded. Hashing a 110.6 MB pool costs
64 ms (measured on the 2-core development machine, SHA-NI, file in the page cache), against ~1.9 s to answer one
question through the pool and seconds to load the model, and a store re-reads its pool only when the file changed
(a write keeps the pool it wrote), so every read is checked rather than some. memories.json is only a copy:
`verify` checks it, reads never need it. A mismatch is one MegamemError (`FileDamaged`) naming the file and
`megamem repair`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import file_sha256
from ..errors import MegamemError
from ..store import write_atomic, write_json_atomic
from ..store.files import writer_gone
from ..store.manifest import TMP_NAME, Store
from .pool import Pool

SETTINGS = "memoryllm.json"
PARAMS = "params.safetensors"
POOL = "pool.safetensors"
MEMORIES = "memories.json"
OWN = (SETTINGS, PARAMS, POOL, MEMORIES)
LOCK = ".lock"
QUARANTINE = "quarantine"
LAYOUT = 2  # settings with "layout": 2 have checksums, an empty pool from creation on, and memories.json
MEMORIES_FORMAT = "megamem-memoryllm-memories/1"
SETTING_KEYS = ("backend", "base_model", "seed", "config")


@dataclass
class PoolRecord:
    """One memory written into the pool: its text, when, and which update wrote it (its age is counted from it)."""

    id: str
    text: str
    created: str
    update: int
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class FileDamaged(MegamemError):
    """A file of a MemoryLLM store that is missing or fails its check: `kind` is verify's (settings, missing,
    corrupt), `name` the file inside the store, `why` what is wrong (naming the file)."""

    def __init__(self, store: Path, name: str, kind: str, why: str) -> None:
        self.store, self.name, self.kind, self.why = store, name, kind, why
        super().__init__(f"{why}; `megamem repair --store {store}` mends the store")


def digest(data: Any) -> str:
    """sha256 of `data` as canonical JSON (sorted keys, no spaces): the same value however it was written."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# -- what is at a path ----------------------------------------------------------------------------------------
def is_own_temp(name: str) -> bool:
    """Whether `name` is a temporary file megamem's atomic write of one of the store's files makes."""
    m = TMP_NAME.fullmatch(name)
    return m is not None and name.startswith(".") and m["name"] in OWN


def store_state(path: Path | str) -> str | None:
    """'store' (memoryllm.json is there), 'unfinished' (no settings, but files only a MemoryLLM store writes: a
    creation that was killed, or a store whose settings were lost) or None (not a MemoryLLM store)."""
    path = Path(path)
    if (path / SETTINGS).exists() or (path / SETTINGS).is_symlink():
        return "store"
    if not path.is_dir() or Store.exists(path):
        return None
    for entry in path.iterdir():
        if is_own_temp(entry.name) or (entry.name in OWN and _marked(entry)):
            return "unfinished"
    return None


def _marked(path: Path) -> bool:
    """Whether a file named like one of the store's says it is megamem's MemoryLLM file (its format field), so
    that a user's folder holding some other `params.safetensors` is not taken for a store."""
    try:
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(min(n, 100_000_000)))  # safetensors caps its header there
            return str(header.get("__metadata__", {}).get("format", "")).startswith("megamem-memoryllm-")
        return json.loads(path.read_text(encoding="utf-8")).get("format") == MEMORIES_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def unfinished_error(path: Path) -> MegamemError:
    """What to do with a folder whose MemoryLLM store has no settings: finish or restart its creation, or repair."""
    if stored_records(path):
        return FileDamaged(path, SETTINGS, "settings", f"{path / SETTINGS} is missing")
    return MegamemError(
        f"{path} holds a MemoryLLM store whose creation did not finish (no {SETTINGS}; nothing was stored in it): "
        f"`megamem repair --store {path}` finishes it, or `megamem add --backend memoryllm --store {path} TEXT` "
        "creates it again"
    )


def stored_records(path: Path) -> bool:
    """Whether a pool or memories.json at `path` holds (or may hold: it cannot be read) at least one memory."""
    for name in (POOL, MEMORIES):
        p = path / name
        if not (p.exists() or p.is_symlink()):
            continue
        try:
            if name == POOL:
                records = json.loads(Pool.metadata(p).get("records", "[]"))
            else:
                records = json.loads(p.read_text(encoding="utf-8")).get("records")
        except (MegamemError, OSError, ValueError, AttributeError):
            return True  # unreadable: it may hold memories, so it is not a creation's leftover
        if records:
            return True
    return False


# -- settings -----------------------------------------------------------------------------------------------------
def sealed(settings: dict) -> dict:
    """The settings as written: with the layout and their own checksum."""
    body = {k: v for k, v in settings.items() if k != "sha256"} | {"layout": LAYOUT}
    return body | {"sha256": digest(body)}


def check_settings(settings: Any, where: str) -> str | None:
    """Why `settings` (parsed JSON) are not a MemoryLLM store's whole settings, or None."""
    if not isinstance(settings, dict) or any(k not in settings for k in SETTING_KEYS):
        return f"{where} is not a MemoryLLM store's settings"
    want = settings.get("sha256")
    if want is not None and digest({k: v for k, v in settings.items() if k != "sha256"}) != want:
        return f"{where} is damaged: it fails its checksum"
    return None


def _read_json(path: Path, name: str, missing: str, unreadable: str) -> object:
    """The JSON in the store's file `name`; FileDamaged of kind `missing` if it is not a file, `unreadable` if it
    does not parse."""
    p = path / name
    if not p.is_file():
        raise FileDamaged(path, name, missing, f"{p} is {'not a file' if p.exists() else 'missing'}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FileDamaged(path, name, unreadable, f"{p} is not readable ({exc})") from None


def read_settings(path: Path) -> dict:
    """The store's settings, checked; FileDamaged naming memoryllm.json otherwise."""
    p = path / SETTINGS
    settings = _read_json(path, SETTINGS, "settings", "settings")
    why = check_settings(settings, str(p))
    if why is not None:
        raise FileDamaged(path, SETTINGS, "settings", why)
    return settings


def write_settings(path: Path, settings: dict) -> dict:
    body = sealed(settings)
    write_json_atomic(path / SETTINGS, body)
    return body


# -- parameters -------------------------------------------------------------------------------------------------
def check_params(path: Path, settings: dict) -> None:
    """FileDamaged unless params.safetensors is there and has the checksum the settings recorded."""
    p = path / PARAMS
    if not p.is_file():
        raise FileDamaged(path, PARAMS, "missing", f"{p} is {'not a file' if p.exists() else 'missing'}")
    want = settings.get("params_sha256")
    try:
        got = file_sha256(p)
    except OSError as exc:
        raise FileDamaged(path, PARAMS, "corrupt", f"{p} is not readable ({exc.strerror})") from None
    if want is not None and got != want:
        raise FileDamaged(path, PARAMS, "corrupt", f"{p} is damaged: it fails its checksum")


# -- the pool and its list ------------------------------------------------------------------------------------
def pool_extra(records: list[PoolRecord]) -> dict[str, str]:
    """The pool file's metadata for its list of memories: the list (texts included) and its checksum."""
    data = [r.to_dict() for r in records]
    return {"records": json.dumps(data, ensure_ascii=False), "records_sha256": digest(data)}


def to_records(data: Any, where: str) -> list[PoolRecord]:
    """PoolRecords from a parsed list; an error naming `where` if it is not one."""
    try:
        return [PoolRecord(**r) for r in data]
    except TypeError:
        raise MegamemError(f"{where} holds a list of memories megamem cannot read") from None


@dataclass
class PoolCheck:
    """What reading pool.safetensors found: the pool (None: unreadable or failing its checksum), its list as
    parsed (None: not readable), whether that list passed its checksum, and what was wrong (None: nothing)."""

    pool: Pool | None = None
    records: list[dict] | None = None
    records_ok: bool = False
    problem: FileDamaged | None = None
    checked: bool = True  # False: a pool written before checksums (nothing to check its list against)


def inspect_pool(path: Path, settings: dict) -> PoolCheck:
    """Read and check pool.safetensors (see PoolCheck); a missing pool is empty before LAYOUT 2, else a problem."""
    p = path / POOL
    if not (p.exists() or p.is_symlink()):
        if settings.get("layout", 1) < LAYOUT:
            return PoolCheck(Pool.empty(seed=int(settings["seed"])), [], True, checked=False)
        return PoolCheck(problem=FileDamaged(path, POOL, "missing", f"{p} is missing"))
    out = PoolCheck()
    try:
        meta = Pool.metadata(p)
    except MegamemError as exc:
        out.problem = FileDamaged(path, POOL, "corrupt", str(exc))
        return out
    try:
        out.records = json.loads(meta.get("records", "[]"))
        if not isinstance(out.records, list) or not all(isinstance(r, dict) for r in out.records):
            out.records = None
    except ValueError:
        pass
    want = meta.get("records_sha256")
    out.checked = want is not None
    out.records_ok = out.records is not None and (want is None or digest(out.records) == want)
    try:
        out.pool = Pool.load(p)
    except MegamemError as exc:
        out.problem = FileDamaged(path, POOL, "corrupt", str(exc))
        return out
    if not out.records_ok:
        out.problem = FileDamaged(path, POOL, "corrupt", f"{p} is damaged: its list of memories fails its checksum")
    return out


def read_pool(path: Path, settings: dict) -> tuple[Pool, list[PoolRecord]]:
    """The committed pool and its memories, every checksum checked; FileDamaged naming the file otherwise."""
    found = inspect_pool(path, settings)
    if found.problem is not None:
        raise found.problem
    assert found.pool is not None and found.records is not None
    try:
        return found.pool, to_records(found.records, str(path / POOL))
    except MegamemError as exc:
        raise FileDamaged(path, POOL, "corrupt", str(exc)) from None


def write_pool(path: Path, pool: Pool, records: list[PoolRecord]) -> None:
    """Commit a pool and its list: one rename (the caller then brings memories.json up to date)."""
    write_atomic(path / POOL, lambda tmp: pool.save(tmp, extra=pool_extra(records)))


# -- memories.json -------------------------------------------------------------------------------------------------
def write_memories(path: Path, settings: dict, records: list[PoolRecord]) -> None:
    """The copy of the list (and of the settings) that repair re-writes a damaged pool from."""
    data = [r.to_dict() for r in records]
    body = {"format": MEMORIES_FORMAT, "settings": settings, "records": data}
    write_json_atomic(path / MEMORIES, body | {"sha256": digest(body)})


def read_memories(path: Path) -> tuple[dict, list[dict]]:
    """memories.json's settings and list as written, checked; FileDamaged naming it otherwise."""
    p = path / MEMORIES
    doc = _read_json(path, MEMORIES, "missing", "corrupt")
    if not isinstance(doc, dict) or doc.get("format") != MEMORIES_FORMAT or not isinstance(doc.get("records"), list):
        raise FileDamaged(path, MEMORIES, "corrupt", f"{p} is not a MemoryLLM store's list of memories")
    if digest({k: v for k, v in doc.items() if k != "sha256"}) != doc.get("sha256"):
        raise FileDamaged(path, MEMORIES, "corrupt", f"{p} is damaged: it fails its checksum")
    return doc["settings"], doc["records"]


# -- writers: the lock and their leftovers ------------------------------------------------------------------------
@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the store for one writer's read-modify-write (adds and repair)."""
    with open(path / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def temp_files(path: Path) -> list[tuple[str, bool]]:
    """The store's own temporary files (name, whether its writer is gone), by name."""
    out = []
    for entry in sorted(path.iterdir()) if path.is_dir() else []:
        if is_own_temp(entry.name) and not entry.is_symlink() and entry.is_file():
            out.append((entry.name, writer_gone(TMP_NAME.fullmatch(entry.name)["writer"])))
    return out


def sweep(path: Path) -> list[str]:
    """Remove the temporary files of writers that are gone (a killed write's 110 MB pool); return their names.
    Only files named by megamem's atomic write of one of the store's own files, whose writer is proven dead."""
    gone = []
    for name, dead in temp_files(path):
        if dead:
            (path / name).unlink(missing_ok=True)
            gone.append(name)
    return gone
