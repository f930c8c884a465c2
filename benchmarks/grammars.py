"""Constrained decoding: which grammar library megamem's server uses for `response_format` and `tools`.

A recipe, run for each grammar library that is installed (llguidance, xgrammar, outlines' outlines-core,
lm-format-enforcer), with the real default model (SmolLM2-135M-Instruct) on CPU:

1. Setup. Build the library's tokenizer data from the HF tokenizer once (timed). Compile four JSON schemas,
   the shapes the server meets: a small object, a nested object (enum, array, bounded integer, inner object),
   a tool call (anyOf over two tools, each {"name": const, "arguments": {...}}, what `tools` compiles to) and
   json_object (any object, {"type": "object"}). For each: the first compile, the same schema compiled again
   (the library's own cache where it has one; not repeated when the first took over 5 s) and a new per-row
   matcher from the compiled grammar (what a server that caches compiled grammars pays per request).
2. Checks without the model. About 25 JSON Schema features ($ref, anyOf, additionalProperties, pattern, ...):
   does the schema compile, does the grammar accept a valid instance and reject an invalid one (each fed as
   the tokenizer's tokens, then: is the grammar in an accepting state); the error for an invalid schema; a
   matcher made on one thread (a request handler) driven on another (the engine thread) and two at once; the
   mask inside a string value (special tokens allowed? tokens like '.",' that close the string allowed?).
3. Decode. Greedy, a fixed number of steps (--tokens), the engine's loop (left-padded prefill, one forward
   per step with the KV cache, torch on --threads threads). Batch of 1: each schema alone, and one
   unconstrained run. Batch of 16: rows with their own schema, cycling over the four, every fourth row
   unconstrained, then the same batch unconstrained, back to back. Each step: fill every live constrained
   row's bitmask (the library's batch call where it has one), set the disallowed logits to -inf (one torch
   function for all libraries), pick, advance the row's matcher. EOS ends a row (a constrained row's grammar
   allows EOS only in an accepting state); an ended row is fed padding until the last step, so constrained
   and bare runs do the same forwards. Timed: mask fill per row and token, the grammar's share of the run
   (fill + apply + advance over wall time: the robust figure on a shared machine) and tokens/s. Every
   constrained row that ended is parsed and validated against its schema (jsonschema).
4. Report. Markdown tables on stdout, a JSON record with every row's text (docs/results/grammars/
   grammars-DATE.json), and with --doc the section "grammars" of docs/performance.md. Also per library:
   the installed MB it adds beyond megamem's core dependencies and its import time.

    python benchmarks/grammars.py                                   # every installed library, 64 tokens
    python benchmarks/grammars.py --libraries llguidance xgrammar --tokens 32
    python benchmarks/grammars.py --doc                             # also write the docs/performance.md section
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, provenance, table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "grammars"
# llguidance-compact: llguidance with no whitespace outside strings, {"whitespace_flexible": false}
LIBRARIES = ["llguidance", "llguidance-compact", "xgrammar", "outlines", "lm-format-enforcer"]

# ---------------------------------------------------------------------------------------------------------------
# The schemas and prompts
# ---------------------------------------------------------------------------------------------------------------

SMALL = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "status": {"type": "string", "enum": ["todo", "doing", "done"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
            "required": ["name"],
            "additionalProperties": False,
        },
    },
    "required": ["title", "status", "priority", "tags", "owner"],
    "additionalProperties": False,
}


def _tool(name: str, arguments: dict) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


TOOL_CALL = {
    "anyOf": [
        _tool(
            "get_weather",
            {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "unit", "days"],
                "additionalProperties": False,
            },
        ),
        _tool(
            "search_memories",
            {
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                "required": ["query"],
                "additionalProperties": False,
            },
        ),
    ]
}
JSON_OBJECT = {"type": "object"}  # response_format {"type": "json_object"}: any JSON object
SCHEMAS = {"small": SMALL, "nested": NESTED, "tool_call": TOOL_CALL, "json_object": JSON_OBJECT}

SYSTEM = "You are a helpful assistant. When asked for JSON, reply with JSON only."
PROMPTS = {
    "small": ["Give the person {0}, aged {1}, as JSON with the fields name and age."],
    "nested": ["Give a task as JSON: title '{2}', status doing, priority 2, tags, and owner {0} <{3}>."],
    "tool_call": [
        "Call a tool to answer: what will the weather be in {4} for the next 3 days? Reply with the tool call"
        ' as JSON {{"name": ..., "arguments": ...}}.'
    ],
    "json_object": ["Give the city of {4} and its country as a JSON object with two keys."],
    None: ["Tell me one fact about {4}."],
}
FILLS = [
    ("Alice", 34, "write the report", "alice@example.com", "Paris"),
    ("Bob", 51, "fix the roof", "bob@example.org", "Tokyo"),
    ("Chen", 27, "book the flights", "chen@example.net", "Lima"),
    ("Dana", 45, "plan the party", "dana@example.com", "Oslo"),
]


def _v(schema: dict, good, bad) -> tuple[dict, dict, dict]:
    """A probe's schema as the value of an object's one required property (the server compiles objects)."""
    wrap = {"type": "object", "properties": {"v": schema}, "required": ["v"], "additionalProperties": False}
    return wrap, {"v": good}, {"v": bad}


# Feature probes: (name, schema, a valid instance, an invalid instance or None).
PROBES = [
    (
        "$ref/$defs",
        {
            "type": "object",
            "properties": {"loc": {"$ref": "#/$defs/loc"}},
            "required": ["loc"],
            "$defs": {
                "loc": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                    "additionalProperties": False,
                }
            },
        },
        {"loc": {"city": "Paris"}},
        {"loc": {"town": "Paris"}},
    ),
    (
        "recursive $ref",
        {
            "$ref": "#/$defs/node",
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "v": {"type": "integer"},
                        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["v"],
                    "additionalProperties": False,
                }
            },
        },
        {"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}]},
        {"v": 1, "kids": [{"v": "x"}]},
    ),
    (
        "anyOf",
        {
            "type": "object",
            "properties": {"v": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
            "required": ["v"],
        },
        {"v": 3},
        {"v": True},
    ),
    (
        "oneOf",
        {
            "type": "object",
            "properties": {"v": {"oneOf": [{"type": "string"}, {"type": "integer"}]}},
            "required": ["v"],
        },
        {"v": "a"},
        {"v": [1]},
    ),
    (
        "allOf",
        {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]},
            ]
        },
        {"a": 1, "b": "x"},
        {"a": 1},
    ),
    (
        "type list with null",
        {
            "type": "object",
            "properties": {"v": {"type": ["string", "null"]}},
            "required": ["v"],
            "additionalProperties": False,
        },
        {"v": None},
        {"v": 1},
    ),
    (
        "additionalProperties false",
        {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
        {"a": 1},
        {"a": 1, "b": 2},
    ),
    (
        "additionalProperties absent",
        {"type": "object", "properties": {"a": {"type": "integer"}}},
        {"a": 1, "b": 2},
        {"a": "x"},
    ),
    (
        "additionalProperties schema",
        {"type": "object", "additionalProperties": {"type": "integer"}},
        {"x": 1, "y": 2},
        {"x": "s"},
    ),
    (
        "optional property",
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a"],
            "additionalProperties": False,
        },
        {"a": 1},
        {"b": 1},
    ),
    (
        "properties out of order",
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
        {"b": 2, "a": 1},
        {"a": 1},
    ),
    ("enum", *_v({"type": "string", "enum": ["red", "green"]}, "green", "blue")),
    ("const", {"type": "object", "properties": {"k": {"const": "x"}}, "required": ["k"]}, {"k": "x"}, {"k": "y"}),
    ("integer minimum/maximum", *_v({"type": "integer", "minimum": 1, "maximum": 10}, 7, 11)),
    ("number", *_v({"type": "number"}, 1.5e3, "1")),
    ("top-level number", {"type": "number"}, 1.5e3, "1"),
    ("string maxLength", *_v({"type": "string", "maxLength": 3}, "abc", "abcd")),
    ("string pattern", *_v({"type": "string", "pattern": "^[A-Z]{2}$"}, "FR", "fra")),
    ("format email", *_v({"type": "string", "format": "email"}, "a@b.co", "not-an-email")),
    ("format date-time", *_v({"type": "string", "format": "date-time"}, "2026-12-03T10:00:00Z", "yesterday")),
    (
        "array minItems/maxItems",
        *_v({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}, [1, 2], [1, 2, 3]),
    ),
    ("uniqueItems", *_v({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1])),
    (
        "not",
        {"type": "object", "properties": {"v": {"not": {"type": "string"}}}, "required": ["v"]},
        {"v": 1},
        {"v": "s"},
    ),
    (
        "unicode string",
        {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]},
        {"s": "café ✓ 東京"},
        None,
    ),
    ("json_object, nested", JSON_OBJECT, {"a": [1, {"b": {"c": [True, None, "x"]}}], "d": -2.5}, [1, 2]),
]
# Probes are fed as compact JSON ('{"a":1}'); these two feed the small schema's instance with whitespace.
WHITESPACE = {
    "spaces after , and :": {},  # json.dumps' default: '{"name": "Al", "age": 3}'
    "pretty-printed (indent 2)": {"indent": 2},
}
INVALID_SCHEMA = {"type": "object", "properties": {"a": {"type": "strnig"}}}  # a typo: must be refused


# ---------------------------------------------------------------------------------------------------------------
# One adapter per library: the same seven calls for each
# ---------------------------------------------------------------------------------------------------------------


class Library:
    """setup (tokenizer data, once), compile (schema -> compiled), matcher (compiled -> per-row state), fill
    (matchers' next-token bitmasks into rows of a (B, W) int32 tensor), advance (the chosen token), accepting."""

    name = ""

    def setup(self, tok, vocab: int, threads: int) -> None:
        raise NotImplementedError

    def compile(self, schema: dict):
        raise NotImplementedError

    def compile_again(self, schema: dict):
        return self.compile(schema)

    def matcher(self, compiled):
        raise NotImplementedError

    def fill(self, rows: list[tuple[object, int]], bitmask: torch.Tensor) -> None:
        for m, i in rows:
            self.fill_one(m, bitmask, i)

    def fill_one(self, m, bitmask: torch.Tensor, i: int) -> None:
        raise NotImplementedError

    def advance(self, m, token: int) -> bool:
        raise NotImplementedError

    def accepting(self, m) -> bool:
        raise NotImplementedError


class LLGuidance(Library):
    name = "llguidance"

    def setup(self, tok, vocab, threads):
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)  # n_vocab: the model's logits width
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.eos = self.tokenizer.eos_token

    def compile(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema)
        m = self.ll.LLMatcher(self.tokenizer, grammar, log_level=0)  # a bad grammar: an error state, no raise
        if m.is_error():
            raise ValueError(m.get_error())
        return m  # the compiled grammar is a fresh matcher: deep_copy() it per row

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, rows, bitmask):
        from llguidance.torch import fill_next_token_bitmask_par

        fill_next_token_bitmask_par(self.executor, list(rows), bitmask)

    def fill_one(self, m, bitmask, i):
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(m, bitmask, i)

    def advance(self, m, token):
        return m.consume_token(token)

    def accepting(self, m):
        return m.is_accepting()


