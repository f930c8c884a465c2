"""Injection speed: seconds per training step vs sequence length and batch size on the default model, then
memories per minute vs how many memories share one batched forward (train.train_adapters_batched), with the
adapters' recall cosine and QA accuracy shown equal to training the same memories one at a time.

    python benchmarks/injection.py --memories 4 --group-sizes 1 2 4 --epochs 10 --paraphrases 9 --eval

Group size 1 is train_adapter (the one-at-a-time path). Dropout draws differ between the two paths, so the
adapters agree statistically, not bitwise (tests/test_train.py checks exact agreement without dropout).
Timings use --threads torch threads (default 1, stable on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import evaluate, layers_text, table, write_section

from megamem.adapters import LoraSpec, new_adapter
from megamem.datasets import load_partition
from megamem.inject import clear, inject_for
from megamem.model import load_model, num_layers
from megamem.train import Recipe, adamw, batches, make_example, train_adapter, train_adapters_batched


def step_seconds(model, layers, spec: LoraSpec, seq: int, batch: int, repeats: int) -> float:
    """Median seconds of one optimiser step (forward, backward, AdamW) on a random batch of seq tokens."""
    adapter = new_adapter(layers, spec, torch.Generator().manual_seed(0))
    opt = adamw([p for ab in adapter.weights.values() for p in ab], Recipe())
    for name, layer in layers.items():
        a, b = adapter.weights[name]
        layer.path = (a, b, torch.full((spec.rank,), spec.scaling))
    ids = torch.randint(100, 40000, (batch, seq), generator=torch.Generator().manual_seed(seq))
    model.train()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    model.eval()
    clear(model)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/mega-wiki2024")
    ap.add_argument("--partition", type=int, default=0)
    ap.add_argument("--memories", type=int, default=4)
    ap.add_argument("--paraphrases", type=int, default=9)
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--epochs", type=int, default=Recipe.epochs)
    ap.add_argument("--lr", type=float, default=Recipe.lr)
    ap.add_argument("--batch-size", type=int, default=Recipe.batch_size, help="examples per memory per step")
    ap.add_argument("--rank", type=int, default=LoraSpec.rank)
    ap.add_argument("--eval", action="store_true", help="also measure recall cosine and QA (slow: generation)")
    ap.add_argument("--step-grid", action="store_true", help="also time one step vs sequence length and batch")
    ap.add_argument("--seqs", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = LoraSpec(rank=args.rank, alpha=float(args.rank)) if args.rank != LoraSpec.rank else LoraSpec()
    recipe = Recipe(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size)
    model, tok = load_model()
    spec = spec.resolved(num_layers(model))
    layers = inject_for(model, spec)
    sections = []
    if args.step_grid:
        grid = []
        for seq in args.seqs:
            row = {"tokens per example": seq}
            for b in args.batches:
                s = step_seconds(model, layers, spec, seq, b, 2)
                row[f"batch {b}: s/step"] = f"{s:.2f}"
                row[f"batch {b}: ms/token"] = f"{1000 * s / (seq * b):.2f}"
            grid.append(row)
            print(row, flush=True)
        sections.append(
            f"Seconds per training step (forward, backward, AdamW; one rank-{spec.rank} adapter):\n\n{table(grid)}"
        )
    recs = load_partition(args.data, args.partition, args.memories)
    memories = [[r.passage, *r.paraphrases[: args.paraphrases]] for r in recs]
    tokens = statistics.mean(len(make_example(tok, t)[0]) for m in memories for t in recipe.select(m))
    rows = []
    for g in args.group_sizes:
        t0 = time.perf_counter()
        adapters = []
        for i in range(0, len(memories), g):
            group = memories[i : i + g]
            if g == 1:
                adapters.append(train_adapter(model, tok, group[0], spec, recipe))
            else:
                adapters += train_adapters_batched(model, tok, group, spec, recipe)
        secs = time.perf_counter() - t0
        row = {
            "memories per forward": g,
            "s per memory": f"{secs / len(memories):.1f}",
            "memories per minute": f"{60 * len(memories) / secs:.2f}",
        }
        if args.eval:
            scores = evaluate(model, tok, recs, adapters)
            row["recall cos"] = f"{scores['recall_cos']:.3f}"
            row["QA"] = f"{scores['qa']:.2f}"
        rows.append(row)
        print(row, flush=True)
    learned = recipe.select(memories[0])
    plans = [len(batches([make_example(tok, t) for t in recipe.select(m)], recipe)) for m in memories]
    steps = f"{min(plans)}-{max(plans)} (mean {statistics.mean(plans):.1f})"
    where = layers_text(spec)
    sections.append(
        f"Memories per minute vs memories per batched forward: {len(memories)} wiki memories (partition "
        f"{args.partition}), each given with {args.paraphrases} paraphrases of which the recipe learns "
        f"{len(learned) - 1} (mean {tokens:.0f} tokens as a training example), {recipe}, {steps} steps per "
        f"memory, rank {spec.rank} on {where}, {args.threads} thread(s):\n\n{table(rows)}"
    )
    text = "\n\n".join(sections)
    print(text)
    if not args.no_doc:
        write_section("injection", "3. Injection", text)


if __name__ == "__main__":
    main()
