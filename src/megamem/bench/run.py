"""The continual-learning protocol: learn a partition's memories one at a time, test every memory seen so far.

One loaded model serves every method. After each finished step the method's state is saved and the
step's rows are appended to metrics.jsonl (one row per method x step x memory, then one 'step' row
that closes the step); a killed run resumes from the last closed step of each method.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from filelock import FileLock
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..adapters import LoraSpec
from ..calibration import calibration_keys, store_null_score
from ..errors import MegamemError
from ..gate import GateConfig
from ..inject import inject_for
from ..keys import compute_keys, embedder_keys
from ..memory import default_gate
from ..model import DEFAULT_MODEL, load_model
from ..train import Example, Recipe
from . import general
from .data import Record, load_partition, partition_files
from .infer import generate, token_logprobs
from .methods import (
    DEFAULT_LR,
    METHODS,
    PROTOCOL_LORA,
    PROTOCOL_RECIPE,
    Method,
    Seen,
    Shared,
    gate_matrix,  # noqa: F401  (tests and benchmarks import it from here)
    keep_base,
    make_method,
    method_spec,
)
from .metrics import cosine_matrix, llm_judge, qa_scores, random_pair_floor
from .prompts import conversation

GENERAL_QA_TOKENS = 32  # a short answer; more only lengthens what must match token for token

TARGETS = {
    "mlp": ("up_proj", "down_proj"),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
THIRDS = ("early", "mid", "late")  # the MLP targets on one third of the layers


@dataclass
class BenchConfig:
    """Everything a run depends on; saved as config.json and checked on resume."""

    data: str
    partitions: list[int] = field(default_factory=lambda: [0])
    memories: int | None = None
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    model: str | None = None
    epochs: int = 10
    max_steps: int | None = None
    lrs: dict[str, float] = field(default_factory=dict)
    rank: int | None = None  # None: the pinned protocol's rank (methods.PROTOCOL_LORA), not the product's
    targets: str = "mlp"
    key_function: str = "embedder"
    beta: float | None = None
    eval_every: int = 1
    qa_tokens: int = 48
    recall_extra_tokens: int = 20
    mcq_limit: int | None = None
    text_paragraphs: int | None = 16
    general_qa: int = 60  # shipped general questions whose answers are compared with the base model's (0: off)
    general_null_rate: float | None = 0.01  # the product gate's null memory, for gated methods' general probes
    mmlu: str | None = None
    mmlu_subjects: list[str] | None = None
    mmlu_limit: int | None = 20
    judge_url: str | None = None
    judge_model: str | None = None
    seed: int = 0
    batch_size: int = 16
    threads: int | None = None

    def __post_init__(self) -> None:
        # the rates in effect, not only those given: config.json then says what ran, and a folder begun under
        # other default rates is refused instead of mixing them
        self.lrs = {**DEFAULT_LR, **self.lrs}

    def to_dict(self) -> dict:
        return asdict(self)


def expand_methods(names: list[str]) -> list[str]:
    """'all' -> every method; others kept in the given order; unknown names are an error."""
    out: list[str] = []
    for n in names:
        for m in METHODS if n == "all" else [n]:
            method_spec(m)
            if m not in out:
                out.append(m)
    return out


def lora_spec(cfg: BenchConfig, n_layers: int) -> LoraSpec:
    """The adapter shape of the run (mega, irag, lora, lora-l2) from the ablation flags."""
    base = PROTOCOL_LORA  # another rank keeps its alpha / rank scaling
    rank = cfg.rank or base.rank
    sized = replace(base, rank=rank, alpha=base.alpha * rank / base.rank)
    if cfg.targets in TARGETS:
        return replace(sized, targets=TARGETS[cfg.targets])
    if cfg.targets in THIRDS:
        third = THIRDS.index(cfg.targets)
        lo, hi = third * n_layers // 3, (third + 1) * n_layers // 3
        return replace(sized, targets=TARGETS["mlp"], layers=tuple(range(lo, hi)))
    raise MegamemError(f"unknown targets {cfg.targets!r}; choose from mlp, attn, all, early, mid, late")


# -- one partition's fixed inputs ------------------------------------------------------------------


@dataclass
class Partition:
    """A partition's memories and everything about them that never changes during a run."""

    index: int
    records: list[Record]
    keys: list[torch.Tensor]  # per memory: keys of the passage and its paraphrases
    cues: list[str]  # per memory: the question that asks for its recall
    questions: list[tuple[int, str, str]]  # (memory, question, gold answer) over all memories
    cue_keys: torch.Tensor
    question_keys: torch.Tensor
    passage_emb: torch.Tensor
    recall_tokens: list[int]

    def texts(self, i: int) -> list[str]:
        return [self.records[i].passage, *self.records[i].paraphrases]