class LLGuidanceCompact(LLGuidance):
    """llguidance with no whitespace between JSON tokens: '{"a":1}' only, never '{ "a": 1 }' (fewer tokens, and
    no room for a small model to wander in newlines and indentation)."""

    name = "llguidance-compact"

    def compile(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        m = self.ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m


class XGrammar(Library):
    name = "xgrammar"

    def setup(self, tok, vocab, threads):
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=threads)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)

    def compile(self, schema):
        self.compiler.clear_cache()  # a first compile: not from the compiler's cache
        return self.compiler.compile_json_schema(schema)

    def compile_again(self, schema):
        return self.compiler.compile_json_schema(schema)  # the compiler's cache

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, rows, bitmask):
        self.batch.batch_fill_next_token_bitmask([m for m, _ in rows], bitmask, [i for _, i in rows])

    def fill_one(self, m, bitmask, i):
        m.fill_next_token_bitmask(bitmask, i)

    def advance(self, m, token):
        return m.accept_token(token)

    def accepting(self, m):
        return m.is_completed()


class Outlines(Library):
    """outlines' own backend for transformers (outlines.backends.outlines_core): schema -> regex -> Index over
    the vocabulary (a DFA), a Guide per row."""

    name = "outlines"

    def setup(self, tok, vocab, threads):
        import outlines_core
        from outlines.backends.outlines_core import OutlinesCoreBackend
        from outlines.models.transformers import TransformerTokenizer

        self.oc = outlines_core
        wrapped = TransformerTokenizer(tok)
        self.vocabulary = OutlinesCoreBackend.create_outlines_core_vocabulary(
            tok.get_vocab(), tok.eos_token_id, tok.eos_token, wrapped.convert_token_to_string
        )

    def compile(self, schema):
        from outlines_core.json_schema import build_regex_from_schema

        return self.oc.Index(build_regex_from_schema(json.dumps(schema)), self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill_one(self, m, bitmask, i):
        row = bitmask[i]
        m.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    def advance(self, m, token):
        try:
            m.advance(token, return_tokens=False)
            return True
        except ValueError:
            return False

    def accepting(self, m):
        return m.is_finished()


class FormatEnforcer(Library):
    """lm-format-enforcer: a character-level JSON schema parser walked over a prefix tree of the vocabulary.
    Its transformers integration does not import under transformers 5 (it imports PreTrainedTokenizerBase from
    transformers.tokenization_utils), so the tokenizer data is built here with the integration's own recipe."""

    name = "lm-format-enforcer"

    def setup(self, tok, vocab, threads):
        from lmformatenforcer import TokenEnforcerTokenizerData

        zero = tok.encode("0")[-1]
        special = set(tok.all_special_ids)
        regular = []
        for i in range(len(tok)):
            if i in special:
                continue
            after_zero = tok.decode([zero, i])[1:]  # keeps a word-start token's leading space
            regular.append((i, after_zero, len(after_zero) > len(tok.decode([i]))))
        self.data = TokenEnforcerTokenizerData(
            regular, lambda ids: tok.decode(ids).rstrip("\ufffd"), tok.eos_token_id, True, vocab
        )
        self.eos = tok.eos_token_id

    def compile(self, schema):
        from lmformatenforcer import JsonSchemaParser

        return JsonSchemaParser(schema)

    def matcher(self, compiled):
        from lmformatenforcer import TokenEnforcer

        return [TokenEnforcer(self.data, compiled), []]  # the enforcer and the row's tokens so far

    def fill_one(self, m, bitmask, i):
        allowed = m[0].get_allowed_tokens(m[1]).allowed_tokens  # (ceil(vocab / 32),) int32
        bitmask[i].copy_(allowed)

    def advance(self, m, token):
        ok = bool(m[0].get_allowed_tokens(m[1]).is_token_allowed(token))
        m[1].append(token)
        return ok

    def accepting(self, m):
        return bool(m[0].get_allowed_tokens(m[1]).is_token_allowed(self.eos))


ADAPTERS = {
    "llguidance": LLGuidance,
    "llguidance-compact": LLGuidanceCompact,
    "xgrammar": XGrammar,
    "outlines": Outlines,
    "lm-format-enforcer": FormatEnforcer,
}
DISTS = {"llguidance-compact": "llguidance"}  # the distribution behind a variant
MODULES = {
    "llguidance": "llguidance",
    "llguidance-compact": "llguidance",
    "xgrammar": "xgrammar",
    "outlines": "outlines_core",
    "lm-format-enforcer": "lmformatenforcer",
}

# ---------------------------------------------------------------------------------------------------------------
# Helpers: masks, validity, dependency weight
# ---------------------------------------------------------------------------------------------------------------

BITS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], n_tok: int) -> None:
    """Set to -inf, in the given rows of logits (B, V), every token whose bit is 0 in bitmask (B, ceil(V/32)),
    and every id >= n_tok (logits the model has for ids its tokenizer lacks). The same code for every library."""
    idx = torch.tensor(rows)
    allowed = ((bitmask[idx].unsqueeze(-1) >> BITS) & 1).bool().view(len(rows), -1)[:, : logits.shape[1]]
    allowed[:, n_tok:] = False
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))


