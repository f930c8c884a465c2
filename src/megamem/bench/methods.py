"""The bench's methods: how each one learns a memory and what it activates to answer.

Every method shares one loaded model. Methods that change the base weights (full fine-tuning, merged
LoRA) restore a kept copy of the base weights first; gated methods (mega, irag) keep frozen adapters
and never touch the base. All of them train on the same examples (make_example / batches of the
passage and its paraphrases) with the same chat prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import Adapter, LoraSpec, load_adapter, new_adapter, save_adapter
from ..errors import MegamemError
from ..inject import clear, gated_layers
from ..train import PAPER_RECIPE, Recipe, collate, fit, lm_loss, make_example, target_layers, train_adapter
from .spec import MethodSpec

METHODS = ("base", "rag", "mega", "irag", "full", "full-l2", "full-ewc", "full-batch", "lora", "lora-l2")
# The paper's protocol, re-tuned for the default model (docs/tuning.md): adapters on every layer's MLP, rank
# 32, 10 epochs over the passage and all its paraphrases, batch 2. The bench keeps it fixed whatever the
# product's faster defaults (Recipe(), LoraSpec(); docs/performance.md) are, so runs stay comparable.
PROTOCOL_LORA = LoraSpec(rank=32, alpha=32.0, dropout=0.05, upper=1.0)
PROTOCOL_RECIPE = PAPER_RECIPE
# Learning rates per family, each the best of a sweep on the default model (docs/bench.md, "Learning rates"):
# mega: the protocol's (docs/tuning.md); sequential merged LoRA (lora, lora-l2): 1e-4 of 3e-5 / 1e-4 / 3e-4 /
# 1e-3 (mega's 1e-3 overwrites earlier memories); full fine-tuning: 1e-5 of 3e-6 / 1e-5 / 3e-5.
DEFAULT_LR = {"mega": PROTOCOL_RECIPE.lr, "lora": 1e-4, "full": 1e-5}
DEFAULT_LAMBDA = {"full-l2": 0.1, "full-ewc": 1.0, "lora-l2": 0.1}
OnStep = Callable[[int, int, float], None] | None


@dataclass
class Shared:
    """What every method of a run shares: the model, a copy of its base weights, the adapter spec."""

    model: PreTrainedModel
    tok: PreTrainedTokenizerBase
    spec: LoraSpec
    recipe: Recipe
    base_state: dict[str, torch.Tensor] = field(default_factory=dict)
    adapters: dict[float, dict[int, Adapter]] = field(default_factory=dict)  # lr -> memory -> MEGa adapter
    caches: dict[str, dict] = field(default_factory=dict)  # outputs of a frozen model (run.reuse), by model

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


class Method:
    """A method's learning and its answer-time view; subclasses override what differs."""

    gated = False  # answers through the MEGa gate over the adapters learned so far
    retrieve = 0  # passages put in context (RAG)
    two_turn = False  # irag: recall, then answer
    static = False  # never learns: the base model answers (base, rag)
    batch_only = False  # learns everything at the last step (full-batch)

    def __init__(self, name: str, shared: Shared, lr: float | None = None, lam: float | None = None) -> None:
        self.name = name
        self.shared = shared
        self.lr = lr
        self.lam = lam
        self.cache: dict | None = None  # outputs reused across steps; set where the model's weights never change

    def recipe(self) -> Recipe:
        r = self.shared.recipe
        return replace(r, lr=self.lr) if self.lr is not None else r

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


class Base(Method):
    static = True

    def __init__(self, name: str, shared: Shared, **kw) -> None:
        super().__init__(name, shared, **kw)
        self.cache = shared.caches.setdefault("base", {})  # base and rag run the same model


class Rag(Base):
    def __init__(self, name: str, shared: Shared, top_k: int = 1, **kw) -> None:
        super().__init__(name, shared, **kw)
        self.retrieve = top_k


class Mega(Method):
    """One frozen adapter per memory; the gate mixes them at answer time. irag shares the adapters."""

    gated = True

    def __init__(self, name: str, shared: Shared, two_turn: bool = False, **kw) -> None:
        super().__init__(name, shared, **kw)
        self.two_turn = two_turn
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


class Full(Method):
    """Sequential full fine-tuning, optionally with an L2 pull to the previous weights or an EWC penalty."""

    def __init__(self, name: str, shared: Shared, penalty: str | None = None, **kw) -> None:
        super().__init__(name, shared, **kw)
        self.penalty = penalty  # None | "l2" | "ewc"
        self.fisher: dict[str, torch.Tensor] = {}

    def _penalty(self) -> Callable[[], torch.Tensor] | None:
        params = dict(self.shared.model.named_parameters())
        if self.penalty is None or (self.penalty == "ewc" and not self.fisher):
            return None
        anchor = {n: p.detach().clone() for n, p in params.items()}
        lam = float(self.lam if self.lam is not None else DEFAULT_LAMBDA[f"full-{self.penalty}"])
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

    def __init__(self, name: str, shared: Shared, l2: bool = False, **kw) -> None:
        super().__init__(name, shared, **kw)
        self.l2 = l2
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
        lam = float(self.lam if self.lam is not None else DEFAULT_LAMBDA["lora-l2"])

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


def method_spec(name: str) -> MethodSpec:
    """A method name parsed and checked: a known family, and a penalty weight only where the family has one."""
    spec = MethodSpec.parse(name)
    if spec.family not in METHODS:
        raise MegamemError(f"unknown method {name!r}; choose from {', '.join(METHODS)} or all")
    if spec.lam is not None and spec.family not in DEFAULT_LAMBDA:
        raise MegamemError(f"method {spec.family} takes no @lambda")
    return spec


def make_method(name: str, shared: Shared, lrs: dict[str, float], rag_top_k: int = 1) -> Method:
    """Build a method by name; 'NAME@LAMBDA' sets the penalty weight of full-l2, full-ewc and lora-l2 and
    'NAME~LR' the learning rate (so one run can hold a lambda or learning-rate sweep)."""
    spec = method_spec(name)
    fam, lam = spec.family, spec.lam
    lr = spec.lr if spec.lr is not None else lrs.get(name, lrs.get(fam))
    if fam == "base":
        return Base(name, shared)
    if fam == "rag":
        return Rag(name, shared, top_k=rag_top_k)
    if fam in ("mega", "irag"):
        return Mega(name, shared, two_turn=fam == "irag", lr=lr if lr is not None else lrs.get("mega"))
    if fam in ("lora", "lora-l2"):
        return SeqLora(name, shared, l2=fam == "lora-l2", lr=lr if lr is not None else lrs.get("lora"), lam=lam)
    full_lr = lr if lr is not None else lrs.get("full", DEFAULT_LR["full"])
    if fam == "full-batch":
        return FullBatch(name, shared, lr=full_lr)
    penalty = {"full": None, "full-l2": "l2", "full-ewc": "ewc"}[fam]
    return Full(name, shared, penalty=penalty, lr=full_lr, lam=lam)