def recall_cue(rec: Record) -> str:
    """The recall query of a memory: its first QA question, else its opening words (stories have no QA)."""
    if rec.qa:
        return rec.qa[0][0]
    words = rec.passage.split()
    return "Tell me the story that begins: " + " ".join(words[:12])


def prepare(cfg: BenchConfig, index: int, model, tok, records: list[Record] | None = None) -> Partition:
    """Load a partition (or take the given records) and compute its keys, query keys and embeddings once."""
    records = records if records is not None else load_partition(cfg.data, index, cfg.memories)
    if not records:
        raise MegamemError(f"partition {index} of {cfg.data} is empty")
    keys = [compute_keys(cfg.key_function, [r.passage, *r.paraphrases], model, tok) for r in records]
    cues = [recall_cue(r) for r in records]
    questions = [(i, q, a) for i, r in enumerate(records) for q, a in r.qa]
    cue_keys = compute_keys(cfg.key_function, cues, model, tok)
    qk = compute_keys(cfg.key_function, [q for _, q, _ in questions], model, tok) if questions else cue_keys[:0]
    return Partition(
        index=index,
        records=records,
        keys=keys,
        cues=cues,
        questions=questions,
        cue_keys=cue_keys,
        question_keys=qk,
        passage_emb=embedder_keys([r.passage for r in records]),
        recall_tokens=[len(tok(r.passage, add_special_tokens=False)["input_ids"]) for r in records],
    )


# -- general ability -------------------------------------------------------------------------------


@dataclass
class Probes:
    """The general-ability inputs and the base model's reference answers, computed once per run."""

    mcq: list[general.MCQ]
    mcq_seqs: list[list[int]]
    letters: list[int]
    mmlu: list[general.MCQ]
    mmlu_seqs: list[list[int]]
    text_seqs: list[list[int]]
    mcq_keys: torch.Tensor
    mmlu_keys: torch.Tensor
    text_keys: torch.Tensor
    reference: general.Reference | None = None
    qa_convs: list = field(default_factory=list)  # the general questions, as QA conversations
    qa_keys: torch.Tensor | None = None
    qa_base: list[str] = field(default_factory=list)  # the base model's answers to them
    calibration: torch.Tensor | None = None  # the calibration queries' keys (the null memory's score)


def make_probes(cfg: BenchConfig, model, tok) -> Probes:
    """Tokenise the probes and compute the base model's KL reference (with no memory active)."""
    mcq = general.shipped_mcq()[: cfg.mcq_limit] if cfg.mcq_limit else general.shipped_mcq()
    mmlu = general.load_mmlu(cfg.mmlu, cfg.mmlu_subjects, cfg.mmlu_limit) if cfg.mmlu else []
    mcq_seqs, letters = general.mcq_inputs(tok, mcq)
    mmlu_seqs, _ = general.mcq_inputs(tok, mmlu)
    paragraphs = general.shipped_text(cfg.text_paragraphs)
    text_seqs = general.text_inputs(tok, paragraphs)
    kf = cfg.key_function
    probes = Probes(
        mcq,
        mcq_seqs,
        letters,
        mmlu,
        mmlu_seqs,
        text_seqs,
        compute_keys(kf, [q.question for q in mcq], model, tok),
        compute_keys(kf, [q.question for q in mmlu], model, tok) if mmlu else torch.zeros(0, 1),
        compute_keys(kf, paragraphs, model, tok),
    )
    probes.reference = general.make_reference(token_logprobs(model, text_seqs, tok.pad_token_id))
    questions = general.shipped_general_qa()[: cfg.general_qa] if cfg.general_qa else []
    probes.qa_convs = [conversation("qa", q["question"]) for q in questions]
    probes.qa_keys = compute_keys(kf, [q["question"] for q in questions], model, tok) if questions else None
    probes.qa_base = generate(model, tok, probes.qa_convs, GENERAL_QA_TOKENS, batch_size=cfg.batch_size)
    if cfg.general_null_rate is not None:
        probes.calibration = calibration_keys(kf, cfg.model or DEFAULT_MODEL, model, tok)
    return probes


