"""Knowledge retention, MemoryLLM's protocol, for MemoryLLM, MEGa and RAG side by side.

Inject a target passage, then k unrelated passages, then ask the target's questions; accuracy against k.
Targets: the first --targets records of wiki partition --target-partition (2: no method was tuned or trained
on it); the unrelated passages: wiki partition --distractor-partition (3), in file order, the same k for every
target. Every method gets the same text: the passage alone (no paraphrases).

- memoryllm: a fresh pool per target (the product's sizes and shipped parameters), the target written first,
  then the distractors one update each; its qa mode at every k.
- mega: one store learns every target and distractor once (the product's recipe, the passage alone); at k the
  gate may only choose among the target and the first k distractors (Memory.route's scope); the paper's qa
  mode and the product's mega+rag.
- rag: the top-1 passage by the embedder's cosine among the same k + 1, in context, no adapter.
- base: no memory (the floor; it does not depend on k).

A recipe: setup (stores, pools), loop (k by k), save (rows, a table, a plot). Offline judge (the gold answer
contained in a one-sentence answer), Wilson 95% intervals.

    python benchmarks/retention.py --out bench-runs/retention --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, table  # noqa: E402
from qa_modes import wilson  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mega-wiki2024"
KS = (0, 1, 2, 5, 10, 20, 50)
METHODS = ("memoryllm", "mega", "mega+rag", "rag", "base")


def run_mega(args, targets, distractors, out: Path) -> dict[str, dict[int, list[str]]]:
    """Answers of mega (qa), mega+rag and rag at every k, from one store of every passage."""
    from megamem import Item, Memory
    from megamem.answer import MEGA_RAG_SCALE, qa_prompt, with_context
    from megamem.bench.infer import generate

    mem = Memory(out / "mega-store")
    named = [(f"t{i}", r.passage) for i, r in enumerate(targets)] + [
        (f"d{j}", r.passage) for j, r in enumerate(distractors)
    ]
    todo = [Item(text, id=mid) for mid, text in named if not (mem.store and mem.store.get(mid, missing_ok=True))]
    t0 = time.perf_counter()
    if todo:
        mem.add_many(todo, on_memory=lambda i, n: print(f"mega: learning {i + 1}/{n}", file=sys.stderr, flush=True))
    learn_s = time.perf_counter() - t0
    model, tok = mem.load()
    ids = [r.id for r in mem.list()]
    adapters = [mem.adapter(i) for i in ids]
    text_of = {r.id: r.text for r in mem.list()}
    questions = [(f"t{i}", q) for i, r in enumerate(targets) for q, _ in r.qa]
    qa = [qa_prompt(q) for _, q in questions]
    out_answers: dict[str, dict[int, list[str]]] = {"mega": {}, "mega+rag": {}, "rag": {}}
    for k in args.ks:
        weights = torch.zeros(len(questions), len(ids))
        routed_top, rag_top = [], []
        for n, (own, q) in enumerate(questions):
            scope = frozenset([own, *(f"d{j}" for j in range(k))])
            routed = mem.route(q, only=scope)
            for i, w in routed:
                weights[n, ids.index(i)] = w
            routed_top.append(routed[0][0] if routed else None)
            rag_top.append(mem.search(q, only=scope, limit=1)[0][0])
        bs = args.batch_size
        out_answers["mega"][k] = generate(model, tok, [[("user", p)] for p in qa], 64, adapters, weights, bs)
        convs = [[("user", with_context(p, [text_of[t]]) if t else p)] for p, t in zip(qa, routed_top, strict=True)]
        out_answers["mega+rag"][k] = generate(model, tok, convs, 64, adapters, weights * MEGA_RAG_SCALE, bs)
        convs = [[("user", with_context(p, [text_of[t]]))] for p, t in zip(qa, rag_top, strict=True)]
        out_answers["rag"][k] = generate(model, tok, convs, 64, batch_size=bs)
        print(f"mega, mega+rag, rag: k={k} done", file=sys.stderr, flush=True)
    out_answers["_learn_s"] = learn_s  # type: ignore[assignment]
    return out_answers


def run_memoryllm(args, targets, distractors) -> dict[int, list[str]]:
    """MemoryLLM's qa answers at every k: a fresh pool per target, then the distractors, one update each."""
    from megamem.answer import qa_prompt
    from megamem.memoryllm import MemoryLLM, Pool
    from megamem.memoryllm.store import shipped_params
    from megamem.model import DEFAULT_MODEL, load_model

    mllm = MemoryLLM(*load_model())
    params = Path(args.params) if args.params else shipped_params(DEFAULT_MODEL)
    if params is not None:
        mllm.load_params(params)
    answers: dict[int, list[str]] = {k: [] for k in args.ks}
    writes, write_s, asks, ask_s = 0, 0.0, 0, 0.0
    for i, r in enumerate(targets):
        t = time.perf_counter()
        pool = mllm.inject(Pool.empty(seed=i), r.passage)
        write_s, writes = write_s + time.perf_counter() - t, writes + 1
        convs = [[("user", qa_prompt(q))] for q, _ in r.qa]
        for j in range(max(args.ks) + 1):
            if j in answers:
                t = time.perf_counter()
                answers[j] += mllm.answer(pool, convs, 64)
                ask_s, asks = ask_s + time.perf_counter() - t, asks + 1
            if j < max(args.ks):
                t = time.perf_counter()
                pool = mllm.inject(pool, distractors[j].passage)
                write_s, writes = write_s + time.perf_counter() - t, writes + 1
        print(f"memoryllm: target {i + 1}/{len(targets)}", file=sys.stderr, flush=True)
    # per write (one passage, one update) and per batch of a target's questions (3, decoded together)
    answers["_timing"] = {"write_s": write_s / writes, "answer_batch_s": ask_s / asks}  # type: ignore[index]
    return answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=20)
    ap.add_argument("--target-partition", type=int, default=2)
    ap.add_argument("--distractor-partition", type=int, default=3)
    ap.add_argument("--ks", default=",".join(map(str, KS)))
    ap.add_argument("--methods", default="memoryllm,mega,base")
    ap.add_argument("--params", default=None, help="MemoryLLM parameters (default: the shipped ones)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench-runs/retention"))
    args = ap.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    from megamem.bench.metrics import qa_scores
    from megamem.datasets import load_partition

    # -- setup -----------------------------------------------------------------------------------------
    targets = load_partition(DATA, args.target_partition, args.targets)
    distractors = load_partition(DATA, args.distractor_partition, max(args.ks))
    golds = [a for r in targets for _, a in r.qa]
    args.out.mkdir(parents=True, exist_ok=True)
    answers_file = args.out / "answers.json"
    answers = json.loads(answers_file.read_text()) if answers_file.exists() else {}  # resumable, method by method

    # -- loop ------------------------------------------------------------------------------------------
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        if method in answers:
            continue
        if method == "memoryllm":
            got = run_memoryllm(args, targets, distractors)
            answers["_memoryllm_timing"] = got.pop("_timing")
            answers["memoryllm"] = {str(k): v for k, v in got.items()}
        elif method == "mega":
            got = run_mega(args, targets, distractors, args.out)
            answers["_mega_learn_s"] = got.pop("_learn_s")
            for m, by_k in got.items():
                answers[m] = {str(k): v for k, v in by_k.items()}
        elif method == "base":
            from megamem.answer import qa_prompt
            from megamem.bench.infer import generate
            from megamem.model import load_model

            model, tok = load_model()
            base = generate(model, tok, [[("user", qa_prompt(q))] for r in targets for q, _ in r.qa], 64)
            answers["base"] = {str(k): base for k in args.ks}
        else:
            raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        answers[f"_{method}_s"] = time.perf_counter() - t0
        answers_file.write_text(json.dumps(answers, indent=1))

    # -- save ------------------------------------------------------------------------------------------
    rows, curves = [], {}
    for method in [m for m in METHODS if m in answers]:
        accs = []
        for k in args.ks:
            outs = answers[method][str(k)]
            hits = int(sum(qa_scores(o, g)["qa_acc"] for o, g in zip(outs, golds, strict=True)))
            lo, hi = wilson(hits, len(outs))
            accs.append(hits / len(outs))
            rows.append({"method": method, "k": k, "QA": f"{hits / len(outs):.3f}", "95% CI": f"{lo:.3f}-{hi:.3f}",
                         "correct": f"{hits}/{len(outs)}"})  # fmt: skip
        curves[method] = accs
    wide = [
        {"method": m, **{f"k={k}": f"{a:.3f}" for k, a in zip(args.ks, accs, strict=True)}}
        for m, accs in curves.items()
    ]
    header = (
        f"{command()}\n{machine()}\n{len(targets)} targets (wiki partition {args.target_partition}), "
        f"{len(golds)} questions, distractors: wiki partition {args.distractor_partition}; "
        f"seconds: "
        + ", ".join(f"{k[1:-2]} {v:.0f}" for k, v in answers.items() if k.endswith("_s"))
        + (
            f"; memoryllm per write / per answer batch: {answers['_memoryllm_timing']}"
            if "memoryllm" in answers
            else ""
        )
    )
    report = f"{header}\n\n{table(wide)}\n\n{table(rows)}\n"
    (args.out / "retention.md").write_text(report)
    print(report)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, accs in curves.items():
        ax.plot(args.ks, accs, marker="o", label=m)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(args.ks, [str(k) for k in args.ks])
    ax.set_xlabel("unrelated passages injected after the target (k)")
    ax.set_ylabel("QA accuracy (offline judge)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"Knowledge retention, SmolLM2-135M, {len(golds)} questions")
    fig.tight_layout()
    fig.savefig(args.out / "retention.png", dpi=110)


if __name__ == "__main__":
    main()
