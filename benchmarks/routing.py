"""Routing at scale: does the gate find a question's memory among 1,000 / 10,000 / 100,000 memories?

    python benchmarks/routing.py --sizes 1000 10000 100000

The pool (nested: each size holds the smaller ones): the 500 wiki records of ../shared/data (every partition;
their 1,500 questions are the queries), the 500 fictional stories, then synthetic memories in turn
(megamem.bench.distractors): near-duplicates of the wiki records (same topic and template, some names and
every number changed, always a word of the subject's own name) and invented fact sheets. Each memory's keys
come from views of its text: its passage, up to two paraphrases (fewer keys than the product's nine, so the
100,000-memory pool embeds in under an hour on 2 cores), its sentences, its names.

Scorers: the gate's own (max over a memory's keys of the cosine, or the dot product), BM25 alone (bm25s over
each memory's passage and paraphrases), hybrid (cosine + lam * BM25 / the query's best BM25), and the hybrid
as a re-rank of the cosine's top candidates. lam is chosen on the questions of wiki partitions 0-4 and every
figure is reported on partitions 5-9 (750 questions) only. Latency: one question at a time, the query's
embedding plus the scoring, median milliseconds. The approximate index (megamem.index, HNSW) is reported as
recall@k of the gold memory among its candidates.

Embeddings are cached under --cache (float16, by text hash; default: the user cache dir's megamem/routing, so
they outlive a session's /tmp), so a second run only scores and an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from common import provenance, table
from platformdirs import user_cache_dir

from megamem.bench.distractors import NUMBER, anchors, invented, names, near_duplicate
from megamem.datasets import Record, load_partition, partition_files
from megamem.index import KeyIndex
from megamem.keys import embedder_keys
from megamem.questions import sentences

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "scale"
VIEWS = ("passage", "paraphrases", "sentences", "names")
_NAME = re.compile(r"\b[A-Z][\w'’-]+(?:\s+(?:of |the |de )?[A-Z][\w'’-]+)*")


@dataclass
class PoolMemory:
    """One memory of the routing pool: its texts by view, and what kind it is."""

    kind: str  # wiki | fictional | near-duplicate | invented
    passage: str
    paraphrases: list[str] = field(default_factory=list)

    def texts(self, view: str) -> list[str]:
        if view == "passage":
            return [self.passage]
        if view == "paraphrases":
            return self.paraphrases[:2]
        if view == "sentences":
            found = sentences(self.passage)
            return found if len(found) > 1 else []  # one sentence: the passage key already holds it
        if view == "names":  # the capitalised names in order: a short key that is mostly the memory's entities
            names = list(dict.fromkeys(m.group(0) for m in _NAME.finditer(self.passage)))
            return [", ".join(names)] if names else []
        raise ValueError(view)

    def document(self) -> str:
        """What BM25 indexes: the memory's stored texts (passage and the paraphrases its keys use)."""
        return " ".join([self.passage, *self.paraphrases[:2]])


def build_pool(
    data: Path, size: int, near_duplicates: int = 20_000, seed: int = 0
) -> tuple[list[PoolMemory], list[tuple[str, int, int, bool]]]:
    """The first `size` memories of the nested pool, and the questions: (question, gold memory, wiki partition,
    whether it names its subject: shares a name or number with its passage, megamem.bench.distractors.anchors).
    After the real records, near-duplicates and invented memories alternate until `near_duplicates` of the
    first are made (each record's in turn), then invented ones only; each kind has its own seeded stream."""
    wiki_dir, fict_dir = data / "mega-wiki2024", data / "mega-fictional"
    wiki: list[tuple[int, Record]] = []
    for p in range(len(partition_files(wiki_dir))):
        wiki += [(p, r) for r in load_partition(wiki_dir, p)]
    pool = [PoolMemory("wiki", r.passage, r.paraphrases) for _, r in wiki]
    questions = [(q, i, p, any(anchors(q, r.passage))) for i, (p, r) in enumerate(wiki) for q, _ in r.qa]
    for p in range(len(partition_files(fict_dir))):
        pool += [PoolMemory("fictional", r.passage) for r in load_partition(fict_dir, p)]
    dup_rng, inv_rng = random.Random(seed), random.Random(seed + 1)
    made, turn = 0, 0
    while len(pool) < size:
        if made < near_duplicates and turn % 2 == 0:
            dup = near_duplicate(wiki[made % len(wiki)][1], dup_rng)
            made += 1
            if dup is not None:
                pool.append(PoolMemory("near-duplicate", dup[0], dup[1]))
        else:
            pool.append(PoolMemory("invented", invented(inv_rng)[1]))
        turn += 1
    return pool[:size], questions


