"""A real store of ~1,000 memories served by `megamem serve`, measured through the `openai` client beside a store
of just the same held-out memories (item 2 of "Memories that last"; big_store.py is the library-level version).

    python benchmarks/big_store_serve.py --store ~/.cache/megamem/stores/big-1000 --partitions 9 \\
        --general 60 --seconds 60 --out docs/results/scale/big-store-served.json

Setup: the held-out partitions' records (../shared/data/mega-wiki2024, --partitions) are found in the big store
(--store) by their text (a memory's stored text is its passage with whitespace normalised, so ids do not matter:
wiki-pPP-II, p9-rN, ...); a record that is not there is an error line and the run stops. Those memories are copied,
adapter and keys as they are (common.copy_memories), into a store of just them, so the two stores differ only in
what else the gate can choose. Each store is copied again with --clients' largest count + 1 API keys of the default
namespace (common.keyed_copy: `megamem keys create`, as a user makes them).

Loop, for the small store and then the big one (one server at a time: the machine's cores are not shared between
two servers), `megamem serve` (the installed command) on loopback, stopped in any case before the next:
 1. open: wall seconds from starting `megamem serve` to /healthz ok (the model is loaded; polled every 0.1 s) and
    to the first answered chat completion (a held-out question: the gate's embedder and key files load lazily on
    it); the RSS of the server's process group (VmRSS summed over /proc), read after the QA pass and after the load.
 2. QA, one client: every held-out question (--limit: the first N), the server's default mode (no memory options
    sent), max_tokens answer.ANSWER_TOKENS (Memory.ask's answer cap), greedy: correct by megamem.judge.is_correct;
    gate top-1: the response's memory.selected[0].id (heaviest first, API ids) is the question's own memory.
 3. general: --general of the shipped general questions (seeded sample, --seed), each asked twice in the default
    mode: as is, and with extra_body {"memory": {"disable": true}} (the server's switch for no memory at all: no
    gate, no adapter, no cortex, the base model in the mode's own prompt, as Memory.ask(use_memory=False)); the
    share answered identically word for word, and the share the gate routed to no memory.
 4. load: common.client_load at each --clients count (default 1 and 16) for --seconds, each client its own API
    key, the held-out questions in turn, default mode, max_tokens --max-tokens (32): p50 and p99 latency, tokens/s.

Output: one JSON (provenance, both stores' figures) at --out, and a markdown table with one row per figure: the small
store, the big store, the growth factor (big / small), the slope per 1,000 memories and the value projected at 10^4
and 10^5 memories. The projection is a two-point linear one: value(n) = a + b*n through the two measurements,
clamped at 0 (and shares at 1). It is only a first guess: the gate's exact scoring grows linearly in the number of
keys (every key file is scored for every question, unless the routing index narrows the candidates), while an
answer reads at most top-k adapters whatever the store's size, so the decode's share of a latency stays flat; RSS
and open time grow with what is loaded up front. Two points carry their noise into the slope: a difference no
larger than a rerun's (latency on a shared machine, a share of a few questions) projects nothing, and two stores of
one size (a smoke run) have no slope (n/a).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import client_load, copy_memories, keyed_copy, provenance, serve, stop, table  # noqa: E402

from megamem import Memory, schema  # noqa: E402
from megamem.answer import ANSWER_TOKENS  # noqa: E402
from megamem.bench.general import shipped_general_qa  # noqa: E402
from megamem.datasets import load_partition  # noqa: E402
from megamem.judge import is_correct  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mega-wiki2024"
TIMEOUT_S = 300  # every request's bound (a loaded 2-core machine answers a 64-token chat in seconds)


def norm(text: str) -> str:
    return " ".join(text.split())


def held_out(store: Memory, partitions: list[int]) -> tuple[list[str], list[tuple[str, str, frozenset[str]]]]:
    """The big store's ids of the held-out partitions' records (matched by normalised text) and their questions:
    (question, gold answer, the API ids of the question's own memory). Stops with an error line per record that is
    not in the store."""
    by_text: dict[str, list] = {}
    for rec in store.list():
        by_text.setdefault(norm(rec.text), []).append(rec)
    ids, questions, missing = [], [], []
    for p in partitions:
        for i, r in enumerate(load_partition(DATA, p)):
            recs = by_text.get(norm(r.passage))
            if not recs:
                missing.append(f"error: partition {p} record {i} ({norm(r.passage)[:60]!r}...) is not in the store")
                continue
            for rec in recs:
                if schema.namespace_of(rec) != schema.DEFAULT_NAMESPACE:
                    raise SystemExit(f"error: memory {rec.id} is not in the default namespace")
            ids += [rec.id for rec in recs]
            own = frozenset(schema.api_id(rec) for rec in recs)
            questions += [(q, gold, own) for q, gold in r.qa]
    if missing:
        print("\n".join(missing), file=sys.stderr)
        raise SystemExit(f"{len(missing)} held-out record(s) missing from the store")
    return ids, questions


def group_rss_mb(pgid: int) -> float:
    """VmRSS summed over the processes of a process group, in MB."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[2]) != pgid:
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a process that ended meanwhile
    return total / 1024


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))] if v else float("nan")


