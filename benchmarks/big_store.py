"""A real store of hundreds or thousands of memories (built by ray_inject.py) against the same memories in a
store of 50: the paper's open question 1 on this machine.

    python benchmarks/big_store.py --store /tmp/big-store --memories 50 --recalls 20

Setup: --memories wiki memories of the big store (seeded choice; ids wiki-pNN-II name their record) are
copied, adapter and keys as they are, into a new store of just them (Memory.commit), so the two stores
differ only in what else the gate can choose. Measured on the big store: bytes on disk, a fresh process's
open time (Memory() plus the first gate, which reads every key file) and RSS, the gate's median ms and a qa
answer's median ms. Then every question of the chosen memories in the paper's qa mode and in the default
mega+rag mode, and --recalls recalls (recall mode, the memory's first question, embedder cosine to the
passage), in each store; and routing top-1 (the heaviest memory is the question's own).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import copy_memories, provenance, table

from megamem import Memory
from megamem.bench.metrics import recall_cosines
from megamem.datasets import load_partition
from megamem.judge import is_correct

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mega-wiki2024"

OPEN = """
import json, resource, sys, time
t0 = time.perf_counter()
from megamem import Memory
mem = Memory(sys.argv[1])
t1 = time.perf_counter()
mem.route("Who won the 2024 SaskTel Tankard?")
t2 = time.perf_counter()
print(json.dumps({"import+open s": round(t1 - t0, 2), "first gate s": round(t2 - t1, 2),
                  "rss MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def measure(mem: Memory, chosen: list[tuple[str, object]], recalls: int) -> dict:
    """QA (qa and mega+rag), routing top-1 and recall cosine over the chosen memories' questions."""
    qa, rag, top, ms = [], [], [], []
    for mid, rec in chosen:
        for q, gold in rec.qa:
            t0 = time.perf_counter()
            a = mem.ask(q, mode="qa")
            ms.append(1000 * (time.perf_counter() - t0))
            qa.append(is_correct(a.text, gold))
            top.append(bool(a.gate) and a.gate[0][0] == mid)
            rag.append(is_correct(mem.ask(q, mode="mega+rag").text, gold))
    outs = [mem.ask(rec.qa[0][0], mode="recall", max_new_tokens=160).text for _, rec in chosen[:recalls]]
    cos = recall_cosines(outs, [rec.passage for _, rec in chosen[:recalls]])
    return {
        "memories in store": len(mem.list()),
        "QA (qa)": round(statistics.mean(qa), 3),
        "QA (mega+rag)": round(statistics.mean(rag), 3),
        "routing top-1": round(statistics.mean(top), 3),
        "recall cos": round(statistics.mean(cos), 3),
        "qa answer ms (median)": round(statistics.median(ms)),
        "questions": len(qa),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path("/tmp/big-store"))
    ap.add_argument("--memories", type=int, default=50)
    ap.add_argument("--recalls", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "scale" / "big-store.json")
    args = ap.parse_args()
    opened = json.loads(
        subprocess.run([sys.executable, "-c", OPEN, str(args.store)], capture_output=True, text=True, check=True).stdout
    )
    big = Memory(args.store)
    records = big.list()
    wiki = sorted(r.id for r in records if r.id.startswith("wiki-"))
    chosen_ids = sorted(random.Random(args.seed).sample(wiki, min(args.memories, len(wiki))))
    by_id = {}
    for i in chosen_ids:
        p, n = int(i[6:8]), int(i[9:11])
        by_id[i] = load_partition(DATA, p)[n]
    chosen = [(i, by_id[i]) for i in chosen_ids]
    t0 = time.perf_counter()
    for _ in range(20):
        big.route("Who won the 2024 SaskTel Tankard?")
    gate_ms = 1000 * (time.perf_counter() - t0) / 20
    size = sum(p.stat().st_size for p in args.store.rglob("*") if p.is_file())
    small = copy_memories(big, chosen_ids, args.store.with_name(args.store.name + f"-{len(chosen_ids)}"))
    rows = []
    for name, mem in (("big store", big), (f"{len(chosen_ids)}-memory store", small)):
        row = {"": name, **measure(mem, chosen, args.recalls)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        **provenance(),
        "big store": {
            "memories": len(records),
            "wiki": len(wiki),
            "bytes": size,
            "bytes a memory": round(size / len(records)),
            "key rows": int(big.keys().keys.shape[0]),
            "gate ms (warm, mean of 20)": round(gate_ms, 1),
            **opened,
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["big store"], indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
