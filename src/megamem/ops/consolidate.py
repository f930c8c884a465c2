"""Consolidation: rehearse stored memories into one shared adapter (the "cortex"), then retire their adapters.

The paper's open question 2, as a recipe. Setup: each chosen memory recalls its story through its own adapter
(weight 1, the training prompt), and cloze questions are made from the recalled text (megamem.questions).
Loop: one fresh LoRA, the cortex, learns every consolidated memory at once from those rehearsals: the
question's recall prompt -> the recalled story, and the question's QA prompt -> the base model's answer with
the story in context (its top tokens as soft targets: context distillation, as Recipe.distill). Questions
are the cue: one adapter holds many memories, so "tell me a story" alone cannot say which. Each step also
pays a drift penalty: the loss to the base model's own answers (and their distributions) on the shipped
generic questions, so the cortex leaves general behaviour as it was. Save: the cortex becomes the namespace's,
and each consolidated memory's adapter is retired (Memory.retire): the memory keeps its text and keys, so the
gate still routes to it and its text is still context (mega+rag), and the cortex answers for it at the weight
the gate gives it: a question no consolidated memory is routed for is answered without the cortex. Retiring
an adapter frees its bytes; text and keys are cheap. `forget=True` is the old way: the memories leave the store
entirely (their texts stay in the cortex's record), and the cortex is then mixed into every answer at weight 1,
since the gate can no longer say when it is needed. An id the cortex holds cannot be taken by a new memory
(admission refuses it), so no consolidation drops an earlier one.

A later consolidation retrains the cortex from scratch on every memory consolidated so far (the earlier
ones from the recalled texts the record keeps) plus the new ones.

    >>> from megamem import Memory
    >>> mem = Memory("store")                              # doctest: +SKIP
    >>> consolidate(mem, [r.id for r in mem.list()])       # doctest: +SKIP

Limits: what the cortex holds is what the adapters recalled (a memory that recalls badly consolidates
badly); questions are cloze questions of the recalled sentences, so a question phrased far from its sentence
is harder than with the memory's own adapter; training time grows with every memory consolidated so far.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..adapters import Adapter, LoraSpec
from ..answer import qa_prompt, recall_prompt, with_context
from ..calibration import calibration_queries
from ..checks import check_count, check_finite, check_id, check_positive
from ..errors import MegamemError
from ..generate import complete
from ..inject import clear, set_mixture
from ..items import Item
from ..learn import learn
from ..questions import questions
from ..schema import (
    CONSOLIDATED,
    DEFAULT_NAMESPACE,
    PARAPHRASES,
    check_namespace,
    is_consolidated,
    namespace_of,
    owns,
    reserved_metadata,
    user_metadata,
)
from ..store import cortex as cortex_files
from ..store import intents
from ..store.cortex import Consolidated
from ..store.files import crash_point
from ..store.manifest import ADAPTER_FILES
from ..train import (
    TRAIN_PROMPT,
    Example,
    Recipe,
    attach_fresh,
    collate,
    fit_examples,
    frozen,
    lm_loss,
    make_example,
    teacher_top,
)


@dataclass(frozen=True)
class ConsolidationConfig:
    """How the cortex learns. rank: its LoRA rank (on the store's layers and targets); questions: cloze
    questions per recalled sentence; distill: weight of the soft loss to the base model reading the story;
    drift: weight of the loss to the base model's own answers on generic questions (0: no penalty); answers:
    the QA target is the base model's own answer to the question with the story in context (its tokens and
    their distributions), instead of the recalled sentence the question was cut from; from_text: rehearse each
    memory's stored text (kept since consolidation keeps it) instead of what its adapter recalls."""

    rank: int = 64
    lr: float = 1e-3
    epochs: int = 4
    batch_size: int = 4
    questions: int = 2
    distill: float = 1.0
    drift: float = 0.5
    drift_questions: int = 48
    recall_tokens: int = 160
    top: int = 32
    seed: int = 0
    answers: bool = False
    from_text: bool = False

    def __post_init__(self) -> None:
        check_count(self.rank, "cortex rank", maximum=65536)
        check_positive(self.lr, "learning rate")
        check_count(self.epochs, "epochs")
        check_count(self.batch_size, "batch size")
        check_count(self.questions, "questions per sentence")
        check_finite(self.distill, "distillation weight", minimum=0)
        check_finite(self.drift, "drift weight", minimum=0)
        check_count(self.drift_questions, "drift questions", minimum=0)
        check_count(self.recall_tokens, "recall tokens")
        check_count(self.top, "soft-target tokens")
        check_count(self.seed, "seed", minimum=0)


