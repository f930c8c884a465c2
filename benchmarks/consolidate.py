"""Consolidation into the cortex (the paper's open question 2): what memories keep once their adapters are gone,
and what each lever of the cortex's training buys.

    python benchmarks/consolidate.py --source ~/.cache/megamem/stores/big-1000 --partitions 0 1 --memories 10 \
        --lever rank128 '{"rank": 128}'
    python benchmarks/consolidate.py --source /tmp/p6-store --partitions 6 --memories 50 --lever chosen '{...}'

Setup: the memories of the first --memories records of each wiki partition are copied, adapter and keys as they
are, out of --source (found by their text) into a new store: every lever starts from the same adapters. Before
(measured once a memory set, cached beside --work): every question in the default mode (mega+rag) and in the
paper's qa mode, --recalls recalls (recall mode, the memory's first question, embedder cosine to the passage),
and the shipped general questions asked in qa mode with the memories (the answers compared word for word with
the base model's). Loop, one lever at a time: a copy of that store is consolidated with the lever's
ConsolidationConfig (the product's default: adapters retired, text and keys kept), then the same measures,
plus MCQ accuracy and KL(base || model) on general text with the cortex forced in at weight 1 (the worst case:
what a question that routes to a consolidated memory carries). Save: one JSON line a lever in --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from common import copy_memories, provenance, table

from megamem import Memory
from megamem.bench.general import (
    bucketed_kl,
    make_reference,
    mcq_accuracy,
    mcq_inputs,
    shipped_general_qa,
    shipped_mcq,
    shipped_text,
    text_inputs,
)
from megamem.bench.metrics import recall_cosines
from megamem.datasets import load_partition
from megamem.inject import clear, set_mixture
from megamem.judge import is_correct
from megamem.ops.consolidate import ConsolidationConfig, consolidate
from megamem.store.manifest import ADAPTER_FILES

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mega-wiki2024"


def answers(mem: Memory, records, recalls: int, general_qs: list[dict]) -> dict:
    """QA in the default and qa modes over every question, recall cosine of the first `recalls` memories, and
    the general questions' answers in qa mode (through the gate, as a user asks)."""
    default, qa = [], []
    for r in records:
        for q, gold in r.qa:
            default.append(is_correct(mem.ask(q).text, gold))
            qa.append(is_correct(mem.ask(q, mode="qa").text, gold))
    told = [mem.ask(r.qa[0][0], mode="recall", max_new_tokens=160).text for r in records[:recalls]]
    general = [mem.ask(d["question"], mode="qa").text for d in general_qs]
    return {
        "qa default mode": statistics.mean(default),
        "qa qa mode": statistics.mean(qa),
        "questions": len(qa),
        "recall cos": statistics.mean(recall_cosines(told, [r.passage for r in records[:recalls]])) if told else None,
        "general answers": general,
    }


@torch.no_grad()
def forced(mem: Memory, adapter) -> dict:
    """MCQ answers' last logits and general text's log-probs with `adapter` mixed in at weight 1 (None: base)."""
    model, tok = mem.load()
    mcq = shipped_mcq()
    seqs, letters = mcq_inputs(tok, mcq)
    set_mixture(model, [adapter], [1.0]) if adapter is not None else clear(model)
    try:
        last = torch.stack([model(input_ids=torch.tensor([s])).logits[0, -1].float() for s in seqs])
        texts = text_inputs(tok, shipped_text(40))
        logprobs = [model(input_ids=torch.tensor([t])).logits[0].float().log_softmax(-1) for t in texts]
    finally:
        clear(model)
    return {"mcq": mcq_accuracy(last, letters, mcq), "logprobs": logprobs}


