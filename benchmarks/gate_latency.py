"""Gate latency vs the number of stored memories: exact scoring of every key vs an approximate HNSW index
(usearch and faiss, both measured), with recall@k of the approximate top-k against the exact one.

    python benchmarks/gate_latency.py --sizes 1000 10000 50000 --keys-per-memory 4

Keys are synthetic, 384-dim like the default embedder's: each memory's keys scatter around its own random
centre and each query lies near one memory's centre (real keys cluster the same way: a passage and its
paraphrases). Timings are single-threaded (torch.set_num_threads(1)), medians over the queries.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import table, write_section

from megamem.gate import GateConfig, gate_weights
from megamem.index import KeyIndex


def synthetic(n: int, per: int, dim: int, queries: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n, dim, generator=g)
    keys = centres.repeat_interleave(per, 0) + 0.6 * torch.randn(n * per, dim, generator=g)
    owners = torch.arange(n).repeat_interleave(per)
    pick = torch.randint(0, n, (queries,), generator=g)
    qs = centres[pick] + 0.6 * torch.randn(queries, dim, generator=g)
    return keys, owners, qs


def timed(fn, qs) -> tuple[float, list]:
    """Median milliseconds per query and the results."""
    out, times = [], []
    for q in qs:
        t0 = time.perf_counter()
        out.append(fn(q))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--keys-per-memory", type=int, default=4)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--backends", nargs="+", default=["usearch", "faiss"])
    ap.add_argument("--no-doc", action="store_true", help="print only, do not write docs/performance.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:
        args.backends = [b for b in args.backends if b != "faiss"]
    rows = []
    for n in args.sizes:
        keys, owners, qs = synthetic(n, args.keys_per_memory, args.dim, args.queries)
        exact = KeyIndex(keys, owners, n, "cosine", exact_max=keys.shape[0])
        k_max = max(args.top_k)
        exact_ms, exact_scores = timed(
            lambda q, e=exact, k=k_max: gate_weights(e.exact_scores(q), GateConfig(top_k=k)), qs
        )
        dense_ms, _ = timed(lambda q, e=exact: gate_weights(e.exact_scores(q), GateConfig()), qs)
        all_scores = [exact.exact_scores(q) for q in qs]
        truth = {k: [set(s.topk(k).indices.tolist()) for s in all_scores] for k in args.top_k}
        mass = {k: [gate_weights(s, GateConfig(top_k=k)) for s in all_scores] for k in args.top_k}
        row = {
            "memories": n,
            "key rows": keys.shape[0],
            "exact top-k ms": f"{exact_ms:.2f}",
            "exact dense ms": f"{dense_ms:.2f}",
        }
        for backend in args.backends:
            index = KeyIndex(keys, owners, n, "cosine", exact_max=0, backend=backend)
            t0 = time.perf_counter()
            index.candidates(qs[0], 1)  # builds the index
            build = time.perf_counter() - t0
            for k in args.top_k:
                ms, scores = timed(lambda q, i=index, k=k: gate_weights(i.scores(q, k), GateConfig(top_k=k)), qs)
                found = [set((w > 0).nonzero().flatten().tolist()) for w in scores]
                recall = sum(len(t & f) for t, f in zip(truth[k], found, strict=True)) / (k * len(qs))
                row[f"{backend} top-{k} ms"] = f"{ms:.2f}"
                got = sum(float(m[list(f)].sum()) for m, f in zip(mass[k], found, strict=True)) / len(qs)
                row[f"{backend} recall@{k}"] = f"{recall:.3f}"
                row[f"{backend} weight@{k}"] = f"{got:.3f}"
            row[f"{backend} build s"] = f"{build:.1f}"
        del exact_scores
        rows.append(row)
        print(row, flush=True)
    text = table(rows)
    print(text)
    if not args.no_doc:
        write_section(
            "gate",
            "2. Gate latency vs N",
            text,
            "Times per query in milliseconds (median), gate weights included; build = one-off seconds to build the "
            "HNSW index (the store builds it lazily on the first top-k question beyond the threshold and extends it "
            "as memories are added). Recall@k: share of the exact top-k memories that the approximate gate also "
            "selects; the memories it does select get exact scores (their keys are re-scored), so their weights "
            "are the exact ones. Weight@k: share of the exact top-k gate weight (default beta) that lands on "
            "memories the "
            "approximate gate selects; the top-k beyond the right memory are near-ties of unrelated memories "
            "(weight ~0), which is why recall@4 can be well below weight@4. Exact scoring stays below ~10 ms per "
            "question up to 40,000 key rows, about 1% of a 30-token answer, so megamem.index scores exactly up "
            "to EXACT_MAX_KEYS = 50,000 rows and uses the faiss HNSW index (faster to build and to search than "
            "usearch here) beyond it.",
        )


if __name__ == "__main__":
    main()
