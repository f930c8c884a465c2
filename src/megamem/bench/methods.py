"""The bench's methods: how each one learns a memory and how it answers after learning some.

`Method` is the whole interface the run loop and the test use: learning (start, learn / learn_all, save,
load) and answering (conversations, generate, gold_logprobs, letter_logits, kl_sums, top1), so a new method
is one subclass registered in METHODS. Every method shares one loaded model. Methods that change the base
weights (full fine-tuning, merged LoRA) restore a kept copy of the base weights first; gated methods (mega,
irag) keep frozen adapters and never touch the base. All of them train on the same examples (make_example /
batches of the passage and its paraphrases) with the same chat prompt.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import Adapter, LoraSpec, load_adapter, new_adapter, save_adapter
from ..errors import MegamemError
from ..gate import GateConfig, gate_weights
from ..index import KeyIndex
from ..inject import clear, gated_layers
from ..train import Recipe, collate, fit, lm_loss, make_example, target_layers, train_adapter
from . import general
from .infer import Turns, answer_logprobs, generate, last_logits, token_logprobs
from .prompts import conversation
from .protocol import PROTOCOL_RECIPE
from .spec import MethodSpec

# Learning rates per family, each the best of a sweep on the default model (docs/bench.md, "Learning rates"):
# mega: the protocol's (docs/tuning.md); sequential merged LoRA (lora, lora-l2): 1e-4 of 3e-5 / 1e-4 / 3e-4 /
# 1e-3 (mega's 1e-3 overwrites earlier memories); full fine-tuning: 1e-5 of 3e-6 / 1e-5 / 3e-5.
DEFAULT_LR = {"mega": PROTOCOL_RECIPE.lr, "lora": 1e-4, "full": 1e-5}
OnStep = Callable[[int, int, float], None] | None


@dataclass
class Shared:
    """What every method of a run shares: the model, a copy of its base weights, the adapter spec, the batch."""

    model: PreTrainedModel
    tok: PreTrainedTokenizerBase
    spec: LoraSpec
    recipe: Recipe
    base_state: dict[str, torch.Tensor] = field(default_factory=dict)
    adapters: dict[float, dict[int, Adapter]] = field(default_factory=dict)  # lr -> memory -> MEGa adapter
    caches: dict[str, dict] = field(default_factory=dict)  # outputs of a frozen model (reuse), by model
    batch_size: int = 16  # prompts per batched call

    def restore(self) -> None:
        """Put the base weights back (after a method that changed them) and switch every adapter off."""
        clear(self.model)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self.base_state[name])


def keep_base(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """A copy of every parameter, by name: restored instead of reloading the model."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def fisher_diagonal(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: list[str], names: list[str]
) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of the named parameters: the mean over `texts` of squared per-text gradients."""
    params = dict(model.named_parameters())
    out = {n: torch.zeros_like(params[n]) for n in names}
    for n in names:
        params[n].requires_grad_(True)
    try:
        for t in texts:
            model.zero_grad(set_to_none=True)
            loss = lm_loss(model, collate([make_example(tok, t)], tok.pad_token_id))
            loss.backward()
            for n in names:
                if params[n].grad is not None:
                    out[n] += params[n].grad.detach() ** 2 / len(texts)
    finally:
        for n in names:
            params[n].requires_grad_(False)
            params[n].grad = None
    return out


def merge(model: PreTrainedModel, adapter: Adapter) -> None:
    """Add an adapter's scaled B·A into the base weights of the layers it covers (sequential LoRA)."""
    layers = gated_layers(model)
    with torch.no_grad():
        for name, (a, b) in adapter.weights.items():
            layers[name].base.weight += adapter.scaling * (b @ a)


# -- what a test asks of a method ------------------------------------------------------------------


@dataclass
class Seen:
    """What a test hands a method: the memories learned so far, the gate that routes queries over them, and how
    long a recall may be."""

    keys: list[torch.Tensor]  # per memory: the keys of its passage and paraphrases
    passages: list[str]
    gate: GateConfig
    recall_tokens: int  # a recall's token budget (irag's first turn)
    retrieve: int = 1  # passages a retrieving method (rag) puts in context
    null_score: float | None = None  # the gate's null memory (the product's gate: the general probes)