def view_rows(pool: list[PoolMemory], view: str) -> tuple[list[str], np.ndarray]:
    """Every text of a view, in memory order, with its owner (memory index)."""
    texts, owners = [], []
    for i, m in enumerate(pool):
        for t in m.texts(view):
            texts.append(t)
            owners.append(i)
    return texts, np.asarray(owners, dtype=np.int64)


def cached_embeddings(cache: Path, texts: list[str], batch: int = 4096) -> torch.Tensor:
    """(len(texts), 384) embeddings, each text computed once ever: kept under `cache` by the text's hash
    (float16 .npz files of up to `batch` rows), so a changed pool embeds only its new texts."""
    cache.mkdir(parents=True, exist_ok=True)
    known: dict[str, np.ndarray] = {}
    for file in sorted(cache.glob("emb-*.npz")):
        with np.load(file) as f:
            known.update(zip(f["hashes"].tolist(), f["vectors"], strict=True))
    digest = [hashlib.sha1(t.encode()).hexdigest()[:20] for t in texts]
    todo, seen = [], set()
    for i, h in enumerate(digest):
        if h not in known and h not in seen:
            seen.add(h)
            todo.append(i)
    for start in range(0, len(todo), batch):
        part = todo[start : start + batch]
        t0 = time.time()
        vectors = embedder_keys([texts[i] for i in part]).numpy().astype(np.float16)
        hashes = [digest[i] for i in part]
        np.savez(cache / f"emb-{time.time_ns()}.npz", hashes=np.asarray(hashes), vectors=vectors)
        known.update(zip(hashes, vectors, strict=True))
        print(f"# embedded {start + len(part)}/{len(todo)} new texts ({time.time() - t0:.0f} s)", flush=True)
    if not texts:
        return torch.zeros(0, 384)
    return torch.from_numpy(np.stack([known[h] for h in digest]).astype(np.float32))


def memory_scores(q: torch.Tensor, keys: torch.Tensor, owners: torch.Tensor, n: int) -> torch.Tensor:
    """(Q, n) max over each memory's keys of q @ key, a block of queries at a time."""
    out = []
    for block in q.split(64):
        s = block @ keys.T  # (B, rows)
        m = torch.full((block.shape[0], n), float("-inf"))
        out.append(m.scatter_reduce(1, owners.expand(block.shape[0], -1), s, reduce="amax", include_self=True))
    return torch.cat(out)


def bm25_scores(pool: list[PoolMemory], questions: list[str]) -> tuple[torch.Tensor, float]:
    """(Q, n) BM25 scores of every memory's document for each question, and ms per question."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize([m.document() for m in pool], stopwords="en", show_progress=False), show_progress=False
    )
    tokens = bm25s.tokenize(questions, stopwords="en", return_ids=False, show_progress=False)
    out, times = [], []
    for t in tokens:
        t0 = time.perf_counter()
        out.append(torch.from_numpy(np.asarray(retriever.get_scores(t), dtype=np.float32)))
        times.append(time.perf_counter() - t0)
    return torch.stack(out), 1000 * statistics.median(times)


def name_coverage(pool: list[PoolMemory], questions: list[str]) -> torch.Tensor:
    """(Q, n) share of each question's names and numbers that a memory's document contains (1: all of them;
    questions with none get 0 everywhere). An inverted index keeps it one pass over each question's words."""
    docs: dict[str, list[int]] = {}
    for i, m in enumerate(pool):
        text = m.document()
        for w in set(names(text)) | set(NUMBER.findall(text)):
            docs.setdefault(w, []).append(i)
    out = torch.zeros(len(questions), len(pool))
    for qi, q in enumerate(questions):
        words = set(names(q)) | set(NUMBER.findall(q))
        for w in words:
            if w in docs:
                out[qi, docs[w]] += 1.0 / len(words)
    return out


def hybrid(cos: torch.Tensor, lex: torch.Tensor, lam: float) -> torch.Tensor:
    """cosine + lam * BM25 scaled by the question's best BM25 (so lam is in cosine units)."""
    best = lex.max(dim=1, keepdim=True).values.clamp_min(1e-6)
    return cos + lam * lex / best


def rerank(cos: torch.Tensor, lex: torch.Tensor, lam: float, candidates: int) -> torch.Tensor:
    """The hybrid over the cosine's top `candidates` memories only (the others -inf): what a gate that takes
    its candidates from the embedding index and re-scores only those would do."""
    top = cos.topk(min(candidates, cos.shape[1]), dim=1).indices
    out = torch.full_like(cos, float("-inf"))
    sub_lex = lex.gather(1, top)
    best = sub_lex.max(dim=1, keepdim=True).values.clamp_min(1e-6)
    out.scatter_(1, top, cos.gather(1, top) + lam * sub_lex / best)
    return out