def chat(oc: openai.OpenAI, question: str, **kw):
    """One greedy chat (the server's default mode unless kw's extra_body says otherwise) and its wall seconds."""
    t = time.perf_counter()
    r = oc.chat.completions.create(
        model="megamem", messages=[{"role": "user", "content": question}], max_tokens=ANSWER_TOKENS, **kw
    )
    return r, time.perf_counter() - t


def selected(r) -> list[dict]:
    return ((r.model_extra or {}).get("memory") or {}).get("selected") or []


def measure(name: str, store: Path, keys: list[str], questions, general: list[dict], args) -> dict:
    """One store's figures, its server started here and stopped before returning."""
    out: dict = {"memories": len(Memory(store).list())}
    url = f"http://127.0.0.1:{args.port}"
    oc = openai.OpenAI(base_url=url + "/v1", api_key=keys[-1], max_retries=0, timeout=TIMEOUT_S)
    t0 = time.perf_counter()
    proc = serve(store, args.port)
    try:
        out["open: start to /healthz s"] = time.perf_counter() - t0
        chat(oc, questions[0][0])
        out["open: start to first answer s"] = time.perf_counter() - t0
        print(name, json.dumps(out), flush=True)

        correct, top1, lat = [], [], []
        asked = questions[: args.limit] if args.limit else questions
        for q, gold, own in asked:
            r, s = chat(oc, q)
            lat.append(s)
            correct.append(is_correct(r.choices[0].message.content or "", gold))
            sel = selected(r)
            top1.append(bool(sel) and sel[0]["id"] in own)
        out["server RSS MB after QA"] = group_rss_mb(proc.pid)
        out["QA (default mode)"] = statistics.mean(correct)
        out["gate top-1"] = statistics.mean(top1)
        out["QA questions"] = len(asked)
        out["QA pass p50 s"], out["QA pass p99 s"] = percentile(lat, 0.5), percentile(lat, 0.99)
        print(name, json.dumps({k: out[k] for k in list(out)[3:]}), flush=True)

        same, unrouted = [], []
        for g in general:
            mine, _ = chat(oc, g["question"])
            base, _ = chat(oc, g["question"], extra_body={"memory": {"disable": True}})
            same.append((mine.choices[0].message.content or "") == (base.choices[0].message.content or ""))
            unrouted.append(not selected(mine))
        out["general identical to base"] = statistics.mean(same) if same else float("nan")
        out["general routed to no memory"] = statistics.mean(unrouted) if unrouted else float("nan")
        out["general questions"] = len(same)

        qs = [q for q, _, _ in questions]
        out["load"] = {}
        for c in args.clients:
            res = client_load(url, keys, qs, c, args.seconds, args.max_tokens, timeout=TIMEOUT_S)
            res.pop("replies")
            out["load"][str(c)] = res
            print(name, c, "clients", json.dumps(res), flush=True)
        out["server RSS MB after load"] = group_rss_mb(proc.pid)
    finally:
        stop(proc)
    return out


def figures(m: dict, clients: list[int]) -> dict[str, tuple[float, bool]]:
    """The table's figures of one store's measurements: name -> (value, is a share)."""
    f = {
        "open: start to /healthz s": (m["open: start to /healthz s"], False),
        "open: start to first answer s": (m["open: start to first answer s"], False),
        "server RSS MB (after QA)": (m["server RSS MB after QA"], False),
        "QA, default mode": (m["QA (default mode)"], True),
        "gate top-1": (m["gate top-1"], True),
        "general: identical to base": (m["general identical to base"], True),
        "general: routed to no memory": (m["general routed to no memory"], True),
    }
    for c in clients:
        load = m["load"][str(c)]
        f[f"ask p50 s, {c} client(s)"] = (load["p50_s"], False)
        f[f"ask p99 s, {c} client(s)"] = (load["p99_s"], False)
        f[f"tokens/s, {c} client(s)"] = (load["tok_per_s"], False)
    return f