def gate_matrix(
    queries: torch.Tensor, keys: list[torch.Tensor], gate: GateConfig, null_score: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_queries, k) gate weights over the k memories' keys (with the null memory at `null_score`, if given),
    and the (n_queries, k) memory scores."""
    k = len(keys)
    all_keys = torch.cat(keys)
    owners = torch.cat([torch.full((len(x),), i) for i, x in enumerate(keys)])
    index = KeyIndex(all_keys, owners, k, gate.similarity)  # the product's scorer (Memory.route uses it too)
    scores = torch.stack([index.exact_scores(q) for q in queries])
    weights = torch.stack([gate_weights(s, gate, null_score) for s in scores])
    return weights, scores


def rows_of(weights: torch.Tensor | None, idx: list[int]) -> torch.Tensor | None:
    """The gate weights of the rows `idx` (None: no gate)."""
    return weights[idx] if weights is not None else None


def gate_signature(w: torch.Tensor | None) -> tuple | None:
    """A query's mixture: the memories with a nonzero weight and their weights (to 1e-6). Two steps where a
    query has the same signature run the same model on it (frozen adapters), so its output can be reused."""
    if w is None:
        return None
    return tuple((i, round(float(w[i]), 6)) for i in w.nonzero().flatten().tolist())


def reuse(
    cache: dict | None, kind: str, items: list, weights: torch.Tensor | None, compute: Callable[[list[int]], list]
) -> list:
    """compute(indices) -> one result per index, run only for the items (hashable) whose (kind, item, gate
    signature) is not in `cache` yet. cache None (a method whose weights change between steps): compute all.

    For base, rag (the base model) and mega, irag (frozen adapters, top-k gate) most of a step's prompts were
    already answered at an earlier step with the same mixture: the new memory's, and those whose top-k
    changed, are computed, so the step's cost does not grow with the memories seen (docs/bench.md)."""
    if cache is None:
        return compute(list(range(len(items))))
    keys = [(kind, item, gate_signature(weights[i] if weights is not None else None)) for i, item in enumerate(items)]
    todo = [i for i, key in enumerate(keys) if key not in cache]
    if todo:
        for i, value in zip(todo, compute(todo), strict=True):
            cache[keys[i]] = value
    return [cache[key] for key in keys]


# -- the methods -----------------------------------------------------------------------------------


