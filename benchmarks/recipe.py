"""The recipe sweep behind the training defaults: each wiki memory learned into its own adapter and asked
with that adapter alone (gate weight 1), so the figures measure learning, not routing.

    python benchmarks/recipe.py --memories 10 --config lr=1e-3,epochs=10 --config lr=3e-3,epochs=2,paraphrases=3

Each --config is comma-separated Recipe / LoraSpec fields (lr, epochs, batch_size, paraphrases, rank, alpha,
upper, ...) plus `layers=A-B` (adapters on layers A..B only); an empty --config "" is the product's defaults.
Every memory's passage and all its paraphrases are given; the recipe's `paraphrases` picks how many are learned.
Prints one JSON line per config and writes a table to docs/performance.md (section "recipe"): QA accuracy
(offline judge), token F1, recall cosine (cued by each question), seconds per memory.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields

import torch
from common import evaluate, table, write_section

from megamem.adapters import LoraSpec
from megamem.datasets import load_partition
from megamem.inject import inject_for
from megamem.model import load_model
from megamem.train import Recipe, batches, make_example, train_adapter


def parse_config(text: str) -> tuple[Recipe, LoraSpec]:
    """'lr=1e-3,rank=16,paraphrases=3,layers=15-29' -> (Recipe, LoraSpec) with those fields set."""
    recipe_fields = {f.name for f in fields(Recipe)}
    spec_fields = {f.name for f in fields(LoraSpec)}
    kw_r: dict = {}
    kw_s: dict = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        if k not in recipe_fields | spec_fields or not v:
            raise SystemExit(f"bad config part {part!r}: want FIELD=VALUE, FIELD one of Recipe / LoraSpec's fields")
        if k == "layers":
            lo, hi = (int(x) for x in v.split("-"))
            kw_s["layers"] = tuple(range(lo, hi + 1))
        else:
            num = float(v) if any(c in v for c in ".e") else int(v)
            (kw_r if k in recipe_fields else kw_s)[k] = num
    if "rank" in kw_s and "alpha" not in kw_s:
        kw_s["alpha"] = float(kw_s["rank"])  # alpha = rank (scaling 1), as the default
    return Recipe(**kw_r), LoraSpec(**kw_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/mega-wiki2024")
    ap.add_argument("--partition", type=int, default=0)
    ap.add_argument("--memories", type=int, default=10)
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recs = load_partition(args.data, args.partition, args.memories)
    model, tok = load_model()
    rows = []
    for cfg in args.config:
        recipe, spec = parse_config(cfg)
        inject_for(model, spec)
        t0 = time.perf_counter()
        adapters = [train_adapter(model, tok, [r.passage, *r.paraphrases], spec, recipe) for r in recs]
        secs = (time.perf_counter() - t0) / len(recs)
        scores = evaluate(model, tok, recs, adapters)
        texts = recipe.select([recs[0].passage, *recs[0].paraphrases])
        steps = len(batches([make_example(tok, t) for t in texts], recipe))
        row = {
            "config": cfg or "(the defaults)",
            "texts": len(texts),
            "steps": steps,
            "recall cos": f"{scores['recall_cos']:.3f}",
            "QA": f"{scores['qa']:.3f}",
            "F1": f"{scores['f1']:.3f}",
            "s per memory": f"{secs:.1f}",
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    text = table(rows)
    print(text)
    if not args.no_doc:
        write_section(
            "recipe",
            "3b. Injection recipe",
            text,
            f"{len(recs)} wiki memories (partition {args.partition}), each asked with its own adapter alone; "
            f"defaults where a config is silent: {Recipe()} {LoraSpec()}; s per memory = training only, "
            f"{args.threads} thread(s).",
        )


if __name__ == "__main__":
    main()
