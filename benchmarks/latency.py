"""Prefill and decode latency per token: the bare base model vs megamem's gated mixture, vs the same mixture done
with PEFT (all k adapters loaded and active, per-adapter scales) and the paper's merge (W0 + sum g_i B_i A_i
written into the weights for each question).

    python benchmarks/latency.py --sizes 1 50 1000 10000 --top-k 1 4 --repeats 5

Adapters are random with the store's shape (rank 32 fp32 on up_proj/down_proj of every layer, 16 MB each) and
are made lazily from their memory number, so N = 10,000 never needs 160 GB: per token only the k gated
adapters exist (the gate picks them from N keys; nothing else is loaded). Dense gates over N >= 1,000 would
need N x 16 MB in the forward pass and are not run. Each ratio is the median over repeats of (condition time /
bare time) measured back to back in the same repeat; single-threaded (torch.set_num_threads(1)).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import layers_text, median_time, table, write_section

from megamem.adapters import Adapter, LoraSpec, load_adapter, save_adapter
from megamem.gate import GateConfig, gate_weights
from megamem.index import KeyIndex
from megamem.inject import clear, gated_layers, inject_for, set_mixture
from megamem.memory import ADAPTER_DTYPE
from megamem.model import load_model, num_layers


def random_adapter(layers: dict, spec: LoraSpec, memory: int) -> Adapter:
    """Memory number `memory`'s adapter: random weights of the trained adapters' scale, seeded by the number."""
    g = torch.Generator().manual_seed(memory)
    weights = {}
    for name, layer in layers.items():
        a = torch.randn(spec.rank, layer.in_features, generator=g) / layer.in_features**0.5
        b = torch.randn(layer.out_features, spec.rank, generator=g) * 0.01
        weights[name] = (a, b)
    return Adapter(spec, weights)


def prefill_op(model, ids):
    return lambda: model(input_ids=ids, use_cache=False)


def decode_time(model, ids, steps: int) -> float:
    """Median seconds of one decode step (KV cache of the prompt, greedy next token) over `steps` steps."""
    out = model(input_ids=ids, use_cache=True)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        times.append(time.perf_counter() - t0)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return statistics.median(times)


def paired(bare, cond, repeats: int) -> tuple[float, float, float]:
    """(median bare seconds, median condition seconds, median of per-repeat ratios), measured back to back."""
    bs, cs, rs = [], [], []
    for _ in range(repeats):
        b, c = bare(), cond()
        bs.append(b)
        cs.append(c)
        rs.append(c / b)
    return statistics.median(bs), statistics.median(cs), statistics.median(rs)


def timer(fn):
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def peft_model(adapters: list[Adapter], weights: list[float], spec: LoraSpec):
    """A fresh base model under PEFT with every adapter loaded, all active, each scaled by its gate weight."""
    from peft import LoraConfig, get_peft_model

    base, _ = load_model()
    layers = list(spec.layers) if spec.layers is not None else None
    cfg = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        layers_to_transform=layers,
        lora_dropout=0.0,
    )
    pm = get_peft_model(base, cfg, adapter_name="m0")
    names = [f"m{i}" for i in range(len(adapters))]
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    prefix = "base_model.model."
    with torch.no_grad():
        for mod_name, module in pm.named_modules():
            if not hasattr(module, "lora_A") or not mod_name.startswith(prefix):
                continue
            key = mod_name[len(prefix) :]
            for n, adapter, w in zip(names, adapters, weights, strict=True):
                a, b = adapter.weights[key]
                module.lora_A[n].weight.copy_(a)
                module.lora_B[n].weight.copy_(b)
                module.scaling[n] = w * spec.scaling
    pm.base_model.set_adapter(names)
    pm.eval()
    return pm


def merge(model, adapters: list[Adapter], weights: list[float]) -> dict:
    """The paper's formulation: W0 += sum_i g_i * scale * B_i A_i in every adapted layer; returns the W0 copies."""
    saved = {}
    for name, layer in gated_layers(model).items():
        w = layer.base.weight
        saved[name] = w.detach().clone()
        delta = sum(
            g * a.scaling * (a.weights[name][1] @ a.weights[name][0]) for a, g in zip(adapters, weights, strict=True)
        )
        w.data += delta
    return saved


def bare_decode_merged(model, ids, steps: int, saved: dict):
    """A bare decode step timing that unmerges first and merges back after (weights restored in between)."""

    def run() -> float:
        merged = {n: layer.base.weight.detach().clone() for n, layer in gated_layers(model).items()}
        unmerge(model, saved)
        t = decode_time(model, ids, steps)
        unmerge(model, merged)
        return t

    return run


