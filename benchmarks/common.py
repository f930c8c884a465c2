"""Shared helpers for the benchmarks: machine description, timing, and writing a section of docs/performance.md."""

from __future__ import annotations

import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def machine() -> str:
    """'N CPU cores, MODEL, Python X, torch Y' for the results header."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (
        f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} thread(s), "
        f"Python {platform.python_version()}"
    )


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in ["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]])


def provenance() -> dict:
    """What every benchmark record starts with: the command that made it, when (UTC) and on what machine."""
    from datetime import datetime, timezone

    return {
        "command": command(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
    }


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k / n."""
    import math

    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def serve(store: Path, port: int, *flags: str, src: Path | None = None) -> subprocess.Popen:
    """`megamem serve` (the installed command, as an application runs it) on a store, in its own process group,
    once /healthz answers; flags: more `serve` options (--open, --max-batch N, ...); src: a source tree put first
    on PYTHONPATH (another commit's code, to compare with)."""
    import httpx

    exe = Path(sys.executable).with_name("megamem")
    cmd = [str(exe), "serve", "--store", str(store), "--port", str(port), *flags]
    env = os.environ | {"HF_HUB_OFFLINE": "1"} | ({"PYTHONPATH": str(src)} if src else {})
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"megamem serve exited with {proc.returncode}")
        time.sleep(0.1)
    stop(proc)
    raise SystemExit("megamem serve did not become healthy in 300 s")