def valid(text: str, schema: dict) -> tuple[bool, str]:
    """Does the text parse as JSON and validate against the schema?"""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return False, f"not JSON: {exc}"
    try:
        import jsonschema
    except ImportError:  # the one check that needs no library: json_object's
        return (isinstance(obj, dict), "") if schema == JSON_OBJECT else (True, "unchecked (no jsonschema)")
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj), key=str)
    return (not errors), (errors[0].message if errors else "")


def dependency_weight(dist: str) -> dict:
    """Installed MB that the library brings beyond megamem's core dependencies (llguidance left out of the
    core), the packages that make it up, and import seconds / RSS MB on top of torch + transformers (a fresh
    interpreter)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def closure(names: list[str]) -> set[str]:
        seen: set[str] = set()
        todo = list(names)
        while todo:
            n = canonicalize_name(todo.pop())
            if n in seen:
                continue
            try:
                d = distribution(n)
            except PackageNotFoundError:
                continue
            seen.add(n)
            for r in d.requires or []:
                req = Requirement(r)
                if req.marker is None or req.marker.evaluate({"extra": ""}):
                    todo.append(req.name)
        return seen

    def size(n: str) -> int:
        d = distribution(n)
        return sum(p.stat().st_size for p in (d.locate_file(f) for f in d.files or []) if p.is_file())

    core = [Requirement(r).name for r in distribution("megamem").requires or [] if "extra ==" not in r]
    base = closure([n for n in core if canonicalize_name(n) != "llguidance"])
    extra = sorted(closure([dist]) - base)
    sizes = {n: size(n) / 1e6 for n in extra}
    code = (
        "import time, os, torch, transformers\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 1e6\n"
        f"r0 = rss(); t = time.perf_counter(); import {MODULES[dist]}\n"
        "print(time.perf_counter() - t, rss() - r0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds, rss = (float(x) for x in out.stdout.split()) if out.returncode == 0 else (float("nan"), float("nan"))
    return {
        "extra_mb": round(sum(sizes.values()), 1),
        "packages": {n: round(mb, 1) for n, mb in sorted(sizes.items(), key=lambda kv: -kv[1])},
        "import_s": round(seconds, 2),
        "import_rss_mb": round(rss, 1),
    }


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# ---------------------------------------------------------------------------------------------------------------
# Steps 1 and 2: compile, probes, threads
# ---------------------------------------------------------------------------------------------------------------


def compile_times(lib: Library) -> tuple[dict, dict]:
    """Per schema: first compile, compile again, a new matcher from the compiled grammar (ms); the compiled."""
    times, compiled = {}, {}
    for name, schema in SCHEMAS.items():
        t0 = time.perf_counter()
        c = lib.compile(schema)
        t1 = time.perf_counter()
        again = None
        if t1 - t0 < 5:  # a compile of seconds is not repeated (outlines' json_object): the point is made
            c = lib.compile_again(schema)
            again = ms(time.perf_counter() - t1)
        t2 = time.perf_counter()
        lib.matcher(c)
        t3 = time.perf_counter()
        compiled[name] = c
        times[name] = {"first_ms": ms(t1 - t0), "again_ms": again, "matcher_ms": ms(t3 - t2)}
    return times, compiled


def accepts(lib: Library, compiled, text: str, tok) -> bool:
    """Feed the text's tokens; True if every token was allowed and the grammar accepts at the end."""
    m = lib.matcher(compiled)
    for t in tok.encode(text, add_special_tokens=False):
        if not lib.advance(m, t):
            return False
    return lib.accepting(m)


