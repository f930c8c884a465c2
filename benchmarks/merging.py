"""Merging memories about one subject (the paper's open question 3): one adapter for two, against two.

    python benchmarks/merging.py --partition 8 --subjects 20 --work /tmp/merging-p8

Setup: each of the first --subjects wiki records of --partition (8: used by no tuning) is cut into two
memories at the sentence boundary nearest its middle, so every subject is two memories that name the same
things, as a user's notes about one person or place are. Each question goes to the half holding its answer
(word for word; questions whose answer is in both halves or neither are left out). Separate: a store of the
halves, one adapter each (the product's defaults, no paraphrases). Merged: a copy of it where each subject's
two halves are merged by `megamem.ops.merge` (one adapter on the joined text). Measures, each arm: QA (qa mode,
judged), recall (recall mode, one question a subject, embedder cosine to the whole subject and to the half
holding the answer), routing top-1 to the right memory in the store and with the other 980 records of the
data set (the other wiki partitions and the fictional stories, passage and first paraphrase keys) as
distractors, adapter bytes, learning seconds. `subjects` is also asked whether it finds the pairs itself.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import provenance, table

from megamem import Item, Memory
from megamem.bench.metrics import recall_cosines
from megamem.datasets import load_partition, partition_files
from megamem.judge import is_correct
from megamem.keys import embedder_keys
from megamem.ops.merge import merge, subjects

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def halves(passage: str) -> tuple[str, str]:
    """The passage cut at the sentence boundary nearest its middle (by characters)."""
    cuts = [m.start() for m in SENTENCE.finditer(passage)]
    if not cuts:
        raise ValueError("one sentence")
    cut = min(cuts, key=lambda c: abs(c - len(passage) / 2))
    return passage[:cut].strip(), passage[cut:].strip()


def subjects_of(partition: int, n: int) -> list[dict]:
    """Each subject: its two halves and its questions, each with the half (0/1) holding the answer."""
    out = []
    for i, r in enumerate(load_partition(DATA / "mega-wiki2024", partition)):
        try:
            parts = halves(r.passage)
        except ValueError:
            continue
        qs = []
        for q, gold in r.qa:
            inside = [gold.lower() in h.lower() for h in parts]
            if sum(inside) == 1:
                qs.append((q, gold, inside.index(True)))
        if qs:
            out.append({"id": f"s{i:02d}", "passage": r.passage, "halves": parts, "qa": qs})
        if len(out) == n:
            break
    return out


def distractor_keys(partition: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (K, 384) and owner (K,) of every other record of the data set: passage and first paraphrase."""
    texts, owner, n = [], [], 0
    for kind in ("mega-wiki2024", "mega-fictional"):
        for p in range(len(partition_files(DATA / kind))):
            if kind == "mega-wiki2024" and p == partition:
                continue
            for r in load_partition(DATA / kind, p):
                texts += [r.passage, *r.paraphrases[:1]]
                owner += [n] * (1 + len(r.paraphrases[:1]))
                n += 1
    return embedder_keys(texts), torch.tensor(owner)


def routing(mem: Memory, truth: list[str], questions: list[str], distract: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Top-1 of the store's gate, and of the best key cosine over the store's keys plus the distractors'."""
    in_store = statistics.mean((mem.route(q) or [("", 0)])[0][0] == t for q, t in zip(questions, truth, strict=True))
    ids, keys, owner = mem.keys()
    d_keys, d_owner = distract
    every = torch.nn.functional.normalize(torch.cat([keys, d_keys]), dim=-1)
    owners = torch.cat([owner, d_owner + len(ids)])
    sims = torch.nn.functional.normalize(embedder_keys(questions), dim=-1) @ every.T  # (Q, K)
    best = torch.full((len(questions), len(ids) + int(d_owner.max()) + 1), -2.0)
    best = best.scatter_reduce(1, owners.expand(len(questions), -1), sims, reduce="amax")
    top = best.argmax(dim=1).tolist()
    at_scale = statistics.mean(ids[t] == want if t < len(ids) else False for t, want in zip(top, truth, strict=True))
    return {"routing top-1 (store)": in_store, f"routing top-1 (+{int(d_owner.max()) + 1} distractors)": at_scale}


def evaluate(mem: Memory, subs: list[dict], merged: bool, distract) -> dict:
    """QA, recall (to the whole subject and to the answering half) and routing for one arm."""
    truth = [s["id"] if merged else f"{s['id']}-{h}" for s in subs for _, _, h in s["qa"]]
    questions = [q for s in subs for q, _, _ in s["qa"]]
    hits = [is_correct(mem.ask(q, mode="qa").text, gold) for s in subs for q, gold, _ in s["qa"]]
    recalls = [mem.ask(s["qa"][0][0], mode="recall", max_new_tokens=200).text for s in subs]
    whole = recall_cosines(recalls, [s["passage"] for s in subs])
    half = recall_cosines(recalls, [s["halves"][s["qa"][0][2]] for s in subs])
    return {
        "QA": round(statistics.mean(hits), 3),
        "recall cos (subject)": round(statistics.mean(whole), 3),
        "recall cos (answering half)": round(statistics.mean(half), 3),
        **{k: round(v, 3) for k, v in routing(mem, truth, questions, distract).items()},
        "questions": len(hits),
    }


def adapter_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in (store / "memories").rglob("adapter_model.safetensors"))