# -- setup: rehearsal ---------------------------------------------------------------------------------------
@torch.no_grad()
def recall(model, tok, adapter: Adapter, max_new_tokens: int) -> str:
    """The story a memory's adapter tells at weight 1 to the prompt it was trained on."""
    set_mixture(model, [adapter], [1.0])
    try:
        return complete(model, tok, [("user", TRAIN_PROMPT)], max_new_tokens)
    finally:
        clear(model)


def rehearsal(model, tok, story: str, cfg: ConsolidationConfig) -> list[Example]:
    """One memory's training examples: for each cloze question of its recalled story, the recall prompt -> the
    story, and the QA prompt -> the sentence, with the base model's soft targets from reading the story."""
    out = []
    asked = questions([story], cfg.questions, cfg.seed)
    clear(model)
    for q, sentence, _span in asked:
        out.append(make_example(tok, story, recall_prompt(q)))
        reading = with_context(qa_prompt(q), [story])
        target = (complete(model, tok, [("user", reading)], 48) or sentence) if cfg.answers else sentence
        qa = make_example(tok, target, qa_prompt(q))
        seen = make_example(tok, target, reading)
        out.append(qa._replace(soft=teacher_top(model, qa, seen, cfg.top) if cfg.distill else None))
    if not asked:  # nothing to ask (no date, number or name): the story under its own first words as the cue
        out.append(make_example(tok, story, recall_prompt(" ".join(story.split()[:8]))))
    return out


@torch.no_grad()
def drift_examples(model, tok, cfg: ConsolidationConfig) -> list[Example]:
    """The base model's own greedy answers to generic questions, each with its top-token distributions: what
    the cortex must keep answering."""
    clear(model)
    out = []
    for q in calibration_queries()[: cfg.drift_questions]:
        answer = complete(model, tok, [("user", qa_prompt(q))], 32)
        if answer:
            ex = make_example(tok, answer, qa_prompt(q))
            out.append(ex._replace(soft=teacher_top(model, ex, ex, cfg.top)))
    return out


# -- loop -----------------------------------------------------------------------------------------------------
def train_cortex(
    model,
    tok,
    memories: list[Example],
    drift: list[Example],
    spec: LoraSpec,
    cfg: ConsolidationConfig,
    on_step: Callable[[int, int, float], None] | None = None,
) -> Adapter:
    """A fresh adapter of `spec` trained on every memory's examples, each step plus `cfg.drift` times the loss
    on a batch of drift examples; returned frozen."""
    cortex = attach_fresh(model, spec, cfg.seed)
    recipe = Recipe(
        lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, min_tokens=0, distill=cfg.distill
    )
    rng = random.Random(cfg.seed)

    def drift_loss() -> torch.Tensor:
        keep = collate(rng.sample(drift, min(cfg.batch_size, len(drift))), tok.pad_token_id)
        return cfg.drift * lm_loss(model, keep, distill=1.0)

    try:
        params = [p for ab in cortex.weights.values() for p in ab]
        fit_examples(model, tok, memories, params, recipe, drift_loss if drift and cfg.drift else None, on_step)
    finally:
        clear(model)
    return frozen(cortex)


