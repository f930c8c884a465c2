"""The run's report: results.md in the paper's Table 1 layout and PNG plots of the forgetting curves."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from . import missing_extra
from .methods import METHODS
from .spec import MethodSpec

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
except ModuleNotFoundError as exc:
    raise missing_extra(exc) from None

COLUMNS = [  # (step-row field, header, digits)
    ("mean_recall_cos", "recall cos", 3),
    ("recall_floor", "random-pair floor", 3),
    ("mean_qa_acc", "QA acc", 3),
    ("mean_qa_f1", "QA F1", 3),
    ("mean_llm_judge", "QA acc (LLM judge)", 3),
    ("mean_logprob", "log p(gold)", 2),
    ("mean_gate_top1", "gate/retrieval top-1", 3),
    ("mcq_acc", "general MCQ acc", 3),
    ("mmlu_acc", "MMLU acc", 3),
    ("kl", "KL to base", 4),
    ("general_qa_same", "general QA = base", 3),
]


def mean_std(values: list[float], digits: int) -> str:
    """'m ± s' over partitions ('m' alone for one partition), '–' when there is no value."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    m = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def partition_ends(rows: list[dict]) -> dict[int, int]:
    """Per partition, its number of memories: the step after its last memory (rows written before step rows
    carried 'memories' count the furthest step any method reached)."""
    ends: dict[int, int] = {}
    for r in rows:
        if r["kind"] == "step":
            ends[r["partition"]] = max(ends.get(r["partition"], 0), r.get("memories", r["step"]))
    return ends


def progress(rows: list[dict]) -> dict[tuple[str, int], tuple[int, int]]:
    """(method, partition) -> (last closed step, the partition's number of memories)."""
    ends, last = partition_ends(rows), {}
    for r in rows:
        if r["kind"] == "step":
            key = (r["method"], r["partition"])
            last[key] = max(last.get(key, 0), r["step"])
    return {key: (k, ends[key[1]]) for key, k in last.items()}


def finished_rows(rows: list[dict]) -> list[dict]:
    """The rows of the (method, partition) pairs that reached their partition's last memory: a method stopped
    part-way through one partition would otherwise be averaged, at its last step, with another's final state."""
    done = {key for key, (k, end) in progress(rows).items() if k == end}
    return [r for r in rows if (r["method"], r["partition"]) in done]


def final_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """Per method, the step row of the state after its partition's last memory, one per partition that reached it
    (a method stopped part-way through a partition has no such row there)."""
    ends = partition_ends(rows)
    out: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["partition"]):
        if r["kind"] == "step" and r["step"] == ends[r["partition"]]:
            out[r["method"]].append(r)
    return out


def markdown_table(groups: dict[str, list[dict]], methods: list[str], columns: list, lead: dict) -> str:
    """One row per method of `groups` (its rows, one per partition): the `lead` columns ({header: function of
    the rows}), then mean ± std of each of `columns` (field, header, digits) that any row has."""
    cols = [c for c in columns if any(c[0] in r for rs in groups.values() for r in rs)]
    lines = [
        "| method | " + " | ".join([*lead, *(h for _, h, _ in cols)]) + " |",
        "|---|" + "---|" * (len(lead) + len(cols)),
    ]
    for m in methods:
        rs = groups.get(m)
        if rs:
            cells = [str(f(rs)) for f in lead.values()] + [mean_std([r.get(f) for r in rs], d) for f, _, d in cols]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def last_step(rs: list[dict]) -> int:
    return max(r["step"] for r in rs)


def results_table(rows: list[dict], methods: list[str]) -> str:
    """The Markdown table: one row per method, mean ± std over partitions after the last memory."""
    return markdown_table(final_rows(rows), methods, COLUMNS, {"partitions": len, "memories": last_step})


FIRST_COLUMNS = [("recall_cos", "recall cos", 3), ("qa_acc", "QA acc", 3), ("logprob", "log p(gold)", 2)]


