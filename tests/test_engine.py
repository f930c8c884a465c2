"""The serving engine (megamem.server.engine): continuous batching on the tests' tiny model.

A request joins the running batch at the next step and finishes before a long row that was there first; a row
that is cancelled leaves the batch within a step (and one cancelled while waiting still ends); and a row's
greedy tokens are the ones it decodes alone (model.generate with its mixture), whatever joins or leaves beside
it, with per-row adapters and mixtures and prompts read in chunks.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from faultlib import make_tiny_model

from megamem.adapters import Adapter, LoraSpec
from megamem.generate import greedy
from megamem.inject import clear, inject, set_mixture
from megamem.model import chat_ids, load_model
from megamem.server.engine import Engine

QUESTIONS = ["Say hi.", "What colour is the Vexmoor bridge, and who painted it?", "Count to three.", "Why?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model with its own output head (its greedy text depends on the prompt and the mixture) and room
    for long answers."""
    return make_tiny_model(tmp_path_factory.mktemp("engine") / "model", context=512, tied=False)


@pytest.fixture()
def tiny512(model_dir):
    model, tok = load_model(str(model_dir))
    return model, tok


class Forwards:
    """Counts the model's forwards and each one's batch size (a forward pre-hook), sleeping `delay` seconds in
    each so that a long row is still decoding when the test acts."""

    def __init__(self, model, delay: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.delay = delay
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.sizes.append(int(kwargs["input_ids"].shape[0]))
        if self.delay:
            time.sleep(self.delay)


def start(model, tok, **kw) -> Engine:
    engine = Engine(model, tok, **kw)
    engine.start()
    return engine


def ids(tok, question: str) -> list[int]:
    return chat_ids(tok, [("user", question)], generation_prompt=True)


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.001)


def random_adapters(model, n: int) -> list[Adapter]:
    """n random rank-2 adapters on up_proj and down_proj (big enough to change the greedy text)."""
    layers = inject(model, ["up_proj", "down_proj"])
    spec = LoraSpec(rank=2, alpha=2.0)
    out = []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        w = {
            name: (
                torch.randn(2, m.in_features, generator=g) * 0.5,
                torch.randn(m.out_features, 2, generator=g) * 0.5,
            )
            for name, m in layers.items()
        }
        out.append(Adapter(spec, w))
    return out


def test_a_newcomer_joins_the_running_batch_and_finishes_first(tiny512):
    """A 3-token request sent while a 300-token one decodes is decoded beside it (a forward of 2 rows) and ends
    while the long one is still decoding (static batching made it wait for the long row's end)."""
    model, tok = tiny512
    seen = Forwards(model, delay=0.002)
    engine = start(model, tok)
    try:
        long = engine.submit(ids(tok, QUESTIONS[1]), [], [], max_tokens=300)
        wait_for(lambda: long.completion_tokens >= 3)
        short = engine.submit(ids(tok, QUESTIONS[0]), [], [], max_tokens=3)
        assert short.done.wait(30)
        assert not long.done.is_set() and short.completion_tokens == 3
        assert 2 in seen.sizes  # the short row was decoded in the long row's forwards
        assert long.done.wait(60) and long.completion_tokens == 300
        assert engine.idle.wait(5)
    finally:
        engine.stop_flag.set()


def test_a_cancelled_row_leaves_within_a_step(tiny512):
    """Two rows decode together; one is cancelled: within a step the forwards carry one row, the cancelled row
    ends with at most one more token, and the other decodes on to its end."""
    model, tok = tiny512
    seen = Forwards(model, delay=0.002)
    engine = start(model, tok, window_s=0.5)
    try:
        a = engine.submit(ids(tok, QUESTIONS[1]), [], [], max_tokens=400)
        b = engine.submit(ids(tok, QUESTIONS[2]), [], [], max_tokens=400)
        wait_for(lambda: a.completion_tokens >= 5 and b.completion_tokens >= 5)
        assert seen.sizes[-1] == 2
        at_cancel, forwards = b.completion_tokens, len(seen.sizes)
        b.cancelled = True
        assert b.done.wait(5) and b.finish_reason == "cancelled"
        assert b.completion_tokens <= at_cancel + 1
        wait_for(lambda: len(seen.sizes) >= forwards + 4)
        assert set(seen.sizes[forwards + 2 :]) == {1}  # the row left: later forwards decode `a` alone
        assert not a.done.is_set()
        assert a.done.wait(60) and a.completion_tokens == 400
        assert engine.stats["cancelled"] == 1
    finally:
        engine.stop_flag.set()


