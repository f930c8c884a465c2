"""Storage: bytes per memory vs LoRA rank and storage dtype, each with recall cosine and QA accuracy on wiki
memories (each adapter asked alone, gate weight 1, so the figures measure what storage keeps, not routing).

    python benchmarks/storage.py --ranks 4 8 16 32 64 128 --dtypes float32 bfloat16 float16 int8 --memories 10

Each rank trains its adapters once (default recipe, alpha = rank); each dtype then round-trips the same
adapters through the stored form (int8: symmetric absmax, one fp32 scale per rank component of A and of B),
so dtype columns differ only by storage. Bytes: the adapter file as the store writes it (safetensors,
PEFT names) plus the keys file; int8 is computed as int8 weights + fp32 scales (not yet a store format).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import evaluate, table, write_section

from megamem.adapters import Adapter, LoraSpec, save_adapter
from megamem.datasets import load_partition
from megamem.inject import inject_for
from megamem.model import load_model, num_layers
from megamem.train import Recipe, train_adapter, train_adapters_batched

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def int8_roundtrip(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Symmetric int8 quantisation and back, one absmax scale per slice along `dim` (per rank component)."""
    scale = t.abs().amax(dim=dim, keepdim=True).clamp(min=1e-12) / 127.0
    return (t / scale).round().clamp(-127, 127) * scale


def stored(adapter: Adapter, dtype: str) -> tuple[Adapter, int]:
    """The adapter as read back after storing in `dtype`, and its bytes on disk (adapter + config)."""
    if dtype == "int8":
        # A (r, in): one scale per row; B (out, r): one per column, so r + r fp32 scales a layer
        weights = {n: (int8_roundtrip(a, 1), int8_roundtrip(b, 0)) for n, (a, b) in adapter.weights.items()}
        size = sum(a.numel() + b.numel() + 4 * (a.shape[0] + b.shape[1]) for a, b in adapter.weights.values())
        with tempfile.TemporaryDirectory() as tmp:  # header + config, as for the other dtypes
            save_adapter(Adapter(adapter.spec, {}), Path(tmp), "m", torch.float32)
            size += sum(p.stat().st_size for p in Path(tmp).iterdir())
        return Adapter(adapter.spec, weights), size
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(adapter, Path(tmp), "m", DTYPES[dtype])
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
    weights = {n: (a.to(DTYPES[dtype]).float(), b.to(DTYPES[dtype]).float()) for n, (a, b) in adapter.weights.items()}
    return Adapter(adapter.spec, weights), size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/mega-wiki2024")
    ap.add_argument("--partition", type=int, default=0)
    ap.add_argument("--memories", type=int, default=10)
    ap.add_argument("--paraphrases", type=int, default=9)
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16", "int8"])
    ap.add_argument("--epochs", type=int, default=Recipe.epochs)
    ap.add_argument("--lr", type=float, default=Recipe.lr)
    ap.add_argument("--group", type=int, default=1, help="memories per batched forward while training")
    ap.add_argument(
        "--alpha-rule",
        choices=["rank", "matched"],
        default="rank",
        help="rank: alpha = rank (scaling 1); matched: alpha = sqrt(32 x rank), so that a step moves the weights "
        "as far as the default rank-32 adapter's does (with alpha = rank a smaller rank also learns slower)",
    )
    ap.add_argument("--no-eval", action="store_true", help="sizes only (no training)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    recs = load_partition(args.data, args.partition, args.memories)
    memories = [[r.passage, *r.paraphrases[: args.paraphrases]] for r in recs]
    recipe = Recipe(lr=args.lr, epochs=args.epochs)
    keys_bytes = 4 * 384 * (1 + args.paraphrases) + 100  # fp32 embedder keys: passage + paraphrases, + header
    rows = []
    for rank in args.ranks:
        alpha = float(rank) if args.alpha_rule == "rank" else (32.0 * rank) ** 0.5
        spec = LoraSpec(rank=rank, alpha=alpha).resolved(num_layers(model))
        layers = inject_for(model, spec)
        t0 = time.perf_counter()
        if args.no_eval:
            from megamem.adapters import new_adapter

            adapters = [new_adapter(layers, spec, torch.Generator().manual_seed(0))]
        elif args.group > 1:
            adapters = []
            for i in range(0, len(memories), args.group):
                adapters += train_adapters_batched(model, tok, memories[i : i + args.group], spec, recipe)
        else:
            adapters = [train_adapter(model, tok, m, spec, recipe) for m in memories]
        train_s = (time.perf_counter() - t0) / len(adapters)
        for dtype in args.dtypes:
            kept = [stored(a, dtype) for a in adapters]
            size = kept[0][1] + keys_bytes
            row = {
                "rank": rank,
                "alpha": f"{alpha:g}",
                "dtype": dtype,
                "bytes per memory": f"{size / 1e6:.2f} MB",
                "% of base model": f"{100 * size / base_bytes:.2f}%",
            }
            if not args.no_eval:
                scores = evaluate(model, tok, recs, [a for a, _ in kept])
                row["recall cos"] = f"{scores['recall_cos']:.3f}"
                row["QA"] = f"{scores['qa']:.2f}"
                row["train s/memory"] = f"{train_s:.0f}"
            rows.append(row)
            print(row, flush=True)
    text = table(rows)
    print(text)
    if not args.no_doc:
        write_section(
            "storage" if args.alpha_rule == "rank" else "storage-matched",
            "4. Storage" if args.alpha_rule == "rank" else "4b. Storage with matched alpha",
            text,
            f"{len(recs)} wiki memories (partition {args.partition}), each asked with its own adapter alone; "
            f"recipe {recipe}, adapters {LoraSpec()} but for the rank and alpha of the row; "
            f"{1 + args.paraphrases} keys a memory (passage + paraphrases); base model "
            f"{base_bytes / 1e6:.0f} MB in memory (fp32). Bytes: "
            f"adapter file + config + fp32 keys ({keys_bytes} B).",
        )


if __name__ == "__main__":
    main()