def keyed_copy(source: Path, work: Path, keys: int) -> tuple[Path, list[str], list[str]]:
    """A copy of a store under `work` with `keys` API keys of its default namespace (each client its own key),
    and one question per memory (its opening words), through the installed `megamem` as a user runs it."""
    import json
    import shutil

    exe = Path(sys.executable).with_name("megamem")
    store = work / "store"
    shutil.copytree(source, store)
    made = []
    for _ in range(keys):
        cmd = [str(exe), "keys", "create", "--store", str(store), "--namespace", "default"]
        made.append(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    cmd = [str(exe), "list", "--store", str(store), "--json"]
    listing = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return store, made, [f"What do you know about {' '.join(m['text'].split()[:6])}?" for m in listing]


def client_load(
    url: str,
    keys: list[str],
    questions: list[str],
    clients: int,
    seconds: float,
    tokens: int,
    timeout: float = 600,
    **create_kw,
) -> dict:
    """`clients` threads, each an `openai` client with its own API key (keys[c]), asking the questions in turn
    (client c asks questions c, c + clients, ...) for `seconds`, each chat with max_tokens `tokens` and `create_kw`
    (response_format, extra_body, ...), every request bounded by `timeout`. Returns requests (answered), tokens
    (completion tokens), tok_per_s (over the wall time), p50_s and p99_s (answered requests' latency), errors (API
    errors, not retried) and replies (each answered request's content, for a caller to check)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import openai

    stop_at = time.perf_counter() + seconds
    lock = threading.Lock()
    lat: list[float] = []
    replies: list[str | None] = []
    done, errors = [0], [0]

    def loop(c: int) -> None:
        oc, n = openai.OpenAI(base_url=url + "/v1", api_key=keys[c], max_retries=0, timeout=timeout), c
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                r = oc.chat.completions.create(
                    model="megamem",
                    messages=[{"role": "user", "content": questions[n % len(questions)]}],
                    max_tokens=tokens,
                    **create_kw,
                )
            except openai.APIError:
                with lock:
                    errors[0] += 1
                continue
            seconds_taken = time.perf_counter() - t
            with lock:
                lat.append(seconds_taken)
                done[0] += r.usage.completion_tokens
                replies.append(r.choices[0].message.content)
            n += clients

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(loop, range(clients)))
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "requests": len(lat),
        "tokens": done[0],
        "tok_per_s": done[0] / wall,
        "p50_s": lat[len(lat) // 2] if lat else float("nan"),
        "p99_s": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))] if lat else float("nan"),
        "errors": errors[0],
        "replies": replies,
    }


def stop(proc: subprocess.Popen) -> None:
    """End a server started by `serve` (its whole process group), killing it if it does not stop in 30 s."""
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def table(rows: list[dict]) -> str:
    """A markdown table of dicts (columns from the first row)."""
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def write_section(name: str, title: str, body: str, notes: str = "") -> None:
    """Replace (or append) the section `name` of docs/performance.md with the table, command, date, machine."""
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "n/a"
    date = datetime.now(timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    text = (
        f"<!-- begin {name} -->\n## {title}\n\n"
        f"Command: `{command()}`  \nDate: {date}; commit {commit}  \nMachine: {machine()}; load average at the end "
        f"{load} (shared machine)\n\n{body}\n" + (f"\n{notes}\n" if notes else "") + f"<!-- end {name} -->\n"
    )
    DOC.parent.mkdir(parents=True, exist_ok=True)
    doc = DOC.read_text() if DOC.exists() else "# Performance\n\n"
    pattern = re.compile(rf"<!-- begin {name} -->.*?<!-- end {name} -->\n", re.S)
    doc = pattern.sub(lambda _m: text, doc) if pattern.search(doc) else doc.rstrip("\n") + "\n\n" + text
    DOC.write_text(doc)
    print(f"\nwrote section '{name}' of {DOC}")


def layers_text(spec) -> str:
    """'layers 15-29' or 'every layer' for a LoraSpec resolved for its model (for the sections' notes)."""
    return f"layers {spec.layers[0]}-{spec.layers[-1]}" if spec.layers else "every layer"


def evaluate(model, tok, recs, adapters, qa_tokens: int = 48, recall_tokens: int = 160) -> dict[str, float]:
    """Each memory's adapter asked alone (gate weight 1): mean QA accuracy, token F1 and recall cosine
    (the recall cued by each of the memory's questions in turn).

    All questions (and then all recalls) run as batched greedy generations, each row gated to its own
    memory's adapter (megamem.bench.infer), so a config's evaluation costs a few batched calls, not one
    generate per question.
    """
    import torch

    from megamem.answer import qa_prompt, recall_prompt
    from megamem.bench.infer import generate
    from megamem.bench.metrics import recall_cosines
    from megamem.judge import is_correct, token_f1

    onehot = torch.eye(len(recs))
    owners = [i for i, r in enumerate(recs) for _ in r.qa]
    pairs = [qa for r in recs for qa in r.qa]
    answers = generate(model, tok, [[("user", qa_prompt(q))] for q, _ in pairs], qa_tokens, adapters, onehot[owners])
    cue = [[("user", recall_prompt(q))] for q, _ in pairs]  # every question as a recall cue: less noise
    recalls = generate(model, tok, cue, recall_tokens, adapters, onehot[owners])
    cos = recall_cosines(recalls, [recs[i].passage for i in owners])
    return {
        "qa": sum(is_correct(a, g) for a, (_, g) in zip(answers, pairs, strict=True)) / max(len(pairs), 1),
        "f1": sum(token_f1(a, g) for a, (_, g) in zip(answers, pairs, strict=True)) / max(len(pairs), 1),
        "recall_cos": sum(cos) / len(cos),
    }


def copy_memories(source, ids: list[str], path: Path):
    """A new store at `path` (removed first) of just the memories `ids` of the Memory `source`, each with the adapter
    and keys it has there: stores that differ only in what else the gate can choose."""
    import shutil

    from megamem import Item, Memory

    shutil.rmtree(path, ignore_errors=True)
    small = Memory(path, adapter_dtype=source.store.settings().get("adapter_dtype", "int8"))
    small.prepare_store()
    for i in ids:
        rec = source.show(i)
        meta = dict(rec.metadata)
        paras = meta.pop("paraphrases", [])
        small.commit(Item(rec.text, paras, meta, rec.id), source.adapter(i), source.store.keys(rec), note_updates=False)
    return small
