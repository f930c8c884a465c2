"""The bench's testing cost with and without reusing outputs across steps (megamem.bench.run.reuse): mega on
the first memories of a wiki partition, tested after each memory both ways.

    python benchmarks/bench_reuse.py --memories 8 --max-steps 5

Adapters are trained for a few steps only: what testing costs does not depend on how well they learned.
After memory k, mega is tested the bench's way (prompts whose gate is unchanged since an earlier step are
reused) and then with the cache off (every seen memory's prompts and every probe computed again), one
thread; the table gives both times and whether the two tests wrote the same recalls and answers.
"""

from __future__ import annotations

import argparse
import time

from common import table, write_section

from megamem.bench.methods import make_method
from megamem.bench.run import BenchConfig, evaluate, make_probes, prepare, setup, torch_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/mega-wiki2024")
    ap.add_argument("--partition", type=int, default=0)
    ap.add_argument("--memories", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=5, help="optimiser steps per adapter")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    args = ap.parse_args()
    cfg = BenchConfig(data=args.data, partitions=[args.partition], memories=args.memories, max_steps=args.max_steps)
    rows, same, total = [], 0, [0.0, 0.0]
    with torch_threads(1):
        shared, gate = setup(cfg)
        part = prepare(cfg, args.partition, shared.model, shared.tok)
        probes = make_probes(cfg, shared.model, shared.tok)
        mega = make_method("mega", shared, cfg.lrs)
        for k in range(1, len(part.records) + 1):
            mega.learn(k - 1, part.texts(k - 1))
            t0 = time.perf_counter()
            reused = evaluate(cfg, mega, shared, part, probes, k, gate)
            t1 = time.perf_counter()
            cache, mega.cache = mega.cache, None
            fresh = evaluate(cfg, mega, shared, part, probes, k, gate)
            t2 = time.perf_counter()
            mega.cache = cache
            equal = sum(
                a.get("recall") == b.get("recall") and a.get("answers") == b.get("answers")
                for a, b in zip(reused[:-1], fresh[:-1], strict=True)
            )
            same += equal
            total[0] += t1 - t0
            total[1] += t2 - t1
            rows.append(
                {
                    "memories seen": k,
                    "reused (s)": f"{t1 - t0:.1f}",
                    "recomputed (s)": f"{t2 - t1:.1f}",
                    "same recall and answers": f"{equal}/{k}",
                }
            )
            print(rows[-1], flush=True)
    rows.append(
        {
            "memories seen": "all steps",
            "reused (s)": f"{total[0]:.0f}",
            "recomputed (s)": f"{total[1]:.0f}",
            "same recall and answers": f"{same}/{sum(range(1, len(part.records) + 1))}",
        }
    )
    body = table(rows)
    print(body)
    if not args.no_write:
        notes = (
            f"mega on the first {len(part.records)} memories of {args.data} partition {args.partition}, adapters "
            f"of {args.max_steps} steps, bench defaults otherwise (gate top-4, beta 50; 154 MCQ probes, 16 KL "
            "paragraphs, batch 16), one thread. A test recomputes what its gate changed: while k <= 4 every "
            "memory is in every query's top 4, so each new memory changes every mixture."
        )
        write_section("bench-reuse", "Bench: testing with outputs reused across steps", body, notes)


if __name__ == "__main__":
    main()