class Method:
    """A method: how it learns memories and how it answers after learning the first k (`Seen`).

    The run loop calls start, load, learn (learn_all where batch_only) and save; the test calls conversations,
    generate, gold_logprobs, letter_logits, kl_sums and top1, each with the queries' keys. The answer calls run
    `shared.model` with `adapters` mixed in by `gate` (none by default: the model as learning left it); a
    method with a model of its own (a memory pool, say) overrides those four calls instead.
    """

    batch_only = False  # learns every memory at once and is tested after the last (full-batch)
    static = False  # never learns: the base model answers (base, rag)
    lr_key: str | None = None  # the family whose learning rate it takes when none is set for it (DEFAULT_LR)
    default_lam: float | None = None  # its penalty weight; None: it has none ('NAME@LAMBDA' is refused)
    in_all = True  # one of the paper's Table 1 methods, run by --methods all

    def __init__(self, name: str, shared: Shared, lr: float | None = None, lam: float | None = None) -> None:
        self.name = name
        self.shared = shared
        self.lr = lr
        self.lam = lam if lam is not None else self.default_lam
        self.cache: dict | None = None  # outputs reused across steps; set where the model's weights never change

    def recipe(self) -> Recipe:
        r = self.shared.recipe
        return replace(r, lr=self.lr) if self.lr is not None else r

    # -- learning

    def start(self) -> None:
        """Begin the method from the base model."""
        self.shared.restore()

    def learn(self, index: int, texts: list[str], on_step: OnStep = None) -> None:
        """Learn memory `index` from its training texts."""

    def learn_all(self, texts: list[list[str]], on_step: OnStep = None) -> None:
        """Learn every memory at once (only full-batch does anything here)."""

    def save(self, folder: Path, step: int) -> None:
        """Persist what the method has learned after `step` memories (written last: step.json)."""
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "step.json.tmp"
        tmp.write_text(json.dumps({"step": step}))
        tmp.replace(folder / "step.json")

    def load(self, folder: Path) -> int:
        """Restore the saved state; return the number of memories it holds (0: nothing saved)."""
        f = folder / "step.json"
        return int(json.loads(f.read_text())["step"]) if f.is_file() else 0

    # -- answering, after the memories in `seen`

    def adapters(self, k: int) -> list[Adapter]:
        """The adapters mixed into the model at answer time after k memories (none: the weights hold them)."""
        return []

    def gate(self, qkeys: torch.Tensor, seen: Seen) -> torch.Tensor | None:
        """(n_queries, k) weights on the seen memories' adapters, per query; None: no gate."""
        return None

    def top1(self, qkeys: torch.Tensor, seen: Seen) -> list[int] | None:
        """The memory each query is routed to (gate or retrieval); None: the method does not route."""
        return None

    def conversations(self, mode: str, questions: list[str], qkeys: torch.Tensor, seen: Seen) -> list[Turns]:
        """The conversations the method answers `questions` in ('recall' or 'qa'): the plain prompts."""
        return [conversation(mode, q) for q in questions]

    def generate(self, convs: list[Turns], qkeys: torch.Tensor, seen: Seen, max_new: int) -> list[str]:
        """Greedy answers to conversations ending in a user turn, each under its own query's gate."""
        s, adapters, w = self.shared, self.adapters(len(seen.keys)), self.gate(qkeys, seen)

        def run(idx: list[int]) -> list[str]:
            return generate(s.model, s.tok, [convs[i] for i in idx], max_new, adapters, rows_of(w, idx), s.batch_size)

        return reuse(self.cache, f"gen{max_new}", [tuple(c) for c in convs], w, run)

    def gold_logprobs(self, convs: list[Turns], golds: list[str], qkeys: torch.Tensor, seen: Seen) -> list[float]:
        """Teacher-forced log p(gold | conversation), summed over the gold answer's tokens."""
        s, adapters, w = self.shared, self.adapters(len(seen.keys)), self.gate(qkeys, seen)

        def run(idx: list[int]) -> list[float]:
            sub, gold = [convs[i] for i in idx], [golds[i] for i in idx]
            return answer_logprobs(s.model, s.tok, sub, gold, adapters, rows_of(w, idx), s.batch_size)

        return reuse(self.cache, "logprob", [(tuple(c), g) for c, g in zip(convs, golds, strict=True)], w, run)

    def letter_logits(self, seqs: list[list[int]], letters: list[int], qkeys: torch.Tensor, seen: Seen) -> torch.Tensor:
        """(n, len(letters)) next-token logits of the answer letters after each prompt (multiple choice)."""
        s, adapters, w = self.shared, self.adapters(len(seen.keys)), self.gate(qkeys, seen)

        def run(idx: list[int]) -> list[torch.Tensor]:
            sub = [seqs[i] for i in idx]
            return list(last_logits(s.model, s.tok, sub, adapters, rows_of(w, idx), s.batch_size)[:, letters])

        return torch.stack(reuse(self.cache, "letters", [tuple(x) for x in seqs], w, run))

    def kl_sums(
        self, seqs: list[list[int]], reference: general.Reference, qkeys: torch.Tensor, seen: Seen
    ) -> list[tuple[float, int]]:
        """Per text, KL(base || method) summed over its positions (general.kl_sum), and the number of positions."""
        s, adapters, w = self.shared, self.adapters(len(seen.keys)), self.gate(qkeys, seen)

        def run(idx: list[int]) -> list[tuple[float, int]]:
            sub, bs = [seqs[i] for i in idx], max(s.batch_size // 2, 1)
            logp = token_logprobs(s.model, sub, s.tok.pad_token_id, adapters, rows_of(w, idx), bs)
            return [general.kl_sum(reference, i, lp) for i, lp in zip(idx, logp, strict=True)]

        return reuse(self.cache, "kl", [tuple(x) for x in seqs], w, run)


def memory_scores(qkeys: torch.Tensor, seen: Seen) -> torch.Tensor:
    """(n_queries, k) scores of each query against the seen memories' keys (max over a memory's keys)."""
    return gate_matrix(qkeys, seen.keys, seen.gate)[1]


class Base(Method):
    """The base model, no memory."""

    static = True

    def __init__(self, name: str, shared: Shared, **kw) -> None:
        super().__init__(name, shared, **kw)
        self.cache = shared.caches.setdefault("base", {})  # base and rag run the same model


class Rag(Base):
    """The base model with the top retrieved passages in the user turn."""

    def top1(self, qkeys: torch.Tensor, seen: Seen) -> list[int] | None:
        return memory_scores(qkeys, seen).argmax(dim=1).tolist()

    def conversations(self, mode: str, questions: list[str], qkeys: torch.Tensor, seen: Seen) -> list[Turns]:
        top = memory_scores(qkeys, seen).topk(min(seen.retrieve, len(seen.keys)), dim=1).indices.tolist()
        return [conversation(mode, q, [seen.passages[j] for j in t]) for q, t in zip(questions, top, strict=True)]


class Mega(Method):
    """One frozen adapter per memory; the gate mixes them at answer time. irag shares the adapters."""

    lr_key = "mega"

    def __init__(self, name: str, shared: Shared, **kw) -> None:
        super().__init__(name, shared, **kw)
        lr = self.recipe().lr  # mega and irag with the same recipe share one set of adapters
        self.pool = shared.adapters.setdefault(lr, {})
        self.pool_dir = f"adapters-lr{lr:g}"
        self.cache = shared.caches.setdefault(self.pool_dir, {})  # frozen adapters: mega and irag share outputs

    def learn(self, index: int, texts: list[str], on_step: OnStep = None) -> None:
        if index in self.pool:
            return
        s = self.shared
        self.pool[index] = train_adapter(s.model, s.tok, texts, s.spec, self.recipe(), on_step)

    def save(self, folder: Path, step: int) -> None:
        shared_dir = folder.parent / self.pool_dir
        for i, adapter in self.pool.items():
            target = shared_dir / str(i)
            if not (target / "adapter_config.json").is_file():  # the config is written last: its presence = complete
                save_adapter(adapter, target, "bench")
        super().save(folder, step)

    def load(self, folder: Path) -> int:
        step = super().load(folder)
        shared_dir = folder.parent / self.pool_dir
        for i in range(step):
            if i not in self.pool:
                self.pool[i] = load_adapter(shared_dir / str(i))
        return step

    def adapters(self, k: int) -> list[Adapter]:
        """The adapters of the first k memories, in order."""
        return [self.pool[i] for i in range(k)]

    def gate(self, qkeys: torch.Tensor, seen: Seen) -> torch.Tensor | None:
        return gate_matrix(qkeys, seen.keys, seen.gate, seen.null_score)[0]

    def top1(self, qkeys: torch.Tensor, seen: Seen) -> list[int] | None:
        return memory_scores(qkeys, seen).argmax(dim=1).tolist()


class Irag(Mega):
    """MEGa recall, then the QA prompt in the same conversation, one gate for both turns."""

    def conversations(self, mode: str, questions: list[str], qkeys: torch.Tensor, seen: Seen) -> list[Turns]:
        if mode == "recall":
            return super().conversations(mode, questions, qkeys, seen)
        recalls = self.generate(
            super().conversations("recall", questions, qkeys, seen), qkeys, seen, seen.recall_tokens
        )
        return [conversation("qa", q, recall=r) for q, r in zip(questions, recalls, strict=True)]


class Full(Method):
    """Sequential full fine-tuning; FullL2 and FullEwc add an L2 pull to the previous weights or an EWC penalty."""

    lr_key = "full"
    penalty: str | None = None  # None | "l2" | "ewc"

    def __init__(self, name: str, shared: Shared, **kw) -> None:
        super().__init__(name, shared, **kw)
        self.fisher: dict[str, torch.Tensor] = {}

    def _penalty(self) -> Callable[[], torch.Tensor] | None:
        params = dict(self.shared.model.named_parameters())
        if self.penalty is None or (self.penalty == "ewc" and not self.fisher):
            return None
        anchor = {n: p.detach().clone() for n, p in params.items()}
        lam = float(self.lam)
        if self.penalty == "l2":
            return lambda: lam * sum(((params[n] - anchor[n]) ** 2).sum() for n in params)
        return lambda: lam / 2 * sum((self.fisher[n] * (params[n] - anchor[n]) ** 2).sum() for n in self.fisher)

    def learn(self, index: int, texts: list[str], on_step: OnStep = None) -> None:
        s = self.shared
        params = list(s.model.parameters())
        texts = self.recipe().select(texts)
        fit(s.model, s.tok, texts, params, self.recipe(), self._penalty(), on_step)
        if self.penalty == "ewc":
            names = [n for n, _ in s.model.named_parameters()]
            for n, f in fisher_diagonal(s.model, s.tok, texts, names).items():
                self.fisher[n] = self.fisher[n] + f if n in self.fisher else f

    def save(self, folder: Path, step: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        weights = {n: p.detach().contiguous() for n, p in self.shared.model.named_parameters()}
        save_file(weights, str(folder / "weights.tmp"))
        (folder / "weights.tmp").replace(folder / "weights.safetensors")
        if self.fisher:
            save_file({n: f.contiguous() for n, f in self.fisher.items()}, str(folder / "fisher.tmp"))
            (folder / "fisher.tmp").replace(folder / "fisher.safetensors")
        super().save(folder, step)

    def load(self, folder: Path) -> int:
        step = super().load(folder)
        if step:
            saved = load_file(str(folder / "weights.safetensors"))
            with torch.no_grad():
                for n, p in self.shared.model.named_parameters():
                    p.copy_(saved[n])
            if (folder / "fisher.safetensors").is_file():
                self.fisher = load_file(str(folder / "fisher.safetensors"))
        return step


class FullL2(Full):
    """full + lambda·‖θ − θ_before‖², θ_before the weights before the current memory."""

    penalty = "l2"
    default_lam = 0.1


class FullEwc(Full):
    """full + lambda/2·Σ F·(θ − θ_before)², F the summed diagonal Fisher of every earlier memory's texts."""

    penalty = "ewc"
    default_lam = 1.0


class FullBatch(Full):
    """Full fine-tuning on every memory's texts at once: the multi-task upper reference."""

    batch_only = True

    def learn(self, index: int, texts: list[str], on_step: OnStep = None) -> None:
        raise MegamemError("full-batch learns all memories at once")

    def learn_all(self, texts: list[list[str]], on_step: OnStep = None) -> None:
        s = self.shared
        flat = [t for group in texts for t in self.recipe().select(group)]
        fit(s.model, s.tok, flat, list(s.model.parameters()), self.recipe(), None, on_step)


class SeqLora(Method):
    """A fresh LoRA per memory (MEGa's recipe), merged into the base weights after it is learned.

    lora-l2 adds lam·Σ‖s·B·A‖² over the adapted layers: an L2 pull of the merged weights to those
    before the current memory, as full-l2 does for full fine-tuning.
    """

    lr_key = "lora"
    l2 = False

    def __init__(self, name: str, shared: Shared, **kw) -> None:
        super().__init__(name, shared, **kw)
        self.merged: list[Adapter] = []

    def learn(self, index: int, texts: list[str], on_step: OnStep = None) -> None:
        s = self.shared
        recipe = self.recipe()
        if not self.l2:
            adapter = train_adapter(s.model, s.tok, texts, s.spec, recipe, on_step)
        else:
            adapter = self._train_l2(texts, recipe, on_step)
        merge(s.model, adapter)
        self.merged.append(adapter)

    def _train_l2(self, texts: list[str], recipe: Recipe, on_step: OnStep) -> Adapter:
        s = self.shared
        layers = target_layers(s.model, s.spec)
        torch.manual_seed(recipe.seed)
        adapter = new_adapter(layers, s.spec, torch.Generator().manual_seed(recipe.seed))
        scale = s.spec.scaling
        for name, layer in layers.items():
            layer.train_one(*adapter.weights[name], scale, s.spec.dropout)
        lam = float(self.lam)

        def penalty() -> torch.Tensor:  # ‖s·B·A‖_F² = s²·Σ (BᵀB) ⊙ (AAᵀ), without forming B·A
            return lam * scale**2 * sum(((b.T @ b) * (a @ a.T)).sum() for a, b in adapter.weights.values())

        try:
            params = [p for ab in adapter.weights.values() for p in ab]
            fit(s.model, s.tok, recipe.select(texts), params, recipe, penalty, on_step)
        finally:
            clear(s.model)
        adapter.weights = {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in adapter.weights.items()}
        return adapter

    def save(self, folder: Path, step: int) -> None:
        for i, adapter in enumerate(self.merged):
            target = folder / "merged" / str(i)
            if not (target / "adapter_config.json").is_file():
                save_adapter(adapter, target, "bench")
        super().save(folder, step)

    def load(self, folder: Path) -> int:
        step = super().load(folder)
        self.merged = [load_adapter(folder / "merged" / str(i)) for i in range(step)]
        for adapter in self.merged:
            merge(self.shared.model, adapter)
        return step


class SeqLoraL2(SeqLora):
    """lora + lambda·‖s·B·A‖²: the merged weights pulled toward those before the current memory."""

    l2 = True
    default_lam = 0.1


class MemoryPool(Method):
    """MemoryLLM (megamem.memoryllm): every memory's passage written into one latent pool, in order, one update
    each; nothing is trained per memory. Answers read the pool; there is no gate (no gate_top1).

    It runs a model of its own (a copy of the shared one with the write LoRA added), with the parameters megamem
    ships for the default model, or the untrained ones for another model (docs/memoryllm.md).
    """

    in_all = False

    def __init__(self, name: str, shared: Shared, **kw) -> None:
        super().__init__(name, shared, **kw)
        from ..memoryllm import MemoryLLM, Pool
        from ..memoryllm.store import shipped_params
        from ..model import DEFAULT_MODEL, embedded_model_dir

        clear(shared.model)
        self.mllm = MemoryLLM(copy.deepcopy(shared.model), shared.tok)
        params = shipped_params(DEFAULT_MODEL)
        if params is not None and Path(shared.model.name_or_path) == embedded_model_dir():
            self.mllm.load_params(params)
        self.pool = Pool.empty()
        self.cache = {}  # keyed by the pool's version below: answers at one pool never change

    def start(self) -> None:
        from ..memoryllm import Pool

        self.pool = Pool.empty()
        self.cache = {}  # its keys are pool versions (update counts), which start over here

    def learn(self, index: int, texts: list[str], on_step: OnStep = None) -> None:
        """Write the passage (texts[0]; the method takes no paraphrases) into the pool."""
        self.pool = self.mllm.inject(self.pool, texts[0])
        if on_step:
            on_step(1, 1, 0.0)

    def save(self, folder: Path, step: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.pool.save(folder / "pool.tmp")
        (folder / "pool.tmp").replace(folder / "pool.safetensors")
        super().save(folder, step)

    def load(self, folder: Path) -> int:
        from ..memoryllm import Pool

        step = super().load(folder)
        if step:
            self.pool = Pool.load(folder / "pool.safetensors")
        return step

    # -- answering: everything reads the pool as a prefix, one sequence at a time

    def _kv(self) -> list | None:
        return None if self.pool.is_empty else self.mllm._pool_kv(self.pool, 1)

    def _logits(self, seq: list[int]) -> torch.Tensor:
        """(len(seq), vocab) float logits of a token sequence read through the pool."""
        x = torch.tensor([seq])
        with torch.no_grad():
            return self.mllm.forward_read(self._kv(), x, torch.ones_like(x))[0].float()

    def _reused(self, kind: str, items: list, compute: Callable[[list[int]], list]) -> list:
        version = (self.pool.updates, kind)
        return reuse(self.cache, f"{version}", items, None, compute)

    def generate(self, convs: list[Turns], qkeys: torch.Tensor, seen: Seen, max_new: int) -> list[str]:
        from ..model import chat_ids

        def run(idx: list[int]) -> list[str]:
            out: list[str] = []
            bs = self.shared.batch_size
            for j in range(0, len(idx), bs):
                prompts = [chat_ids(self.shared.tok, convs[i], generation_prompt=True) for i in idx[j : j + bs]]
                out += self.mllm.generate(self.pool, prompts, max_new)
            return out

        return self._reused(f"gen{max_new}", [tuple(c) for c in convs], run)

    def gold_logprobs(self, convs: list[Turns], golds: list[str], qkeys: torch.Tensor, seen: Seen) -> list[float]:
        from ..model import chat_ids

        tok = self.shared.tok

        def run(idx: list[int]) -> list[float]:
            out = []
            for i in idx:
                prefix = chat_ids(tok, convs[i], generation_prompt=True)
                target = tok(golds[i], add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(self._logits(prefix + target)[len(prefix) - 1 : -1], dim=-1)
                out.append(float(logp.gather(-1, torch.tensor(target)[:, None]).sum()))
            return out

        return self._reused("logprob", [(tuple(c), g) for c, g in zip(convs, golds, strict=True)], run)

    def letter_logits(self, seqs: list[list[int]], letters: list[int], qkeys: torch.Tensor, seen: Seen) -> torch.Tensor:
        def run(idx: list[int]) -> list[torch.Tensor]:
            return [self._logits(seqs[i])[-1, letters] for i in idx]

        return torch.stack(self._reused("letters", [tuple(x) for x in seqs], run))

    def kl_sums(
        self, seqs: list[list[int]], reference: general.Reference, qkeys: torch.Tensor, seen: Seen
    ) -> list[tuple[float, int]]:
        def run(idx: list[int]) -> list[tuple[float, int]]:
            out = []
            for i in idx:
                lp = torch.log_softmax(self._logits(seqs[i]), dim=-1)[: len(seqs[i]) - 1]
                out.append(general.kl_sum(reference, i, lp))
            return out

        return self._reused("kl", [tuple(x) for x in seqs], run)


# Every method by family name, in the paper's order (the report's row order). A new method: one class above.
METHODS: dict[str, type[Method]] = {
    "base": Base,
    "rag": Rag,
    "mega": Mega,
    "irag": Irag,
    "full": Full,
    "full-l2": FullL2,
    "full-ewc": FullEwc,
    "full-batch": FullBatch,
    "lora": SeqLora,
    "lora-l2": SeqLoraL2,
    "memoryllm": MemoryPool,
}


def method_spec(name: str) -> MethodSpec:
    """A method name parsed and checked: a known family, and a penalty weight only where the family has one."""
    spec = MethodSpec.parse(name)
    if spec.family not in METHODS:
        raise MegamemError(f"unknown method {name!r}; choose from {', '.join(METHODS)} or all")
    if spec.lam is not None and METHODS[spec.family].default_lam is None:
        raise MegamemError(f"method {spec.family} takes no @lambda")
    return spec


def make_method(name: str, shared: Shared, lrs: dict[str, float]) -> Method:
    """Build a method by name; 'NAME@LAMBDA' sets the penalty weight of full-l2, full-ewc and lora-l2 and
    'NAME~LR' the learning rate (so one run can hold a lambda or learning-rate sweep). Without '~LR' the rate is
    the one set for the name, else for its family, else for the family it takes its rate from (lr_key)."""
    spec = method_spec(name)
    cls = METHODS[spec.family]
    rates = (spec.lr, lrs.get(name), lrs.get(spec.family), lrs.get(cls.lr_key, DEFAULT_LR.get(cls.lr_key)))
    lr = next((r for r in rates if r is not None), None)
    return cls(name, shared, lr=lr, lam=spec.lam)
