"""The test of one step: every memory learned so far is recalled and its questions answered, then the general
ability probes. Everything a method does here goes through its answer calls (methods.Method)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..calibration import calibration_keys, store_null_score
from ..datasets import Record, load_partition
from ..errors import MegamemError
from ..gate import GateConfig
from ..keys import compute_keys, embedder_keys
from ..model import DEFAULT_MODEL
from . import general
from .config import BenchConfig
from .infer import generate, token_logprobs
from .methods import Method, Seen, Shared, method_spec
from .metrics import cosine_matrix, llm_judge, qa_scores, random_pair_floor
from .prompts import conversation

GENERAL_QA_TOKENS = 32  # a short answer; more only lengthens what must match token for token


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


def skipped(method: str, part: Partition) -> bool:
    """Whether a method is not run on a partition: irag where there are no questions (its recall turn is
    mega's, so its rows would only copy mega's)."""
    return method_spec(method).family == "irag" and not part.questions


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
