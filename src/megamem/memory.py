"""The Python API: `Memory(store).add(text)`, `.ask(question, mode=...)`, `.list()`, `.forget(id)`.

Memory ties the parts together in the one direction data flows: text -> keys + adapter -> store
-> gate -> generation. The base model is loaded only when a call needs it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .adapters import Adapter, LoraSpec, save_adapter
from .admission import check_items, fitting_items
from .answer import DEFAULT_MODE, MIN_WEIGHT, MODES, Gated, check_mode, context, mixture, plan, run
from .backend import CAPABILITIES, KINDS, MEGA, MEMORYLLM
from .calibration import calibration_keys
from .checks import check_count, check_id, check_text, first_of
from .errors import MegamemError
from .gate import GateConfig, gate_weights
from .generate import decode
from .index import EXACT_MAX_KEYS, KeyIndex
from .inject import inject_for
from .items import Answer, Item, OnMemory, OnStep, OnStored, Progress
from .keys import DEFAULT_KEY_FUNCTION, KEY_FUNCTIONS, compute_keys
from .learn import learn
from .memoryllm.store import PoolMemory, is_pool_store
from .model import DEFAULT_MODEL, load_model
from .routing import KeyTable, Routing
from .schema import (
    CONSOLIDATED,
    DEFAULT_NAMESPACE,
    PARAPHRASES,
    REPLACES,
    check_namespace,
    is_consolidated,
    owns,
    reserved_metadata,
)
from .store import MemoryDamaged, Record, Store, default_store_path, intents
from .store import cortex as cortex_files
from .store.caches import AdapterCache, CortexCache
from .store.cortex import Consolidated
from .store.cortex import namespaces as cortex_namespaces
from .train import Recipe
from .updates import likely_update

if TYPE_CHECKING:
    from typing_extensions import Unpack

# Adapters are stored in bfloat16: half the bytes of float32 with recall and QA unchanged at every rank
# measured (docs/performance.md, storage); they are computed in float32 once loaded.
ADAPTER_DTYPE = "bfloat16"
# "int8" (a store option) halves that again, recall and QA unchanged (docs/performance.md section 4; docs/scale.md);
# PEFT loads such an adapter after `megamem export` (Memory.export)
ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "int8")


class Memory:
    """A language model with memories stored in gated LoRA adapters.

    store: folder of the store (default: the user data dir). model / key_function / lora: used when the
    store is created (by the first add, once the model has loaded); for an existing store, any given value
    must match the stored one. create=False: a path without a store is an error (read-only use).
    strict: a damaged memory is an error instead of a warning (by default it is skipped, named in `warnings`,
    and every other memory keeps working).
    adapter_cache: adapters kept in RAM (LRU; the rest stay on disk). exact_max_keys: key rows up to which
    a top-k gate scores every key; beyond it an approximate index proposes candidates (megamem.index).
    train_group: memories add_many trains together in one batched forward, each with its own adapter (2 was
    the fastest on a 2-core CPU: 5.0-5.1 s a memory vs 6.1-6.9 s one at a time; docs/performance.md, injection).
    The object stays current: before it routes or lists it picks up other processes' adds and forgets.
    """

    kind = MEGA
    capabilities = frozenset(CAPABILITIES)  # every one (megamem.backend)
    modes = MODES
    default_mode = DEFAULT_MODE

    def __new__(cls, store: str | Path | None = None, *args, backend: str | None = None, **kw):
        """Memory(path, backend="memoryllm") (or a path holding such a store) is a MemoryLLM store instead."""
        if backend not in (None, *KINDS):
            raise MegamemError(f"unknown backend {backend!r}; choose one of {', '.join(KINDS)}")
        path = Path(store) if store is not None else default_store_path()
        if cls is Memory and (backend == MEMORYLLM or (backend is None and is_pool_store(path))):
            return PoolMemory(path, *args, **kw)
        if backend == MEGA and is_pool_store(path):
            raise MegamemError(f"{path} is a MemoryLLM store, not a MEGa one")
        return super().__new__(cls)

    def __init__(
        self,
        store: str | Path | None = None,
        model: str | None = None,
        key_function: str | None = None,
        lora: LoraSpec | None = None,
        recipe: Recipe | None = None,
        gate: GateConfig | None = None,
        adapter_cache: int = 16,
        exact_max_keys: int = EXACT_MAX_KEYS,
        train_group: int = 2,
        strict: bool = False,
        create: bool = True,
        backend: str | None = None,
        adapter_dtype: str | None = None,
    ) -> None:
        if adapter_dtype is not None and adapter_dtype not in ADAPTER_DTYPES:
            raise MegamemError(f"unknown adapter dtype {adapter_dtype!r}; choose one of {', '.join(ADAPTER_DTYPES)}")
        if key_function is not None and key_function not in KEY_FUNCTIONS:
            raise MegamemError(f"unknown key function {key_function!r}; choose one of {', '.join(KEY_FUNCTIONS)}")
        check_count(train_group, "train_group")
        check_count(adapter_cache, "adapter_cache", minimum=0)
        self.path = Path(store) if store is not None else default_store_path()
        self.strict = strict
        self.recipe = recipe or Recipe()
        self.train_group = train_group
        self.warnings: list[str] = []  # damaged memories skipped and entries left alone, newest last
        self._given = {
            "base_model": model,
            "key_function": key_function,
            "lora": lora.to_dict() if lora else None,
            "adapter_dtype": adapter_dtype,
        }
        self._given_gate = gate
        self._model = None
        self._tok = None
        self._adapters = AdapterCache(adapter_cache)
        self._exact_max_keys = exact_max_keys
        self.routing = Routing(None, exact_max_keys, self._damaged_found)  # the gate's derived state (routing.py)
        self._cortexes = CortexCache(self.path)
        self.store: Store | None = None
        if Store.exists(self.path):
            self._open()
        elif not create:
            raise MegamemError(f"no megamem store at {self.path}")
        else:  # a new store: its settings now, its files only once the first memory's model has loaded
            Store.check_new_path(self.path)  # now, before the model loads for the first add
            kf = key_function or DEFAULT_KEY_FUNCTION
            self._settings = {
                "base_model": model or DEFAULT_MODEL,
                "key_function": kf,
                "lora": (lora or LoraSpec()).to_dict(),
                "gate": default_gate(kf).to_dict(),
                "adapter_dtype": adapter_dtype or ADAPTER_DTYPE,
            }
        self._apply_settings()

    def _apply_settings(self) -> None:
        """The model, key function, LoRA spec and gate this object uses: the store's (or a new store's)."""
        s = self._settings
        if self._model is not None and (
            s["base_model"] != self.model_name or LoraSpec.from_dict(s["lora"]) != self.lora
        ):
            self._model = self._tok = None  # another process made the store with another model or adapter shape
        self.model_name: str = s["base_model"]
        self.key_function: str = s["key_function"]
        self.lora = LoraSpec.from_dict(s["lora"])
        self.gate = self._given_gate or GateConfig(**s["gate"])

    def _open(self) -> None:
        self.store = Store(self.path, self._given)
        self._settings = self.store.settings()
        self.routing = Routing(self.store, self._exact_max_keys, self._damaged_found)
        if hasattr(self, "model_name"):  # opened after construction: a store another process created
            self._apply_settings()
        self._report_unknown()

    def _report_unknown(self) -> None:
        """Warn about entries in memories/ and tmp/ that megamem did not write (it leaves them alone)."""
        for entry in self.store.foreign_entries():
            self._warn(f"{entry} is not megamem's: left alone (`megamem verify` lists such entries)")

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def _sync(self) -> None:
        """Pick up what other processes committed (a store created, memories added or forgotten) since last look."""
        if self.store is None:
            if Store.exists(self.path):
                self._open()
            return
        self.routing.sync()

    # -- model ---------------------------------------------------------------------------------
    def load(self) -> tuple:
        """The base model and tokenizer, loaded on first use with gated layers for the store's spec."""
        if self._model is None:
            self._model, self._tok = load_model(self.model_name)
            inject_for(self._model, self.lora)
        return self._model, self._tok

    # -- writing -------------------------------------------------------------------------------
    def add(
        self,
        text: str,
        paraphrases: Iterable[str] = (),
        metadata: dict | None = None,
        id: str | None = None,
        on_step: OnStep = None,
        replaces: str | list[str] | None = None,
    ) -> Record:
        """Learn one memory (the text plus any paraphrases) into a new adapter and store it. replaces: the id(s)
        of older memories it corrects; the gate then prefers it (see Item)."""
        paras = [] if paraphrases is None else paraphrases
        paras = list(paras) if isinstance(paras, (list, tuple)) else paras  # anything else: refused by check
        meta = {} if metadata is None else metadata
        olds = [] if replaces is None else [replaces] if isinstance(replaces, str) else replaces
        return self.add_many([Item(text, paras, meta, id, replaces=olds)], on_step=on_step)[0]

    def check(self, items: list[Item]) -> tuple[list[Item], list[str]]:
        """Check every item without loading anything: cleaned copies of the good ones, and one message a bad one
        (naming it). Ids must be unique in the batch and new to the store (megamem.admission)."""
        self._sync()
        return check_items(items, self.store)

    def validate(self, items: list[Item], keep_going: bool = False) -> list[Item]:
        """Cleaned copies of `items`, or an error naming the first bad one (nothing is stored). keep_going: the
        good ones only (the bad ones' messages go to `warnings`). Loads the model to check each text fits."""
        good, bad = self.check(items)
        if bad and not keep_going:
            raise first_of(bad)
        for message in bad:
            self._warn(f"skipped {message}")
        if not good:
            raise MegamemError("no memories to add" if not bad else "no memory left to add")
        model, tok = self.load()
        fitting, unfit = fitting_items(good, model, tok, keep_going)
        for message in unfit:
            self._warn(f"skipped {message}")
        if not fitting:
            raise MegamemError("no memory left to add")
        return fitting

    def prepare_store(self) -> Store:
        """The store, created now if it does not exist yet (its model has loaded by then), ready for writing."""
        if self.store is None:
            self.load()  # a store is only created for a model that loads
            self.store = Store(self.path, self._settings)
            self.routing = Routing(self.store, self._exact_max_keys, self._damaged_found)
        self.store.writable()
        for note in self.store.notices:
            self._warn(note)
        settled = intents.settle(self.store)  # what a killed merge, split or consolidation left: finished or undone
        for line in settled:
            self._warn(line)
        if settled:
            self.routing.invalidate()
        return self.store

    def add_many(
        self,
        items: list[Item],
        on_step: OnStep = None,
        on_memory: OnMemory = None,
        on_stored: OnStored = None,
        keep_going: bool = False,
    ) -> list[Record]:
        """Validate every item first (nothing is stored if one is bad, unless keep_going), then learn them
        `train_group` at a time and commit each as soon as its group is learned (a crash keeps those already
        committed; `on_stored` hears of each). On a Ray cluster: megamem.ops.distributed.add_many_ray."""
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, Item) for i in items):
            raise MegamemError("add_many takes a list of Item")
        checked = self.validate(items, keep_going)
        self.prepare_store()
        return self.learn(checked, on_step=on_step, on_memory=on_memory, on_stored=on_stored)

    def learn(
        self,
        items: list[Item],
        note_updates: bool = True,
        key_texts: list[list[str]] | None = None,
        group: int | None = None,
        recipe: Recipe | None = None,
        **progress: Unpack[Progress],
    ) -> list[Record]:
        """Learn items that passed `validate` (or an operation's own checks) into the prepared store, `train_group`
        at a time, committing each as soon as its group is learned: the one path every memory takes in
        (megamem.learn). key_texts: each item's key texts, where they are more than its own (a merged memory).
        note_updates: warn of stored memories an item may update (see commit). group: memories trained together
        (default train_group; 1 learns each exactly as a single add does). recipe: the store's unless given (a
        merged memory's floor of example tokens is its members')."""
        on_step, on_memory, on_stored = (progress.get(k) for k in ("on_step", "on_memory", "on_stored"))
        model, tok = self.load()
        size = group or self.train_group
        records = []
        for start in range(0, len(items), size):
            batch = items[start : start + size]
            if on_memory is not None:
                on_memory(start, len(items))
            texts = [[item.text, *item.paraphrases] for item in batch]
            keyed = key_texts[start : start + size] if key_texts is not None else None
            learned = learn(model, tok, texts, self.lora, recipe or self.recipe, self.key_function, on_step, keyed)
            for item, one in zip(batch, learned, strict=True):
                records.append(self.commit(item, one.adapter, one.keys, note_updates))
                if on_stored is not None:
                    on_stored(records[-1])
        return records

    def commit(self, item: Item, adapter: Adapter, keys: torch.Tensor, note_updates: bool = True) -> Record:
        """Store one learned memory (an item add_many or a cluster worker trained) and route to it from now on.
        The item must have passed `validate` and the store be prepared (`prepare_store`). note_updates: warn of
        stored memories it may update (megamem.updates), unless it names what it replaces."""
        meta = {**item.metadata, PARAPHRASES: item.paraphrases} if item.paraphrases else dict(item.metadata)
        meta.update(reserved_metadata(item.reserved))
        if item.replaces:
            meta[REPLACES] = list(item.replaces)
        elif note_updates:
            self._note_likely_updates(item, keys)
        record = self.store.add(item.text, adapter, keys, meta, item.id)
        self.routing.add(record, keys)
        return record

    def likely_updates(self, text: str, keys: torch.Tensor | None = None) -> list[tuple[str, float]]:
        """Stored memories that `text` probably updates (close keys and the same names: megamem.updates), with
        their best key cosine, closest first. keys: the text's keys, if already computed."""
        text = check_text(text)
        ids = self.routing.table().ids
        if not ids:
            return []
        if keys is None:
            keys = self.keys_of([text])
        index = self.routing.index("cosine")
        best = torch.stack([index.exact_scores(k) for k in keys]).max(dim=0).values  # (n,) over the text's keys
        order = torch.argsort(best, descending=True)[:8].tolist()
        out = []
        for i in order:
            if likely_update(float(best[i]), text, self.store.get(ids[i]).text):
                out.append((ids[i], float(best[i])))
        return out

    def _note_likely_updates(self, item: Item, keys: torch.Tensor) -> None:
        for old, cos in self.likely_updates(item.text, keys):
            self._warn(
                f"{item.id or 'the new memory'} may update memory {old!r} (key cosine {cos:.2f}, the same names); "
                f"add it with replaces={old!r} (--replaces {old}) for the newer one to win"
            )

    def owned_by(self, namespace: str) -> frozenset[str]:
        """The ids of a namespace's memories (megamem.schema.owns)."""
        check_namespace(namespace)
        return frozenset(r.id for r in self.list() if owns(namespace, r))

    def forget(self, memory_id: str) -> Record:
        """Remove a memory for good (a consolidated one leaves its cortex's record too: its text is gone; what the
        cortex's weights learned from it stays until the cortex is retrained)."""
        check_id(memory_id)
        self._sync()
        if self.store is None:
            raise MegamemError(f"no memory with id {memory_id!r} in {self.path}")
        store = self.prepare_store()
        found = store.get(memory_id, missing_ok=True)
        if found is not None and is_consolidated(found):  # first out of the record, so its text never outlives it
            held = cortex_files.held_ids(self.path)
            if memory_id in held:
                cortex_files.withdraw(self.path, memory_id, held[memory_id])
        rec = store.forget(memory_id)
        for note in store.notices:
            self._warn(note)
        self.routing.invalidate()
        self.routing.version = store.data_version()
        return rec

    # -- reading -------------------------------------------------------------------------------
    def list(self) -> list[Record]:
        self._sync()
        records = self.store.records() if self.store is not None else []
        for r in records:
            if "\ufffd" in r.text:  # refused on input, so only a damaged manifest row shows it
                self._warn(
                    f"memory {r.id!r}: its text in the manifest holds bytes that are not UTF-8 (a damaged row); "
                    "`megamem repair` restores it from its memory.json"
                )
        return records

    def show(self, memory_id: str) -> Record:
        check_id(memory_id)
        self._sync()
        if self.store is None:
            raise MegamemError(f"no memory with id {memory_id!r} in {self.path}")
        return self.store.get(memory_id)

    def info(self) -> dict:
        self._sync()
        recs = self.store.records() if self.store is not None else []
        return {
            "store": str(self.path),
            "memories": len(recs),
            "bytes": self.store.size_bytes() if self.store is not None else 0,
            "consolidated": sum(len(self.consolidated(ns)) for ns in cortex_namespaces(self.path)),
            **(self.store.settings() if self.store is not None else self._settings),
        }

    def export(self, memory_id: str, out: str | Path, dtype: str = "float32") -> Path:
        """Write one memory's adapter to `out` (a new or empty folder) as a plain PEFT adapter in a float dtype,
        whatever the store keeps (int8 included): `peft.PeftModel.from_pretrained(base, out)` loads it."""
        if dtype not in ("float32", "bfloat16", "float16"):
            raise MegamemError(f"export dtype must be float32, bfloat16 or float16, got {dtype!r}")
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise MegamemError(f"{out} exists and is not an empty folder")
        rec = self.show(memory_id)
        try:
            adapter = self.store.adapter(rec)
        except MemoryDamaged as exc:
            raise MegamemError(f"{exc}; `megamem repair` mends the store") from None
        save_adapter(adapter, out, self.model_name, getattr(torch, dtype))
        return out

    def cortex(self, namespace: str = DEFAULT_NAMESPACE) -> Adapter | None:
        """A namespace's consolidated adapter (megamem.ops.consolidate), mixed into its every answer at weight 1;
        None when nothing was consolidated. Re-read when another process replaces it."""
        return self._cortexes.get(namespace)[0]

    def consolidated(self, namespace: str = DEFAULT_NAMESPACE) -> list[Consolidated]:
        """The memories a namespace's cortex holds, oldest first: by default still stored (text and keys; the
        gate routes to them and the cortex answers for them), or forgotten from the gate (`forget=True`)."""
        return self._cortexes.get(namespace)[1]

    def retire(self, memory_id: str) -> Record:
        """Retire a memory's adapter into its namespace's cortex (megamem.ops.consolidate does, once the cortex
        holds it): it keeps its row, text and keys; the gate routes to it and the cortex answers for it."""
        store = self.prepare_store()
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rec = store.get(check_id(memory_id))
        rec = store.retire_adapter(memory_id, {CONSOLIDATED: rec.metadata.get(CONSOLIDATED, stamp)})
        self.routing.invalidate()
        self.routing.version = store.data_version()
        return rec

    def adapter(self, memory_id: str) -> Adapter:
        """A memory's adapter, from a small LRU cache or from disk (checksum-verified; MemoryDamaged if not)."""
        return self._adapters.get(self.store, memory_id)

    def _damaged_found(self, exc: MemoryDamaged) -> None:
        """A damaged memory is left out of every gate from now on (routing.mark_damaged), with a warning; or an
        error when strict."""
        if self.strict:
            raise MegamemError(f"{exc} (strict mode; `megamem verify` lists every problem)")
        self._warn(f"{exc}; skipped (`megamem verify` and `megamem repair` mend the store)")

    def _key_model(self) -> tuple:
        """What the key function runs on: the model and tokenizer for activation keys, else (None, None) (the
        sentence embedder needs no base model loaded)."""
        return self.load() if self.key_function == "activation" else (None, None)

    def keys_of(self, texts: list[str]) -> torch.Tensor:
        """(n, d) keys of texts by the store's key function, as a question or a memory is keyed."""
        return compute_keys(self.key_function, texts, *self._key_model())

    def keys(self) -> KeyTable:
        """Every stored memory's keys, current with the store (routing.KeyTable: ids, keys, owners)."""
        self._sync()
        return self.routing.table()

    def superseded(self) -> set[str]:
        """The stored memories a stored newer one replaces (the gate leaves them out), current with the store."""
        self._sync()
        return set(self.routing.superseded)

    def key_index(self, similarity: str) -> KeyIndex:
        """The gate's scorer for a similarity over every stored key (routing.Routing.index)."""
        return self.routing.index(similarity)

    def null_score(self, gate: GateConfig | None = None, only: frozenset[str] | None = None) -> float | None:
        """The null memory's score for this store and gate (megamem.calibration), None when the gate has no null
        memory or no memory is in scope. only: calibrate on those memories' keys alone (a namespace's)."""
        cfg = gate or self.gate

        def calibration() -> torch.Tensor:
            return calibration_keys(self.key_function, self.model_name, *self._key_model())

        return self.routing.null_score(cfg, only, calibration)

    def scored(
        self, question: str, gate: GateConfig | None = None, only: frozenset[str] | None = None
    ) -> list[tuple[str, float, float]]:
        """The gate for a question with each memory's score: (memory id, score, weight) for every memory with
        weight > 0, heaviest first. only: the memories that may take part (a namespace, a user's, chosen ids);
        the others are never scored into the softmax, so they can never weigh in."""
        question = check_text(question, "question")
        self._sync()
        ids = self.routing.table().ids
        if not ids:
            return []
        scores = self.scores(question, gate, only)
        cfg = gate or self.gate
        w = gate_weights(scores, cfg, self.null_score(cfg, only))
        order = torch.argsort(w, descending=True)
        return [(ids[i], float(scores[i]), float(w[i])) for i in order.tolist() if w[i] > 0]

    def scores(self, question: str, gate: GateConfig | None = None, only: frozenset[str] | None = None) -> torch.Tensor:
        """(n,) every stored memory's score for a question (-inf: takes no part: superseded, damaged, outside
        `only`, or not among the index's candidates in a large store; routing.Routing.scores)."""
        cfg = gate or self.gate
        q = self.keys_of([question])[0]
        return self.routing.scores(q, question, cfg, only, lambda: self.null_score(cfg, only))

    def search(self, query: str, only: frozenset[str] | None = None, limit: int = 10) -> list[tuple[str, float]]:
        """The memories closest to a query by the gate's score (no softmax, no null memory), best first: (memory
        id, score) for up to `limit` of them. only: the memories to rank (a namespace's)."""
        query = check_text(query, "query")
        self._sync()
        ids = self.routing.table().ids
        if not ids:
            return []
        scores = self.scores(query, replace(self.gate, top_k=None), only)
        order = torch.argsort(scores, descending=True)[:limit]
        return [(ids[i], float(scores[i])) for i in order.tolist() if scores[i] > float("-inf")]

    def route(
        self, question: str, gate: GateConfig | None = None, only: frozenset[str] | None = None
    ) -> list[tuple[str, float]]:
        """The gate for a question: (memory id, weight) for every memory with weight > 0, heaviest first; the
        weights sum to 1 less the null memory's share (the base model's). [] is the base model alone.
        Memories found damaged are left out (their weight goes to the others)."""
        return [(i, w) for i, _, w in self.scored(question, gate, only)]

    def ask(
        self,
        question: str,
        mode: str = DEFAULT_MODE,
        gate: GateConfig | None = None,
        max_new_tokens: int | None = None,
        use_memory: bool = True,
        namespace: str | None = None,
    ) -> Answer:
        """Answer a question with the gated mixture of memories (use_memory=False: the base model alone).
        namespace: answer from that namespace's memories and cortex only (None: every memory, and the default
        namespace's cortex).

        The default mode, mega+rag, answers with the gated adapters and the heaviest memory's text in context; it
        answered 0.653 of 300 questions of wiki partitions nobody tuned on, against 0.557 for plain RAG and 0.510
        for the paper's qa mode (docs/results.md). A question that reaches no memory is asked in the mode's own
        prompt with no gated adapter (the namespace's cortex, if any, is still mixed).

        A routed memory whose adapter fails its checksum is skipped (a warning; an error when strict) and the
        gate is taken again without it, so one damaged memory never breaks questions about the others."""
        question = check_text(question, "question")
        check_mode(mode)
        if max_new_tokens is not None:
            check_count(max_new_tokens, "max new tokens")
        only = None if namespace is None else self.owned_by(namespace)
        g = self.gated(question, mode, gate, only, namespace or DEFAULT_NAMESPACE, use_memory)
        model, tok = self.load()
        reply = run(plan(question, mode, g.mixture, g.passages, max_new_tokens), lambda s: decode(model, tok, s))
        routed = [(i, w) for i, _, w in g.routed]
        return Answer(question, mode, reply.text, routed, reply.recall)

    def gated(
        self,
        question: str,
        mode: str = DEFAULT_MODE,
        gate: GateConfig | None = None,
        only: frozenset[str] | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        use_memory: bool = True,
        min_weight: float = MIN_WEIGHT,
    ) -> Gated:
        """What the answer pipeline needs for one question in `mode` (megamem.answer): the gate, the mixture (the
        namespace's cortex at weight 1 and the gated adapters) and the context. only: the memories that may take
        part (a namespace's, a user's); use_memory=False: nothing at all, the base model alone.

        A routed memory whose adapter fails its checksum is skipped (a warning; an error when strict) and the
        gate is taken again without it, so one damaged memory never breaks questions about the others."""
        check_mode(mode)
        while True:
            routed = self.scored(question, gate, only) if use_memory and (only is None or only) else []
            retired = self.routing.consolidated
            own = [(i, w) for i, _, w in routed if i not in retired]
            try:
                adapters = [self.adapter(i) for i, _ in own]
                break
            except MemoryDamaged as exc:
                self.routing.mark_damaged(exc)
        weights = [w for _, w in own]
        cortex = self.cortex(namespace) if use_memory else None
        always = []
        if cortex is not None and self._cortex_always_on(namespace, retired):
            always = [cortex]  # it holds memories the gate can no longer route to: in every answer, at weight 1
        elif cortex is not None:  # it stands in for the consolidated memories the gate routed to, at their weight
            adapters.append(cortex)
            mine = [w for i, _, w in routed if i in retired and owns(namespace, self.store.get(i))]
            weights.append(min(1.0, sum(mine)))
        mix = mixture(mode, adapters, weights, always, min_weight)
        texts = [self.store.get(i).text for i, _, _ in routed[:1]]
        return Gated(routed, mix, context(mode, texts))

    def _cortex_always_on(self, namespace: str, retired: frozenset[str]) -> bool:
        """Whether a namespace's cortex must be in every answer: it holds a memory that is not a consolidated
        memory the gate can route to (forgotten from the gate by `consolidate --forget`, or still kept with its
        own adapter by `--keep-adapters`)."""
        return any(m.id not in retired for m in self.consolidated(namespace))


def default_gate(key_function: str) -> GateConfig:
    """The store's default gate for its key function (docs/tuning.md): the paper's beta=1 dot product
    for activation keys, a sharper softmax over cosines and the null memory for the sentence embedder."""
    if key_function == "activation":
        # no null memory: on the default model these keys do not separate questions about a memory from others,
        # and at null_rate 0.01 95% of the wiki questions lost their memory (docs/tuning.md, "No memory")
        return GateConfig(similarity="dot", beta=1.0, top_k=None, null_rate=None)
    return GateConfig()


def with_overrides(cfg: GateConfig, **changes) -> GateConfig:
    """A copy of a gate config with the given non-None fields replaced."""
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})