def general_ability(method: Method, probes: Probes, seen: Seen, null_rate: float | None = None) -> dict[str, float]:
    """MCQ accuracy, MMLU accuracy (if given), KL to the base model, and the share of general questions answered
    exactly as the base model does. Gated methods go through the product's gate: the bench's, with the null
    memory at the store's calibrated score (null_rate; None: the paper's gate)."""
    if null_rate is not None and probes.calibration is not None:
        null = store_null_score(probes.calibration, torch.cat(seen.keys), seen.gate.similarity, null_rate)
        seen = replace(seen, null_score=null)
    choices = list(range(len(probes.letters)))  # the letters' columns of the kept logits
    mcq_logits = method.letter_logits(probes.mcq_seqs, probes.letters, probes.mcq_keys, seen)
    out = {"mcq_acc": general.mcq_accuracy(mcq_logits, choices, probes.mcq)}
    if probes.mmlu:
        logits = method.letter_logits(probes.mmlu_seqs, probes.letters, probes.mmlu_keys, seen)
        out["mmlu_acc"] = general.mcq_accuracy(logits, choices, probes.mmlu)
    out["kl"] = general.mean_kl(method.kl_sums(probes.text_seqs, probes.reference, probes.text_keys, seen))
    if probes.qa_convs:
        got = method.generate(probes.qa_convs, probes.qa_keys, seen, GENERAL_QA_TOKENS)
        out["general_qa_same"] = sum(a == b for a, b in zip(got, probes.qa_base, strict=True)) / len(got)
    return out


# -- one evaluation step ---------------------------------------------------------------------------


def evaluate(
    cfg: BenchConfig, method: Method, shared: Shared, part: Partition, probes: Probes, k: int, gate: GateConfig
) -> list[dict]:
    """Test every memory learned so far (the first k): recall, QA, gold log-prob, routing accuracy, general."""
    recall_tokens = max(part.recall_tokens) + cfg.recall_extra_tokens  # one length for every step: reusable
    seen = Seen(part.keys[:k], [r.passage for r in part.records[:k]], gate, recall_tokens)

    # recall: one cue per memory
    cue_keys = part.cue_keys[:k]
    recall_convs = method.conversations("recall", part.cues[:k], cue_keys, seen)
    recalls = method.generate(recall_convs, cue_keys, seen, recall_tokens)
    cue_top1 = method.top1(cue_keys, seen)
    rec_emb = embedder_keys(recalls)
    rec_cos = cosine_matrix(rec_emb, part.passage_emb)
    floor = random_pair_floor(rec_emb, part.passage_emb)  # recall i against the partition's other passages

    # QA: the seen memories' questions
    seen_q = [(j, i, q, a) for j, (i, q, a) in enumerate(part.questions) if i < k]
    golds = [a for *_, a in seen_q]
    answers, logps, q_top1 = [], [], []
    if seen_q:
        q_keys = part.question_keys[[j for j, *_ in seen_q]]
        qa_convs = method.conversations("qa", [q for _, _, q, _ in seen_q], q_keys, seen)
        answers = method.generate(qa_convs, q_keys, seen, cfg.qa_tokens)
        logps = method.gold_logprobs(qa_convs, golds, q_keys, seen)
        q_top1 = method.top1(q_keys, seen)

    rows = []
    for i in range(k):
        mine = [n for n, (_, mi, _, _) in enumerate(seen_q) if mi == i]
        row = {
            "kind": "memory",
            "partition": part.index,
            "method": method.name,
            "step": k,
            "memory": i,
            "name": part.records[i].name,
            "recall_cos": float(rec_cos[i, i]),
            "recall_floor": floor,
            "recall": recalls[i],
        }
        if cue_top1 is not None:
            tops = [cue_top1[i]] + [q_top1[n] for n in mine]
            row["gate_top1"] = sum(int(t == i) for t in tops) / len(tops)
        if mine:
            scores = [qa_scores(answers[n], golds[n]) for n in mine]
            row["qa_acc"] = sum(s["qa_acc"] for s in scores) / len(mine)
            row["qa_f1"] = sum(s["qa_f1"] for s in scores) / len(mine)
            row["logprob"] = sum(logps[n] for n in mine) / len(mine)
            row["answers"] = [answers[n] for n in mine]
            if cfg.judge_url and cfg.judge_model:
                judged = [llm_judge(cfg.judge_url, cfg.judge_model, seen_q[n][2], golds[n], answers[n]) for n in mine]
                row["llm_judge"] = sum(judged) / len(judged)
        rows.append(row)

    general_row = general_ability(method, probes, seen, cfg.general_null_rate)
    step_row = {"kind": "step", "partition": part.index, "method": method.name, "step": k, **general_row}
    step_row["memories"] = len(part.records)  # the partition's last step: the report tells finished methods apart
    for metric in ("recall_cos", "qa_acc", "qa_f1", "logprob", "gate_top1", "llm_judge"):
        vals = [r[metric] for r in rows if metric in r]
        if vals:
            step_row[f"mean_{metric}"] = sum(vals) / len(vals)
    step_row["recall_floor"] = floor
    return rows + [step_row]


