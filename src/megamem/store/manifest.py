"""The memory store: a folder with a SQLite manifest and one folder a memory, each file checksummed.

    STORE/settings.json               the store's settings (base model, key function, LoRA spec, gate), a copy
                                      of the manifest's: a lost manifest does not lose the store
    STORE/manifest.sqlite             (WAL) settings, one row a memory (the commit point), pending operations
    STORE/memories/<id>/              adapter_config.json, adapter_model.safetensors (PEFT), keys.safetensors,
                                      memory.json (the record and the other files' sha256: enough to re-list it)
    STORE/tmp/<name>.<writer>.<nonce> a memory (or a manifest, in repair) being written or thrown away by the
                                      process <writer> (pid-starttime)
    STORE/quarantine/                 what `repair` moved aside; megamem never deletes it

Adding writes a memory's files under tmp/ and fsyncs them, claims the id in the manifest (a pending row,
under SQLite's write lock), renames the folder into memories/, fsyncs memories/, and commits the memory's
row while dropping the pending one: that commit is the commit point. Forgetting commits the row's removal
(with a pending row) and then removes the folder. A crash leaves a pending row naming its writer; once that
process is proven gone, the next writer rolls it back. Only folders that a pending row proves megamem's
(its own memory.json, by checksum) and tmp/ entries in megamem's own naming are ever removed; anything else
is left alone and reported (`verify`). Opening a store for reading changes nothing on disk.
docs/reliability.md states what this promises and how it is tested.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import torch
from platformdirs import user_data_dir
from safetensors.torch import load_file, save_file

from ..adapters import INT8, Adapter, file_sha256, load_adapter, save_adapter
from ..checks import check_id
from ..errors import MegamemError
from .files import crash_point, fsync_path, write_json_atomic, writer_gone, writer_token

SCHEMA_VERSION = 2
MANIFEST = "manifest.sqlite"
SETTINGS_FILE = "settings.json"
MEMORY_FILE = "memory.json"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_FILES = ("adapter_config.json", ADAPTER_FILE)  # what consolidation retires (Store.retire_adapter)
MEMORY_FILES = (*ADAPTER_FILES, "keys.safetensors", MEMORY_FILE)
ROOT_ENTRIES = {MANIFEST, f"{MANIFEST}-wal", f"{MANIFEST}-shm", f"{MANIFEST}-journal", SETTINGS_FILE}
ROOT_FOLDERS = {"memories", "tmp", "quarantine", "cortex", "intents"}  # cortex, intents: megamem.ops
BUSY_TIMEOUT_S = float(os.environ.get("MEGAMEM_BUSY_TIMEOUT", "15"))
# megamem's own temporary names: NAME.WRITER.NONCE (tmp/ entries; SQLite's -wal/-shm/-journal beside a manifest
# being built there) and .NAME.WRITER.NONCE (a file being replaced atomically, beside it).
TMP_NAME = re.compile(
    r"\.?(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*?)\.(?P<writer>\d+-\d+)\.(?P<nonce>[0-9a-f]{16})(?:-wal|-shm|-journal)?"
)
_LOOKUP = re.compile(r"[A-Za-z0-9_-]{1,256}")  # what a stored id can be; anything else is simply not there
_PENDING_TABLE = (
    "CREATE TABLE pending (id TEXT PRIMARY KEY, op TEXT NOT NULL, writer TEXT NOT NULL, proof TEXT NOT NULL)"
)
_TABLES = (
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE memories (
    id TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    created TEXT NOT NULL,
    key_function TEXT NOT NULL,
    base_model TEXT NOT NULL,
    adapter_sha256 TEXT NOT NULL,
    n_keys INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    files TEXT NOT NULL DEFAULT '{}'
)""",
    _PENDING_TABLE,
)
_COLUMNS = "id, text, created, key_function, base_model, adapter_sha256, n_keys, metadata"


def default_store_path() -> Path:
    """MEGAMEM_STORE, else 'store' under the user data dir."""
    return Path(os.environ.get("MEGAMEM_STORE") or Path(user_data_dir("megamem")) / "store")


class StoreDamaged(MegamemError):
    """The store's manifest or layout is damaged; `megamem verify` lists the problems, `repair` mends them."""


class MemoryDamaged(MegamemError):
    """One memory's files are missing or fail their checksums; the other memories are unaffected."""

    def __init__(self, memory_id: str, message: str) -> None:
        super().__init__(f"memory {memory_id!r} is damaged: {message}")
        self.memory_id = memory_id


