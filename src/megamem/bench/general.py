"""General ability probes: the shipped multiple-choice questions, MMLU from local files, and KL to the base model.

Multiple choice is scored by comparing the next-token logits of the letters A-D after the prompt
(zero-shot, the usual instruct-model form). KL is measured on a shipped general-text sample against the
base model's next-token distributions, stored as each position's top-k probabilities plus one bucket
for the rest (a lower bound on the exact KL that needs ~1000x less memory than full distributions).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import MegamemError
from ..model import chat_ids

LETTERS = "ABCD"


@dataclass
class MCQ:
    """One multiple-choice question: four choices, the index of the right one."""

    question: str
    choices: list[str]
    answer: int
    subject: str = ""


def shipped_mcq() -> list[MCQ]:
    """The project's general-knowledge probe (src/megamem/data/general_mcq.jsonl)."""
    text = resources.files("megamem").joinpath("data/general_mcq.jsonl").read_text(encoding="utf-8")
    return [_mcq(json.loads(line)) for line in text.splitlines() if line.strip()]


def _mcq(d: dict) -> MCQ:
    return MCQ(d["question"], list(d["choices"]), int(d["answer"]), d.get("subject", ""))


def shipped_general_qa() -> list[dict]:
    """The shipped general questions with short answers (data/general_qa.jsonl; 'near' marks near-topic ones)."""
    text = resources.files("megamem").joinpath("data/general_qa.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def shipped_text(max_paragraphs: int | None = None) -> list[str]:
    """The shipped general-text sample, one paragraph per item."""
    text = resources.files("megamem").joinpath("data/general_text.txt").read_text(encoding="utf-8")
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    return paras[:max_paragraphs] if max_paragraphs else paras


def load_mmlu(path: Path | str, subjects: list[str] | None = None, limit: int | None = None) -> list[MCQ]:
    """MMLU test questions from local files: the original CSV release (data/test/SUBJECT_test.csv, no header:
    question, A, B, C, D, letter) or the Hugging Face parquet layout (SUBJECT/test-*.parquet with question,
    choices, answer). `subjects` None = every subject found; `limit` caps questions per subject."""
    root = Path(path)
    if not root.exists():
        raise MegamemError(f"MMLU folder {root} does not exist")
    csvs = sorted(root.rglob("*_test.csv"))
    out: list[MCQ] = []
    if csvs:
        for f in csvs:
            subject = f.name[: -len("_test.csv")]
            if subjects and subject not in subjects:
                continue
            with open(f, newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.reader(fh) if len(r) >= 6]
            out += [MCQ(r[0], r[1:5], LETTERS.index(r[5].strip()), subject) for r in rows[:limit]]
        return _nonempty(out, root)
    parquets = sorted(p for p in root.rglob("test-*.parquet") if p.parent.name not in ("all", "auxiliary_train"))
    if not parquets:
        raise MegamemError(f"no MMLU files in {root} (want */*_test.csv or SUBJECT/test-*.parquet)")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MegamemError("reading MMLU parquet files needs pyarrow (pip install pyarrow)") from None
    for f in parquets:
        subject = f.parent.name
        if subjects and subject not in subjects:
            continue
        rows = pq.read_table(f).to_pylist()[:limit]
        out += [MCQ(r["question"], list(r["choices"]), int(r["answer"]), subject) for r in rows]
    return _nonempty(out, root)


def _nonempty(out: list[MCQ], root: Path) -> list[MCQ]:
    if not out:
        raise MegamemError(f"no MMLU questions of the chosen subjects in {root}")
    return out


def mcq_prompt(q: MCQ) -> str:
    """The zero-shot prompt: question, lettered choices, ask for the letter."""
    lines = [q.question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)]
    return "\n".join(lines) + "\nAnswer with the letter of the correct choice only."


def mcq_inputs(tok: PreTrainedTokenizerBase, qs: list[MCQ]) -> tuple[list[list[int]], list[int]]:
    """Prompt token ids (ending in the assistant's turn) and the token ids of the letters A-D."""
    seqs = [chat_ids(tok, [("user", mcq_prompt(q))], generation_prompt=True) for q in qs]
    letters = [tok(x, add_special_tokens=False)["input_ids"][0] for x in LETTERS]
    return seqs, letters


def mcq_accuracy(logits: torch.Tensor, letters: list[int], qs: list[MCQ]) -> float:
    """Share of questions whose right letter has the highest logit among A-D."""
    if not qs:
        return float("nan")
    picks = logits[:, letters].argmax(dim=-1).tolist()
    return sum(int(p == q.answer) for p, q in zip(picks, qs, strict=True)) / len(qs)


def text_inputs(tok: PreTrainedTokenizerBase, paragraphs: list[str], max_tokens: int = 128) -> list[list[int]]:
    """Token ids of each paragraph, capped at `max_tokens` (plain text, no chat template)."""
    return [tok(p, add_special_tokens=True)["input_ids"][:max_tokens] for p in paragraphs]


@dataclass
class Reference:
    """The base model's next-token distributions, compressed to top-k ids and probabilities per position."""

    ids: list[torch.Tensor]
    probs: list[torch.Tensor]


def make_reference(base_logprobs: list[torch.Tensor], k: int = 64) -> Reference:
    """Top-k of each position's base distribution (the rest is kept as one 'other' bucket)."""
    ids, probs = [], []
    for lp in base_logprobs:
        p, i = lp.exp().topk(k, dim=-1)
        ids.append(i)
        probs.append(p)
    return Reference(ids, probs)


def kl_sum(ref: Reference, i: int, lq: torch.Tensor) -> tuple[float, int]:
    """Paragraph i's summed KL(base || model) over its positions, on the base's top-k tokens plus one bucket
    for the rest, and the number of positions."""
    ids, p = ref.ids[i], ref.probs[i]
    q = lq.exp().gather(-1, ids).clamp_min(1e-12)
    p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - q.sum(-1)).clamp_min(1e-12)
    kl = (p * (p.clamp_min(1e-12).log() - q.log())).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return float(kl.sum()), kl.numel()


def bucketed_kl(ref: Reference, logprobs: list[torch.Tensor]) -> float:
    """Mean over positions of KL(base || model) on the base's top-k tokens plus one bucket for the rest."""
    return mean_kl([kl_sum(ref, i, lq) for i, lq in enumerate(logprobs)])


def mean_kl(sums: list[tuple[float, int]]) -> float:
    """The mean KL per position from per-paragraph (summed KL, positions)."""
    total, n = sum(t for t, _ in sums), sum(n for _, n in sums)
    return max(total / max(n, 1), 0.0)  # KL >= 0; float error can dip a hair below
