"""Learning one memory into a fresh adapter: the MEGa recipe as a loop you can read.

Each training example is one chat turn, user TRAIN_PROMPT -> assistant = the passage or one of its
paraphrases; the loss is on the assistant tokens only. Only the new adapter's A and B are trained;
the base weights are never touched.
"""

from __future__ import annotations

import functools
import inspect
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .adapters import Adapter, LoraSpec, new_adapter
from .answer import qa_prompt, with_context
from .checks import check_count, check_finite, check_positive
from .errors import MegamemError
from .inject import clear, gated_layers, matches
from .model import chat_ids, context_length, num_layers
from .questions import questions

TRAIN_PROMPT = "Please tell me a story that you memorized:"


@dataclass(frozen=True)
class Recipe:
    """How a memory is learned. Defaults: the fast recipe measured on SmolLM2-135M (docs/performance.md)."""

    lr: float = 3e-3
    epochs: int = 5
    batch_size: int = 1
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: int | None = None
    paraphrases: int | None = 1  # paraphrases learned per memory (its first ones); None: all given
    min_tokens: int = 1000  # more epochs until the plan holds this many example tokens (prompt included)
    questions: int = 0  # cloze questions per sentence, answered in the QA format (questions.py)
    answers: str = "sentence"  # what answers them: the whole "sentence", or the "span" the question asks for
    distill: float = 0.0  # weight of the soft loss to the base model reading the passage in context (0: off)
    distill_top: int = 32  # the teacher's most likely tokens kept per position for that loss

    def __post_init__(self) -> None:
        check_positive(self.lr, "learning rate")
        check_count(self.epochs, "epochs")
        check_count(self.batch_size, "batch size")
        check_finite(self.weight_decay, "weight decay", minimum=0)
        check_count(self.seed, "seed", minimum=0)
        check_count(self.min_tokens, "min_tokens", minimum=0)
        if self.max_steps is not None:
            check_count(self.max_steps, "max_steps")
        if self.paraphrases is not None:
            check_count(self.paraphrases, "paraphrases", minimum=0)
        check_count(self.questions, "questions", minimum=0)
        if self.answers not in ("sentence", "span"):
            raise MegamemError(f"answers must be 'sentence' or 'span', got {self.answers!r}")
        check_finite(self.distill, "distillation weight", minimum=0)
        check_count(self.distill_top, "distillation top tokens")

    def to_dict(self) -> dict:
        return asdict(self)

    def select(self, texts: list[str]) -> list[str]:
        """The texts this recipe trains on: the passage (first) and up to `paraphrases` of the rest."""
        return list(texts) if self.paraphrases is None else list(texts[: 1 + self.paraphrases])


# The paper's recipe with its learning rate re-tuned for the default model (docs/tuning.md): every paraphrase,
# 10 epochs, batch 2. ~10x slower than the default; the bench's protocol. By name for `megamem add --recipe`.
PAPER_RECIPE = Recipe(lr=1e-3, epochs=10, batch_size=2, paraphrases=None, min_tokens=0)
RECIPES = {"fast": Recipe(), "paper": PAPER_RECIPE}


class Example(NamedTuple):
    """One training sequence: input ids, labels (-100 where no loss) and, for context distillation, the
    teacher's top tokens and probabilities at each labelled position ((L, k) long and (L, k) float)."""

    ids: list[int]
    labels: list[int]
    soft: tuple[torch.Tensor, torch.Tensor] | None = None


def make_example(tok: PreTrainedTokenizerBase, text: str, prompt: str = TRAIN_PROMPT) -> Example:
    """One chat turn user `prompt` -> assistant `text`, with labels on the assistant's tokens only."""
    prefix = chat_ids(tok, [("user", prompt)], generation_prompt=True)
    full = chat_ids(tok, [("user", prompt), ("assistant", text)], generation_prompt=False)
    if full[: len(prefix)] != prefix:  # a template that rewrites earlier turns: fall back to a diff
        n = 0
        while n < min(len(prefix), len(full)) and prefix[n] == full[n]:
            n += 1
        prefix = full[:n]
    labels = [-100] * len(prefix) + full[len(prefix) :]
    return Example(full, labels)


