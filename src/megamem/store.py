"""The memory store: a folder with a SQLite manifest and one sub-folder of files per memory.

    STORE/manifest.sqlite          settings (base model, key function, gate, LoRA spec) + one row a memory
    STORE/memories/<id>/           adapter_config.json, adapter_model.safetensors (PEFT format), keys.safetensors
    STORE/tmp/                     memories being written

Adding is atomic: a memory's files are written under tmp/, fsynced, renamed into memories/, and
only then is its row committed; the row is the commit point. Opening a store sweeps away files
without a row (left by a killed add or forget), so a memory is either whole or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from platformdirs import user_data_dir
from safetensors.torch import load_file, save_file

from .adapters import Adapter, load_adapter, save_adapter
from .errors import MegamemError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS memories (
    id TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    created TEXT NOT NULL,
    key_function TEXT NOT NULL,
    base_model TEXT NOT NULL,
    adapter_sha256 TEXT NOT NULL,
    n_keys INTEGER NOT NULL,
    metadata TEXT NOT NULL
);
"""


def default_store_path() -> Path:
    """MEGAMEM_STORE, else 'store' under the user data dir."""
    return Path(os.environ.get("MEGAMEM_STORE") or Path(user_data_dir("megamem")) / "store")


@dataclass
class Record:
    """One memory's manifest row."""

    id: str
    text: str
    created: str
    key_function: str
    base_model: str
    adapter_sha256: str
    n_keys: int
    metadata: dict

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """A memory store folder; settings are fixed when it is created and checked on every open."""

    def __init__(self, path: Path | str, settings: dict | None = None) -> None:
        """Open the store at `path`, creating it with `settings` if it does not exist yet.

        `settings` must hold base_model and key_function; for an existing store, any value given
        that differs from the stored one is an error (a store's adapters and keys only make sense
        with the model and key function they were built with).
        """
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise MegamemError(f"store path {self.path} is not a folder")
        existed = (self.path / "manifest.sqlite").is_file()
        if not existed and settings is None:
            raise MegamemError(f"no megamem store at {self.path}")
        (self.path / "memories").mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path / "manifest.sqlite", timeout=30)
        self.db.executescript(_SCHEMA)
        stored = self.settings()
        if not stored:
            if settings is None:
                raise MegamemError(f"store {self.path} has no settings")
            with self.db:
                self.db.executemany(
                    "INSERT INTO settings VALUES (?, ?)",
                    [(k, json.dumps(v)) for k, v in {**settings, "schema_version": SCHEMA_VERSION}.items()],
                )
        else:
            for key in ("base_model", "key_function"):
                if settings and settings.get(key) is not None and settings[key] != stored.get(key):
                    raise MegamemError(
                        f"store {self.path} was built with {key} {stored.get(key)!r}, not {settings[key]!r}"
                    )
        self._sweep()

    def settings(self) -> dict:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM settings")}

    def _sweep(self) -> None:
        """Remove files no committed row owns: the leftovers of a killed add or forget.

        A tmp folder is swept once the process that wrote it is gone; a memory folder without a row
        once it is a minute old (a concurrent add commits its row right after the rename).
        """
        for d in (self.path / "tmp").glob("*.*"):
            if not _pid_alive(int(d.suffix[1:] or 0)):
                shutil.rmtree(d, ignore_errors=True)
        ids = {r[0] for r in self.db.execute("SELECT id FROM memories")}
        now = time.time()
        for d in (self.path / "memories").iterdir():
            if d.name not in ids and now - d.stat().st_mtime > 60:
                shutil.rmtree(d, ignore_errors=True)

    def folder(self, memory_id: str) -> Path:
        return self.path / "memories" / memory_id

    def add(
        self,
        text: str,
        adapter: Adapter,
        keys: torch.Tensor,
        metadata: dict | None = None,
        memory_id: str | None = None,
    ) -> Record:
        """Store one memory whole (files, then the row that commits it); returns its record."""
        settings = self.settings()
        memory_id = memory_id or uuid.uuid4().hex[:12]
        if not memory_id.replace("-", "").replace("_", "").isalnum():
            raise MegamemError(f"memory id {memory_id!r} may hold only letters, digits, '-' and '_'")
        if self.get(memory_id, missing_ok=True) is not None:
            raise MegamemError(f"a memory with id {memory_id!r} already exists")
        tmp = self.path / "tmp" / f"{memory_id}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.rmtree(self.folder(memory_id), ignore_errors=True)  # a row-less leftover of a killed add
        try:
            sha = save_adapter(adapter, tmp, settings["base_model"], _dtype(settings.get("adapter_dtype", "float32")))
            save_file({"keys": keys.float().contiguous()}, str(tmp / "keys.safetensors"))
            _fsync_tree(tmp)
            os.rename(tmp, self.folder(memory_id))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        rec = Record(
            id=memory_id,
            text=text,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            key_function=settings["key_function"],
            base_model=settings["base_model"],
            adapter_sha256=sha,
            n_keys=int(keys.shape[0]),
            metadata=metadata or {},
        )
        try:
            with self.db:
                self.db.execute(
                    "INSERT INTO memories VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        rec.id,
                        rec.text,
                        rec.created,
                        rec.key_function,
                        rec.base_model,
                        rec.adapter_sha256,
                        rec.n_keys,
                        json.dumps(rec.metadata),
                    ),
                )
        except BaseException:
            shutil.rmtree(self.folder(memory_id), ignore_errors=True)
            raise
        return rec

    def records(self) -> list[Record]:
        """Every memory, oldest first."""
        rows = self.db.execute("SELECT * FROM memories ORDER BY created, rowid").fetchall()
        return [_record(r) for r in rows]

    def get(self, memory_id: str, missing_ok: bool = False) -> Record | None:
        row = self.db.execute("SELECT * FROM memories WHERE id = ?", (memory_id,)).fetchone()
        if row is None:
            if missing_ok:
                return None
            raise MegamemError(f"no memory with id {memory_id!r} in {self.path}")
        return _record(row)

    def forget(self, memory_id: str) -> Record:
        """Remove a memory for good: its row (the commit point), then its files."""
        rec = self.get(memory_id)
        with self.db:
            self.db.execute("DELETE FROM memories WHERE id = ?", (memory_id,))
        shutil.rmtree(self.folder(memory_id), ignore_errors=True)
        return rec

    def adapter(self, rec: Record) -> Adapter:
        """Load a memory's adapter, checking its file against the manifest's checksum."""
        return load_adapter(self.folder(rec.id), checksum=rec.adapter_sha256)

    def keys(self, rec: Record) -> torch.Tensor:
        path = self.folder(rec.id) / "keys.safetensors"
        try:
            return load_file(str(path))["keys"]
        except Exception as exc:
            raise MegamemError(f"key file {path} is unreadable: {exc}") from exc

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def close(self) -> None:
        self.db.close()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _record(row: tuple) -> Record:
    return Record(*row[:7], metadata=json.loads(row[7]))


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise MegamemError(f"unknown adapter dtype {name!r}") from None
