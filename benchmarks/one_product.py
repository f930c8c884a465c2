"""One product, measured: the context prompt chosen on held-out data, then the server against the library.

    python benchmarks/one_product.py prompt --partition 6 --store /tmp/p6-store
    python benchmarks/one_product.py parity --partition 9 --store /tmp/p9-store

Both learn a wiki partition's 50 records into a store with the product's defaults (resumed: ids p<P>-r<I> are
skipped when stored) and ask its 150 questions.

prompt: the default mode (mega+rag) asked through `Memory.ask` with each context prompt (megamem.answer's
CONTEXT_SUFFIX): the paper's QA prompt (question + the one-sentence suffix) and the chat-shaped one (the question
as asked), scored by the offline judge (the paper's: answer contained, one sentence), by containment alone, and
by length.

parity: `Memory.ask`'s default answer against `megamem serve --open`'s default answer, asked through the real
`openai` client with no extension fields (what an application gets), on the same store; and how often the two
answers are the same text.

Each writes its record to docs/results/one-product/ and prints a markdown table for docs/results.md. Partitions
6 and 9 were chosen before measuring: neither was used to tune an answer setting (docs/tuning.md uses 0-4).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import provenance, serve, stop, table, wilson

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mega-wiki2024"
OUT = ROOT / "docs" / "results" / "one-product"


def wiki_store(store: Path, partition: int, memories: int):
    """The partition's records learned into `store` (product defaults), and its questions (id, question, gold)."""
    from megamem import Item, Memory
    from megamem.datasets import load_partition

    records = load_partition(DATA, partition, memories)
    mem = Memory(store)
    todo = [
        Item(r.passage, r.paraphrases, {"partition": partition, "record": i}, f"p{partition}-r{i}")
        for i, r in enumerate(records)
        if not (mem.store and mem.store.get(f"p{partition}-r{i}", missing_ok=True))
    ]
    if todo:
        mem.add_many(todo, on_memory=lambda i, n: print(f"learning {i + 1}/{n}", file=sys.stderr, flush=True))
    questions = [(f"p{partition}-r{i}", q, a) for i, r in enumerate(records) for q, a in r.qa]
    return mem, questions


def scored(name: str, answers: list[str], questions: list[tuple]) -> dict:
    """One row: the judge's accuracy (Wilson 95%), containment alone, mean words."""
    from megamem.judge import contains_answer, is_correct

    n = len(answers)
    k = sum(is_correct(a, g) for a, (_, _, g) in zip(answers, questions, strict=True))
    lo, hi = wilson(k, n)
    held = sum(contains_answer(a, g) for a, (_, _, g) in zip(answers, questions, strict=True))
    return {
        "answers": name,
        "questions": n,
        "QA (judge)": f"{k / n:.3f}",
        "95% CI": f"{lo:.3f}-{hi:.3f}",
        "contains gold": f"{held / n:.3f}",
        "mean words": f"{statistics.mean(len(a.split()) for a in answers):.1f}",
    }


def ask_all(mem, questions: list[tuple]) -> list[str]:
    """Memory.ask's default answer to every question."""
    out = []
    for n, (_, q, _) in enumerate(questions, 1):
        out.append(mem.ask(q).text)
        if n % 25 == 0:
            print(f"asked {n}/{len(questions)}", file=sys.stderr, flush=True)
    return out


def prompt_choice(args) -> dict:
    """The default mode with each context prompt, through the library."""
    from megamem import answer

    mem, questions = wiki_store(args.store, args.partition, args.memories)
    rows, answers = [], {}
    for name, suffix in (("qa prompt (question + one-sentence suffix)", answer.QA_SUFFIX), ("chat prompt", "")):
        answer.CONTEXT_SUFFIX = suffix
        t0 = time.perf_counter()
        answers[name] = ask_all(mem, questions)
        rows.append(scored(name, answers[name], questions) | {"seconds": round(time.perf_counter() - t0)})
    return {"rows": rows, "answers": answers}


def parity(args) -> dict:
    """The server's default answer (openai client, no extension fields) against Memory.ask's default."""
    import openai

    mem, questions = wiki_store(args.store, args.partition, args.memories)
    library = ask_all(mem, questions)
    del mem
    proc = serve(args.store, args.port, "--open")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none", timeout=600)
        server = []
        for _, q, _ in questions:
            reply = client.chat.completions.create(model="megamem", messages=[{"role": "user", "content": q}])
            server.append((reply.choices[0].message.content or "").strip())
    finally:
        stop(proc)
    rows = [scored("Memory.ask (default)", library, questions), scored("megamem serve via openai", server, questions)]
    same = sum(a == b for a, b in zip(library, server, strict=True))
    return {"rows": rows, "identical": same, "answers": {"library": library, "server": server}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("prompt", "parity"))
    ap.add_argument("--partition", type=int, required=True)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--memories", type=int, default=50)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    record = provenance() | {"partition": args.partition}
    record |= prompt_choice(args) if args.what == "prompt" else parity(args)
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"{args.what}-p{args.partition}.json"
    out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"{record['command']}\n{record['date']}; {record['machine']}\n")
    print(table(record["rows"]))
    if "identical" in record:
        print(f"\nidentical answers: {record['identical']} of {len(record['answers']['library'])}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