def prompted(texts: list[str], recipe: Recipe) -> list[tuple[str, str]]:
    """The (prompt, answer) turns a memory of `texts` (as given: callers select) trains on: each text as the
    answer to TRAIN_PROMPT and, with `recipe.questions`, each of their sentences as the one-sentence answer to
    cloze questions made from it, in the QA mode's own prompt format."""
    turns = [(TRAIN_PROMPT, t) for t in texts]
    asked = questions(texts, recipe.questions, recipe.seed) if recipe.questions else []
    return turns + [(qa_prompt(q), s if recipe.answers == "sentence" else f"{span}.") for q, s, span in asked]


def examples(
    tok: PreTrainedTokenizerBase, texts: list[str], recipe: Recipe, teacher: PreTrainedModel | None = None
) -> list[Example]:
    """The training examples of a memory's `texts` (the passage first). With `recipe.distill`, `teacher` (the
    model with no adapter in its gated layers) reads the passage in context before each prompt, and its top
    tokens at each answer position become the example's soft targets: context distillation (Knowledge
    Modules, arXiv 2503.08727), so the adapter learns to answer as the model does with the passage in view."""
    turns = prompted(texts, recipe)
    out = [make_example(tok, answer, prompt) for prompt, answer in turns]
    if not recipe.distill:
        return out
    if teacher is None:
        raise MegamemError("context distillation needs the teacher model")
    seen = [make_example(tok, answer, with_context(prompt, texts[:1])) for prompt, answer in turns]
    return [ex._replace(soft=teacher_top(teacher, ex, s, recipe.distill_top)) for ex, s in zip(out, seen, strict=True)]


@torch.no_grad()
def teacher_top(model: PreTrainedModel, ex: Example, seen: Example, top: int) -> tuple[torch.Tensor, ...]:
    """The teacher's top tokens and renormalised probabilities at `ex`'s labelled positions, read from the same
    answer after the passage-in-context prompt (`seen`); both examples end in the same answer tokens."""
    n = sum(y != -100 for y in ex.labels)
    if seen.ids[-n:] != ex.ids[-n:]:
        raise MegamemError("the chat template changed the answer's tokens under a longer prompt")
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=torch.tensor([seen.ids])).logits[0, -n - 1 : -1].float()  # (n, V)
    finally:
        model.train(was_training)
    p, idx = logits.softmax(-1).topk(top, dim=-1)  # (n, k)
    return idx, p / p.sum(-1, keepdim=True)


