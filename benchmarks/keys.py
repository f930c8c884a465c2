"""Which key function routes questions to the right memory? Gate top-1 accuracy and the weight the gate
puts on the right memory, for activation keys (the paper's) vs sentence-embedder keys, on the wiki set.

    python benchmarks/keys.py --data ../shared/data/mega-wiki2024 --partitions 0 1 --memories 50
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from megamem.datasets import load_partition
from megamem.gate import GateConfig, gate_weights
from megamem.index import KeyIndex
from megamem.keys import compute_keys
from megamem.model import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/mega-wiki2024")
    ap.add_argument("--partitions", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--memories", type=int, default=50)
    ap.add_argument("--betas", type=float, nargs="+", default=[1, 5, 10, 20, 50])
    args = ap.parse_args()
    model, tok = load_model()
    rows = []
    for part in args.partitions:
        recs = load_partition(args.data, part, args.memories)
        questions = [(i, q) for i, r in enumerate(recs) for q, _ in r.qa]
        for kind in ("activation", "embedder"):
            t0 = time.time()
            texts, owners_all = [], []
            for i, r in enumerate(recs):
                for t in [r.passage, *r.paraphrases]:
                    texts.append(t)
                    owners_all.append(i)
            keys_all = compute_keys(kind, texts, model, tok)
            owners_all = torch.tensor(owners_all)
            passage_only = torch.tensor([texts.index(r.passage) for r in recs])
            qk = compute_keys(kind, [q for _, q in questions], model, tok)
            gold = torch.tensor([i for i, _ in questions])
            for keyset, keys, owners in (
                ("passage", keys_all[passage_only], torch.arange(len(recs))),
                ("passage+paraphrases", keys_all, owners_all),
            ):
                for sim in ("dot", "cosine"):
                    scores = torch.stack([KeyIndex(keys, owners, len(recs), sim).exact_scores(q) for q in qk])
                    top1 = float((scores.argmax(1) == gold).float().mean())
                    row = {
                        "partition": part,
                        "key_function": kind,
                        "keys": keyset,
                        "similarity": sim,
                        "memories": len(recs),
                        "questions": len(questions),
                        "top1": round(top1, 3),
                    }
                    for beta in args.betas:
                        w = torch.stack([gate_weights(s, GateConfig(similarity=sim, beta=beta)) for s in scores])
                        row[f"gold_weight_beta{beta:g}"] = round(float(w[torch.arange(len(gold)), gold].mean()), 3)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            print(f"# {kind} keys for partition {part}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