def consolidate(
    mem,
    ids: list[str],
    cfg: ConsolidationConfig = ConsolidationConfig(),
    keep_adapters: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
    namespace: str | None = None,
    retrain: bool = False,
    forget: bool = False,
) -> dict:
    """Consolidate the memories `ids` of `mem` (a MEGa Memory) into their namespace's cortex (they must all be
    one namespace's), then retire their adapters (they keep text and keys: the gate routes to them and the
    cortex answers for them). forget: forget them from the store instead (their text stays only in the cortex's
    record); keep_adapters: leave them as they were (the cortex answers beside them). retrain: `ids` may be empty,
    and the namespace's cortex is trained again from its record alone (after a withdraw; removed if it holds
    nothing). An intent record is written before the first step (megamem.store.intents): a consolidation killed
    at any point is finished or rolled back by the next writer. Returns a report: memories, examples, steps,
    seconds, bytes freed."""
    ids = list(dict.fromkeys(check_id(i) for i in ids))
    if not ids and not retrain:
        raise MegamemError("no memories to consolidate")
    if forget and keep_adapters:
        raise MegamemError("consolidate: forget and keep_adapters contradict each other; choose one")
    prior = intents.interrupted(mem.path, "consolidate", ids)
    mem.prepare_store()  # settles what an interrupted operation left before anything is read
    if ids and prior and all(_done(mem, i) for i in ids):
        return _finished(mem, prior.plan["namespace"], ids)  # the interrupted one was finished just now
    records = [mem.show(i) for i in ids]  # every id is a stored memory, checked before any work
    namespace = check_namespace(namespace) if namespace is not None else None
    namespace = _one_namespace(records, namespace)
    held = mem.consolidated(namespace)
    again = [m.id for m in held if m.id in set(ids)]
    if again:
        raise MegamemError(
            f"consolidate: the {namespace} cortex already holds a memory {again[0]!r}; withdraw that one first "
            f"(`megamem forget {again[0]}`) so that no consolidated memory is dropped"
        )
    if retrain and not held and not ids:
        return _remove_cortex(mem, namespace)
    t0 = time.time()
    model, tok = mem.load()
    new = []
    for rec in records:
        story = rec.text if cfg.from_text else recall(model, tok, mem.adapter(rec.id), cfg.recall_tokens)
        new.append(Consolidated(rec.id, rec.text, story, rec.metadata, rec.created))
    everyone = held + new
    examples = [ex for m in everyone for ex in rehearsal(model, tok, m.recalled, cfg)]
    drift = drift_examples(model, tok, cfg) if cfg.drift else []
    spec = LoraSpec(**{**mem.lora.to_dict(), "rank": cfg.rank, "alpha": float(cfg.rank), "dropout": 0.0})
    steps = []

    def counted(step: int, total: int, loss: float) -> None:
        steps.append(loss)
        if on_step is not None:
            on_step(step, total, loss)

    cortex = train_cortex(model, tok, examples, drift, spec, cfg, counted)
    freed = 0 if keep_adapters else sum(_freed_bytes(mem, r.id, forget) for r in records)
    plan = {"namespace": namespace, "ids": ids, "keep_adapters": keep_adapters, "forget": forget}
    _save(mem, cortex, everyone, asdict(cfg), plan)
    return {
        "namespace": namespace,
        "consolidated": [r.id for r in records],
        "held": len(everyone),
        "examples": len(examples),
        "steps": len(steps),
        "last_loss": round(steps[-1], 4) if steps else None,
        "seconds": round(time.time() - t0, 1),
        "bytes_freed": freed,
        "cortex_bytes": _tree_bytes(cortex_files.folder(mem.path, namespace)),
    }


def _save(mem, cortex: Adapter, everyone: list[Consolidated], config: dict, plan: dict) -> None:
    """Commit a trained cortex under an intent record: write and switch its new version, then retire (or with
    plan["forget"] forget) each consolidated memory's adapter, unless plan["keep_adapters"]."""
    mem.prepare_store()
    namespace = plan["namespace"]
    plan = {**plan, "version": cortex_files.new_version()}
    intent = intents.begin(mem.path, "consolidate", plan)
    crash_point("consolidate:intent")
    others = frozenset(intents.claimed(mem.path, "versions", namespace)) - {plan["version"]}
    cortex_files.write_cortex(mem.path, cortex, everyone, config, mem.model_name, namespace, plan["version"], others)
    for memory_id in [] if plan["keep_adapters"] else plan["ids"]:
        if plan["forget"]:
            mem.forget(memory_id)
        else:
            mem.retire(memory_id)
        crash_point("consolidate:retired")
    mem.routing.invalidate()
    intents.end(intent)


def _done(mem, memory_id: str) -> bool:
    """Whether a memory an interrupted consolidation took in is settled: retired (kept, consolidated) or gone."""
    rec = mem.store.get(memory_id, missing_ok=True)
    return rec is None or (is_consolidated(rec) and not rec.adapter_sha256)


def _freed_bytes(mem, memory_id: str, forget: bool) -> int:
    """What retiring (the adapter's files) or forgetting (the whole folder) a memory frees on disk."""
    folder = mem.store.folder(memory_id)
    if forget:
        return _tree_bytes(folder)
    return sum((folder / name).stat().st_size for name in ADAPTER_FILES if (folder / name).is_file())