def probe(lib: Library, tok, compiled: dict) -> dict:
    """Each feature: 'ok' (accepts the valid, rejects the invalid), 'loose' (accepts the invalid too: output may
    break the schema), 'strict' (rejects the valid: output cannot take a shape the schema allows), or
    'error: ...' (does not compile)."""
    out = {}
    known = {json.dumps(SCHEMAS[k]): c for k, c in compiled.items()}
    for name, schema, good, bad in [*PROBES, *((n, SMALL, {"name": "Al", "age": 3}, None) for n in WHITESPACE)]:
        try:
            c = known.get(json.dumps(schema)) or lib.compile(schema)
        except Exception as exc:  # noqa: BLE001 - each library raises its own
            out[name] = "error: " + str(exc).strip().splitlines()[-1][:120]
            continue
        text = json.dumps(good, ensure_ascii=False, **WHITESPACE.get(name, {"separators": (",", ":")}))
        try:
            takes_good = accepts(lib, c, text, tok)
            takes_bad = bad is not None and accepts(
                lib, c, json.dumps(bad, ensure_ascii=False, separators=(",", ":")), tok
            )
        except Exception as exc:  # noqa: BLE001
            out[name] = "crash: " + str(exc).strip().splitlines()[-1][:120]
            continue
        out[name] = ("ok" if not takes_bad else "loose") if takes_good else ("strict" if not takes_bad else "wrong")
    try:
        lib.compile(INVALID_SCHEMA)
        out["invalid schema refused"] = "no: compiled"
    except Exception as exc:  # noqa: BLE001
        out["invalid schema refused"] = "yes: " + str(exc).strip().splitlines()[-1][:120]
    return out


