"""Compositional questions (the paper's Table 2): each needs two wiki passages at once.

Every passage the shipped questions name (partitions 0 and 1 of mega-wiki2024) is learned; then each
question is answered by mega and irag through a soft gate (beta 0.1 by default, as in the paper), by
rag with the top-2 retrieved passages in context, and by full-batch fine-tuning on all the passages.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..datasets import Record, load_partition
from ..errors import MegamemError
from ..keys import compute_keys
from .config import BenchConfig, check_config, validate
from .methods import Method, Seen, gate_matrix, make_method
from .metrics import qa_scores
from .report import ordered
from .run import setup, torch_threads
from .runlog import append_rows, folder_lock, read_rows
from .spec import MethodSpec

METHODS = ("mega", "irag", "rag", "full-batch")
BETA = 0.1


def shipped_questions() -> list[dict]:
    """The project's compositional questions: {"question", "answer", "themes": [A, B], "partitions"?}."""
    text = resources.files("megamem").joinpath("data/compositional.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def needed_records(data: str, questions: list[dict]) -> list[Record]:
    """The records the questions name, from partitions 0 and 1, in partition then file order."""
    wanted = {t for q in questions for t in q["themes"]}
    records = [r for p in (0, 1) for r in load_partition(data, p) if r.name in wanted]
    missing = wanted - {r.name for r in records}
    if missing:
        raise MegamemError(f"compositional themes not found in partitions 0-1 of {data}: {', '.join(sorted(missing))}")
    return records


def run_compositional(
    cfg: BenchConfig,
    out: Path,
    console: Console | None = None,
    progress: bool = True,
    questions: list[dict] | None = None,
) -> Path:
    """Learn every named passage with each method, answer the two-passage questions, write compositional.md."""
    validate(cfg)
    with torch_threads(cfg.threads):
        return _run(cfg, out, console or Console(stderr=True), progress, questions)


def _run(cfg: BenchConfig, out: Path, console: Console, progress: bool, questions: list[dict] | None) -> Path:
    methods = [m for m in cfg.methods if m in METHODS]
    if not methods:
        raise MegamemError(f"compositional questions are run with {', '.join(METHODS)}")
    questions = questions if questions is not None else shipped_questions()
    records = needed_records(cfg.data, questions)
    check_config(cfg, out)
    rows = read_rows(out / "metrics.jsonl")  # a question's rows and their summary are appended in one write
    shared, gate = setup(cfg)
    if cfg.beta is None:
        gate = replace(gate, beta=BETA)
    model, tok = shared.model, shared.tok
    keys = [compute_keys(cfg.key_function, [r.passage, *r.paraphrases], model, tok) for r in records]
    qkeys = compute_keys(cfg.key_function, [q["question"] for q in questions], model, tok)
    index = {r.name: i for i, r in enumerate(records)}
    console.print(f"compositional: {len(questions)} questions over {len(records)} passages", highlight=False)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not progress,
    ) as bar:
        for name in methods:
            if any(r["kind"] == "compositional-step" and r["method"] == name for r in rows):
                continue
            method = make_method(name, shared, cfg.lrs)
            task = bar.add_task(f"{name}: learning", total=len(records))
            _learn(method, records, out / "state" / "compositional" / name, bar, task)
            bar.update(task, description=f"{name}: answering")
            t0 = time.perf_counter()
            new = _answer(cfg, method, records, keys, qkeys, questions, index, gate)
            new.append(_summary(name, new, time.perf_counter() - t0))
            append_rows(out / "metrics.jsonl", new)
            rows += new
            bar.remove_task(task)
    with folder_lock(out):  # every method in the folder, also those another command added meanwhile
        rows = read_rows(out / "metrics.jsonl")
        done = ordered(r["method"] for r in rows if r["kind"] == "compositional-step")
        (out / "compositional.md").write_text(_table(rows, done, gate.beta), encoding="utf-8")
    return out


def _learn(method: Method, records: list[Record], folder: Path, bar: Progress, task) -> None:
    """Learn every record (saving after each so a killed run resumes), or all at once for full-batch."""
    method.start()
    learned = method.load(folder)
    texts = [[r.passage, *r.paraphrases] for r in records]
    if method.batch_only:
        if not learned:
            method.learn_all(texts)
            method.save(folder, len(records))
        bar.update(task, completed=len(records))
        return
    if method.static:
        return
    for i in range(learned, len(records)):
        method.learn(i, texts[i])
        method.save(folder, i + 1)
        bar.update(task, completed=i + 1)


def _answer(cfg, method, records, keys, qkeys, questions, index, gate) -> list[dict]:
    """Each question answered by the method after learning every record; rag puts the top-2 passages in context."""
    tok = method.shared.tok
    recall_tokens = max(len(tok(r.passage)["input_ids"]) for r in records) + cfg.recall_extra_tokens
    seen = Seen(keys, [r.passage for r in records], gate, recall_tokens, retrieve=2)
    top2 = gate_matrix(qkeys, keys, gate)[1].topk(min(2, len(records)), dim=1).indices.tolist()
    convs = method.conversations("qa", [q["question"] for q in questions], qkeys, seen)
    golds = [q["answer"] for q in questions]
    answers = method.generate(convs, qkeys, seen, cfg.qa_tokens)
    logps = method.gold_logprobs(convs, golds, qkeys, seen)
    w = method.gate(qkeys, seen)
    rows = []
    for n, q in enumerate(questions):
        need = {index[t] for t in q["themes"]}
        rows.append(
            {
                "kind": "compositional",
                "method": method.name,
                "question": q["question"],
                "answer": answers[n],
                "gold": golds[n],
                **qa_scores(answers[n], golds[n]),
                "logprob": logps[n],
                "top2_both": float(need <= set(top2[n])),
                **({"gate_on_needed": float(sum(float(w[n, i]) for i in need))} if w is not None else {}),
            }
        )
    return rows


def _summary(name: str, rows: list[dict], seconds: float) -> dict:
    out = {"kind": "compositional-step", "method": name, "seconds": round(seconds, 2)}
    for f in ("qa_acc", "qa_f1", "logprob", "top2_both", "gate_on_needed"):
        if f in rows[0]:
            out[f"mean_{f}"] = sum(r[f] for r in rows) / len(rows)
    return out


def _table(rows: list[dict], methods: list[str], beta: float) -> str:
    lines = [
        "# Compositional questions (two passages each)",
        "",
        f"Gate beta {beta:g} for mega and irag; rag puts the top-2 retrieved passages in context.",
        "",
        "| method | QA acc | QA F1 | log p(gold) | both passages in top-2 | gate weight on the two |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        s = [r for r in rows if r["kind"] == "compositional-step" and r["method"] == m]
        if s:
            r = s[-1]
            gated = MethodSpec.parse(m).family in (
                "mega",
                "irag",
            )  # rag and full-batch have no gate (older rows carry one)
            gate = f"{r['mean_gate_on_needed']:.3f}" if gated and "mean_gate_on_needed" in r else "–"
            lines.append(
                f"| {m} | {r['mean_qa_acc']:.3f} | {r['mean_qa_f1']:.3f} | {r['mean_logprob']:.2f} | "
                f"{r['mean_top2_both']:.3f} | {gate} |"
            )
    return "\n".join(lines) + "\n"
