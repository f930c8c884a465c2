"""The recipe sweep behind the training defaults: each wiki memory learned into its own adapter and asked
with that adapter alone (gate weight 1), so the figures measure learning, not routing.

    python benchmarks/recipe.py --memories 6 --config lr=1e-3,epochs=10 --config lr=3e-3,epochs=10

Each --config is comma-separated Recipe / LoraSpec fields (lr, epochs, batch_size, rank, alpha, ...).
Prints one JSON line per config: QA accuracy (offline judge), token F1, recall cosine, seconds per memory.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields

import torch

from megamem.adapters import LoraSpec
from megamem.bench.data import load_partition
from megamem.generate import answer
from megamem.inject import inject
from megamem.judge import is_correct, token_f1
from megamem.keys import embedder_keys
from megamem.model import load_model
from megamem.train import Recipe, train_adapter


def parse_config(text: str) -> tuple[Recipe, LoraSpec]:
    """'lr=1e-3,rank=16' -> (Recipe, LoraSpec) with those fields set."""
    recipe_fields = {f.name: f.type for f in fields(Recipe)}
    kw_r, kw_s = {}, {}
    for part in filter(None, text.split(",")):
        k, v = part.split("=")
        num = float(v) if any(c in v for c in ".e") else int(v)
        (kw_r if k in recipe_fields else kw_s)[k] = num
    if "rank" in kw_s and "alpha" not in kw_s:
        kw_s["alpha"] = float(kw_s["rank"])  # the paper's alpha = rank (scaling 1)
    return Recipe(**kw_r), LoraSpec(**kw_s)


def cosine(a: str, b: str) -> float:
    e = embedder_keys([a, b])
    return float(torch.nn.functional.cosine_similarity(e[0], e[1], dim=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/mega-wiki2024")
    ap.add_argument("--partition", type=int, default=0)
    ap.add_argument("--memories", type=int, default=6)
    ap.add_argument("--paraphrases", type=int, default=9, help="paraphrases per memory used for training")
    ap.add_argument("--config", action="append", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    recs = load_partition(args.data, args.partition, args.memories)
    model, tok = load_model()
    for cfg in args.config:
        recipe, spec = parse_config(cfg)
        inject(model, list(spec.targets))
        qa, f1, cos, secs = [], [], [], []
        for r in recs:
            t0 = time.time()
            adapter = train_adapter(model, tok, [r.passage, *r.paraphrases[: args.paraphrases]], spec, recipe)
            secs.append(time.time() - t0)
            for q, gold in r.qa:
                text, _ = answer(model, tok, q, "qa", [adapter], [1.0], max_new_tokens=48)
                qa.append(is_correct(text, gold))
                f1.append(token_f1(text, gold))
            recall, _ = answer(model, tok, r.qa[0][0], "recall", [adapter], [1.0], max_new_tokens=160)
            cos.append(cosine(recall, r.passage))
        row = {
            "config": cfg,
            "memories": len(recs),
            "qa": round(sum(qa) / len(qa), 3),
            "f1": round(sum(f1) / len(f1), 3),
            "recall_cos": round(sum(cos) / len(cos), 3),
            "sec_per_memory": round(sum(secs) / len(secs), 1),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