def test_a_request_cancelled_while_waiting_still_ends(tiny512):
    """One row at a time (max_batch 1): a waiting request that is cancelled ends (END, done) at the next step,
    without waiting for the running row, so a caller blocked on its answer is released (it was dropped
    silently, never ended)."""
    model, tok = tiny512
    Forwards(model, delay=0.002)
    engine = start(model, tok, max_batch=1)
    try:
        long = engine.submit(ids(tok, QUESTIONS[1]), [], [], max_tokens=300)
        wait_for(lambda: long.completion_tokens >= 2)
        queued = engine.submit(ids(tok, QUESTIONS[0]), [], [], max_tokens=5)
        time.sleep(0.05)
        queued.cancelled = True
        assert queued.done.wait(5) and queued.finish_reason == "cancelled" and queued.completion_tokens == 0
        assert list(queued.pieces()) == []  # the stream ended
        assert not long.done.is_set()
    finally:
        engine.stop_flag.set()


def alone(model, tok, prompt: list[int], adapters: list, weights: list[float], n: int, eos: set[int]) -> list[int]:
    """The row decoded by itself: model.generate's greedy continuation with its mixture, cut at the first stop
    token (the library's decoder)."""
    set_mixture(model, adapters, weights)
    try:
        x = torch.tensor([prompt])
        out = greedy(model, tok, x, torch.ones_like(x), n)[0, len(prompt) :].tolist()
    finally:
        clear(model)
    return next((out[:i] for i, t in enumerate(out) if t in eos), out)


@pytest.mark.parametrize("prefill_tokens", [512, 7])
def test_greedy_tokens_with_joins_equal_each_row_alone(tiny512, prefill_tokens):
    """Four rows with their own mixtures (one adapter, a 0.3 / 0.7 mix of two, none, all three) join a running
    batch one after another at different lengths and leave at different times; prompts read whole or 7 tokens a
    step beside the decoding. Every row's tokens are the ones it decodes alone, and the rows did share forwards
    (three and four rows at once)."""
    model, tok = tiny512
    adapters = random_adapters(model, 3)
    rows = [
        (QUESTIONS[0], [adapters[0]], [1.0], 40),
        (QUESTIONS[1], [adapters[1], adapters[2]], [0.3, 0.7], 24),
        (QUESTIONS[2], [], [], 30),
        (QUESTIONS[3], adapters, [0.2, 0.5, 0.3], 16),
    ]
    engine = Engine(model, tok)
    expected = [alone(model, tok, ids(tok, q), a, w, n, engine.eos) for q, a, w, n in rows]
    assert len({tuple(e) for e in expected}) == 4 and all(len(e) >= 8 for e in expected)  # mixtures matter
    seen = Forwards(model, delay=0.003)
    engine = start(model, tok, prefill_tokens=prefill_tokens)
    try:
        reqs = []
        for q, a, w, n in rows:
            reqs.append(engine.submit(ids(tok, q), a, w, max_tokens=n))
            wait_for(lambda: reqs[-1].completion_tokens >= 3)  # decoding before the next one comes
        for r in reqs:
            assert r.done.wait(60), "a row never ended"
        assert [r.tokens for r in reqs] == expected
        assert max(seen.sizes) >= 3
    finally:
        engine.stop_flag.set()


def test_a_failed_prefill_fails_its_rows_not_the_batch(tiny512):
    """A newcomer whose prompt's forward raises ends with the error at once, while the row that was decoding
    goes on to its end (and the engine serves the next request)."""
    model, tok = tiny512
    Forwards(model, delay=0.002)
    engine = start(model, tok)
    armed = threading.Event()

    def hook(module, args, kwargs):
        if armed.is_set() and kwargs["input_ids"].shape[1] > 1:  # the next prompt read
            armed.clear()
            raise RuntimeError("boom")

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        long = engine.submit(ids(tok, QUESTIONS[1]), [], [], max_tokens=300)
        wait_for(lambda: long.completion_tokens >= 2)
        armed.set()
        bad = engine.submit(ids(tok, QUESTIONS[0]), [], [], max_tokens=4)
        assert bad.done.wait(30) and bad.finish_reason == "error" and "boom" in bad.error
        assert not long.done.is_set()
        assert long.done.wait(60) and long.finish_reason == "length" and long.completion_tokens == 300
        good = engine.submit(ids(tok, QUESTIONS[0]), [], [], max_tokens=4)
        assert good.done.wait(30) and good.finish_reason == "length" and good.completion_tokens == 4
    finally:
        handle.remove()
        engine.stop_flag.set()