def first_memory_table(rows: list[dict], methods: list[str]) -> str:
    """The first memory after the last one is learned (the paper's forgetting test), per method: mean ± std
    over partitions of its recall cosine, QA accuracy and gold log-prob."""
    at = {(r["method"], r["partition"]): r["step"] for rs in final_rows(rows).values() for r in rs}
    firsts: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["kind"] == "memory" and r.get("memory") == 0 and at.get((r["method"], r["partition"])) == r["step"]:
            firsts[r["method"]].append(r)
    return markdown_table(firsts, methods, FIRST_COLUMNS, {"after memories": last_step})


def curve(rows: list[dict], method: str, kind: str, field: str, memory: int | None = None) -> tuple[list, list]:
    """(steps, mean over partitions) of one field of a method's rows."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if r["kind"] != kind or r["method"] != method or field not in r:
            continue
        if memory is not None and r.get("memory") != memory:
            continue
        v = r[field]
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            by_step[r["step"]].append(v)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def plot(rows: list[dict], methods: list[str], kind: str, field: str, title: str, path: Path, memory=None) -> bool:
    """One line per method of `field` against memories learned; False when no method has the field."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for m in methods:
        xs, ys = curve(rows, m, kind, field, memory)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=m)
            drawn = True
    if drawn and field in ("recall_cos", "mean_recall_cos"):
        floors = [r["recall_floor"] for r in rows if r["kind"] == "step" and r.get("recall_floor") is not None]
        floors = [f for f in floors if not math.isnan(f)]
        if floors:
            ax.axhline(statistics.fmean(floors), color="gray", linestyle="--", linewidth=1, label="random-pair floor")
    if drawn:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("memories learned")
        ax.set_ylabel(field)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


PLOTS = [  # (file, row kind, field, title, memory)
    ("forgetting_recall.png", "memory", "recall_cos", "First memory: recall cosine", 0),
    ("forgetting_qa.png", "memory", "qa_acc", "First memory: QA accuracy", 0),
    ("general_mcq.png", "step", "mcq_acc", "General knowledge (MCQ accuracy)", None),
    ("general_kl.png", "step", "kl", "KL divergence to the base model", None),
    ("general_mmlu.png", "step", "mmlu_acc", "MMLU accuracy", None),
    ("average_qa.png", "step", "mean_qa_acc", "QA accuracy over all seen memories", None),
    ("average_recall.png", "step", "mean_recall_cos", "Recall cosine over all seen memories", None),
]


def ordered(names) -> list[str]:
    """Method names once each, in the paper's order of families (variants of one family in order of appearance):
    rows of several commands filling one folder come interleaved."""
    rank = {f: i for i, f in enumerate(METHODS)}
    return sorted(dict.fromkeys(names), key=lambda m: rank.get(MethodSpec.parse(m).family, len(METHODS)))


def write_report(out: Path, rows: list[dict], cfg) -> list[Path]:
    """Write results.md and the plots into the run folder; returns the files written."""
    methods = ordered(r["method"] for r in rows)
    written, finished = [], finished_rows(rows)
    for name, kind, field, title, memory in PLOTS:
        if plot(finished, methods, kind, field, title, out / name, memory):
            written.append(out / name)
    text = [
        "# megamem bench results",
        "",
        f"Data `{cfg.data}`, partitions {sorted({r['partition'] for r in rows})}, model `{cfg.model or 'default'}`, "
        f"{cfg.epochs} epochs, targets {cfg.targets}, rank {cfg.rank or 'default'}.",
        "",
        "State after the last memory; mean ± std over partitions of the mean over all memories.",
        "Recall cos is the sentence-embedder cosine between passage and recall; the random-pair floor is the",
        "cosine between a recall and the other memories' passages.",
        "",
        results_table(rows, methods),
        "",
        "The first memory after the last one is learned (how much of it each method kept):",
        "",
        first_memory_table(rows, methods),
        "",
        "Plots: " + ", ".join(f"[{p.name}]({p.name})" for p in written),
        "",
    ]
    partial = [
        f"{m} in partition {p} ({k} of {end} memories)" for (m, p), (k, end) in progress(rows).items() if k < end
    ]
    if partial:
        text += ["Not finished, left out of the tables and plots: " + ", ".join(sorted(partial)) + ".", ""]
    (out / "results.md").write_text("\n".join(text), encoding="utf-8")
    return [out / "results.md", *written]