def fmt(v: float) -> str:
    return "n/a" if v != v else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def projection(small: dict, big: dict, clients: list[int]) -> list[dict]:
    """One row per figure: both stores, growth, slope per 1,000 memories, the two-point linear projection."""
    n0, n1 = small["memories"], big["memories"]
    rows = []
    fs, fb = figures(small, clients), figures(big, clients)
    for name, (v0, share) in fs.items():
        v1 = fb[name][0]
        row = {"figure": name, f"small store ({n0})": fmt(v0), f"big store ({n1})": fmt(v1)}
        row["growth"] = f"x{v1 / v0:.2f}" if v0 else "n/a"
        b = (v1 - v0) / (n1 - n0) if n1 != n0 else float("nan")  # no slope between two stores of one size
        row["per 1,000 memories"] = "n/a" if b != b else f"{1000 * b:+.3g}"
        for n in (10**4, 10**5):
            v = v1 + b * (n - n1)
            v = v if v != v else max(0.0, min(v, 1.0) if share else v)  # nan stays nan (n/a)
            row[f"at 10^{len(str(n)) - 1}"] = fmt(v)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True, help="the big store (not changed: it is copied)")
    ap.add_argument("--partitions", type=int, nargs="+", default=[9], help="held-out partitions of mega-wiki2024")
    ap.add_argument("--general", type=int, default=60, help="general questions per store")
    ap.add_argument("--seconds", type=float, default=60, help="load per client count")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens under load")
    ap.add_argument("--limit", type=int, default=None, help="QA: only the first N held-out questions (a quick check)")
    ap.add_argument("--seed", type=int, default=0, help="the general questions' sample")
    ap.add_argument("--port", type=int, default=8797)
    ap.add_argument("--work", type=Path, default=None, help="keep the keyed copies here (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="reuse the keyed copies already in --work")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "scale" / "big-store-served.json")
    args = ap.parse_args()
    if args.reuse and args.work is None:
        ap.error("--reuse needs --work")
    store = args.store.expanduser()
    big = Memory(store)
    ids, questions = held_out(big, args.partitions)
    pool = shipped_general_qa()
    general = random.Random(args.seed).sample(pool, min(args.general, len(pool)))
    print(f"{len(ids)} held-out memories, {len(questions)} questions; the big store: {len(big.list())}", flush=True)

    work = args.work or Path(tempfile.mkdtemp(prefix="megamem-big-serve-"))
    nkeys = max(args.clients) + 1  # the load's clients and the QA / general client
    stores = {}
    try:
        for name in ("small", "big"):
            folder = work / name
            saved = folder / "keys.json"
            if args.reuse and saved.exists():
                stores[name] = (folder / "store", json.loads(saved.read_text()))
                continue
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            source = store
            if name == "small":
                source = folder / "source"
                copy_memories(big, ids, source)
            copied, keys, _ = keyed_copy(source, folder, nkeys)
            if name == "small":
                shutil.rmtree(source)
            saved.write_text(json.dumps(keys))
            os.chmod(saved, 0o600)
            stores[name] = (copied, keys)
        results = {name: measure(name, s, keys, questions, general, args) for name, (s, keys) in stores.items()}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = projection(results["small"], results["big"], args.clients)
    record = {
        **provenance(),
        "big store": str(store),
        "held out": {"partitions": args.partitions, "memories": len(ids), "questions": len(questions)},
        "settings": {
            "QA max_tokens": ANSWER_TOKENS,
            "load max_tokens": args.max_tokens,
            "seconds": args.seconds,
            "general": len(general),
            "limit": args.limit,
        },
        "stores": results,
        "table": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    errors = {n: sum(r["load"][c]["errors"] for c in r["load"]) for n, r in results.items()}
    print(table(rows))
    print(f"\nload errors: {errors}; wrote {args.out}")


if __name__ == "__main__":
    main()
