"""No harm to general ability: with memories stored, do general questions get the base model's answers?

Setup: a store with the product's defaults learns wiki partition 0 (50 memories, passage + paraphrases;
reused if --store holds it). Loop, for three conditions (the base model alone; the product's gate with
its null memory; the paper's gate, null memory off): the shipped general questions
(data/general_qa.jsonl, 280, 75 of them near the stored topics) answered greedily, each routed by the
gate on its own text; the shipped multiple-choice questions (data/general_mcq.jsonl) scored by the
letter logits; the general-text paragraphs (data/general_text.txt) for KL(base || model) per token.
Save: the share of answers identical to the base model's (and of those near-topic), accuracy with a
Wilson 95% CI, MCQ accuracy with its CI, mean KL, and the share of inputs routed to no memory.

    python benchmarks/general_harm.py --store /tmp/harm-p0 --out bench-runs/general_harm.json
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
from qa_modes import DATA, wilson  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partition", type=int, default=0)
    ap.add_argument("--paraphrases", type=int, default=9)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from megamem import GateConfig, Item, Memory
    from megamem.answer import qa_prompt
    from megamem.bench import general
    from megamem.bench.infer import generate, last_logits, token_logprobs
    from megamem.datasets import load_partition
    from megamem.judge import contains_answer

    # -- setup ---------------------------------------------------------------------------------------
    mem = Memory(args.store)
    records = load_partition(DATA, args.partition)
    if not mem.list():
        mem.add_many(
            [
                Item(r.passage, r.paraphrases[: args.paraphrases], id=f"p{args.partition}-r{i}")
                for i, r in enumerate(records)
            ]
        )
    model, tok = mem.load()
    ids = [r.id for r in mem.list()]
    adapters = [mem.adapter(i) for i in ids]
    text = resources.files("megamem").joinpath("data/general_qa.jsonl").read_text(encoding="utf-8")
    qa = [json.loads(line) for line in text.splitlines() if line.strip()]
    mcq = general.shipped_mcq()
    mcq_seqs, letters = general.mcq_inputs(tok, mcq)
    paragraphs = general.shipped_text()
    text_seqs = general.text_inputs(tok, paragraphs)

    def weights(queries: list[str], gate: GateConfig) -> tuple[torch.Tensor, float]:
        w = torch.zeros(len(queries), len(ids))
        for n, q in enumerate(queries):
            for i, g in mem.route(q, gate):
                w[n, ids.index(i)] = g
        return w, float((w.sum(dim=1) == 0).float().mean())

    # -- loop: each condition answers everything --------------------------------------------------------
    product = mem.gate
    conditions = {"base model": None, "product gate (null memory)": product, "paper's gate (no null)": None}
    conditions["paper's gate (no null)"] = GateConfig(**{**product.to_dict(), "null_rate": None})
    out: dict[str, dict] = {}
    for name, gate in conditions.items():
        if gate is None:
            wq = wm = wt = None
            none_q = none_m = none_t = 1.0
        else:
            wq, none_q = weights([d["question"] for d in qa], gate)
            wm, none_m = weights([q.question for q in mcq], gate)
            wt, none_t = weights(paragraphs, gate)
        answers = generate(model, tok, [[("user", qa_prompt(d["question"]))] for d in qa], 48, adapters, wq)
        logits = last_logits(model, tok, mcq_seqs, adapters, wm)
        logprobs = token_logprobs(model, text_seqs, tok.pad_token_id, adapters, wt)
        out[name] = {"answers": answers, "logits": logits, "logprobs": logprobs, "none": (none_q, none_m, none_t)}
        print(f"{name}: done", file=sys.stderr, flush=True)

    # -- save --------------------------------------------------------------------------------------------
    base = out["base model"]
    ref = general.make_reference(base["logprobs"])
    near = [bool(d.get("near")) for d in qa]
    rows = []
    for name, o in out.items():
        same = [a == b for a, b in zip(o["answers"], base["answers"], strict=True)]
        right = [
            any(contains_answer(a, g) for g in [d["answer"], *d.get("aliases", [])])
            for a, d in zip(o["answers"], qa, strict=True)
        ]
        k = sum(right)
        lo, hi = wilson(k, len(qa))
        picks = o["logits"][:, letters].argmax(dim=-1).tolist()
        m = sum(int(p == q.answer) for p, q in zip(picks, mcq, strict=True))
        mlo, mhi = wilson(m, len(mcq))
        n_near = sum(near)
        rows.append(
            {
                "condition": name,
                "same answer as base": f"{sum(same) / len(qa):.3f}",
                "near-topic same": f"{sum(s for s, n in zip(same, near, strict=True) if n) / n_near:.3f}",
                "QA correct (95% CI)": f"{k / len(qa):.3f} ({lo:.3f}-{hi:.3f})",
                "MCQ (95% CI)": f"{m / len(mcq):.3f} ({mlo:.3f}-{mhi:.3f})",
                "KL to base": f"{general.bucketed_kl(ref, o['logprobs']):.4f}",
                "no memory: QA / MCQ / text": "/".join(f"{x:.2f}" for x in o["none"]),
            }
        )
    header = (
        f"{command()}\n{machine()}\n{len(ids)} memories (wiki partition {args.partition}); {len(qa)} general questions "
        f"({sum(near)} near-topic), {len(mcq)} MCQ, {len(paragraphs)} text paragraphs"
    )
    print(header)
    print(table(rows))
    if args.out:
        per = [{"question": d["question"], **{n: o["answers"][i] for n, o in out.items()}} for i, d in enumerate(qa)]
        args.out.write_text(json.dumps({"header": header, "rows": rows, "answers": per}, indent=1))


if __name__ == "__main__":
    main()