def lever_arm(args: argparse.Namespace, subs: list[dict]) -> None:
    """The merged arm again with other Recipe fields for the merged memories, beside the separate arm of --work
    (reused: its store, and its row once measured, in separate-row.json)."""
    over = json.loads(args.merged_recipe)
    name = "merged " + ", ".join(f"{k}={v}" for k, v in sorted(over.items()))
    separate = args.work / "separate"
    cached = args.work / "separate-row.json"
    distract = distractor_keys(args.partition)
    mem = Memory(separate)
    if cached.is_file():
        sep_row = json.loads(cached.read_text())
    else:
        sep_row = {"": "separate", "memories": len(mem.list()), **evaluate(mem, subs, False, distract)}
        sep_row["adapter MB"] = round(adapter_bytes(mem.path) / 1e6, 1)
        cached.write_text(json.dumps(sep_row))
    target = args.work / ("merged-" + "-".join(f"{k}{v}" for k, v in sorted(over.items())))
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(separate, target)
    both = Memory(target)
    both.recipe = replace(both.recipe, **over)
    t0 = time.time()
    for s in subs:
        merge(both, [f"{s['id']}-0", f"{s['id']}-1"], id=s["id"])
    row = {"": name, "memories": len(both.list()), **evaluate(both, subs, True, distract)}
    row["adapter MB"] = round(adapter_bytes(both.path) / 1e6, 1)
    row["learn s"] = round(time.time() - t0, 1)
    print(json.dumps(row), flush=True)
    result = {**provenance(), "partition": args.partition, "subjects": len(subs), "rows": [sep_row, row]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table([sep_row, row]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--partition", type=int, default=8)
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--work", type=Path, default=Path("/tmp/merging-p8"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "scale" / "merging.json")
    ap.add_argument(
        "--reuse", action="store_true", help="evaluate the two stores a finished run left in --work (no learning)"
    )
    ap.add_argument(
        "--merged-recipe",
        metavar="JSON",
        help="a lever: Recipe fields for the merged memories (e.g. '{\"questions\": 1}'); the separate store of "
        "--work is reused as it is (its row too, once measured) and only a merged arm named by the JSON is learned",
    )
    args = ap.parse_args()
    subs = subjects_of(args.partition, args.subjects)
    separate, merged = args.work / "separate", args.work / "merged"
    pairs = sorted([f"{s['id']}-0", f"{s['id']}-1"] for s in subs)
    if args.merged_recipe:
        lever_arm(args, subs)
        return
    if args.reuse:  # learning seconds are not measured again: nan
        mem, both, separate_s, merged_s = Memory(separate), Memory(merged), float("nan"), float("nan")
        assert len(mem.list()) == 2 * len(subs) and len(both.list()) == len(subs), "the stores in --work are not whole"
    else:
        shutil.rmtree(args.work, ignore_errors=True)
        t0 = time.time()
        mem = Memory(separate)
        mem.add_many([Item(h, id=f"{s['id']}-{n}") for s in subs for n, h in enumerate(s["halves"])])
        separate_s = time.time() - t0
        shutil.copytree(separate, merged)
        both = Memory(merged)
        t0 = time.time()
        for s in subs:
            merge(both, [f"{s['id']}-0", f"{s['id']}-1"], id=s["id"])
        merged_s = time.time() - t0
    found = subjects(mem)
    distract = distractor_keys(args.partition)
    rows = []
    for name, m, secs, is_merged in (("separate", mem, separate_s, False), ("merged", both, merged_s, True)):
        row = {"": name, "memories": len(m.list()), **evaluate(m, subs, is_merged, distract)}
        row["adapter MB"] = round(adapter_bytes(m.path) / 1e6, 1)
        row["learn s"] = round(secs, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        **provenance(),
        "partition": args.partition,
        "subjects": len(subs),
        "rows": rows,
        "subjects() found": {
            "pairs": len(pairs),
            "exactly found": sum(sorted(g) in pairs for g in found),
            "groups": len(found),
            "memories in groups": sum(len(g) for g in found),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(rows))
    print(json.dumps(result["subjects() found"]))


if __name__ == "__main__":
    main()