def string_mask(lib: Library, compiled, tok, vocab: int) -> dict:
    """The mask inside a string value ('{"name":"Ali' of the small schema): how many tokens it allows, which
    special tokens among them (the tokenizer's added special tokens: chat markers, not text), and how many
    allowed tokens close the string and go on (like '.",', canonical BPE merges a grammar should not forbid)."""
    m = lib.matcher(compiled)
    for t in tok.encode('{"name":"Ali', add_special_tokens=False):
        lib.advance(m, t)
    bm = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    lib.fill_one(m, bm, 0)
    allowed = ((bm[0].unsqueeze(-1) >> BITS) & 1).view(-1)[: len(tok)].nonzero().flatten().tolist()
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special} | set(tok.all_special_ids)
    closing = [t for t in tok.convert_ids_to_tokens(list(range(len(tok)))) if t.find('"') not in (-1, len(t) - 1)]
    closing_ids = set(tok.convert_tokens_to_ids(closing))
    return {
        "allowed": len(allowed),
        "special_allowed": tok.convert_ids_to_tokens(sorted(special & set(allowed))),
        "closing_allowed": len(closing_ids & set(allowed)),
    }


def threads_check(lib: Library, compiled, tok, vocab: int) -> str:
    """A matcher made on one thread (a request handler) driven on another (the engine thread); then two
    threads at once on two matchers of one compiled grammar. Both must give the sequential run's masks."""
    text = tok.encode('{"name":"Zed","age":40}', add_special_tokens=False)

    def masks(m) -> list[torch.Tensor]:
        out = []
        for t in text:
            bm = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
            lib.fill_one(m, bm, 0)
            out.append(bm.clone())
            lib.advance(m, t)
        return out

    try:
        reference = masks(lib.matcher(compiled))
        made: list = []
        t = threading.Thread(target=lambda: made.append(lib.matcher(compiled)))
        t.start()
        t.join()
        results: list = [None, None]

        def run(k: int) -> None:
            try:
                results[k] = masks(made[0] if k == 0 else lib.matcher(compiled))
            except Exception as exc:  # noqa: BLE001
                results[k] = exc

        ts = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for x in ts:
            x.start()
        for x in ts:
            x.join()
        for r in results:
            if isinstance(r, Exception):
                return f"fails: {type(r).__name__}: {r}"
            if len(r) != len(reference) or any(not torch.equal(a, b) for a, b in zip(r, reference, strict=True)):
                return "fails: masks differ"
        return "ok"
    except Exception as exc:  # noqa: BLE001
        return f"fails: {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------------------------
