"""QA of the product's answer modes against plain RAG, on wiki partitions, with 95% confidence intervals.

A recipe in three parts. Setup: a store with the product's defaults (or the one given with --store) learns
every record of the partitions (the passage and its paraphrases, as `megamem add -p` gives them).
Loop: every question of those records is routed by the product's gate (null memory on) and answered in
each mode, in batches with a per-row mixture (megamem.bench.infer.generate: token for token what
Memory.ask answers): base (no memory), rag (plain RAG: the top-1 stored passage by the embedder's cosine,
in context, no adapter), mega (the product's qa mode), irag (recall, then answer) and mega+rag (the gated
adapters and the heaviest gated memory's text in context, as the product's mode; --context N for more).
Save: per-question rows and a summary as JSON, and the summary table (offline judge: the gold answer
contained in a one-sentence answer; Wilson 95% CI).

    python benchmarks/qa_modes.py --partitions 7,8 --store /tmp/qa-p78 --out bench-runs/qa_modes-p78.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, table, wilson  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mega-wiki2024"
MODES = ("base", "rag", "mega", "irag", "mega+rag")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partitions", default="7,8")
    ap.add_argument("--memories", type=int, default=None, help="first N records of each partition")
    ap.add_argument("--paraphrases", type=int, default=9, help="paraphrases given with each passage")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--store", type=Path, required=True, help="store folder (learned once, reused if it exists)")
    ap.add_argument("--upper", type=float, default=None, help="a new store's LoRA share of layers (a lever)")
    ap.add_argument("--rank", type=int, default=None, help="a new store's LoRA rank (a lever)")
    ap.add_argument(
        "--recipe",
        default="{}",
        help="the learning recipe's fields that differ from the default, as JSON",
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--rephrasings",
        action="store_true",
        help="ask data/rephrasings.jsonl's questions (worded unlike any training text) beside their originals",
    )
    ap.add_argument(
        "--context", type=int, default=1, help="mega+rag: this many gated texts in context (the product's: 1)"
    )
    ap.add_argument(
        "--scale", type=float, default=None, help="the gate weights times this in mega+rag (default: the product's)"
    )
    ap.add_argument(
        "--gate",
        default="{}",
        help="the gate's fields that differ from the store's, as JSON (e.g. '{\"lexical\": 0.5, \"names\": 0.3}')",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from megamem import Item, Memory
    from megamem.answer import MEGA_RAG_SCALE, qa_prompt, recall_prompt, with_context
    from megamem.bench.infer import generate
    from megamem.bench.metrics import qa_scores
    from megamem.datasets import load_partition

    if args.scale is None:
        args.scale = MEGA_RAG_SCALE

    # -- setup: the store, learned with the product's defaults ----------------------------------------------
    parts = [int(x) for x in args.partitions.split(",")]
    records = [(p, i, r) for p in parts for i, r in enumerate(load_partition(DATA, p, args.memories))]
    from megamem import LoraSpec
    from megamem.train import Recipe

    lora = {k: v for k, v in (("upper", args.upper), ("rank", args.rank)) if v is not None}
    recipe = Recipe(**json.loads(args.recipe))
    mem = Memory(args.store, lora=LoraSpec(**lora) if lora else None, recipe=recipe)
    t0 = time.perf_counter()
    todo = [
        Item(r.passage, r.paraphrases[: args.paraphrases], {"partition": p, "record": i}, f"p{p}-r{i}")
        for p, i, r in records
        if not (mem.store and mem.store.get(f"p{p}-r{i}", missing_ok=True))
    ]
    if todo:
        mem.add_many(todo, on_memory=lambda i, n: print(f"learning {i + 1}/{n}", file=sys.stderr, flush=True))
    learn_s = time.perf_counter() - t0
    from megamem.memory import with_overrides

    gate = with_overrides(mem.gate, **json.loads(args.gate))  # a lever: the re-rank's weights, say
    model, tok = mem.load()
    ids = [r.id for r in mem.list()]
    adapters = [mem.adapter(i) for i in ids]
    text_of = {r.id: r.text for r in mem.list()}
    questions = [(f"p{p}-r{i}", q, a) for p, i, r in records for q, a in r.qa]
    tags = ["original"] * len(questions)
    if args.rephrasings:  # each rephrasing beside its original: the same memory and gold answer
        from importlib import resources

        lines = resources.files("megamem").joinpath("data/rephrasings.jsonl").read_text(encoding="utf-8")
        by_record = {(p, i): r for p, i, r in records}
        questions, tags = [], []
        for d in (json.loads(line) for line in lines.splitlines() if line.strip()):
            r = by_record.get((d["partition"], d["record"]))
            if r is None:
                continue
            q, a = r.qa[d["qa"]]
            assert q == d["original"], d
            questions += [
                (f"p{d['partition']}-r{d['record']}", q, a),
                (f"p{d['partition']}-r{d['record']}", d["question"], a),
            ]
            tags += ["original", f"rephrased: {d['style']}"]

    # -- the gate, once per question -------------------------------------------------------------------
    weights = torch.zeros(len(questions), len(ids))
    routed_ids = []
    for n, (_, q, _) in enumerate(questions):
        routed = mem.route(q, gate)
        routed_ids.append([i for i, _ in routed])
        for i, w in routed:
            weights[n, ids.index(i)] = w
    index = mem.key_index("cosine")
    from megamem.keys import compute_keys

    qkeys = compute_keys(mem.key_function, [q for _, q, _ in questions], model, tok)
    rag_top1 = [ids[int(index.exact_scores(k).argmax())] for k in qkeys]

    # -- the loop: each mode answers every question ------------------------------------------------------
    answers: dict[str, list[str]] = {}
    timings: dict[str, float] = {}
    for mode in args.modes.split(","):
        t = time.perf_counter()
        qa = [qa_prompt(q) for _, q, _ in questions]
        bs = args.batch_size
        if mode == "base":
            answers[mode] = generate(model, tok, [[("user", p)] for p in qa], 64, batch_size=bs)
        elif mode == "rag":
            convs = [[("user", with_context(p, [text_of[rag_top1[n]]]))] for n, p in enumerate(qa)]
            answers[mode] = generate(model, tok, convs, 64, batch_size=bs)
        elif mode == "mega":
            answers[mode] = generate(model, tok, [[("user", p)] for p in qa], 64, adapters, weights, bs)
        elif mode == "irag":
            cues = [[("user", recall_prompt(q))] for _, q, _ in questions]
            recalls = generate(model, tok, cues, 256, adapters, weights, bs)
            convs = [[*c, ("assistant", r), ("user", p)] for c, r, p in zip(cues, recalls, qa, strict=True)]
            answers[mode] = generate(model, tok, convs, 64, adapters, weights, bs)
        elif mode == "mega+rag":
            convs = [
                [("user", with_context(p, [text_of[i] for i in routed_ids[n][: args.context]]) if routed_ids[n] else p)]
                for n, p in enumerate(qa)
            ]
            answers[mode] = generate(model, tok, convs, 64, adapters, weights * args.scale, bs)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        timings[mode] = time.perf_counter() - t
        print(f"{mode}: {timings[mode]:.0f} s", file=sys.stderr, flush=True)

    # -- save ------------------------------------------------------------------------------------------
    summary = []
    groups = sorted(set(tags), key=lambda t: (t != "original", t))
    if args.rephrasings:
        groups.insert(1, "rephrased: all")
    for group in groups:
        rows = [n for n, t in enumerate(tags) if t == group or (group == "rephrased: all" and t != "original")]
        top1 = sum(routed_ids[n][:1] == [questions[n][0]] for n in rows) / len(rows)
        for mode, outs in answers.items():
            scores = [qa_scores(outs[n], questions[n][2]) for n in rows]
            k = int(sum(s["qa_acc"] for s in scores))
            lo, hi = wilson(k, len(scores))
            summary.append(
                {
                    **({"questions": group, "gate top-1": f"{top1:.3f}"} if args.rephrasings else {}),
                    "mode": mode,
                    "QA": f"{k / len(scores):.3f}",
                    "95% CI": f"{lo:.3f}-{hi:.3f}",
                    "correct": f"{k}/{len(scores)}",
                    "F1": f"{sum(s['qa_f1'] for s in scores) / len(scores):.3f}",
                    "s": f"{timings[mode]:.0f}",
                }
            )
    top1 = sum(r[:1] == [own] for r, (own, _, _) in zip(routed_ids, questions, strict=True)) / len(questions)
    none = sum(not r for r in routed_ids) / len(questions)
    header = (
        f"{command()}\n{machine()}\n{len(ids)} memories (partitions {parts}), {len(questions)} questions; "
        f"gate top-1 {top1:.3f}, routed to no memory {none:.3f}; learning {learn_s:.0f} s ({len(todo)} new);"
        f" recipe {recipe.to_dict()}, lora {mem.lora}, gate {gate}, mega+rag scale {args.scale}"
    )
    print(header)
    print(table(summary))
    if args.out:
        rows = [
            {"memory": own, "question": q, "gold": a, "tag": tags[n], "routed": routed_ids[n]}
            | {m: answers[m][n] for m in answers}
            for n, (own, q, a) in enumerate(questions)
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"header": header, "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