def _finished(mem, namespace: str, ids: list[str]) -> dict:
    """The report of a consolidation of `ids` that an earlier, interrupted run had done (settled just now)."""
    return {
        "namespace": namespace,
        "consolidated": ids,
        "held": len(mem.consolidated(namespace)),
        "examples": 0,
        "steps": 0,
        "last_loss": None,
        "seconds": 0.0,
        "bytes_freed": 0,
        "cortex_bytes": _tree_bytes(cortex_files.folder(mem.path, namespace)),
        "resumed": True,
    }


def _one_namespace(records: list, namespace: str | None) -> str:
    """The one namespace every record belongs to (and `namespace`, if given), or an error naming the first that
    does not; the default namespace when there are no records and none is given."""
    namespace = namespace or (namespace_of(records[0]) if records else DEFAULT_NAMESPACE)
    for r in records:
        if not owns(namespace, r):
            raise MegamemError(
                f"consolidate: memory {r.id!r} is in namespace {namespace_of(r)!r}, not {namespace!r}"
                f"{f' like {records[0].id!r}' if r is not records[0] else ''}; a cortex holds one namespace's "
                "memories, so consolidate each namespace apart"
            )
    return namespace


def _remove_cortex(mem, namespace: str) -> dict:
    """Retrain with nothing held: the namespace's cortex is removed (its weights held only withdrawn memories)."""
    if cortex_files.read_record(mem.path, namespace) is None:
        raise MegamemError(f"the {namespace} namespace has no cortex to retrain")
    freed = _tree_bytes(cortex_files.folder(mem.path, namespace))
    cortex_files.remove(mem.path, namespace)
    return {"namespace": namespace, "consolidated": [], "held": 0, "removed": True, "bytes_freed": freed}


def withdraw(mem, memory_id: str, namespace: str = DEFAULT_NAMESPACE) -> Consolidated:
    """Take a consolidated memory out of its namespace's cortex record: its text and metadata leave the store.
    What the cortex learned from it stays in the cortex's weights until `consolidate(..., retrain=True)` trains
    the cortex again from the memories it still holds. MegamemError if the cortex holds no such memory."""
    check_id(memory_id)
    mem.prepare_store()
    if mem.store.get(memory_id, missing_ok=True) is not None:  # else the cortex would stand in for nobody's record
        raise MegamemError(
            f"memory {memory_id!r} is still stored (consolidated, with its text and keys); forget it instead "
            f"(`megamem forget {memory_id}`), which also takes it out of the cortex's record"
        )
    return cortex_files.withdraw(mem.path, memory_id, check_namespace(namespace))


def bring_back(mem, memories: list[Consolidated], on_step: Callable[[int, int, float], None] | None = None) -> list:
    """Learn again, as memories of their own, the memories a damaged cortex held (`megamem repair` set it aside):
    their text, paraphrases and metadata from its record, under their ids. Those that can no longer be added
    (an id taken since) are skipped with a warning in mem.warnings. Returns the records stored."""
    kept = [m for m in memories if (r := mem.store.get(m.id, missing_ok=True)) is not None and is_consolidated(r)]
    restored = _relearn_kept(mem, [m.id for m in kept], on_step)
    items = []
    for m in memories:
        if m in kept:
            continue
        meta = dict(m.metadata)
        paraphrases = list(meta.pop(PARAPHRASES, []))
        items.append(
            Item(
                m.text,
                paraphrases,
                user_metadata(meta),
                m.id,
                f"consolidated memory {m.id!r}",
                reserved=reserved_metadata(meta),
            )
        )
    if not items:
        return restored
    good = mem.validate(items, keep_going=True)
    mem.prepare_store()
    return restored + mem.learn(good, note_updates=False, on_step=on_step)


def _relearn_kept(mem, ids: list[str], on_step) -> list:
    """Learn again, in place, the adapters of consolidated memories still stored (text, paraphrases and keys
    kept): each gets its adapter back and is an ordinary memory again."""
    if not ids:
        return []
    model, tok = mem.load()
    records = [mem.store.get(i) for i in ids]
    texts = [[r.text, *r.metadata.get(PARAPHRASES, [])] for r in records]
    out = []
    for start in range(0, len(records), mem.train_group):
        group = slice(start, start + mem.train_group)
        learned = learn(model, tok, texts[group], mem.lora, mem.recipe, mem.key_function, on_step)
        for r, one in zip(records[group], learned, strict=True):
            out.append(mem.store.restore_adapter(r.id, one.adapter, (CONSOLIDATED,)))
    mem.routing.invalidate()
    return out


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