# -- the run ---------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    """metrics.jsonl rows; a torn last line (killed mid-write) is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def closed_steps(rows: list[dict], partition: int, method: str) -> set[int]:
    """Steps of a method whose 'step' row was written (the step finished)."""
    return {r["step"] for r in rows if r["kind"] == "step" and r["partition"] == partition and r["method"] == method}


def drop_open_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Rewrite metrics.jsonl without the rows of steps that never closed (a run killed mid-step)."""
    closed = {(r["partition"], r["method"], r["step"]) for r in rows if r["kind"] == "step"}
    keep = [r for r in rows if (r["partition"], r["method"], r["step"]) in closed]
    if len(keep) != len(rows) or (path.is_file() and len(path.read_text().splitlines()) != len(rows)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
        tmp.replace(path)
    return keep


def folder_lock(out: Path) -> FileLock:
    """The run folder's lock: several bench commands (processes) may fill one folder with different methods;
    config.json, metrics.jsonl and the report are read and written under it."""
    out.mkdir(parents=True, exist_ok=True)
    return FileLock(str(out / ".lock"))


def read_closed_rows(out: Path) -> list[dict]:
    """The folder's rows, without those of steps that never closed (dropped from the file too)."""
    path = out / "metrics.jsonl"
    with folder_lock(out):
        return drop_open_rows(path, read_rows(path))


def append_rows(path: Path, rows: list[dict]) -> None:
    with folder_lock(path.parent), open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()


def eval_steps(n: int, every: int) -> list[int]:
    """The steps after which every seen memory is tested: each `every`-th and the last."""
    return sorted({k for k in range(1, n + 1) if k % every == 0} | {n})


def check_config(cfg: BenchConfig, out: Path) -> None:
    """Write config.json, or check a resumed run's config is the same except for its methods, partitions and
    threads.

    Methods and partitions may differ: one folder can be filled by several commands (say the full-FT methods
    on one machine, the rest on another, or partition 1 in a later session); config.json then lists every
    method and partition run into it, and the report's mean ± std covers every partition in the folder.
    """
    with folder_lock(out):
        _check_config(cfg, out)


