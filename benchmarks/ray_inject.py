"""Injection on Ray: memories per minute vs workers, building a real store of every record of ../shared/data.

    python benchmarks/ray_inject.py --store /tmp/big-store --phases 1:24 2:0

Each phase learns the next memories of the data set (wiki partitions 0-9 with their paraphrases, then the
fictional stories) with `workers` Ray actors of one thread each on a local Ray instance, through the product
path (megamem.ops.distributed.add_many_ray, default recipe, int8 adapters); COUNT 0 means the rest. The store keeps
every memory, so a later phase (or a rerun after a crash) goes on where the last stopped: ids already stored
are skipped. Rate: memories committed per minute from the phase's first commit to its last (the steady
state), and the start-up (Ray, actors loading the model) until the first commit, reported apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

from common import command, machine, table

from megamem import Item, Memory
from megamem.datasets import load_partition, partition_files
from megamem.ops.distributed import add_many_ray

ROOT = Path(__file__).resolve().parents[1]


def all_items(data: Path) -> list[Item]:
    """Every wiki record (with its paraphrases and questions' partition in the id), then every fictional story."""
    items = []
    for kind, folder in (("wiki", data / "mega-wiki2024"), ("fict", data / "mega-fictional")):
        for p in range(len(partition_files(folder))):
            for i, r in enumerate(load_partition(folder, p)):
                items.append(
                    Item(r.passage, r.paraphrases, {"source": kind, "partition": p}, f"{kind}-p{p:02d}-{i:02d}")
                )
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--phases", nargs="+", default=["1:24", "2:0"], help="WORKERS:COUNT, COUNT 0 = the rest")
    ap.add_argument("--adapter-dtype", default="int8")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "scale" / "ray-inject.jsonl")
    args = ap.parse_args()
    mem = Memory(args.store, adapter_dtype=args.adapter_dtype)
    commit_s: list[float] = []
    commit = mem.commit

    def timed_commit(*a, **k):  # the driver's own cost per memory: what bounds a cluster's rate
        t = time.perf_counter()
        try:
            return commit(*a, **k)
        finally:
            commit_s.append(time.perf_counter() - t)

    mem.commit = timed_commit
    items = all_items(args.data)
    rows = []
    for phase in args.phases:
        workers, count = (int(x) for x in phase.split(":"))
        stored = {r.id for r in mem.list()}
        todo = [it for it in items if it.id not in stored]
        todo = todo[:count] if count else todo
        if not todo:
            continue
        commits: list[float] = []
        commit_s.clear()
        t0 = time.time()
        add_many_ray(mem, todo, "local", workers=workers, on_stored=lambda _r, c=commits: c.append(time.time()))
        steady = (len(commits) - 1) / ((commits[-1] - commits[0]) / 60) if len(commits) > 1 else None
        row = {
            "workers": workers,
            "threads each": 1,
            "memories": len(commits),
            "wall s": round(time.time() - t0, 1),
            "start-up s": round(commits[0] - t0, 1),
            "memories/min": round(steady, 2) if steady else None,
            "driver commit ms": round(1000 * statistics.median(commit_s), 1) if commit_s else None,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps({"command": command(), "machine": machine(), **row}) + "\n")
    if rows:
        print(table(rows))


if __name__ == "__main__":
    main()