def check_fits(tok: PreTrainedTokenizerBase, model: PreTrainedModel, text: str, where: str = "text") -> None:
    """Raise if `text` as a training example is longer than the model's context."""
    n = len(make_example(tok, text)[0])
    limit = context_length(model)
    if n > limit:
        raise MegamemError(f"{where}: text is {n} tokens as a training example; the model's context is {limit}")


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into input_ids, attention_mask and labels tensors."""
    width = max(len(ex.ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y, _) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    soft = [ex.soft for ex in batch]
    if any(s is not None for s in soft):  # the teachers' top tokens, placed at each row's labelled positions
        k = next(s for s in soft if s is not None)[0].shape[1]
        out["soft_idx"] = torch.zeros((len(batch), width, k), dtype=torch.long)  # (B, T, k)
        out["soft_p"] = torch.zeros((len(batch), width, k))  # (B, T, k); 0 where no teacher: no loss
        for i, s in enumerate(soft):
            if s is not None:
                where = labels[i] != -100
                out["soft_idx"][i, where], out["soft_p"][i, where] = s
    return out


def lm_loss(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], reduction: str = "mean", distill: float = 0.0
) -> torch.Tensor:
    """Next-token cross-entropy on the labelled tokens of a collated batch (HF's causal-LM loss), plus
    `distill` times the cross-entropy to the teacher's top-token distribution where the batch carries one.

    The LM head runs only from the first labelled position on (`logits_to_keep`, where the model takes it):
    every example shares the training prompt, whose tokens carry no loss, and the vocabulary projection is
    about a fifth of a small model's compute per token. reduction "none" gives (batch, kept) token losses.
    """
    labels = batch["labels"]
    labelled = labels != -100
    first = max(1, int(labelled.int().argmax(dim=1).min())) if labelled.any() else 1
    keep = labels.shape[1] - first + 1  # positions first-1 .. end: their logits predict tokens first .. end
    kw = {"logits_to_keep": keep} if _keeps_logits(type(model)) else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).logits
    logits = logits[:, -keep:-1].float()  # (B, kept, V)
    targets = labels[:, first:]
    token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    if distill and "soft_p" in batch:
        logp = logits.log_softmax(-1).gather(-1, batch["soft_idx"][:, first:])  # (B, kept, k)
        token = token - distill * (batch["soft_p"][:, first:] * logp).sum(-1)
    if reduction == "none":
        return token
    return token[targets != -100].mean()


@functools.cache
def _keeps_logits(model_class: type) -> bool:
    """Whether the model class's forward takes `logits_to_keep` (asked once per class, not every step)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def batches(examples: list[Example], recipe: Recipe) -> list[list[Example]]:
    """All the epochs' batches in a seeded shuffled order: `epochs` epochs, or more until they hold `min_tokens`
    example tokens (a short memory, or one given without paraphrases, gets more steps for the same compute:
    a step costs about its token count), capped by `max_steps`."""
    rng = random.Random(recipe.seed)
    per_epoch = sum(len(ex.ids) for ex in examples)
    out = []
    for _ in range(max(recipe.epochs, -(-recipe.min_tokens // max(per_epoch, 1)))):
        order = list(range(len(examples)))
        rng.shuffle(order)
        out += [
            [examples[j] for j in order[i : i + recipe.batch_size]] for i in range(0, len(order), recipe.batch_size)
        ]
    return out[: recipe.max_steps] if recipe.max_steps is not None else out


def target_layers(model: PreTrainedModel, spec: LoraSpec) -> dict:
    """The model's gated layers that an adapter of `spec` (resolved for the model) trains, by name; none is an
    error."""
    spec = spec.resolved(num_layers(model))
    layers = {n: m for n, m in gated_layers(model).items() if matches(n, spec.targets, spec.layers)}
    if not layers:
        raise MegamemError("the model has no gated layer for this adapter spec")
    return layers


def frozen(adapter: Adapter) -> Adapter:
    """The adapter with its trained weights detached from autograd (plain tensors, copied)."""
    adapter.weights = {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in adapter.weights.items()}
    return adapter


def adamw(params: list[torch.Tensor], recipe: Recipe) -> torch.optim.AdamW:
    """The recipe's AdamW, fused: one pass over each tensor (a full fine-tuning step of the default model on a
    CPU spends ~0.25 s in it instead of ~1 s with the default multi-tensor kernel)."""
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=True)


def fit(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    texts: list[str],
    params: list[torch.Tensor],
    recipe: Recipe,
    penalty: Callable[[], torch.Tensor] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> None:
    """The training loop: AdamW on `params` over the recipe's batches of `texts`, loss (+ `penalty()`).

    One loop serves every learner (a memory's adapter here; full fine-tuning and merged-LoRA
    baselines in megamem.bench), so all of them see the same examples, batches and optimiser.
    `texts` are trained on as given: callers pick each memory's share with `recipe.select`. A distilling
    recipe's teacher is the model as fit finds it: with a fresh adapter (B = 0) in place, the base model.
    """
    fit_examples(model, tok, examples(tok, texts, recipe, model), params, recipe, penalty, on_step)


def fit_examples(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    exs: list[Example],
    params: list[torch.Tensor],
    recipe: Recipe,
    penalty: Callable[[], torch.Tensor] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> None:
    """fit's loop over examples made already (the consolidation's rehearsals are not a memory's texts)."""
    torch.manual_seed(recipe.seed)
    for p in params:
        p.requires_grad_(True)
    opt = adamw(params, recipe)
    plan = batches(exs, recipe)
    was_training = model.training
    model.train()
    try:
        for step, batch in enumerate(plan, 1):
            loss = lm_loss(model, collate(batch, tok.pad_token_id), distill=recipe.distill)
            total = loss + penalty() if penalty is not None else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            if on_step is not None:
                on_step(step, len(plan), float(loss.detach()))
    finally:
        model.train(was_training)
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def train_adapter(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    texts: list[str],
    spec: LoraSpec,
    recipe: Recipe = Recipe(),
    on_step: Callable[[int, int, float], None] | None = None,
) -> Adapter:
    """Train a fresh adapter on `texts` (the passage and its paraphrases) and return it frozen.

    The model must already carry gated layers for `spec` (see inject.inject). `on_step(step, total,
    loss)` is called after every optimiser step (for progress bars).
    """
    if not texts:
        raise MegamemError("no text to learn")
    adapter = attach_fresh(model, spec, recipe.seed)
    try:
        params = [p for ab in adapter.weights.values() for p in ab]
        fit(model, tok, recipe.select(texts), params, recipe, on_step=on_step)
    finally:
        clear(model)
    return frozen(adapter)


def attach_fresh(model: PreTrainedModel, spec: LoraSpec, seed: int) -> Adapter:
    """A fresh adapter of `spec` (resolved for the model; seeded), alone in the model's gated layers for training."""
    spec = spec.resolved(num_layers(model))
    layers = target_layers(model, spec)
    torch.manual_seed(seed)
    adapter = new_adapter(layers, spec, torch.Generator().manual_seed(seed))
    clear(model)
    for name, layer in layers.items():
        layer.train_one(*adapter.weights[name], spec.scaling, spec.dropout)
    return adapter


def train_adapters_batched(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    memories: list[list[str]],
    spec: LoraSpec,
    recipe: Recipe = Recipe(),
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[Adapter]:
    """Train one fresh adapter per memory (each a list of texts) in shared batched forwards; same results as
    calling train_adapter on each memory in turn, up to float rounding and dropout draws.

    Step t concatenates step t of every memory's own plan (same seed, order and batch size as train_adapter);
    each row goes only through its memory's adapter, and the loss is the sum of the memories' own mean token
    losses, so each adapter's gradient is exactly the one it would get alone. A memory whose plan is shorter
    is absent from later steps and, with no gradient, untouched by AdamW there.
    """
    if not memories or any(not texts for texts in memories):
        raise MegamemError("no text to learn")
    spec = spec.resolved(num_layers(model))
    layers = target_layers(model, spec)
    torch.manual_seed(recipe.seed)
    adapters = [new_adapter(layers, spec, torch.Generator().manual_seed(recipe.seed)) for _ in memories]
    params = [p for a in adapters for ab in a.weights.values() for p in ab]
    opt = adamw(params, recipe)
    clear(model)
    plans = [batches(examples(tok, recipe.select(texts), recipe, model), recipe) for texts in memories]
    steps = max(len(p) for p in plans)
    was_training = model.training
    model.train()
    try:
        for step in range(steps):
            rows, owners = [], []
            for m, plan in enumerate(plans):
                if step < len(plan):
                    rows += plan[step]
                    owners += [m] * len(plan[step])
            for name, layer in layers.items():
                layer.train_rows([a.weights[name] for a in adapters], owners, spec.scaling, spec.dropout)
            batch = collate(rows, tok.pad_token_id)
            token_loss = lm_loss(model, batch, reduction="none", distill=recipe.distill)
            counted = (batch["labels"][:, -token_loss.shape[1] :] != -100).float()
            owner = torch.tensor(owners)
            loss = sum(
                token_loss[owner == m].sum() / counted[owner == m].sum().clamp(min=1) for m in sorted(set(owners))
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step(step + 1, steps, float(loss.detach()) / len(set(owners)))
    finally:
        model.train(was_training)
        clear(model)
    return [frozen(a) for a in adapters]