# Step 3: decoding
# ---------------------------------------------------------------------------------------------------------------


def prompts(tok, kinds: list[str | None]) -> list[list[int]]:
    from megamem.model import chat_ids

    out = []
    for i, kind in enumerate(kinds):
        fill = FILLS[i // 4 % len(FILLS)]  # rows of one schema in the mixed batch get different words
        user = PROMPTS[kind][0].format(*fill)
        out.append(chat_ids(tok, [("system", SYSTEM), ("user", user)], generation_prompt=True))
    return out


@torch.no_grad()
def decode(model, tok, kinds: list[str | None], steps: int, lib: Library | None, compiled: dict) -> dict:
    """Greedy decoding of one batch for `steps` steps, each row masked by its own grammar (kinds[i] names its
    schema, None: unconstrained); lib None: every row unconstrained. Returns the texts and the timings."""
    ids_list = prompts(tok, kinds)
    B, width = len(ids_list), max(len(p) for p in ids_list)
    vocab, n_tok = model.config.vocab_size, len(tok)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    pad = tok.pad_token_id
    ids = torch.full((B, width), pad, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for b, p in enumerate(ids_list):  # left padding, as the engine does
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    matchers = {b: lib.matcher(compiled[k]) for b, k in enumerate(kinds) if lib is not None and k is not None}
    bitmask = torch.full((B, (vocab + 31) // 32), -1, dtype=torch.int32)
    tokens: list[list[int]] = [[] for _ in range(B)]
    ended = [False] * B
    refused = [False] * B  # the matcher refused a token its own mask allowed (a library bug)
    fill_s, apply_s, advance_s, forward_s, row_fills, fills = 0.0, 0.0, 0.0, 0.0, 0, []
    t_start = time.perf_counter()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    t0 = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    forward_s += time.perf_counter() - t0
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    for step in range(steps):
        logits = out.logits[:, -1].float()
        live = [(m, b) for b, m in matchers.items() if not ended[b] and not refused[b]]
        if live:
            t0 = time.perf_counter()
            if len(live) == 1:
                lib.fill_one(live[0][0], bitmask, live[0][1])
            else:
                lib.fill(live, bitmask)
            t1 = time.perf_counter()
            apply_bitmask(logits, bitmask, [b for _, b in live], n_tok)
            t2 = time.perf_counter()
            fill_s, apply_s, row_fills = fill_s + t1 - t0, apply_s + t2 - t1, row_fills + len(live)
            fills.append((t1 - t0) / len(live))
        nxt = logits.argmax(-1)
        t0 = time.perf_counter()
        for b in range(B):
            if ended[b]:
                nxt[b] = pad
                continue
            t = int(nxt[b])
            if t in eos:
                ended[b] = True
                continue
            tokens[b].append(t)
            if b in matchers and not refused[b] and not lib.advance(matchers[b], t):
                refused[b] = True
        advance_s += time.perf_counter() - t0
        if step == steps - 1:
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], dim=1)
        pos = mask.sum(-1, keepdim=True) - 1
        t0 = time.perf_counter()
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{kw: cache},
        )  # transformers 5 renamed the forward's past_key_values to cache
        forward_s += time.perf_counter() - t0
        cache = out["cache"] if "cache" in out else out["past_key_values"]
    wall = time.perf_counter() - t_start
    rows = []
    for b, kind in enumerate(kinds):
        text = tok.decode(tokens[b], skip_special_tokens=True)
        row = {"schema": kind, "ended": ended[b], "tokens": len(tokens[b]), "text": text}
        if kind is not None and lib is not None:
            row["refused_token"] = refused[b]
            if ended[b]:
                row["valid"], row["why"] = valid(text, SCHEMAS[kind])
        rows.append(row)
    return {
        "rows": rows,
        "wall_s": wall,
        "tokens_per_s": B * steps / wall,
        "forward_s": forward_s,
        "fill_s": fill_s,
        "apply_s": apply_s,
        "advance_s": advance_s,
        "mask_ms_per_row_token": ms(fill_s / row_fills) if row_fills else None,
        "mask_ms_max": ms(max(fills)) if fills else None,
        "mask_ms_p50": ms(statistics.median(fills)) if fills else None,
    }


def summary(con: dict, bare: dict, steps: int) -> dict:
    """A constrained run against its unconstrained twin (same prompts, same number of steps)."""
    judged = [r for r in con["rows"] if r["schema"] is not None]
    done = [r for r in judged if r["ended"]]
    grammar_s = con["fill_s"] + con["apply_s"] + con["advance_s"]
    return {
        "unconstrained_tok_s": round(bare["tokens_per_s"], 2),
        "constrained_tok_s": round(con["tokens_per_s"], 2),
        "ratio": round(con["tokens_per_s"] / bare["tokens_per_s"], 3),
        "grammar_share": round(grammar_s / con["wall_s"], 4),  # of the constrained run's wall time
        "grammar_ms_per_step": ms(grammar_s / steps),
        "mask_ms_per_row_token": con["mask_ms_per_row_token"],
        "mask_ms_p50": con["mask_ms_p50"],
        "mask_ms_max": con["mask_ms_max"],
        "fill_ms_per_step": ms(con["fill_s"] / steps),
        "apply_ms_per_step": ms(con["apply_s"] / steps),
        "advance_ms_per_step": ms(con["advance_s"] / steps),
        "forward_ms_per_step": ms(con["forward_s"] / steps),
        "constrained_rows": len(judged),
        "ended": len(done),
        "valid": sum(bool(r.get("valid")) for r in done),
        "refused": sum(bool(r.get("refused_token")) for r in judged),
        "rows": con["rows"],
        "unconstrained_rows": bare["rows"],
    }


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def run_library(name: str, model, tok, args) -> dict:
    lib = ADAPTERS[name]()
    vocab = model.config.vocab_size
    rec: dict = {"library": name}
    from importlib.metadata import version

    dist = DISTS.get(name, name)
    rec["version"] = version(dist) + (f" (outlines-core {version('outlines_core')})" if name == "outlines" else "")
    print(f"\n== {name} {rec['version']}", flush=True)
    t0 = time.perf_counter()
    lib.setup(tok, vocab, args.threads)
    rec["tokenizer_s"] = round(time.perf_counter() - t0, 2)
    print(f"tokenizer data {rec['tokenizer_s']} s", flush=True)
    rec["compile"], compiled = compile_times(lib)
    print("compile ms", json.dumps(rec["compile"]), flush=True)
    logging.disable(logging.CRITICAL)  # lm-format-enforcer logs a traceback for every schema it cannot follow
    try:
        rec["probes"] = probe(lib, tok, compiled)
    finally:
        logging.disable(logging.NOTSET)
    print("probes", json.dumps(rec["probes"]), flush=True)
    rec["threads"] = threads_check(lib, compiled["small"], tok, vocab)
    print("threads", rec["threads"], flush=True)
    rec["string_mask"] = string_mask(lib, compiled["small"], tok, vocab)
    print("mask inside a string", rec["string_mask"], flush=True)
    # batch of 1: one unconstrained run (a step costs the same whatever the prompt's words), then each schema
    bare = decode(model, tok, ["nested"], args.tokens, None, {})
    singles = [summary(decode(model, tok, [k], args.tokens, lib, compiled), bare, args.tokens) for k in SCHEMAS]
    con_s = sum(args.tokens / s["constrained_tok_s"] for s in singles) / len(singles)  # seconds per run
    row_tokens = [s["mask_ms_per_row_token"] for s in singles if s["mask_ms_per_row_token"] is not None]
    rec["batch1"] = {
        "unconstrained_tok_s": round(bare["tokens_per_s"], 2),
        "constrained_tok_s": round(args.tokens / con_s, 2),
        "ratio": round(args.tokens / con_s / bare["tokens_per_s"], 3),
        "grammar_share": round(statistics.mean(s["grammar_share"] for s in singles), 4),
        "mask_ms_per_row_token": round(statistics.mean(row_tokens), 3),
        "mask_ms_max": max(s["mask_ms_max"] for s in singles),
        "by_schema": dict(zip(SCHEMAS, singles, strict=True)),
        "ended": sum(s["ended"] for s in singles),
        "valid": sum(s["valid"] for s in singles),
        "constrained_rows": len(singles),
        "refused": sum(s["refused"] for s in singles),
    }
    print("batch 1:", {k: v for k, v in rec["batch1"].items() if k != "by_schema"}, flush=True)
    # batch of 16: own schema per row, every fourth row unconstrained
    kinds = [None if i % 4 == 3 else list(SCHEMAS)[(i - i // 4) % 4] for i in range(args.batch)]
    bare = decode(model, tok, kinds, args.tokens, None, {})
    rec["batch16"] = summary(decode(model, tok, kinds, args.tokens, lib, compiled), bare, args.tokens)
    print("batch", args.batch, {k: v for k, v in rec["batch16"].items() if "rows" not in k}, flush=True)
    rec["dependencies"] = dependency_weight(dist)
    print("dependencies", rec["dependencies"], flush=True)
    return rec


def report(records: list[dict], args) -> tuple[str, str, str]:
    """Three markdown tables: decoding, compile, feature probes."""
    b = args.batch
    main = []
    for r in records:
        b1, bn, d = r["batch1"], r["batch16"], r["dependencies"]
        feats = [v for k, v in r["probes"].items() if k != "invalid schema refused"]
        main.append(
            {
                "library": f"{r['library']} {r['version']}",
                "tokenizer data s": r["tokenizer_s"],
                "compile ms, first (max of 4)": max(c["first_ms"] for c in r["compile"].values()),
                "matcher from compiled ms": max(c["matcher_ms"] for c in r["compile"].values()),
                "mask ms/row/token, B=1 (max)": f"{b1['mask_ms_per_row_token']:.3f} ({b1['mask_ms_max']:.1f})",
                f"mask ms/row/token, B={b} (max)": f"{bn['mask_ms_per_row_token']:.3f} ({bn['mask_ms_max']:.1f})",
                "grammar share of step, B=1": f"{b1['grammar_share']:.1%}",
                f"grammar ms/step, B={b} (share)": f"{bn['grammar_ms_per_step']:.1f} ({bn['grammar_share']:.1%})",
                "tok/s B=1: constrained / bare": f"{b1['constrained_tok_s']:.1f} / {b1['unconstrained_tok_s']:.1f}",
                f"tok/s B={b}: constrained / bare": f"{bn['constrained_tok_s']:.1f} / {bn['unconstrained_tok_s']:.1f}",
                "valid / ended / rows": f"{b1['valid'] + bn['valid']} / {b1['ended'] + bn['ended']} / "
                f"{b1['constrained_rows'] + bn['constrained_rows']}",
                "probes ok": f"{feats.count('ok')}/{len(feats)}",
                "in a string: special / closing tokens allowed": f"{len(r['string_mask']['special_allowed'])} / "
                f"{r['string_mask']['closing_allowed']}",
                "other thread": r["threads"].split(":")[0],
                "extra install MB / import s": f"{d['extra_mb']:.0f} / {d['import_s']:.2f}",
            }
        )
    comp = []
    for r in records:
        row = {"library": r["library"], "tokenizer data s": r["tokenizer_s"]}
        for k, c in r["compile"].items():
            again = "-" if c["again_ms"] is None else f"{c['again_ms']:.1f}"
            row[f"{k}: first / again / matcher ms"] = f"{c['first_ms']:.1f} / {again} / {c['matcher_ms']:.2f}"
        comp.append(row)
    names = list(records[0]["probes"]) if records else []
    probes = [{"feature": n, **{r["library"]: r["probes"].get(n, "") for r in records}} for n in names]
    return table(main), table(comp), table(probes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--libraries", nargs="+", default=LIBRARIES, choices=LIBRARIES, help="default: all installed")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per batch (default 64)")
    ap.add_argument("--batch", type=int, default=16, help="rows of the mixed batch (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads and grammar threads (default 1)")
    ap.add_argument("--out", type=Path, help="JSON record (default docs/results/grammars/grammars-DATE.json)")
    ap.add_argument("--doc", action="store_true", help="write the section 'grammars' of docs/performance.md")
    args = ap.parse_args()

    import importlib.util

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from megamem.model import load_model

    model, tok = load_model()  # the default: SmolLM2-135M-Instruct
    decode(model, tok, [None], 4, None, {})  # warm-up: the first forwards of a process are slower
    records, missing = [], []
    for name in args.libraries:
        if importlib.util.find_spec(MODULES[name]) is None:
            missing.append(name)
            print(f"\n== {name}: not installed, skipped")
            continue
        records.append(run_library(name, model, tok, args))

    main_t, comp_t, probe_t = report(records, args)
    print("\n" + main_t + "\n\n" + comp_t + "\n\n" + probe_t)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out = args.out or OUT / f"grammars-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        **provenance(),
        "tokens": args.tokens,
        "batch": args.batch,
        "threads": args.threads,
        "model": "SmolLM2-135M-Instruct (megamem.model.load_model())",
        "vocab": model.config.vocab_size,
        "tokenizer_len": len(tok),
        "schemas": SCHEMAS,
        "skipped": missing,
        "libraries": records,
    }
    out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"\nwrote {out}")
    if args.doc:
        body = (
            f"Decoding ({args.tokens} greedy steps, every row stepped to the end; batch 1 = each of the 4 schemas "
            f"alone, batch {args.batch} = rows with their own schema, every fourth unconstrained):\n\n{main_t}\n\n"
            f"Compile per schema (first / again / a new matcher from the compiled grammar):\n\n{comp_t}\n\n"
            f"Feature probes (a valid and an invalid instance fed as tokens): ok, loose (accepts the invalid "
            f"too), strict (rejects the valid), error (does not compile):\n\n{probe_t}"
        )
        write_section("grammars", "Constrained decoding: which grammar library", body)
    print(machine())


if __name__ == "__main__":
    main()