@dataclass
class Record:
    """One memory's manifest row. files: sha256 of each file in its folder (empty for stores made before 0.2)."""

    id: str
    text: str
    created: str
    key_function: str
    base_model: str
    adapter_sha256: str
    n_keys: int
    metadata: dict
    files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def read_memory_file(folder: Path) -> dict | None:
    """A folder's memory.json if it is one megamem wrote (right format marker), else None."""
    path = folder / MEMORY_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == "megamem-memory" else None


def record_from_memory_file(data: dict, memory_file_sha: str) -> Record:
    files = {**data["files"], MEMORY_FILE: memory_file_sha}
    return Record(
        id=data["id"],
        text=data["text"],
        created=data["created"],
        key_function=data["key_function"],
        base_model=data["base_model"],
        adapter_sha256=data["files"].get(ADAPTER_FILE, ""),  # "": consolidated, its adapter retired
        n_keys=int(data["n_keys"]),
        metadata=data.get("metadata", {}),
        files=files,
    )


def check_files(folder: Path, files: dict) -> str | None:
    """Why `folder` does not hold `files` (name -> sha256), or None when every file is there and matches.
    Messages name the path from the store's root (memories/<id>/<file>)."""
    where = f"{folder.parent.name}/{folder.name}"
    if folder.is_symlink() or not folder.is_dir():
        return f"{where}/ is missing" if not folder.exists() else f"{where} is not a folder"
    for name, sha in files.items():
        path = folder / name
        if not path.is_file():
            return f"{where}/{name} is missing"
        try:
            if file_sha256(path) != sha:
                return f"{where}/{name} is corrupted (checksum mismatch)"
        except OSError as exc:
            return f"{where}/{name} is unreadable ({exc.strerror or exc})"
    return None


