"""Consolidation into the cortex (the paper's open question 2): what memories keep once their adapters are gone.

    python benchmarks/consolidate.py --store /tmp/consolidate-p01 --partitions 0 1 --memories 25

Setup: a store with the product's defaults learns the first --memories records of each wiki partition (the
passage and its nine paraphrases), or is reused if it exists. Before: every question in the paper's qa mode
through the gate (the memories' own adapters), and each memory's recall (recall mode, its first question,
cosine of the embedder to the passage). Then `consolidate` (every memory; adapters retired) and the same
questions and recalls with the cortex alone. General ability, base model vs the model with the cortex: the
shipped general questions (judged, and the share answered word for word as the base model does), the
general MCQ probe and KL(base || model) on the general text sample (none of them used in training: the drift
penalty uses the calibration questions). A copy of the store is consolidated; the original is kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from common import provenance, table

from megamem import Item, Memory
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

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mega-wiki2024"


def qa_and_recall(mem: Memory, records, use_memory: bool = True) -> dict:
    """QA accuracy (qa mode) over every question and mean recall cosine (recall mode, first question)."""
    hits, recalls, passages = [], [], []
    for r in records:
        for q, gold in r.qa:
            hits.append(is_correct(mem.ask(q, mode="qa", use_memory=use_memory).text, gold))
        recalls.append(mem.ask(r.qa[0][0], mode="recall", max_new_tokens=160, use_memory=use_memory).text)
        passages.append(r.passage)
    return {
        "qa": statistics.mean(hits),
        "questions": len(hits),
        "recall cos": statistics.mean(recall_cosines(recalls, passages)),
    }


@torch.no_grad()
def general(mem: Memory, with_cortex: bool, limit: int) -> dict:
    """General QA (judged, and answers identical to the base model's), MCQ accuracy and KL to the base."""
    model, tok = mem.load()
    cortex = mem.cortex() if with_cortex else None

    def mix() -> None:
        set_mixture(model, [cortex], [1.0]) if cortex is not None else clear(model)

    qa = shipped_general_qa()[:limit]
    answers = [mem.ask(d["question"], mode="qa", use_memory=with_cortex).text for d in qa]
    mcq = shipped_mcq()
    seqs, letters = mcq_inputs(tok, mcq)
    mix()
    try:
        last = torch.stack([model(input_ids=torch.tensor([s])).logits[0, -1].float() for s in seqs])
        texts = text_inputs(tok, shipped_text(40))
        logprobs = [model(input_ids=torch.tensor([t])).logits[0].float().log_softmax(-1) for t in texts]
    finally:
        clear(model)
    return {
        "answers": answers,
        "qa": [is_correct(a, d["answer"]) for a, d in zip(answers, qa, strict=True)],
        "mcq": mcq_accuracy(last, letters, mcq),
        "logprobs": logprobs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--partitions", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--memories", type=int, default=25, help="first N records of each partition")
    ap.add_argument("--epochs", type=int, default=ConsolidationConfig.epochs)
    ap.add_argument("--drift", type=float, default=ConsolidationConfig.drift)
    ap.add_argument("--questions", type=int, default=ConsolidationConfig.questions, help="cloze questions a sentence")
    ap.add_argument("--general", type=int, default=120, help="general questions asked (of the shipped 280)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "scale" / "consolidate.json")
    args = ap.parse_args()
    # setup
    records = [r for p in args.partitions for r in load_partition(DATA, p, args.memories)]
    t0 = time.time()
    if not args.store.exists():
        Memory(args.store).add_many([Item(r.passage, r.paraphrases, id=f"w{i:03d}") for i, r in enumerate(records)])
    learn_s = time.time() - t0
    work = args.store.with_name(args.store.name + "-consolidated")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(args.store, work)
    mem = Memory(work)
    adapters_bytes = sum(p.stat().st_size for p in (work / "memories").rglob("*") if p.is_file())
    # before: the memories' own adapters (kept beside the store: they depend only on it); the base model's
    # general ability
    saved = args.store.with_name(args.store.name + "-before.json")
    if saved.is_file():
        before = json.loads(saved.read_text())
    else:
        before = qa_and_recall(mem, records)
        saved.write_text(json.dumps(before))
    base = general(mem, with_cortex=False, limit=args.general)
    print(json.dumps({"before": before}), flush=True)
    # consolidate every memory, then the same measures with the cortex alone
    cfg = ConsolidationConfig(epochs=args.epochs, drift=args.drift, questions=args.questions)
    report = consolidate(mem, [r.id for r in mem.list()], cfg)
    print(json.dumps({"consolidate": report}), flush=True)
    after = qa_and_recall(mem, records)
    cortex = general(mem, with_cortex=True, limit=args.general)
    ref = make_reference(base["logprobs"])
    same = statistics.mean(a == b for a, b in zip(base["answers"], cortex["answers"], strict=True))
    result = {
        **provenance(),
        "memories": len(records),
        "learn s (50 adapters)": round(learn_s, 1),
        "before": before,
        "after": after,
        "qa kept": round(after["qa"] / before["qa"], 3) if before["qa"] else None,
        "consolidate": report,
        "adapter bytes before": adapters_bytes,
        "general": {
            "general qa base": statistics.mean(base["qa"]),
            "general qa cortex": statistics.mean(cortex["qa"]),
            "general answers identical": same,
            "mcq base": base["mcq"],
            "mcq cortex": cortex["mcq"],
            "kl cortex vs base": bucketed_kl(ref, cortex["logprobs"]),
            "general questions": len(base["qa"]),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    rows = [
        {"": "with adapters", "QA": round(before["qa"], 3), "recall cos": round(before["recall cos"], 3)},
        {"": "cortex only", "QA": round(after["qa"], 3), "recall cos": round(after["recall cos"], 3)},
    ]
    print(table(rows))
    print(json.dumps(result["general"], indent=2))


if __name__ == "__main__":
    main()