def rerank_names(cos: torch.Tensor, lex: torch.Tensor, cover: torch.Tensor, lam: float, mu: float, candidates: int):
    """The re-rank plus mu * name coverage on the same candidates: what the product's gate does with
    GateConfig(lexical=lam, names=mu) (Memory._add_lexical)."""
    out = rerank(cos, lex, lam, candidates)
    return torch.where(torch.isfinite(out), out + mu * cover, out)


def accuracy(scores: torch.Tensor, gold: torch.Tensor) -> tuple[float, float]:
    """(top-1, top-4) share of questions whose gold memory is ranked first / among the first four."""
    top4 = scores.topk(min(4, scores.shape[1]), dim=1).indices
    return float((top4[:, 0] == gold).float().mean()), float((top4 == gold[:, None]).any(1).float().mean())


def ms_per_query(fn, items) -> float:
    times = []
    for x in items:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def activation_rows(args, pool, questions, sizes, tune, naming, gold) -> list[dict]:
    """Top-1 / top-4 of activation keys (passage + paraphrases) with the cosine and the dot product."""
    from megamem.keys import activation_keys
    from megamem.model import load_model

    model, tok = load_model()
    texts, owners = view_rows(pool, "passage")
    ptexts, powners = view_rows(pool, "paraphrases")
    k = torch.cat([activation_keys(model, tok, texts), activation_keys(model, tok, ptexts)])
    o = torch.from_numpy(np.concatenate([owners, powners]))
    q = activation_keys(model, tok, [t for t, *_ in questions])
    ev = ~tune & naming
    embed_ms = ms_per_query(
        lambda t: activation_keys(model, tok, [t]), [t for t, *_ in questions[: args.latency_queries]]
    )
    out = []
    for size in sizes:
        ks, os_ = k[o < size], o[o < size]
        kn, qn = torch.nn.functional.normalize(ks, dim=-1), torch.nn.functional.normalize(q, dim=-1)
        for name, qq, kk in (("cosine", qn, kn), ("dot", q, ks)):
            top1, top4 = accuracy(memory_scores(qq[ev], kk, os_, size), gold[ev])
            ms = ms_per_query(
                lambda x, kk=kk, os_=os_, size=size: memory_scores(x[None], kk, os_, size), qq[: args.latency_queries]
            )
            row = {
                "memories": size,
                "keys": "activation: passage+paraphrases",
                "key rows": int(os_.shape[0]),
                "scorer": name,
                "top-1": round(top1, 4),
                "top-4": round(top4, 4),
                "gate ms": round(embed_ms + ms, 1),
            }
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--all-views-max", type=int, default=10000, help="sentences and names keys up to this size")
    ap.add_argument("--cache", type=Path, default=Path(user_cache_dir("megamem")) / "routing")
    ap.add_argument("--lams", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--mus", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    ap.add_argument("--near-duplicates", type=int, default=20000)
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--activation-max", type=int, default=1000, help="the paper's activation keys up to this size")
    ap.add_argument("--latency-queries", type=int, default=50)
    ap.add_argument("--out", type=Path, default=OUT / "routing.jsonl")
    args = ap.parse_args()
    # setup: the largest pool (the others are its prefixes), its keys by view, the questions' embeddings
    pool, questions = build_pool(args.data, max(args.sizes), args.near_duplicates)
    tune = torch.tensor([p < 5 for _, _, p, _ in questions])
    naming = torch.tensor([n for *_, n in questions])
    gold_all = torch.tensor([g for _, g, *_ in questions])
    q_emb = cached_embeddings(args.cache, [q for q, *_ in questions])
    keys = {}
    for view in VIEWS:
        limit = max(args.sizes) if view in ("passage", "paraphrases") else min(max(args.sizes), args.all_views_max)
        texts, owners = view_rows(pool[:limit], view)
        keys[view] = (cached_embeddings(args.cache, texts), torch.from_numpy(owners))
    header = provenance()
    rows = []
    # loop: each size, each set of views, each scorer
    for size in sorted(args.sizes):
        sub = pool[:size]
        lex, bm25_ms = bm25_scores(sub, [q for q, *_ in questions])
        cover = name_coverage(sub, [q for q, *_ in questions])
        view_sets = [("passage",), ("passage", "paraphrases")]
        if size <= args.all_views_max:
            view_sets += [("passage", "paraphrases", "sentences"), ("passage", "paraphrases", "sentences", "names")]
        for views in view_sets:
            k = torch.cat([keys[v][0][keys[v][1] < size] for v in views])
            o = torch.cat([keys[v][1][keys[v][1] < size] for v in views])
            kn = torch.nn.functional.normalize(k, dim=-1)
            qn = torch.nn.functional.normalize(q_emb, dim=-1)
            cos = memory_scores(qn, kn, o, size)
            dot = memory_scores(q_emb, k, o, size)
            embed_ms = ms_per_query(lambda q: embedder_keys([q]), [q for q, *_ in questions[: args.latency_queries]])
            exact_ms = ms_per_query(
                lambda q, kn=kn, o=o, size=size: memory_scores(q[None], kn, o, size), qn[: args.latency_queries]
            )
            # lam (and mu) on the tuning questions, for the hybrid and the re-rank alike
            tn = tune & naming
            best_lam = max(args.lams, key=lambda lam: accuracy(hybrid(cos[tn], lex[tn], lam), gold_all[tn])[0])
            grid = [(lam, mu) for lam in args.lams for mu in args.mus]
            lam2, mu = max(
                grid, key=lambda lm: accuracy(hybrid(cos[tn], lex[tn], lm[0]) + lm[1] * cover[tn], gold_all[tn])[0]
            )
            lam3, mu3 = max(
                grid,
                key=lambda lm: accuracy(
                    rerank_names(cos[tn], lex[tn], cover[tn], lm[0], lm[1], args.candidates), gold_all[tn]
                )[0],
            )
            scorers = {
                "cosine": (cos, exact_ms),
                "dot": (dot, exact_ms),
                "bm25": (lex, bm25_ms - embed_ms),  # needs no embedding
                f"hybrid lam={best_lam:g}": (hybrid(cos, lex, best_lam), exact_ms + bm25_ms),
                f"rerank top-{args.candidates}": (rerank(cos, lex, best_lam, args.candidates), exact_ms),
                f"hybrid lam={lam2:g} + names mu={mu:g}": (hybrid(cos, lex, lam2) + mu * cover, exact_ms + bm25_ms),
                f"rerank top-{args.candidates} lam={lam3:g} + names mu={mu3:g}": (
                    rerank_names(cos, lex, cover, lam3, mu3, args.candidates),
                    exact_ms,
                ),
            }
            ev = ~tune & naming
            for name, (scores, ms) in scorers.items():
                top1, top4 = accuracy(scores[ev], gold_all[ev])
                row = {
                    "memories": size,
                    "keys": "+".join(views),
                    "key rows": int(o.shape[0]),
                    "scorer": name,
                    "top-1": round(top1, 4),
                    "top-4": round(top4, 4),
                    "top-1 all": round(accuracy(scores[~tune], gold_all[~tune])[0], 4),
                    "gate ms": round(embed_ms + ms, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        # the approximate index over passage+paraphrase keys: recall of the gold memory among its candidates
        views = ("passage", "paraphrases")
        k = torch.cat([keys[v][0][keys[v][1] < size] for v in views])
        o = torch.cat([keys[v][1][keys[v][1] < size] for v in views])
        t0 = time.time()
        index = KeyIndex(k, o, size, "cosine", exact_max=0)
        index.candidates(q_emb[0], 4)  # builds the HNSW graph
        build_s = time.time() - t0
        ev_q = q_emb[~tune & naming]
        found = [bool((index.candidates(q, 4) == g).any()) for q, g in zip(ev_q, gold_all[~tune & naming], strict=True)]
        hnsw_ms = ms_per_query(lambda q, index=index: index.scores(q, 4), ev_q[: args.latency_queries])
        row = {
            "memories": size,
            "keys": "+".join(views),
            "key rows": int(o.shape[0]),
            "scorer": "cosine, HNSW candidates",
            "candidate recall": round(statistics.mean(found), 4),
            "index build s": round(build_s, 1),
            "scoring ms": round(hnsw_ms, 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    # the paper's key function (mean last-layer MLP input of the base model) at the small sizes
    act_sizes = [s for s in sorted(args.sizes) if s <= args.activation_max]
    if act_sizes:
        rows += activation_rows(args, pool[: max(act_sizes)], questions, act_sizes, tune, naming, gold_all)
    # save
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        f.write(json.dumps(header) + "\n")
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(table([r for r in rows if "top-1" in r]))
    print(table([r for r in rows if "candidate recall" in r]))


if __name__ == "__main__":
    main()
