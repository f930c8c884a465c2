"""Memories that change: does the answer follow the newer of two contradicting memories?

Setup: a store with the product's defaults learns the 30 invented pairs of data/contradictions.jsonl,
every older memory first, then every newer one with `replaces` (the user's word that it corrects the
older). Loop: each pair's question is asked (qa mode) with the recency rule, and again with the rule
switched off (both memories mixed by the gate, as before the rule existed); then every newer memory is
forgotten and the question asked once more. Save: the share of answers holding the newer answer (and
not the older), and after forgetting, the older. Also counts how many pairs `likely_updates` flags.

    python benchmarks/updates.py --store /tmp/updates-store --out bench-runs/updates.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from megamem import Item, Memory
    from megamem.judge import contains_answer

    text = resources.files("megamem").joinpath("data/contradictions.jsonl").read_text(encoding="utf-8")
    pairs = [json.loads(line) for line in text.splitlines() if line.strip()]
    mem = Memory(args.store)
    t0 = time.perf_counter()
    if not mem.list():
        mem.add_many([Item(p["old"], id=f"{p['id']}-old") for p in pairs])
        flagged = sum(bool(mem.likely_updates(p["new"])) for p in pairs)
        mem.add_many([Item(p["new"], id=f"{p['id']}-new", replaces=[f"{p['id']}-old"]) for p in pairs])
    else:
        flagged = None
    learn_s = time.perf_counter() - t0

    def ask_all() -> list[str]:
        return [mem.ask(p["question"], max_new_tokens=48).text for p in pairs]

    def score(answers: list[str], want: str, not_want: str) -> tuple[int, int]:
        hits = [
            contains_answer(a, p[want]) and not contains_answer(a, p[not_want])
            for a, p in zip(answers, pairs, strict=True)
        ]
        return sum(hits), len(hits)

    with_rule = ask_all()
    mem._superseded = set()  # the recency rule off: both memories of a pair mixed by the gate (measurement only)
    without_rule = ask_all()
    mem._invalidate()  # the rule back (derived again from the records)
    for p in pairs:
        mem.forget(f"{p['id']}-new")
    after_forget = ask_all()
    base = [mem.ask(p["question"], max_new_tokens=48, use_memory=False).text for p in pairs]
    rows = []
    for what, answers, want, other in (
        ("newer memory stored, recency rule on (default)", with_rule, "new_answer", "old_answer"),
        ("newer memory stored, rule off (both mixed)", without_rule, "new_answer", "old_answer"),
        ("newer memory forgotten", after_forget, "old_answer", "new_answer"),
        ("base model, no memory (new answer)", base, "new_answer", "old_answer"),
    ):
        k, n = score(answers, want, other)
        rows.append({"condition": what, "answer holds": want.replace("_", " "), "share": f"{k / n:.3f}", "n": n})
    header = f"{command()}\n{machine()}\n{len(pairs)} pairs; learning {learn_s:.0f} s; likely_updates flagged {flagged}"
    print(header)
    print(table(rows))
    if args.out:
        per = [
            {"id": p["id"], "with_rule": a, "without_rule": b, "after_forget": c}
            for p, a, b, c in zip(pairs, with_rule, without_rule, after_forget, strict=True)
        ]
        args.out.write_text(json.dumps({"header": header, "rows": rows, "answers": per}, indent=1))


if __name__ == "__main__":
    main()
