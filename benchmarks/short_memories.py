"""Short invented memories (tests/test_e2e.py's 3 + the demo's 5) under several recipes: does the memory's
distinctive word come back in recall and in a QA answer, each asked with its own adapter alone?

    python benchmarks/short_memories.py "" min_tokens=2000 upper=1.0

Each argument is a config as recipe.py takes it (Recipe / LoraSpec fields); "" is the defaults. Prints one
JSON line per config: recall / QA hits out of 8 and the memories recall missed. 1 thread.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from recipe import parse_config

from megamem.answer import qa_prompt, recall_prompt
from megamem.bench.infer import generate
from megamem.demo import demo_items
from megamem.inject import inject_for
from megamem.model import load_model
from megamem.train import train_adapter


def memories() -> list[tuple[str, list[str], str, str]]:
    """(text, paraphrases, question, word that must come back) for the e2e test's and the demo's memories."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_e2e import MEMORIES

    items = [(text, [para], q, word) for word, text, para, q in MEMORIES]
    return items + [(d["text"], d["paraphrases"], d["question"], d["answer"]) for d in demo_items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help='recipe.py configs, e.g. "" min_tokens=2000 upper=1.0')
    args = parser.parse_args()
    configs = [(cfg, *parse_config(cfg)) for cfg in args.configs]  # bad configs fail before the model loads
    torch.set_num_threads(1)
    items = memories()
    model, tok = load_model()
    for cfg, recipe, spec in configs:
        inject_for(model, spec)
        adapters = [train_adapter(model, tok, [t, *p], spec, recipe) for t, p, _, _ in items]
        gate = torch.eye(len(items))  # each question through its own memory's adapter alone
        recalls = generate(model, tok, [[("user", recall_prompt(q))] for _, _, q, _ in items], 40, adapters, gate)
        answers = generate(model, tok, [[("user", qa_prompt(q))] for _, _, q, _ in items], 40, adapters, gate)
        hit_r = [w.lower() in r.lower() for (_, _, _, w), r in zip(items, recalls, strict=True)]
        hit_q = [w.lower() in a.lower() for (_, _, _, w), a in zip(items, answers, strict=True)]
        row = {"config": cfg or "(the defaults)", "recall": sum(hit_r), "qa": sum(hit_q), "of": len(items)}
        row["recall missed"] = [items[i][3] for i, hit in enumerate(hit_r) if not hit]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
