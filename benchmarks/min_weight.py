"""The smallest gate weight that still changes an answer: how much of a mixture the server may skip.

A recipe. Setup: an existing store (--store, the product's defaults) and questions: its wiki partitions'
questions (--partitions) and the shipped general questions (whose gates blend a memory with the null memory).
Loop: the product's gate for every question, then greedy answers with the whole mixture and with every term
below each threshold dropped (the server's `min_weight`). Save: per threshold, the share of answers
token-for-token unchanged and how many mixture terms were skipped.

    python benchmarks/min_weight.py --store /tmp/store-p01 --partitions 0,1 --out bench-runs/min_weight.json
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, table  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mega-wiki2024"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--partitions", default="0,1")
    ap.add_argument("--thresholds", default="1e-4,1e-3,1e-2,5e-2")
    ap.add_argument("--general", type=int, default=280, help="general questions asked too")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from megamem import Memory
    from megamem.answer import qa_prompt
    from megamem.bench.infer import generate
    from megamem.datasets import load_partition

    # -- setup ----------------------------------------------------------------------------------------------------
    mem = Memory(args.store, create=False)
    model, tok = mem.load()
    ids = [r.id for r in mem.list()]
    adapters = [mem.adapter(i) for i in ids]
    questions = [q for p in args.partitions.split(",") for r in load_partition(DATA, int(p)) for q, _ in r.qa]
    lines = resources.files("megamem").joinpath("data/general_qa.jsonl").read_text(encoding="utf-8").splitlines()
    questions += [json.loads(line)["question"] for line in lines if line.strip()][: args.general]
    weights = torch.zeros(len(questions), len(ids))
    for n, q in enumerate(questions):
        for i, w in mem.route(q):
            weights[n, ids.index(i)] = w

    # -- loop: the whole mixture, then each threshold -----------------------------------------------------------
    convs = [[("user", qa_prompt(q))] for q in questions]
    full = generate(model, tok, convs, args.max_new_tokens, adapters, weights)
    rows = []
    for t in (float(x) for x in args.thresholds.split(",")):
        cut = torch.where(weights >= t, weights, torch.zeros(()))
        changed = [n for n in range(len(questions)) if not torch.equal(cut[n], weights[n])]
        outs = generate(model, tok, [convs[n] for n in changed], args.max_new_tokens, adapters, cut[changed])
        same = len(questions) - len(changed) + sum(o == full[n] for o, n in zip(outs, changed, strict=True))
        terms = int(((weights > 0) & (weights < t)).sum())
        rows.append(
            {
                "threshold": f"{t:g}",
                "answers unchanged": f"{same / len(questions):.4f}",
                "questions with a term dropped": len(changed),
                "terms dropped": terms,
                "terms in all": int((weights > 0).sum()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    # -- save -------------------------------------------------------------------------------------------------------
    header = f"{command()}\n{machine()}\n{len(ids)} memories, {len(questions)} questions"
    print(header)
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"header": header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