def adapter_bytes(mem: Memory) -> int:
    return sum(
        (mem.store.folder(r.id) / n).stat().st_size
        for r in mem.list()
        for n in ADAPTER_FILES
        if (mem.store.folder(r.id) / n).is_file()
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True, help="a store holding the memories (found by text)")
    ap.add_argument("--partitions", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--memories", type=int, default=10, help="first N records of each partition")
    ap.add_argument("--work", type=Path, default=Path("/tmp/consolidate-levers"))
    ap.add_argument("--recalls", type=int, default=10)
    ap.add_argument("--general", type=int, default=60, help="general questions asked (of the shipped 280)")
    ap.add_argument(
        "--lever", nargs=2, action="append", metavar=("NAME", "JSON"), help="a ConsolidationConfig override, named"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "scale" / "consolidate-levers.jsonl")
    args = ap.parse_args()
    known = {f.name for f in fields(ConsolidationConfig)}
    levers = [(name, json.loads(js)) for name, js in args.lever or [("default", "{}")]]
    for name, over in levers:
        if set(over) - known:
            raise SystemExit(f"error: lever {name}: unknown fields {sorted(set(over) - known)}; known: {sorted(known)}")
    # setup: the memories, copied out of the source store with their adapters and keys
    records = [r for p in args.partitions for r in load_partition(DATA, p, args.memories)]
    source = Memory(args.source, create=False)
    by_text = {" ".join(r.text.split()): r.id for r in source.list()}  # as stored: whitespace cleaned

    def stored(passage: str) -> str | None:
        return by_text.get(" ".join(passage.split()))

    missing = [r.passage[:40] for r in records if stored(r.passage) is None]
    if missing:
        raise SystemExit(f"error: {len(missing)} memories are not in {args.source}, first: {missing[0]!r}")
    tag = f"p{'-'.join(map(str, args.partitions))}x{args.memories}"
    base_store = args.work / f"{tag}-store"
    if not base_store.exists():
        copy_memories(source, [stored(r.passage) for r in records], base_store)
    general_qs = shipped_general_qa()[: args.general]
    cached = args.work / f"{tag}-before.json"
    if cached.is_file():
        before = json.loads(cached.read_text())
    else:
        mem = Memory(base_store)
        before = answers(mem, records, args.recalls, general_qs)
        base_general = [mem.ask(d["question"], mode="qa", use_memory=False).text for d in general_qs]
        before["general identical"] = statistics.mean(
            a == b for a, b in zip(before["general answers"], base_general, strict=True)
        )
        before["base general answers"] = base_general
        cached.write_text(json.dumps(before))
    base_forced = forced(Memory(base_store), None)
    ref = make_reference(base_forced["logprobs"])
    print(json.dumps({k: v for k, v in before.items() if "answers" not in k}), flush=True)
    # loop: one consolidation a lever, from the same adapters
    for name, over in levers:
        work = args.work / f"{tag}-{name}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(base_store, work)
        mem = Memory(work)
        held_bytes = adapter_bytes(mem)
        cfg = ConsolidationConfig(**over)
        t0 = time.time()
        report = consolidate(mem, [r.id for r in mem.list()], cfg)
        after = answers(mem, records, args.recalls, general_qs)
        worst = forced(mem, mem.cortex())
        row = {
            **provenance(),
            "lever": name,
            "config": asdict(cfg),
            "memories": len(records),
            "partitions": args.partitions,
            "questions": after["questions"],
            "before": {k: v for k, v in before.items() if "answers" not in k},
            "after": {k: v for k, v in after.items() if "answers" not in k},
            "default mode kept": after["qa default mode"] / before["qa default mode"],
            "qa mode kept": after["qa qa mode"] / before["qa qa mode"],
            "general identical": statistics.mean(  # --general may ask fewer than the cached before did
                a == b for a, b in zip(after["general answers"], before["base general answers"], strict=False)
            ),
            "general questions": len(after["general answers"]),
            "mcq base": base_forced["mcq"],
            "mcq cortex at weight 1": worst["mcq"],
            "kl cortex at weight 1": bucketed_kl(ref, worst["logprobs"]),
            "adapter bytes before": held_bytes,
            "adapter bytes freed": report["bytes_freed"],
            "cortex bytes": report["cortex_bytes"],
            "net freed": (report["bytes_freed"] - report["cortex_bytes"]) / held_bytes,
            "consolidate s": round(time.time() - t0, 1),
            "steps": report["steps"],
            "examples": report["examples"],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            table(
                [
                    {
                        "lever": name,
                        "default": f"{before['qa default mode']:.3f} -> {after['qa default mode']:.3f}",
                        "qa": f"{before['qa qa mode']:.3f} -> {after['qa qa mode']:.3f}",
                        "general same": f"{row['general identical']:.2f}",
                        "net freed": f"{row['net freed']:.2f}",
                    }
                ]
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
