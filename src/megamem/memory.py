"""The Python API: `Memory(store).add(text)`, `.ask(question, mode=...)`, `.list()`, `.forget(id)`.

Memory ties the parts together in the one direction data flows: text -> keys + adapter -> store
-> gate -> generation. The base model is loaded only when a call needs it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .adapters import Adapter, LoraSpec
from .errors import MegamemError
from .gate import GateConfig, gate_weights
from .generate import answer
from .index import EXACT_MAX_KEYS, KeyIndex
from .inject import inject_for
from .keys import DEFAULT_KEY_FUNCTION, KEY_FUNCTIONS, compute_keys
from .model import DEFAULT_MODEL, load_model
from .store import Record, Store, default_store_path
from .train import Recipe, check_fits, train_adapter, train_adapters_batched

# Adapters are stored in bfloat16: half the bytes of float32 with recall and QA unchanged at every rank
# measured (docs/performance.md, storage); they are computed in float32 once loaded.
ADAPTER_DTYPE = "bfloat16"


@dataclass
class Answer:
    """What `ask` returns: the answer text, the gate (memory id -> weight, heaviest first), and for
    recall/irag the reconstruction."""

    question: str
    mode: str
    text: str
    gate: list[tuple[str, float]] = field(default_factory=list)
    recall: str | None = None

    def to_dict(self) -> dict:
        return {
            "question": self.question,
            "mode": self.mode,
            "answer": self.text,
            "gate": [{"id": i, "weight": w} for i, w in self.gate],
            "recall": self.recall,
        }


@dataclass
class Item:
    """One memory to add: its text, optional paraphrases (extra training texts and keys), metadata, id."""

    text: str
    paraphrases: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    id: str | None = None


def clean_text(text: object, what: str = "text") -> str:
    """Strip a text, refusing anything that is not a non-empty string."""
    if not isinstance(text, str):
        raise MegamemError(f"{what} must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise MegamemError(f"{what} is empty")
    return text


class Memory:
    """A language model with memories stored in gated LoRA adapters.

    store: folder of the store (default: the user data dir). model / key_function / lora: used when
    the store is created; for an existing store, any given value must match the stored one.
    adapter_cache: adapters kept in RAM (LRU; the rest stay on disk). exact_max_keys: key rows up to which
    a top-k gate scores every key; beyond it an approximate index proposes candidates (megamem.index).
    train_group: memories add_many trains together in one batched forward, each with its own adapter (2 was
    the fastest on a 2-core CPU: 5.0-5.1 s a memory vs 6.1-6.9 s one at a time; docs/performance.md, injection).
    """

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
    ) -> None:
        if key_function is not None and key_function not in KEY_FUNCTIONS:
            raise MegamemError(f"unknown key function {key_function!r}; choose one of {', '.join(KEY_FUNCTIONS)}")
        path = Path(store) if store is not None else default_store_path()
        new = not (path / "manifest.sqlite").is_file()
        kf = key_function or DEFAULT_KEY_FUNCTION
        settings = (
            {
                "base_model": model or DEFAULT_MODEL,
                "key_function": kf,
                "lora": (lora or LoraSpec()).to_dict(),
                "gate": (gate or default_gate(kf)).to_dict(),
                "adapter_dtype": ADAPTER_DTYPE,
            }
            if new
            else {"base_model": model, "key_function": key_function}
        )
        self.store = Store(path, settings)
        s = self.store.settings()
        self.model_name: str = s["base_model"]
        self.key_function: str = s["key_function"]
        self.lora = lora or LoraSpec.from_dict(s["lora"])
        self.gate = gate or GateConfig(**s["gate"])
        self.recipe = recipe or Recipe()
        self._model = None
        self._tok = None
        self._adapters: OrderedDict[str, Adapter] = OrderedDict()
        self._adapter_cache = adapter_cache
        self._keys: tuple[list[str], torch.Tensor, torch.Tensor] | None = None
        self._exact_max_keys = exact_max_keys
        if train_group < 1:
            raise MegamemError(f"train_group must be at least 1, got {train_group}")
        self.train_group = train_group
        self._indexes: dict[str, KeyIndex] = {}  # by similarity; kept in step with _keys

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
        on_step: Callable[[int, int, float], None] | None = None,
    ) -> Record:
        """Learn one memory (the text plus any paraphrases) into a new adapter and store it."""
        return self.add_many([Item(text, list(paraphrases), metadata or {}, id)], on_step=on_step)[0]

    def validate(self, items: list[Item]) -> list[Item]:
        """Cleaned copies of `items`, or an error naming the first bad one (nothing is stored)."""
        cleaned = []
        for n, item in enumerate(items, 1):
            where = f"memory {n}" if len(items) > 1 else "memory"
            text = clean_text(item.text, f"{where} text")
            paras = [clean_text(p, f"{where} paraphrase") for p in item.paraphrases]
            if item.id is not None and self.store.get(item.id, missing_ok=True) is not None:
                raise MegamemError(f"a memory with id {item.id!r} already exists")
            cleaned.append(Item(text, paras, dict(item.metadata), item.id))
        if not cleaned:
            raise MegamemError("no memories to add")
        model, tok = self.load()
        for item in cleaned:
            for t in [item.text, *item.paraphrases]:
                check_fits(tok, model, t)
        return cleaned

    def add_many(
        self,
        items: list[Item],
        on_step: Callable[[int, int, float], None] | None = None,
        on_memory: Callable[[int, int], None] | None = None,
    ) -> list[Record]:
        """Validate every item first (nothing is stored if one is bad), then learn them `train_group` at a time and
        store each as soon as its group is learned."""
        checked = self.validate(items)
        model, tok = self.load()
        records = []
        for start in range(0, len(checked), self.train_group):
            group = checked[start : start + self.train_group]
            if on_memory is not None:
                on_memory(start, len(checked))
            texts = [[item.text, *item.paraphrases] for item in group]
            if len(group) == 1:
                adapters = [train_adapter(model, tok, texts[0], self.lora, self.recipe, on_step)]
            else:
                adapters = train_adapters_batched(model, tok, texts, self.lora, self.recipe, on_step)
            for item, item_texts, adapter in zip(group, texts, adapters, strict=True):
                keys = compute_keys(self.key_function, item_texts, model, tok)
                meta = {**item.metadata, "paraphrases": item.paraphrases} if item.paraphrases else item.metadata
                records.append(self.store.add(item.text, adapter, keys, meta, item.id))
                self._append_keys(records[-1].id, keys)
        return records

    def forget(self, memory_id: str) -> Record:
        """Remove a memory for good."""
        rec = self.store.forget(memory_id)
        self._adapters.pop(memory_id, None)
        self._keys = None
        self._indexes = {}
        return rec

    # -- reading -------------------------------------------------------------------------------
    def list(self) -> list[Record]:
        return self.store.records()

    def show(self, memory_id: str) -> Record:
        return self.store.get(memory_id)

    def info(self) -> dict:
        recs = self.store.records()
        return {
            "store": str(self.store.path),
            "memories": len(recs),
            "bytes": self.store.size_bytes(),
            **self.store.settings(),
        }

    def adapter(self, memory_id: str) -> Adapter:
        """A memory's adapter, from a small LRU cache or from disk (checksum-verified)."""
        if memory_id in self._adapters:
            self._adapters.move_to_end(memory_id)
            return self._adapters[memory_id]
        adapter = self.store.adapter(self.store.get(memory_id))
        self._adapters[memory_id] = adapter
        while len(self._adapters) > self._adapter_cache:
            self._adapters.popitem(last=False)
        return adapter

    def _all_keys(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        if self._keys is None:
            recs = self.store.records()
            ids, keys, owners = [r.id for r in recs], [], []
            for i, r in enumerate(recs):
                k = self.store.keys(r)
                keys.append(k)
                owners.append(torch.full((k.shape[0],), i))
            self._keys = (
                ids,
                torch.cat(keys) if keys else torch.zeros(0, 1),
                torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long),
            )
        return self._keys

    def _append_keys(self, memory_id: str, keys: torch.Tensor) -> None:
        """Extend the cached key matrix (and any built index) with a new memory instead of re-reading the store."""
        if self._keys is None:
            return
        ids, all_keys, owners = self._keys
        n = len(ids)
        k = keys.float()
        self._keys = (
            [*ids, memory_id],
            torch.cat([all_keys, k]) if n else k,
            torch.cat([owners, torch.full((k.shape[0],), n, dtype=owners.dtype)]),
        )
        for index in self._indexes.values():
            index.add(k, n)

    def key_index(self, similarity: str) -> KeyIndex:
        """The gate's scorer for a similarity over every stored key (cached; extended as memories are added)."""
        if similarity not in self._indexes:
            ids, keys, owners = self._all_keys()
            self._indexes[similarity] = KeyIndex(keys, owners, len(ids), similarity, self._exact_max_keys)
        return self._indexes[similarity]

    def route(self, question: str, gate: GateConfig | None = None) -> list[tuple[str, float]]:
        """The gate for a question: (memory id, weight) for every memory with weight > 0, heaviest first."""
        question = clean_text(question, "question")
        ids = self._all_keys()[0]
        if not ids:
            return []
        model, tok = self.load() if self.key_function == "activation" else (None, None)
        q = compute_keys(self.key_function, [question], model, tok)[0]
        cfg = gate or self.gate
        w = gate_weights(self.key_index(cfg.similarity).scores(q, cfg.top_k), cfg)
        order = torch.argsort(w, descending=True)
        return [(ids[i], float(w[i])) for i in order.tolist() if w[i] > 0]

    def ask(
        self,
        question: str,
        mode: str = "qa",
        gate: GateConfig | None = None,
        max_new_tokens: int | None = None,
        use_memory: bool = True,
    ) -> Answer:
        """Answer a question with the gated mixture of memories (use_memory=False: the base model alone)."""
        question = clean_text(question, "question")
        routed = self.route(question, gate) if use_memory else []
        model, tok = self.load()
        adapters = [self.adapter(i) for i, _ in routed]
        text, recall = answer(model, tok, question, mode, adapters, [w for _, w in routed], max_new_tokens)
        return Answer(question, mode, text, routed, recall)


def default_gate(key_function: str) -> GateConfig:
    """The store's default gate for its key function (docs/tuning.md): the paper's beta=1 dot product
    for activation keys, a sharper softmax over cosines for the sentence embedder."""
    if key_function == "activation":
        return GateConfig(similarity="dot", beta=1.0, top_k=None)
    return GateConfig()


def with_overrides(cfg: GateConfig, **changes) -> GateConfig:
    """A copy of a gate config with the given non-None fields replaced."""
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})