def unmerge(model, saved: dict) -> None:
    for name, layer in gated_layers(model).items():
        layer.base.weight.data.copy_(saved[name])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 50, 1000, 10000])
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dense-max", type=int, default=50, help="largest N run with a dense gate")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=LoraSpec.rank)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    model, tok = load_model()
    model.eval()
    spec = LoraSpec(rank=args.rank, alpha=float(args.rank)).resolved(num_layers(model))
    layers = inject_for(model, spec)
    ids = torch.randint(100, 40000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))

    def bare_prefill():
        clear(model)
        return timer(prefill_op(model, ids))()

    def bare_decode():
        clear(model)
        return decode_time(model, ids, args.decode_steps)

    # what a question costs besides the forward passes: the gate over N keys and loading k adapters from disk
    one = random_adapter(layers, spec, 0)
    with tempfile.TemporaryDirectory() as tmp:
        sha = save_adapter(one, Path(tmp) / "a", "bench", getattr(torch, ADAPTER_DTYPE))
        load_ms = 1000 * median_time(lambda: load_adapter(Path(tmp) / "a", checksum=sha), 3)
        adapter_mb = (Path(tmp) / "a" / "adapter_model.safetensors").stat().st_size / 1e6

    # per-token cost depends only on how many adapters are active: measure each count once
    counts = {min(k, n) for n in args.sizes for k in args.top_k} | {n for n in args.sizes if n <= args.dense_max}
    counts = sorted(counts)
    per_count: dict[int, dict] = {}
    for c in counts:
        adapters = [random_adapter(layers, spec, m) for m in range(c)]
        w = torch.softmax(torch.randn(c, generator=torch.Generator().manual_seed(c)), 0).tolist()

        def on():
            set_mixture(model, adapters, w)  # noqa: B023

        def mix_prefill():
            on()
            return timer(prefill_op(model, ids))()

        def mix_decode():
            on()
            return decode_time(model, ids, args.decode_steps)

        r: dict = {}
        r["bare prefill"], _, r["prefill"] = paired(bare_prefill, mix_prefill, args.repeats)
        r["bare decode"], _, r["decode"] = paired(bare_decode, mix_decode, args.repeats)
        clear(model)
        t0 = time.perf_counter()
        saved = merge(model, adapters, w)
        unmerge(model, saved)
        r["merge s"] = time.perf_counter() - t0
        saved = merge(model, adapters, w)

        def merged_decode():
            return decode_time(model, ids, args.decode_steps)

        # merged weights cost what the bare model costs per token; measured all the same
        _, _, r["merged decode"] = paired(bare_decode_merged(model, ids, args.decode_steps, saved), merged_decode, 2)
        unmerge(model, saved)
        if not args.no_peft:
            pm = peft_model(adapters, w, spec)
            on()
            check = (pm(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
            clear(model)
            _, _, r["peft prefill"] = paired(bare_prefill, timer(prefill_op(pm, ids)), args.repeats)
            _, _, r["peft decode"] = paired(
                bare_decode, lambda pm=pm: decode_time(pm, ids, args.decode_steps), args.repeats
            )
            r["peft max |dlogit|"] = check
            del pm
        per_count[c] = r
        print(c, {k: round(v, 4) for k, v in r.items()}, flush=True)

    rows = []
    for n in args.sizes:
        g = torch.Generator().manual_seed(n)
        keys = torch.randn(n, 384, generator=g)
        index = KeyIndex(keys, torch.arange(n), n, "cosine")
        q = torch.randn(384, generator=g)
        for k in [*args.top_k, None]:
            if k is not None and k > n:
                continue
            c = n if k is None else min(k, n)
            label = "dense" if k is None else str(k)
            if c not in per_count:
                rows.append({"N": n, "top-k": label, "active adapters": f"{c}: not run ({c} x {adapter_mb:.0f} MB)"})
                continue
            r = per_count[c]
            gate_ms = 1000 * median_time(lambda q=q, k=k, i=index: gate_weights(i.scores(q, k), GateConfig(top_k=k)), 5)
            row = {
                "N": n,
                "top-k": label,
                "active adapters": c,
                "megamem prefill": f"{r['prefill']:.3f}x",
                "megamem decode": f"{r['decode']:.3f}x",
            }
            if not args.no_peft:
                row["PEFT prefill"] = f"{r['peft prefill']:.3f}x"
                row["PEFT decode"] = f"{r['peft decode']:.3f}x"
            row["merged decode"] = f"{r['merged decode']:.3f}x"
            row["merge+unmerge s/question"] = f"{r['merge s']:.2f}"
            row["gate ms"] = f"{gate_ms:.2f}"
            row["load adapters ms"] = f"{c * load_ms:.0f}"
            rows.append(row)
    bare = per_count[counts[0]]
    text = table(rows)
    print(text)
    if not args.no_doc:
        where = layers_text(spec)
        peft_check = ", ".join(f"{c}: {r.get('peft max |dlogit|', float('nan')):.1e}" for c, r in per_count.items())
        write_section(
            "latency",
            "1. Prefill and decode latency per token",
            text,
            f"Ratios to the bare model, measured back to back in this run (median of {args.repeats} repeats); the "
            f"bare model took {1000 * bare['bare prefill'] / args.prompt_tokens:.1f} ms per prompt token in prefill "
            f"({args.prompt_tokens}-token prompt, one forward) and {1000 * bare['bare decode']:.1f} ms per decoded "
            f"token (KV cache). Adapters: rank {args.rank} on {len(layers)} modules ({where}), stored "
            f"{ADAPTER_DTYPE} ({adapter_mb:.1f} MB each) and computed in fp32, random and made lazily "
            f"from their memory number (only the gated ones ever exist). Per question, besides the forward passes: "
            f"gate ms = scoring N keys (one key per memory here; benchmarks/gate_latency.py has the detail); load "
            f"adapters ms = reading the k gated adapters from disk with the checksum ({load_ms:.0f} ms each, page "
            f"cache warm), which the LRU cache skips for repeat memories; merge+unmerge = the paper's formulation's "
            f"extra cost per question, after which a token costs what a bare one does. PEFT = the same adapters "
            f"loaded into peft and all active with per-adapter scales (max |logit difference| from megamem's "
            f"mixture by active count: {peft_check}). The per-token cost depends only on the number of active "
            f"adapters, not on N: the gate picks k of N and nothing else is touched.",
        )


if __name__ == "__main__":
    main()