def init_manifest(file: Path, settings: dict) -> None:
    """Create a manifest at `file` holding `settings` and no memory, in one transaction, fsynced."""
    db = sqlite3.connect(file, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        for stmt in _TABLES:
            db.execute(stmt)
        db.executemany("INSERT INTO settings VALUES (?, ?)", [(k, json.dumps(v)) for k, v in settings.items()])
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file: it can be renamed alone
    finally:
        db.close()
    fsync_path(file)


class Store:
    """A memory store folder. Reading it never changes it; writers sweep their own dead leftovers first.

    Store(path) opens an existing store (an error if there is none); Store(path, settings) also creates one
    at a new or empty path. For an existing store every given setting must equal the stored one.
    """

    def __init__(
        self,
        path: Path | str,
        settings: dict | None = None,
        busy_timeout: float | None = None,
        check_layout: bool = True,
    ) -> None:
        self.path = Path(path)
        self.busy_timeout = BUSY_TIMEOUT_S if busy_timeout is None else busy_timeout
        self.notices: list[str] = []  # what a forget left alone (a folder that no longer matched), to report
        self._writable = False
        if self.path.exists() and not self.path.is_dir():
            raise MegamemError(f"store path {self.path} is not a folder")
        manifest = self.path / MANIFEST
        if not manifest.exists():
            if (self.path / SETTINGS_FILE).is_file():
                raise StoreDamaged(
                    f"store {self.path} has lost its manifest ({MANIFEST}); "
                    f"`megamem repair --store {self.path}` rebuilds it from the memory folders"
                )
            if settings is None:
                raise MegamemError(f"no megamem store at {self.path}")
            self._create(settings)
        else:
            self.db = self._connect(manifest)
            self._check_manifest()
            self._check_settings(settings or {})
        for name in ("memories", "tmp") if check_layout else ():  # verify and repair look at the layout themselves
            p = self.path / name
            if p.exists() and (p.is_symlink() or not p.is_dir()):
                raise StoreDamaged(
                    f"{p} is not a folder; the store is damaged (`megamem verify --store {self.path}` lists the "
                    "problems, `megamem repair` mends them)"
                )

    @staticmethod
    def exists(path: Path | str) -> bool:
        """Whether `path` holds a store (its manifest, or the settings.json that outlives a lost manifest)."""
        path = Path(path)
        return path.is_dir() and ((path / MANIFEST).exists() or (path / SETTINGS_FILE).is_file())

    @staticmethod
    def check_new_path(path: Path) -> None:
        """Refuse to create a store where something else already is: a file, or a folder that is not empty."""
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise MegamemError(
                f"{path} is not empty and holds no megamem store; choose a new or empty folder"
                if path.is_dir()
                else f"store path {path} is not a folder"
            )

    def foreign_entries(self) -> list[str]:
        """Entries in memories/ and tmp/ that megamem did not write (it leaves them alone), from the store's root."""
        known = {r.id for r in self.records()} | set(self.pending())
        out = []
        for sub in ("memories", "tmp"):
            folder = self.path / sub
            for entry in sorted(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []:
                ours = (
                    entry.name in known or read_memory_file(entry) is not None
                    if sub == "memories"
                    else TMP_NAME.fullmatch(entry.name) is not None
                )
                if not ours:
                    out.append(f"{sub}/{entry.name}")
        return out

    # -- opening ----------------------------------------------------------------------------------------------
    def _connect(self, manifest: Path) -> sqlite3.Connection:
        if not manifest.is_file():
            raise StoreDamaged(f"{manifest} is not a file; `megamem repair --store {self.path}` rebuilds it")
        try:
            db = sqlite3.connect(
                f"file:{quote(str(manifest.resolve()))}?mode=rw",
                uri=True,
                timeout=self.busy_timeout,
                isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE takes the write lock
                check_same_thread=False,
            )
            db.execute("PRAGMA synchronous=FULL")  # a commit survives a power cut, not just a crash
            # a damaged row's bytes decode with U+FFFD instead of failing every query (verify compares each row
            # with its memory.json and names it)
            db.text_factory = lambda b: b.decode("utf-8", "replace")
        except sqlite3.Error as exc:
            raise self._sql_error(exc) from None
        return db

    def _check_manifest(self) -> None:
        """Refuse a manifest that is not a whole megamem manifest (SQLite's quick_check, then its tables)."""
        try:
            check = self.db.execute("PRAGMA quick_check").fetchall()
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.Error as exc:
            raise self._sql_error(exc) from None
        if check != [("ok",)]:
            raise self._damaged(f"SQLite integrity check failed ({check[0][0]})")
        if not {"settings", "memories"} <= tables:
            raise self._damaged("it holds no megamem tables")
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(memories)")}
        self._has_files = "files" in cols
        self._has_pending = "pending" in tables
        version = self.settings().get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise MegamemError(f"store {self.path} was made by a newer megamem (schema {version}); upgrade megamem")

    def _damaged(self, why: str) -> StoreDamaged:
        return StoreDamaged(
            f"the manifest {self.path / MANIFEST} is damaged: {why}; no memory was touched. "
            f"`megamem repair --store {self.path}` rebuilds it from the memory folders"
        )

    def _sql_error(self, exc: sqlite3.Error) -> MegamemError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return MegamemError(
                f"the store {self.path} is locked by another process (waited {self.busy_timeout:g} s); try again"
            )
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            return self._damaged(text)
        if "readonly" in text or "unable to open" in text:
            return MegamemError(f"cannot open the manifest of {self.path} for writing: {text}")
        if "malformed" in text or "not a database" in text:
            return self._damaged(text)
        return MegamemError(f"the manifest of {self.path} failed: {text}")

    def _create(self, settings: dict) -> None:
        for key in ("base_model", "key_function"):
            if not settings.get(key):
                raise MegamemError(f"a new store needs the setting {key!r}")
        Store.check_new_path(self.path)
        full = {**settings, "schema_version": SCHEMA_VERSION}
        try:
            (self.path / "memories").mkdir(parents=True, exist_ok=True)
            (self.path / "tmp").mkdir(exist_ok=True)
            manifest = self.path / MANIFEST
            init_manifest(manifest, full)
            write_json_atomic(self.path / SETTINGS_FILE, {"format": "megamem-store", "settings": full})
        except OSError as exc:
            raise MegamemError(f"cannot create a store at {self.path}: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            raise MegamemError(f"cannot create a store at {self.path}: {exc}") from None
        self.db = self._connect(manifest)
        self._has_files = self._has_pending = True

    def _check_settings(self, given: dict) -> None:
        stored = self.settings()
        for key, value in given.items():
            if key == "gate" or value is None:  # the gate is a per-question setting, overridable on open
                continue
            if json.loads(json.dumps(value)) != stored.get(key):
                raise MegamemError(
                    f"store {self.path} was built with {key} {stored.get(key)!r}, not {value!r}; "
                    "a stored memory only makes sense with the settings it was learned with"
                )

    # -- SQL -----------------------------------------------------------------------------------------------
    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise self._sql_error(exc) from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under SQLite's write lock (waits up to busy_timeout for other writers)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._sql_error(exc) from None
        try:
            yield self.db
        except BaseException:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        try:
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._sql_error(exc) from None

    def settings(self) -> dict:
        return {k: json.loads(v) for k, v in self._q("SELECT key, value FROM settings")}

    def data_version(self) -> int:
        """Changes whenever another connection commits to the manifest (SQLite's PRAGMA data_version)."""
        return int(self._q("PRAGMA data_version")[0][0])

    def records(self) -> list[Record]:
        """Every memory, oldest first."""
        return [self._record(r) for r in self._q(f"SELECT {self._cols()} FROM memories ORDER BY created, rowid")]

    def get(self, memory_id: str, missing_ok: bool = False) -> Record | None:
        if not isinstance(memory_id, str) or not _LOOKUP.fullmatch(memory_id):
            if missing_ok:
                return None
            raise MegamemError(f"no memory with id {memory_id!r} in {self.path}")
        rows = self._q(f"SELECT {self._cols()} FROM memories WHERE id = ?", (memory_id,))
        if not rows:
            if missing_ok:
                return None
            raise MegamemError(f"no memory with id {memory_id!r} in {self.path}")
        return self._record(rows[0])

    def _cols(self) -> str:
        return _COLUMNS + (", files" if self._has_files else "")

    @staticmethod
    def _record(row: tuple) -> Record:
        files = json.loads(row[8]) if len(row) > 8 else {}
        return Record(*row[:7], metadata=json.loads(row[7]), files=files or {"adapter_model.safetensors": row[5]})

    def folder(self, memory_id: str) -> Path:
        return self.path / "memories" / memory_id

    # -- writing -------------------------------------------------------------------------------------------
    def writable(self) -> None:
        """Make this store ready for writing, once: bring an old schema up to date, restore a lost settings.json,
        and sweep the leftovers of writers proven gone. Read-only use never calls it."""
        if self._writable:
            return
        with self._write() as db:
            if not self._has_files:
                db.execute("ALTER TABLE memories ADD COLUMN files TEXT NOT NULL DEFAULT '{}'")
            if not self._has_pending:
                db.execute(_PENDING_TABLE)
            db.execute("INSERT OR REPLACE INTO settings VALUES ('schema_version', ?)", (json.dumps(SCHEMA_VERSION),))
        if not self._has_files or not self._has_pending:
            self.db.execute("PRAGMA journal_mode=WAL")
        self._has_files = self._has_pending = True
        try:
            for name in ("memories", "tmp"):
                (self.path / name).mkdir(exist_ok=True)
            if not (self.path / SETTINGS_FILE).exists() and not (self.path / SETTINGS_FILE).is_symlink():
                write_json_atomic(self.path / SETTINGS_FILE, {"format": "megamem-store", "settings": self.settings()})
        except OSError as exc:
            raise MegamemError(f"cannot write to the store {self.path}: {exc.strerror or exc}") from None
        self.sweep()
        self._writable = True

    def sweep(self) -> None:
        """Roll back the operations of writers proven gone and remove their temp entries (only those: what
        megamem did not write is left alone, and `foreign_entries` names it)."""
        for memory_id, writer, proof in self._q("SELECT id, writer, proof FROM pending"):
            if not writer_gone(writer):
                continue
            folder = self.folder(memory_id)
            if self.get(memory_id, missing_ok=True) is None and folder.is_dir() and self._proves(folder, proof):
                self._discard(folder, memory_id)
            with self._write() as db:
                db.execute("DELETE FROM pending WHERE id = ? AND writer = ?", (memory_id, writer))
        tmp = self.path / "tmp"
        for entry in sorted(tmp.iterdir()) if tmp.is_dir() and not tmp.is_symlink() else []:
            m = TMP_NAME.fullmatch(entry.name)
            if m and not entry.is_symlink() and writer_gone(m["writer"]):
                _remove(entry)
        for entry in self.path.glob(".*"):  # a settings.json being replaced when its writer died
            m = TMP_NAME.fullmatch(entry.name)
            if m and entry.name.startswith(f".{SETTINGS_FILE}.") and entry.is_file() and writer_gone(m["writer"]):
                entry.unlink(missing_ok=True)

    @staticmethod
    def _proves(folder: Path, proof: str) -> bool:
        """Whether `folder` holds the files a pending row names (so megamem wrote it): {name: sha256}."""
        try:
            files = json.loads(proof)
        except ValueError:
            return False
        return bool(files) and check_files(folder, files) is None

    def _discard(self, folder: Path, name: str) -> None:
        """Move one of megamem's own folders into tmp/ under this writer's name, then remove it there."""
        trash = self.path / "tmp" / f"{name}.{writer_token()}.{uuid.uuid4().hex[:16]}"
        os.rename(folder, trash)
        fsync_path(folder.parent)
        _remove(trash)

    def add(
        self,
        text: str,
        adapter: Adapter,
        keys: torch.Tensor,
        metadata: dict | None = None,
        memory_id: str | None = None,
    ) -> Record:
        """Store one memory whole (files, then the row that commits it); returns its record."""
        memory_id = check_id(memory_id or uuid.uuid4().hex[:12])
        self.writable()
        if self.get(memory_id, missing_ok=True) is not None:
            raise MegamemError(f"a memory with id {memory_id!r} already exists")
        settings = self.settings()
        writer, nonce = writer_token(), uuid.uuid4().hex[:16]
        tmp = self.path / "tmp" / f"{memory_id}.{writer}.{nonce}"
        folder = self.folder(memory_id)
        claimed = False
        try:
            tmp.mkdir()
            save_adapter(adapter, tmp, settings["base_model"], _dtype(settings.get("adapter_dtype", "float32")))
            save_file({"keys": keys.float().contiguous()}, str(tmp / "keys.safetensors"))
            files = {name: file_sha256(tmp / name) for name in MEMORY_FILES[:3]}
            rec = Record(
                id=memory_id,
                text=text,
                created=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                key_function=settings["key_function"],
                base_model=settings["base_model"],
                adapter_sha256=files["adapter_model.safetensors"],
                n_keys=int(keys.shape[0]),
                metadata=metadata or {},
            )
            body = {"format": "megamem-memory", "version": 1, "nonce": nonce, **rec.to_dict(), "files": files}
            (tmp / MEMORY_FILE).write_text(json.dumps(body, indent=2, ensure_ascii=False), encoding="utf-8")
            rec.files = {**files, MEMORY_FILE: file_sha256(tmp / MEMORY_FILE)}
            for name in MEMORY_FILES:
                fsync_path(tmp / name)
            fsync_path(tmp)
            proof = json.dumps({MEMORY_FILE: rec.files[MEMORY_FILE]})
            with self._write() as db:  # claim the id under the write lock: two adds of one id cannot both pass
                if db.execute("SELECT 1 FROM memories WHERE id = ?", (memory_id,)).fetchone():
                    raise MegamemError(f"a memory with id {memory_id!r} already exists")
                if db.execute("SELECT 1 FROM pending WHERE id = ?", (memory_id,)).fetchone():
                    raise MegamemError(f"another process is adding or forgetting a memory with id {memory_id!r}")
                db.execute("INSERT INTO pending VALUES (?, 'add', ?, ?)", (memory_id, writer, proof))
            claimed = True
            if folder.exists() or folder.is_symlink():
                raise MegamemError(
                    f"{folder} already exists but is in no manifest row (not megamem's, or damaged); "
                    f"`megamem verify --store {self.path}` tells which"
                )
            os.rename(tmp, folder)
            fsync_path(folder.parent)
            with self._write() as db:  # the commit point
                _insert(db, rec)
                db.execute("DELETE FROM pending WHERE id = ?", (memory_id,))
            claimed = False
        except OSError as exc:
            self._undo_add(tmp, folder, memory_id, claimed, proof if claimed else None)
            raise MegamemError(f"cannot write memory {memory_id!r} into {self.path}: {exc.strerror or exc}") from None
        except BaseException:
            self._undo_add(tmp, folder, memory_id, claimed, proof if claimed else None)
            raise
        return rec

    def _undo_add(self, tmp: Path, folder: Path, memory_id: str, claimed: bool, proof: str | None) -> None:
        """Roll back an add that failed before its commit: its temp folder, its renamed folder, its pending row."""
        try:
            if tmp.is_dir():
                _remove(tmp)
            if claimed and proof and folder.is_dir() and self._proves(folder, proof):
                self._discard(folder, memory_id)
            if claimed:
                with self._write() as db:
                    db.execute("DELETE FROM pending WHERE id = ?", (memory_id,))
        except (OSError, MegamemError):
            pass  # left for the next writer's sweep: the pending row names this process, which will be gone

    def forget(self, memory_id: str) -> Record:
        """Remove a memory for good: its row (the commit point), then its files."""
        if not isinstance(memory_id, str) or not _LOOKUP.fullmatch(memory_id):
            raise MegamemError(f"no memory with id {memory_id!r} in {self.path}")
        self.writable()
        writer = writer_token()
        with self._write() as db:
            rows = db.execute(f"SELECT {self._cols()} FROM memories WHERE id = ?", (memory_id,)).fetchall()
            if not rows:
                raise MegamemError(f"no memory with id {memory_id!r} in {self.path}")
            rec = self._record(rows[0])
            proof = json.dumps(rec.files)
            db.execute("DELETE FROM memories WHERE id = ?", (memory_id,))
            db.execute("INSERT OR REPLACE INTO pending VALUES (?, 'forget', ?, ?)", (memory_id, writer, proof))
        folder = self.folder(memory_id)
        if folder.is_dir() and not folder.is_symlink():
            if self._proves(folder, proof):
                self._discard(folder, memory_id)
            else:
                self.notices.append(f"memories/{memory_id} no longer matches its checksums: left alone")
        with self._write() as db:
            db.execute("DELETE FROM pending WHERE id = ?", (memory_id,))
        return rec

    def relist(self, rec: Record, replace: bool = False) -> None:
        """Commit the row of a memory whose folder is already in place (repair, from the folder's memory.json);
        replace: over a damaged row of the same id."""
        self.writable()
        with self._write() as db:
            if replace:
                db.execute("DELETE FROM memories WHERE id = ?", (rec.id,))
            _insert(db, rec)

    def drop_row(self, memory_id: str) -> None:
        """Remove a memory's row only (repair: its folder has gone to quarantine, its record with it)."""
        with self._write() as db:
            db.execute("DELETE FROM memories WHERE id = ?", (memory_id,))

    def set_files(self, memory_id: str, files: dict) -> None:
        """Record the checksums of a memory's files (repair, for a memory from a store made before 0.2)."""
        with self._write() as db:
            db.execute("UPDATE memories SET files = ? WHERE id = ?", (json.dumps(files), memory_id))

    def retire_adapter(self, memory_id: str, metadata: dict) -> Record:
        """Consolidation's step for one memory: it keeps its row, text and keys (the gate still routes to it and
        its text is still context) and gains `metadata` (megamem's reserved keys); its adapter files go, since the
        cortex holds what they learned. memory.json is rewritten first, then the row is updated (the commit
        point), then the adapter files are removed. Idempotent: run again after a crash at any step (the
        consolidation's intent, megamem.store.intents, does), it finishes the same way."""
        self.writable()
        rec = self.get(memory_id)
        folder = self.folder(memory_id)
        files = {k: v for k, v in rec.files.items() if k not in (*ADAPTER_FILES, MEMORY_FILE)}
        kept = {**rec.metadata, **metadata}
        if rec.adapter_sha256 or kept != rec.metadata:
            body = {
                "format": "megamem-memory",
                "version": 1,
                "nonce": uuid.uuid4().hex[:16],
                **rec.to_dict(),
                "adapter_sha256": "",
                "metadata": kept,
                "files": files,
            }
            write_json_atomic(folder / MEMORY_FILE, body)
            crash_point("consolidate:memory-file")
            files = {**files, MEMORY_FILE: file_sha256(folder / MEMORY_FILE)}
            with self._write() as db:  # the commit point
                db.execute(
                    "UPDATE memories SET adapter_sha256 = '', metadata = ?, files = ? WHERE id = ?",
                    (json.dumps(kept, ensure_ascii=False), json.dumps(files), memory_id),
                )
        for name in ADAPTER_FILES:
            (folder / name).unlink(missing_ok=True)
        fsync_path(folder)
        return self.get(memory_id)

    def restore_adapter(self, memory_id: str, adapter: Adapter, drop: tuple[str, ...]) -> Record:
        """Give a consolidated memory an adapter of its own again (its cortex was lost and it was learned again):
        the adapter's files are written beside its keys, then memory.json, then the row (the commit point), its
        metadata without the keys `drop`. Returns the record."""
        self.writable()
        rec = self.get(memory_id)
        folder = self.folder(memory_id)
        tmp = self.path / "tmp" / f"{memory_id}.{writer_token()}.{uuid.uuid4().hex[:16]}"
        tmp.mkdir()
        try:
            save_adapter(adapter, tmp, rec.base_model, _dtype(self.settings().get("adapter_dtype", "float32")))
            for name in ADAPTER_FILES:
                fsync_path(tmp / name)
                os.replace(tmp / name, folder / name)
        finally:
            _remove(tmp)
        fsync_path(folder)
        files = {k: v for k, v in rec.files.items() if k != MEMORY_FILE}
        files.update({name: file_sha256(folder / name) for name in ADAPTER_FILES})
        meta = {k: v for k, v in rec.metadata.items() if k not in drop}
        body = {
            "format": "megamem-memory",
            "version": 1,
            "nonce": uuid.uuid4().hex[:16],
            **rec.to_dict(),
            "adapter_sha256": files[ADAPTER_FILE],
            "metadata": meta,
            "files": files,
        }
        write_json_atomic(folder / MEMORY_FILE, body)
        files[MEMORY_FILE] = file_sha256(folder / MEMORY_FILE)
        with self._write() as db:  # the commit point
            db.execute(
                "UPDATE memories SET adapter_sha256 = ?, metadata = ?, files = ? WHERE id = ?",
                (files[ADAPTER_FILE], json.dumps(meta, ensure_ascii=False), json.dumps(files), memory_id),
            )
        return self.get(memory_id)

    def pending(self) -> dict[str, tuple[str, str]]:
        """The operations in flight or left by a dead writer: id -> (op, writer)."""
        if not self._has_pending:
            return {}
        return {i: (op, w) for i, op, w in self._q("SELECT id, op, writer FROM pending")}

    # -- reading files ---------------------------------------------------------------------------------------
    def adapter(self, rec: Record) -> Adapter:
        """A memory's adapter, its files checked against the manifest's checksums (MemoryDamaged if they fail)."""
        if not rec.adapter_sha256:
            raise MegamemError(
                f"memory {rec.id!r} is consolidated: its adapter was retired into its namespace's cortex (it keeps "
                "its text and keys), so it has no adapter of its own to read or export"
            )
        folder = self.folder(rec.id)
        wanted = {k: v for k, v in rec.files.items() if k in ADAPTER_FILES}
        why = check_files(folder, wanted)
        if why is not None:
            raise MemoryDamaged(rec.id, why)
        try:
            return load_adapter(folder)
        except (MegamemError, OSError, ValueError, KeyError) as exc:
            raise MemoryDamaged(rec.id, str(exc)) from None

    def keys(self, rec: Record) -> torch.Tensor:
        """A memory's keys, checked against the manifest's checksum and its key count."""
        folder = self.folder(rec.id)
        path = folder / "keys.safetensors"
        why = check_files(folder, {k: v for k, v in rec.files.items() if k == "keys.safetensors"})
        if why is not None:
            raise MemoryDamaged(rec.id, why)
        try:
            keys = load_file(str(path))["keys"]
        except Exception as exc:  # safetensors raises its own error types on a damaged header
            raise MemoryDamaged(rec.id, f"key file {path} is unreadable: {exc}") from None
        if keys.ndim != 2 or keys.shape[0] != rec.n_keys or not bool(torch.isfinite(keys).all()):
            raise MemoryDamaged(rec.id, f"key file {path} does not hold {rec.n_keys} finite key rows")
        return keys

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file() and not p.is_symlink())

    def close(self) -> None:
        self.db.close()


def _insert(db: sqlite3.Connection, rec: Record) -> None:
    """The row that commits a memory (inside the caller's write transaction)."""
    db.execute(
        f"INSERT INTO memories ({_COLUMNS}, files) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            rec.id,
            rec.text,
            rec.created,
            rec.key_function,
            rec.base_model,
            rec.adapter_sha256,
            rec.n_keys,
            json.dumps(rec.metadata, ensure_ascii=False),
            json.dumps(rec.files),
        ),
    )


def _remove(entry: Path) -> None:
    """Remove one of megamem's own temp entries (a folder or a file; never following a link)."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _dtype(name: str) -> torch.dtype | str:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, INT8: INT8}[name]
    except KeyError:
        raise MegamemError(f"unknown adapter dtype {name!r}") from None
