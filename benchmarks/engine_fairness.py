"""Fairness of `megamem serve`'s engine: a short chat while another client decodes a long answer, and throughput
at 16 clients, for the continuous-batching engine (this tree) and the static-batching one it replaced.

A recipe. Setup: per server, a fresh copy of a store (--store) with one API key per client (each client its own
tenant's key), and `megamem serve` on loopback as a subprocess: once from this tree, once with --old-src (the old
commit's src folder, e.g. a git worktree) first on PYTHONPATH. Loop, through the real `openai` client:
(a) "Say hi" (max_tokens 5) asked --repeats times with nothing else running (idle), then asked again and again
while another tenant's client streams a --long-tokens answer (greedy; memory mode mega, the conversation as
given, whose story SmolLM2 goes on with to the cap), counting only the chats that were sent
while the long answer was still decoding; (b) --clients clients asking questions about different memories
(max_tokens --max-tokens, so every row carries its own mixture) for --seconds. Save: the section 'engine' of
docs/performance.md.

    git worktree add /tmp/old-engine 63ca324
    python benchmarks/engine_fairness.py --store /tmp/p9-store --old-src /tmp/old-engine/src
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import client_load, keyed_copy, serve, stop, table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHORT = [{"role": "user", "content": "Say hi"}]
LONG = [{"role": "user", "content": "Write a 5000-word story about a dragon. Make it very long."}]


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)


def short_chat(c: openai.OpenAI) -> float:
    """Seconds for one "Say hi" of 5 tokens, non-streaming."""
    t = time.perf_counter()
    c.chat.completions.create(model="megamem", messages=SHORT, max_tokens=5)
    return time.perf_counter() - t


def latency(url: str, keys: list[str], repeats: int, long_tokens: int) -> dict:
    """(a): the short chat idle, then while another tenant streams a long answer."""
    short = client(url, keys[0])
    short_chat(short)  # warm-up (the gate's embedder, the first forward)
    idle = [short_chat(short) for _ in range(repeats)]
    state = {"chunks": 0, "tokens": 0, "done": False, "t0": time.perf_counter()}

    def long_answer() -> None:
        stream = client(url, keys[1]).chat.completions.create(
            model="megamem",
            messages=LONG,
            max_tokens=long_tokens,
            extra_body={"memory": {"mode": "mega"}},  # the conversation as given (no QA prompt): it goes on
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                state["chunks"] += 1
            if chunk.usage:
                state["tokens"] = chunk.usage.completion_tokens
        state["done"], state["seconds"] = True, time.perf_counter() - state["t0"]

    thread = threading.Thread(target=long_answer)
    thread.start()
    while state["chunks"] < 20 and not state["done"]:  # the long answer is decoding
        time.sleep(0.05)
    busy = []
    while not state["done"] and len(busy) < repeats:
        sent_while_decoding = not state["done"]
        seconds = short_chat(short)
        if sent_while_decoding:
            busy.append(seconds)
    thread.join()
    return {
        "idle": idle,
        "busy": busy,
        "long_tokens": state["tokens"],
        "long_s": state["seconds"],
    }


def throughput(url: str, keys: list[str], questions: list[str], clients: int, seconds: float, tokens: int) -> dict:
    """(b): `clients` clients, each its own key, asking questions in turn for `seconds` (common.client_load)."""
    res = client_load(url, keys, questions, clients, seconds, tokens)
    return {k: res[k] for k in ("requests", "tok_per_s", "p50_s", "p99_s", "errors")}


def run_server(name: str, src: Path | None, args: argparse.Namespace) -> dict:
    """Both measurements on one server (a fresh store copy)."""
    work = Path(tempfile.mkdtemp(prefix="megamem-fair-"))
    try:
        store, keys, questions = keyed_copy(args.store, work, args.clients + 1)  # and the long answer's
        proc = serve(store, args.port, src=src)
        url = f"http://127.0.0.1:{args.port}"
        try:
            lat = latency(url, keys, args.repeats, args.long_tokens)
            print(name, json.dumps(lat), flush=True)
            thr = throughput(url, keys[1:], questions, args.clients, args.seconds, args.max_tokens)
            print(name, json.dumps(thr), flush=True)
        finally:
            stop(proc)
        return {"name": name, "latency": lat, "throughput": thr, "memories": len(questions)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True, help="a store to copy (its memories give the questions)")
    ap.add_argument("--old-src", type=Path, required=True, help="the old engine's src folder (a git worktree's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--long-tokens", type=int, default=1200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8793)
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/performance.md alone")
    args = ap.parse_args()
    old_commit = subprocess.run(
        ["git", "-C", str(args.old_src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    runs = [run_server("continuous (this tree)", None, args), run_server(f"static ({old_commit})", args.old_src, args)]
    rows = []
    for r in runs:
        lat, thr = r["latency"], r["throughput"]
        idle, busy = statistics.median(lat["idle"]), statistics.median(lat["busy"]) if lat["busy"] else float("nan")
        rows.append(
            {
                "engine": r["name"],
                "short chat idle s": f"{idle:.2f}",
                "beside the long answer s": f"{busy:.2f} (n={len(lat['busy'])})",
                "ratio": f"{busy / idle:.1f}x",
                "long answer": f"{lat['long_tokens']} tokens in {lat['long_s']:.0f} s",
                f"{args.clients} clients tokens/s": f"{thr['tok_per_s']:.1f}",
                "requests": thr["requests"],
                "p50 s": f"{thr['p50_s']:.2f}",
                "p99 s": f"{thr['p99_s']:.2f}",
                "errors": thr["errors"],
            }
        )
    body = table(rows)
    print(body)
    notes = (
        f"A fresh copy of {args.store} ({runs[0]['memories']} memories) per server, one API key per client. "
        f'Short chat: "Say hi", max_tokens 5, non-streaming, median of '
        f"{args.repeats} idle and of those sent while another tenant's client streamed a {args.long_tokens}-token "
        f"greedy answer (the static engine answers one, after the long one). Throughput: {args.clients} clients, "
        f"{args.seconds:.0f} s, questions about different memories, max_tokens {args.max_tokens}, greedy."
    )
    if not args.no_doc:
        write_section("engine", "8. Serving: continuous batching (engine fairness)", body, notes)


if __name__ == "__main__":
    main()
