"""The gate's 'no memory' decision, measured: how a question's best score against its own memory compares
with the best score of questions about no stored memory, for each key function.

For stores of N wiki memories (keys from the passage and its first P paraphrases, as `megamem add -p`
would give them), it scores: the wiki questions against the store (their own memory's score and rank),
the shipped general questions (data/general_qa.jsonl: plain and near-topic), and the calibration
queries (data/null_queries.txt, never used for evaluation). Then it evaluates no-memory rules:
a fixed cosine cut, and the per-memory calibrated threshold (each memory's highest calibration score,
plus a margin) that megamem's gate uses. Prints a table and writes JSON.

    python benchmarks/null_gate.py --partitions 0,1 --key-function embedder --out /tmp/null.json
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, table  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mega-wiki2024"


def packaged(name: str) -> str:
    return resources.files("megamem").joinpath(f"data/{name}").read_text(encoding="utf-8")


def general_questions() -> list[dict]:
    return [json.loads(line) for line in packaged("general_qa.jsonl").splitlines() if line.strip()]


def null_queries() -> list[str]:
    return [line.strip() for line in packaged("null_queries.txt").splitlines() if line.strip()]


def scores_by_memory(queries: torch.Tensor, keys: torch.Tensor, owners: torch.Tensor, n: int, sim: str) -> torch.Tensor:
    """(n_queries, n) max-over-keys scores with the product's scorer."""
    from megamem.index import KeyIndex

    index = KeyIndex(keys, owners, n, sim)
    return torch.stack([index.exact_scores(q) for q in queries]) if len(queries) else torch.zeros(0, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partitions", default="0,1", help="wiki partitions whose memories form the store")
    ap.add_argument("--paraphrases", type=int, default=1, help="paraphrase keys per memory (besides the passage)")
    ap.add_argument("--key-function", default="embedder", choices=["embedder", "activation"])
    ap.add_argument("--similarity", default=None, help="cosine | dot (default: the store's default gate)")
    ap.add_argument("--margins", default="0,0.02,0.05", help="margins over the calibrated threshold")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from megamem.datasets import load_partition
    from megamem.keys import compute_keys
    from megamem.memory import default_gate

    sim = args.similarity or default_gate(args.key_function).similarity
    model = tok = None
    if args.key_function == "activation":
        from megamem.model import load_model

        model, tok = load_model()
    parts = [int(x) for x in args.partitions.split(",")]
    records = [r for p in parts for r in load_partition(DATA, p)]
    texts, owners = [], []
    for i, r in enumerate(records):
        for t in [r.passage, *r.paraphrases[: args.paraphrases]]:
            texts.append(t)
            owners.append(i)
    keys = compute_keys(args.key_function, texts, model, tok)
    owners_t = torch.tensor(owners)
    n = len(records)
    wiki_q = [(i, q) for i, r in enumerate(records) for q, _ in r.qa]
    general = general_questions()
    calib = null_queries()

    def enc(qs: list[str]) -> torch.Tensor:
        return compute_keys(args.key_function, qs, model, tok)

    s_wiki = scores_by_memory(enc([q for _, q in wiki_q]), keys, owners_t, n, sim)
    s_gen = scores_by_memory(enc([g["question"] for g in general]), keys, owners_t, n, sim)
    s_cal = scores_by_memory(enc(calib), keys, owners_t, n, sim)
    own = torch.tensor([s_wiki[j, i] for j, (i, _) in enumerate(wiki_q)])
    top1 = torch.tensor([int(s_wiki[j].argmax()) == i for j, (i, _) in enumerate(wiki_q)]).float()
    near = torch.tensor([bool(g.get("near")) for g in general])
    best_gen = s_gen.max(dim=1).values
    best_cal = s_cal.max(dim=1).values

    def q(x: torch.Tensor, p: float) -> float:
        return float(torch.quantile(x.float(), p)) if len(x) else float("nan")

    rows = [
        {
            "what": what,
            "count": len(x),
            "min": f"{float(x.min()):.3f}",
            "p05": f"{q(x, 0.05):.3f}",
            "median": f"{q(x, 0.5):.3f}",
            "p95": f"{q(x, 0.95):.3f}",
            "max": f"{float(x.max()):.3f}",
        }
        for what, x in (
            ("wiki question vs its own memory", own),
            ("general question, best memory", best_gen[~near]),
            ("near-topic question, best memory", best_gen[near]),
            ("calibration query, best memory", best_cal),
        )
    ]
    print(f"# {command()}\n# {machine()}\n# store: {n} memories of wiki partitions {parts}, top-1 {top1.mean():.3f}")
    print(table(rows))

    def rule(thresholds: torch.Tensor) -> dict:
        """Share of wiki questions whose own memory passes and is the top-1 of those that pass; share of general
        (and near) questions routed to no memory at all."""
        keep = (own >= thresholds[[i for i, _ in wiki_q]]) & (top1 > 0)
        gen_off = ~(s_gen >= thresholds[None, :]).any(dim=1)
        return {
            "wiki routed right": f"{float(keep.float().mean()):.3f}",
            "general: no memory": f"{float(gen_off[~near].float().mean()):.3f}",
            "near: no memory": f"{float(gen_off[near].float().mean()):.3f}",
        }

    results = []
    for cut in (0.4, 0.45, 0.5, 0.55, 0.6) if sim == "cosine" else ():
        results.append({"rule": f"cosine >= {cut}", **rule(torch.full((n,), cut))})
    for rate in (0.02, 0.01, 0.005, 0.0):
        tau = q(best_cal, 1 - rate)  # the store's null score: calibration queries routed at most `rate` of the time
        results.append({"rule": f"null at calibration q{1 - rate:g} = {tau:.3f}", **rule(torch.full((n,), tau))})
    per_memory = s_cal.max(dim=0).values  # each memory's highest calibration score
    for m in [float(x) for x in args.margins.split(",")]:
        scale = 1.0 if sim == "cosine" else float(per_memory.abs().mean())
        results.append({"rule": f"calibrated per memory + {m:g}", **rule(per_memory + m * scale)})
    print(table(results))
    if args.out:
        args.out.write_text(
            json.dumps({"command": command(), "machine": machine(), "rows": rows, "rules": results}, indent=2)
        )


if __name__ == "__main__":
    main()
