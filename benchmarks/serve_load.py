"""Load on `megamem serve`: batched decoding against one request at a time, chat under injection, mixed load.

A recipe. Setup: a copy of a store (the product's defaults; --store) gets an API key, and `megamem serve` runs
on loopback as a subprocess, once with the batching engine and once with --no-batch. Loop: for each
concurrency (1, 4, 16) that many clients send chat requests for --seconds, each question about a different
stored memory (so every row of a batch carries its own mixture); then the same while an injection job trains
(the chat p99 under a job); then --mixed-seconds of 16 clients mixing asks and adds. Save: a JSON summary and
a table (requests/s, tokens/s, p50/p99 latency, errors).

    python benchmarks/serve_load.py --store /tmp/store-p01 --out bench-runs/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, serve, stop, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def chat_clients(
    url: str, key: str, questions: list[str], clients: int, seconds: float, max_tokens: int, add_every: float = 0
) -> dict:
    """`clients` concurrent loops of chat requests (and, with add_every > 0, an add with that probability)."""
    lat, tokens, errors, adds, selected = [], 0, [], 0, 0
    stop_at = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {key}"}
    rng = random.Random(0)

    async def one(client: httpx.AsyncClient, c: int) -> None:
        nonlocal tokens, adds, selected
        n = c
        while time.perf_counter() < stop_at:
            if add_every and rng.random() < add_every:
                body = {"text": f"Load-test note {c}-{n}: the kiln at Ostrava site {n} fires at {900 + n} degrees."}
                r = await client.post(f"{url}/v1/memories", json=body, headers=headers)
                if r.status_code not in (202, 429):
                    errors.append(f"add {r.status_code}: {r.text[:200]}")
                adds += r.status_code == 202
                n += clients
                continue
            q = questions[n % len(questions)]
            n += clients
            t = time.perf_counter()
            body = {"model": "megamem", "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens}
            r = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            if r.status_code != 200:
                errors.append(f"chat {r.status_code}: {r.text[:200]}")
                continue
            lat.append(time.perf_counter() - t)
            d = r.json()
            tokens += d["usage"]["completion_tokens"]
            selected += bool(d["memory"]["selected"])

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        await asyncio.gather(*(one(client, c) for c in range(clients)))
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(lat),
        "req_per_s": len(lat) / wall,
        "tok_per_s": tokens / wall,
        "p50_s": pct(lat, 0.5),
        "p99_s": pct(lat, 0.99),
        "mean_s": statistics.mean(lat) if lat else float("nan"),
        "errors": len(errors),
        "error_examples": errors[:5],
        "adds": adds,
        "with_memory": selected,
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True, help="a store to copy (product defaults)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--mixed-seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="megamem-load-"))
    store = work / "store"
    shutil.copytree(args.store, store)
    out = subprocess.run(
        [str(ROOT / ".venv/bin/megamem"), "keys", "create", "--store", str(store), "--namespace", "default"],
        capture_output=True,
        text=True,
        check=True,
    )
    key = out.stdout.strip().splitlines()[-1]
    url = f"http://127.0.0.1:{args.port}"
    # one question per memory, the memory's own opening words as the question (distinct mixtures per row)
    listing = json.loads(
        subprocess.run(
            [str(ROOT / ".venv/bin/megamem"), "list", "--store", str(store), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    questions = [f"What do you know about {' '.join(m['text'].split()[:6])}?" for m in listing]
    rows, results = [], {"command": command(), "machine": machine(), "memories": len(listing), "runs": []}
    for batched in (True, False):
        proc = serve(store, args.port, "--max-batch", "16", *([] if batched else ["--no-batch"]))
        try:
            for c in (int(x) for x in args.concurrency.split(",")):
                r = asyncio.run(chat_clients(url, key, questions, c, args.seconds, args.max_tokens))
                r["server"] = "batched" if batched else "one at a time"
                results["runs"].append(r)
                rows.append(r)
                print(json.dumps(r), flush=True)
            if batched:  # chat while an injection job trains
                body = {"text": "The Ostrava kiln at site 7 was relined with firebrick in March 2031 by Petra Holub."}
                httpx.post(f"{url}/v1/memories", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
                r = asyncio.run(chat_clients(url, key, questions, 4, min(args.seconds, 20), args.max_tokens))
                r["server"] = "batched, an injection job training"
                results["runs"].append(r)
                rows.append(r)
                print(json.dumps(r), flush=True)
                r = asyncio.run(chat_clients(url, key, questions, 16, args.mixed_seconds, args.max_tokens, 0.1))
                r["server"] = "batched, mixed asks and adds (10% adds)"
                results["runs"].append(r)
                rows.append(r)
                print(json.dumps(r), flush=True)
        finally:
            stop(proc)
    one = {r["clients"]: r["req_per_s"] for r in rows if r["server"] == "one at a time"}
    for r in rows:
        r["speed-up"] = f"{r['req_per_s'] / one[r['clients']]:.2f}x" if r["clients"] in one else ""
    print(f"{results['command']}\n{results['machine']}\n{len(listing)} memories, max_tokens {args.max_tokens}")
    print(
        table(
            [
                {
                    "server": r["server"],
                    "clients": r["clients"],
                    "requests": r["requests"],
                    "req/s": f"{r['req_per_s']:.2f}",
                    "tokens/s": f"{r['tok_per_s']:.1f}",
                    "p50 s": f"{r['p50_s']:.2f}",
                    "p99 s": f"{r['p99_s']:.2f}",
                    "errors": r["errors"],
                    "adds": r["adds"],
                    "vs one at a time": r["speed-up"],
                }
                for r in rows
            ]
        )
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