def _check_config(cfg: BenchConfig, out: Path) -> None:
    path = out / "config.json"
    now = cfg.to_dict()
    if path.is_file():
        old = json.loads(path.read_text())
        same = {**old, "threads": now["threads"], "methods": now["methods"], "partitions": now["partitions"]}
        if same != now:
            diff = sorted(k for k in now if same.get(k) != now[k])
            raise MegamemError(f"{out} holds a run with another config (differs in {', '.join(diff)}); use a new --out")
        now["methods"] = list(dict.fromkeys([*old["methods"], *now["methods"]]))
        now["partitions"] = sorted({*old["partitions"], *now["partitions"]})
    path.write_text(json.dumps(now, indent=2))


def validate(cfg: BenchConfig) -> None:
    """Refuse bad input before loading anything."""
    if not Path(cfg.data).is_dir():
        raise MegamemError(f"data folder {cfg.data} does not exist")
    files = partition_files(cfg.data)
    for p in cfg.partitions:
        if not 0 <= p < len(files):
            raise MegamemError(f"partition {p} out of range: {cfg.data} has {len(files)}")
    if cfg.memories is not None and cfg.memories < 1:
        raise MegamemError("--memories must be at least 1")
    if cfg.eval_every < 1:
        raise MegamemError("--eval-every must be at least 1")
    if cfg.rank is not None and cfg.rank < 1:
        raise MegamemError("--rank must be at least 1")
    if cfg.batch_size < 1:
        raise MegamemError("--batch-size must be at least 1")
    expand_methods(cfg.methods)
    if cfg.targets not in TARGETS and cfg.targets not in THIRDS:
        raise MegamemError(f"unknown targets {cfg.targets!r}; choose from mlp, attn, all, early, mid, late")


def skipped(method: str, part: Partition) -> bool:
    """Whether a method is not run on a partition: irag where there are no questions (its recall turn is
    mega's, so its rows would only copy mega's)."""
    return method_spec(method).family == "irag" and not part.questions


