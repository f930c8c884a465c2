"""Constrained decoding: a grammar says which tokens a row may take next, and its logits are masked to those.

What a chat asks its answer to look like (OpenAI's response_format json_object / json_schema, a tool call whose
arguments match the tool's schema) becomes a grammar compiled by llguidance (chosen by measurement against
xgrammar, outlines and lm-format-enforcer: benchmarks/grammars.py, docs/performance.md). Each row of a batch has
its own matcher (`Constraint`) or none; before a row picks its token its matcher fills that row's bitmask and the
disallowed logits become -inf, so greedy and sampled decoding alike can only write what the grammar accepts, and
the end-of-sequence token is allowed only where the grammar may end.

    grammars = Grammars(tok, n_vocab=model.config.vocab_size, eos=[tok.eos_token_id])
    c = grammars.constraint(grammars.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}))
    logits = mask_logits(logits, [c])        # (B, V) with the rows' constraints (None: unconstrained)
    c.consume(int(logits[0].argmax()))       # the matcher follows the token taken

Limits: JSON is written compactly with ", " and ": " separators and no other whitespace (free whitespace lets a
small model pad with newlines until max_tokens); a schema keyword llguidance does not implement is an error
naming it, not silently dropped; a reply cut by max_tokens is unfinished JSON (finish_reason "length", as OpenAI).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .errors import MegamemError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE = 256  # compiled grammars kept (by their source), least recently used dropped first


class GrammarError(MegamemError):
    """A schema or grammar that cannot be compiled (its message names what is wrong)."""


class Constraint:
    """One row's matcher: the tokens it may take next, following the tokens it takes. Used from one thread
    (the engine's); its error state is final (llguidance never raises for a grammar error, it reports one)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def consume(self, token: int) -> bool:
        """Follow `token`; False if the grammar did not allow it (then `error` says why)."""
        return self.matcher.consume_token(token)

    @property
    def stopped(self) -> bool:
        """No token but the end may follow: the reply is complete."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        # its first line: the rest is the parser's state and the whole grammar
        return self.matcher.get_error().strip().splitlines()[0] if self.matcher.is_error() else None


class Grammars:
    """The grammars of one tokenizer: compiled once per source (an LRU of CACHE), a fresh matcher per row.
    Building the tokenizer's index takes ~2 s for SmolLM2's 49k tokens, so a server makes one and keeps it."""

    def __init__(self, tok: PreTrainedTokenizerBase, n_vocab: int, eos: list[int]) -> None:
        self.n_vocab = n_vocab
        self.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=n_vocab, eos_token=list(eos))
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()  # routes compile from the server's threadpool

    def json_schema(self, schema: dict) -> str:
        """The grammar of JSON valid against `schema`; GrammarError naming the problem if it cannot be compiled.

        >>> g.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
        """
        if not isinstance(schema, dict):
            raise GrammarError("a JSON schema is an object")
        return self._checked(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS))

    def json_object(self) -> str:
        """Any JSON object (OpenAI's response_format json_object)."""
        return self.json_schema({"type": "object"})

    def tool_call(self, tools: list[dict], text_allowed: bool) -> str:
        """One call of one of `tools` ({"name", "parameters"} each), written as {"name": ..., "arguments": {...}}
        with arguments valid against that tool's parameters; with `text_allowed` (tool_choice auto) the reply
        may instead be plain text that does not start with "{", so it is a whole call or text, never a mix."""
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": t["name"]}, "arguments": t.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        call = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if not text_allowed:
            return self._checked(call)
        # Lark with the call's JSON grammar inline (its options in the schema's x-guidance, as Lark takes them):
        # a reply is the call, or text whose first character is neither "{" nor a space
        inline = json.dumps(schema | {"x-guidance": JSON_OPTIONS})
        lark = f"start: call | TEXT\ncall: %json {inline}\nTEXT: /[^{{\\s](.|\\n)*/\n"
        return self._checked(llguidance.LLMatcher.grammar_from_lark(lark))

    def constraint(self, grammar: str) -> Constraint:
        """A fresh matcher for one row (compiling is cached; a matcher is cheap)."""
        return Constraint(llguidance.LLMatcher(self.tokenizer, grammar, log_level=0))

    def _checked(self, grammar: str) -> str:
        """The grammar if llguidance compiles it for this tokenizer (cached), else GrammarError with its reason."""
        with self._lock:
            if grammar in self._cache:
                self._cache.move_to_end(grammar)
                return grammar
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(f"the schema cannot be used: {error.strip()}")
        with self._lock:
            self._cache[grammar] = grammar
            while len(self._cache) > CACHE:
                self._cache.popitem(last=False)
        return grammar


def mask_logits(logits: torch.Tensor, constraints: list[Constraint | None]) -> torch.Tensor:
    """logits (B, V) with every disallowed token of a constrained row at -inf (a new tensor when any row is
    constrained; the same one when none is). A row whose matcher is in error keeps its logits: the caller ends
    it with the error."""
    rows = [b for b, c in enumerate(constraints) if c is not None and c.error is None]
    if not rows:
        return logits
    B, V = logits.shape
    words = (V + 31) // 32
    bitmask = torch.full((len(rows), words), -1, dtype=torch.int32)  # (k, W) 32 tokens a word
    for k, b in enumerate(rows):
        v = bitmask[k]
        constraints[b].matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())
    # bit j of word w is token 32w + j: numpy's little-endian unpack (~0.05 ms; torch's shifts took ~50 ms)
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :V]
    allowed = torch.from_numpy(bits.astype(bool))  # (k, V)
    out = logits.clone()
    idx = torch.tensor(rows)
    out[idx] = out[idx].masked_fill(~allowed, float("-inf"))
    return out
