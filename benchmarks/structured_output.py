"""What a JSON-schema constraint costs `megamem serve`: tokens/s with and without response_format json_schema,
at 1 and at 16 concurrent clients, through the real `openai` client.

A recipe. Setup: a fresh copy of a store (--store) with one API key per client, `megamem serve` on loopback as a
subprocess (the installed command, as an application runs it). Loop: for each client count, each client asks
questions about different memories in turn for --seconds, first free text, then under a JSON schema (an object
with a one-sentence answer, a confidence and a topic from an enum; greedy, max_tokens --max-tokens); every
constrained reply is checked against the schema. Save: the section 'structured' of docs/performance.md.

    python benchmarks/structured_output.py --store /tmp/p9-store
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import client_load, keyed_copy, serve, stop, table, write_section  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 200},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        "topic": {"enum": ["person", "place", "event", "thing", "other"]},
    },
    "required": ["answer", "confidence", "topic"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}


def load(url: str, keys: list[str], questions: list[str], clients: int, seconds: float, tokens: int, fmt) -> dict:
    """`clients` clients asking in turn for `seconds` (common.client_load); tokens/s over the wall time, and the
    constrained replies that are valid against the schema."""
    res = client_load(url, keys, questions, clients, seconds, tokens, **({"response_format": fmt} if fmt else {}))
    valid = 0
    for content in res["replies"] if fmt else []:
        try:
            jsonschema.validate(json.loads(content or ""), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    keep = ("requests", "tokens", "tok_per_s", "p50_s")
    return {**{k: res[k] for k in keep}, "valid": valid, "errors": res["errors"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True, help="a store to copy (its memories give the questions)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8794)
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/performance.md alone")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="megamem-structured-"))
    rows = []
    try:
        store, keys, questions = keyed_copy(args.store, work, max(args.clients))
        proc = serve(store, args.port)
        url = f"http://127.0.0.1:{args.port}"
        try:
            load(url, keys, questions, 1, 1, 4, FORMAT)  # warm-up: the embedder, the grammar's tokenizer index
            for clients in args.clients:
                free = load(url, keys, questions, clients, args.seconds, args.max_tokens, None)
                held = load(url, keys, questions, clients, args.seconds, args.max_tokens, FORMAT)
                print(clients, json.dumps(free), json.dumps(held), flush=True)
                rows.append(
                    {
                        "clients": clients,
                        "free tokens/s": f"{free['tok_per_s']:.1f}",
                        "json_schema tokens/s": f"{held['tok_per_s']:.1f}",
                        "change": f"{held['tok_per_s'] / free['tok_per_s'] - 1:+.0%}",
                        "valid replies": f"{held['valid']}/{held['requests']}",
                        "p50 s free / json": f"{free['p50_s']:.2f} / {held['p50_s']:.2f}",
                        "errors": free["errors"] + held["errors"],
                    }
                )
        finally:
            stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body = table(rows)
    print(body)
    notes = (
        f"A fresh copy of {args.store} ({len(questions)} memories), one API key per client, each client asking "
        f"about different memories in turn for {args.seconds:.0f} s, greedy, max_tokens {args.max_tokens}; "
        "json_schema: an object {answer (string, at most 200 characters), confidence (0-100), topic (an enum)}, "
        "strict. Tokens/s counts completion tokens over the wall time. 'valid replies': constrained replies that "
        "parse and validate against the schema (a reply cut by max_tokens is unfinished JSON)."
    )
    if not args.no_doc:
        write_section("structured", "10. Serving: what a JSON-schema constraint costs", body, notes)


if __name__ == "__main__":
    main()