def estimate_seconds(cfg: BenchConfig, shared: Shared, part: Partition, probe_s: float) -> tuple[float, dict]:
    """Expected CPU seconds of the whole run from one measured training step and one measured generation."""
    from ..train import batches, fit, train_adapter
    from .infer import generate as _gen

    model, tok = shared.model, shared.tok
    texts = part.texts(0)
    n = len(part.records)
    fams = {method_spec(m).family for m in expand_methods(cfg.methods)}
    recipe3 = Recipe(lr=1e-12, epochs=1, batch_size=shared.recipe.batch_size, max_steps=3)

    def step_seconds(train: Callable[[Callable[[int, int, float], None]], object]) -> float:
        """Seconds per training step after the first (which pays one-off allocation and warm-up: timing it alone
        over-stated the full-FT step 3-4x)."""
        marks: list[float] = []
        train(lambda *_: marks.append(time.perf_counter()))
        return (marks[-1] - marks[0]) / max(len(marks) - 1, 1)

    full_step = lora_step = 0.0
    if fams & {"full", "full-l2", "full-ewc", "full-batch"}:
        full_step = step_seconds(lambda cb: fit(model, tok, texts, list(model.parameters()), recipe3, on_step=cb))
        shared.restore()
    if fams & {"mega", "irag", "lora", "lora-l2"}:
        lora_step = step_seconds(lambda cb: train_adapter(model, tok, texts, shared.spec, recipe3, cb))
    convs = [conversation("qa", part.cues[0])] * cfg.batch_size
    t0 = time.perf_counter()
    _gen(model, tok, convs, 1)
    prefill_s = time.perf_counter() - t0  # a full batch's prompt pass
    t0 = time.perf_counter()
    _gen(model, tok, convs, 9)
    tok_s = max(time.perf_counter() - t0 - prefill_s, 0.0) / 8  # one decoding step of a full batch
    per_mem_steps = len(batches([Example([], [])] * len(texts), shared.recipe))
    steps = eval_steps(n, cfg.eval_every)
    qa_per_mem = max(1, len(part.questions) // n) if part.questions else 0
    recall_len = max(part.recall_tokens) + cfg.recall_extra_tokens

    def eval_cost(k: int, irag: bool) -> float:
        batches_qa = -(-k * qa_per_mem // cfg.batch_size)
        batches_rec = -(-k // cfg.batch_size)
        # upper bounds: every batch full, every answer as long as allowed; QA adds the log-prob pass
        c = batches_rec * (prefill_s + recall_len * tok_s) + batches_qa * (2 * prefill_s + cfg.qa_tokens * tok_s)
        if irag:
            c += batches_qa * (prefill_s + recall_len * tok_s)
        return c + probe_s

    detail = {}
    for m in expand_methods(cfg.methods):
        fam = method_spec(m).family
        train = 0.0
        if skipped(m, part):
            continue
        if fam in ("mega", "irag", "lora", "lora-l2"):
            train = n * per_mem_steps * lora_step * (0 if fam == "irag" and "mega" in cfg.methods else 1)
        elif fam in ("full", "full-l2", "full-ewc"):
            train = n * per_mem_steps * full_step * (1.3 if fam != "full" else 1.0)
            if fam == "full-ewc":  # the Fisher: one backward pass per training text
                train += n * len(texts) * full_step * 0.5
        elif fam == "full-batch":
            train = n * per_mem_steps * full_step
        if fam in ("base", "rag", "mega", "irag"):  # outputs reused (see reuse): each step tests its new memories
            ev = sum(eval_cost(k - prev, fam == "irag") for prev, k in zip([0, *steps[:-1]], steps, strict=True))
        elif fam == "full-batch":
            ev = eval_cost(n, False)
        else:
            ev = sum(eval_cost(k, fam == "irag") for k in steps)
        detail[m] = train + ev
    return sum(detail.values()) * len(cfg.partitions), {
        "full_step_s": full_step,
        "lora_step_s": lora_step,
        "decode_step_s": tok_s,
        "prefill_s": prefill_s,
        "probe_s": probe_s,
        "per_method_s": {m: round(v * len(cfg.partitions)) for m, v in detail.items()},
    }


def setup(cfg: BenchConfig) -> tuple[Shared, GateConfig]:
    """Load the model once, add the gated layers of the run's adapter spec, keep its base weights."""
    model, tok = load_model(cfg.model)
    n_layers = int(model.config.num_hidden_layers)
    spec = lora_spec(cfg, n_layers).resolved(n_layers)
    inject_for(model, spec)
    recipe = replace(
        PROTOCOL_RECIPE,
        lr=cfg.lrs["mega"],
        epochs=cfg.epochs,
        seed=cfg.seed,
        max_steps=cfg.max_steps,
    )
    shared = Shared(model, tok, spec, recipe, keep_base(model), batch_size=cfg.batch_size)
    # the pinned protocol's gate: the store default's similarity, beta and top-k, without the null memory
    gate = replace(default_gate(cfg.key_function), null_rate=None)
    if cfg.beta is not None:
        gate = replace(gate, beta=cfg.beta)
    return shared, gate


def run_bench(
    cfg: BenchConfig, out: Path, console: Console | None = None, progress: bool = True, estimate_only: bool = False
) -> Path:
    """Run (or resume) the benchmark into `out`; returns the run folder. estimate_only: print the expected
    CPU time (from measured steps) and stop, writing nothing."""

    console = console or Console(stderr=True)
    validate(cfg)
    with torch_threads(cfg.threads):
        return _run_bench(cfg, out, console, progress, estimate_only)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with n torch CPU threads (None: leave as is), restoring the previous count after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_bench(cfg: BenchConfig, out: Path, console: Console, progress: bool, estimate_only: bool) -> Path:
    from .report import write_report

    methods = expand_methods(cfg.methods)
    if not estimate_only:
        check_config(cfg, out)
    rows = read_closed_rows(out) if not estimate_only else []

    shared, gate = setup(cfg)
    model, tok = shared.model, shared.tok

    t0 = time.perf_counter()
    probes = make_probes(cfg, model, tok)
    probe_s = (time.perf_counter() - t0) * 1.5
    timings: dict = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not progress,
    ) as bar:
        for p in cfg.partitions:
            part = prepare(cfg, p, model, tok)
            n = len(part.records)
            if not timings:
                total_s, timings = estimate_seconds(cfg, shared, part, probe_s)
                shared.restore()
                console.print(
                    f"expected CPU time: about {total_s / 60:.0f} min ({total_s:.0f} s) for the whole run, "
                    f"{len(methods)} methods x "
                    f"{n} memories x {len(cfg.partitions)} partition(s); measured: full-FT step "
                    f"{timings['full_step_s']:.2f} s, LoRA step {timings['lora_step_s']:.2f} s, decode step "
                    f"{timings['decode_step_s'] * 1000:.0f} ms and prompt pass {timings['prefill_s']:.2f} s "
                    f"(batch {cfg.batch_size}), general probes {probe_s:.1f} s",
                    highlight=False,
                )
                if estimate_only:
                    for m, sec in timings["per_method_s"].items():
                        console.print(f"  {m}: about {sec / 60:.0f} min", highlight=False)
                    return out
                (out / "timings.json").write_text(json.dumps({**timings, "expected_s": total_s}, indent=2))
            shared.adapters, shared.caches = {}, {}  # memory indices name other adapters in another partition
            steps = eval_steps(n, cfg.eval_every)
            overall = bar.add_task(f"partition {p}", total=len(methods) * n)
            for name in methods:
                if skipped(name, part):
                    console.print(f"partition {p} has no questions: {name} (recall, then answer) is skipped")
                    bar.advance(overall, n)
                    continue
                method = make_method(name, shared, cfg.lrs)
                rows = _run_method(cfg, method, shared, part, probes, steps, gate, out, rows, bar, overall)
            bar.remove_task(overall)
    with folder_lock(out):  # every method in the folder, also those another command added meanwhile
        write_report(out, read_rows(out / "metrics.jsonl"), cfg)
    return out


def _run_method(
    cfg: BenchConfig,
    method: Method,
    shared: Shared,
    part: Partition,
    probes: Probes,
    steps: list[int],
    gate: GateConfig,
    out: Path,
    rows: list[dict],
    bar: Progress,
    overall,
) -> list[dict]:
    """Learn and test one method over a partition, resuming from its saved state and closed steps."""
    n = len(part.records)
    folder = out / "state" / f"p{part.index}" / method.name
    closed = closed_steps(rows, part.index, method.name)
    if method.batch_only:
        steps = [n]
    if all(k in closed for k in steps):  # finished: its rows are all there, whether or not its state is kept
        bar.advance(overall, n)
        return rows
    last = max(k for k in steps if k not in closed)  # nothing after the last untested step needs learning
    method.start()
    learned = method.load(folder)
    bar.update(overall, advance=learned if not method.batch_only else (n if learned else 0))
    sub = bar.add_task(f"  {method.name}", total=None)
    on_step: Callable[[int, int, float], None] = lambda s, t, _loss: bar.update(sub, completed=s, total=t)  # noqa: E731
    metrics = out / "metrics.jsonl"

    def test(k: int) -> None:
        bar.update(sub, description=f"  {method.name}: testing {k} memories", completed=0, total=None)
        t0 = time.perf_counter()
        new = evaluate(cfg, method, shared, part, probes, k, gate)
        new[-1]["seconds"] = round(time.perf_counter() - t0, 2)
        append_rows(metrics, new)
        rows.extend(new)
        closed.add(k)

    if learned in steps and learned not in closed:  # killed after saving the state, before closing the step
        test(learned)
    if method.batch_only:
        if not learned:
            bar.update(sub, description=f"  {method.name}: learning all {n} memories")
            method.learn_all([part.texts(i) for i in range(n)], on_step)
            method.save(folder, n)
            bar.update(overall, advance=n)
        if n not in closed:
            test(n)
    else:
        for k in range(learned + 1, last + 1):
            bar.update(sub, description=f"  {method.name}: learning memory {k}/{n}", completed=0, total=None)
            method.learn(k - 1, part.texts(k - 1), on_step)
            method.save(folder, k)
            if k in steps and k not in closed:  # closed already: its state was lost and relearned, its rows kept
                test(k)
            bar.update(overall, advance=1)
    bar.remove_task(sub)
    return rows
