"""The engine: continuous (iteration-level) batching of chat requests, each row with its own gated mixture.

One thread owns the serving model and runs it a step at a time, vLLM's scheduler in miniature. Each step:

  1. takes the requests that arrived (when the engine was idle it gathers for `window_s` after the first, so a
     burst is read together);
  2. drops the rows whose client went away (`Request.cancelled`, set by the server when a client disconnects,
     streaming or not): they leave before the next forward, so a gone client costs at most one more step;
  3. reads the newcomers' prompts (prefill), up to `max_batch` rows in all: left-padded, with a KV cache of their
     own, one chunk of at most `prefill_tokens` tokens a step, so a long prompt holds the running rows up for a
     chunk at a time, not for its whole length;
  4. when their prompts are read, the newcomers pick their first token and join the running batch: both KV
     caches are left-padded along the time axis to one length and concatenated along the batch axis, their
     attention masks likewise;
  5. decodes one token for every running row in one forward (the KV cache, streaming each row's text as it
     grows); a row that ends (a stop token, a stop string, max_tokens) leaves: its cache rows are index-selected
     away, and padding columns no remaining row needs are cut.

So a request joins the batch at the next step and never waits for another request's answer to end (the static
batching this replaced decoded a batch to its longest row while newcomers waited: a 5-token chat behind a
1,200-token one waited 75 s).

Every forward runs with its rows' gated mixture ((B, N) weights in the gated layers: row b computes
W0·x + Σ_i w[b, i]·s_i·B_i·A_i·x), weighed again whenever the rows in the forward change; the adapters of all
live rows are attached once and re-attached only when a newcomer needs one that is not (Mixer: attaching costs
about a third of a decode step). Rows whose gate chose no memory carry zero weights; while no live row uses a
memory, the bare model runs. This is S-LoRA /
Punica's many-adapters-in-one-batch idea, for weighted mixtures. Each request's mixture is decoded as given: the
answer pipeline (megamem.answer.mixture) has already dropped the terms under the min weight.

A row decodes as the library's greedy `generate` does: one prompt, its positions counted from its first real
token (the attention mask's cumsum, so padding shifts nothing), the same stop tokens; a chat and Memory.ask
answer with the same text.

Limits: padding is real compute (a newcomer beside a 1,000-token row attends over that row's length, masked),
where vLLM's paged attention pays only for each row's own tokens; the cache must be transformers' plain
DynamicLayer per layer (full attention: Llama, SmolLM2, Qwen2 ...), not sliding-window layers, or the engine
fails the request with that reason; newcomers that arrive while a group's prompts are being read wait for the
next group.

    engine = Engine(model, tok); engine.start()
    req = engine.submit(prompt_ids, adapters, weights, max_tokens=64)
    for piece in req.pieces(): print(piece, end="")
"""

from __future__ import annotations

import inspect
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from ..grammar import Constraint, Grammars, mask_logits
from ..inject import clear, gated_layers, set_mixture

END = object()  # the marker a request's stream ends with
PREFILL_TOKENS = 512  # prompt tokens read per step (all newcomers together): ~2.5 s of SmolLM2-135M on 2 cores
log = logging.getLogger("megamem.server")
_serial = itertools.count()


class Piece(str):
    """A piece of a row's text, and how many of its tokens were decoded when it was emitted (so a stream can
    send each token's logprobs with the piece that shows it)."""

    tokens: int = 0

    def __new__(cls, text: str, tokens: int) -> Piece:
        piece = super().__new__(cls, text)
        piece.tokens = tokens
        return piece


@dataclass
class Logprob:
    """A decoded token's log-probability under the model (before any grammar mask or temperature, as OpenAI
    reports them) and the `top` most likely tokens with theirs: [(token id, logprob), ...]."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Request:
    """One completion to decode. Tokens arrive through `emit` (thread-safe; the server hands it an asyncio
    queue's put) as text pieces, then END, exactly once, however the request ends; `finish_reason` ("stop",
    "length", "error" or "cancelled") and the token counts are set before END, and `on_end` (if given) is called
    then, from the engine's thread."""

    prompt: list[int]
    adapters: list = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    emit: Callable[[object], None] | None = None
    on_end: Callable[[], None] | None = None
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)  # the completion's token ids so far
    constraint: Constraint | None = None  # a grammar the completion must follow (megamem.grammar), or None
    logprobs: int | None = None  # None: none kept; n: each token's logprob with the n most likely (0 to 20)
    logprob_list: list[Logprob] = field(default_factory=list)  # one per token in `tokens`
    serial: int = field(default_factory=lambda: next(_serial))  # tells rows apart (ids of dead objects repeat)
    _q: queue.Queue | None = None
    _gen: torch.Generator | None = None

    def pieces(self):
        """The text pieces as they are decoded (for callers without an event loop)."""
        while True:
            item = self._q.get()
            if item is END:
                return
            yield item


@dataclass
class Batch:
    """Rows decoded together: their requests, their KV cache, the attention mask over it (B, L) (0: padding)
    and the token each row feeds next (B,)."""

    reqs: list[Request]
    cache: object
    mask: torch.Tensor
    nxt: torch.Tensor


@dataclass
class Prefill:
    """Newcomers whose prompts are being read: left-padded (B, T) ids and mask, `done` columns read so far into
    their own KV cache."""

    reqs: list[Request]
    ids: torch.Tensor
    mask: torch.Tensor
    done: int = 0
    cache: object = None


class Engine(threading.Thread):
    """The serving model's one thread; see the module docstring. `stats` counts what /metrics reports and what
    the tests check: steps (decode forwards), prefills (prefill forwards), rows (requests read), tokens (decoded),
    cancelled (rows dropped because their client left), decode_s (seconds in forwards)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        max_batch: int = 16,
        window_s: float = 0.005,
        batched: bool = True,
        prefill_tokens: int = PREFILL_TOKENS,
    ) -> None:
        super().__init__(name="megamem-engine", daemon=True)
        self.model, self.tok = model, tok
        self.max_batch = max_batch if batched else 1
        self.window_s = window_s
        self.prefill_tokens = max(1, prefill_tokens)
        self.inbox: queue.Queue[Request] = queue.Queue()
        self.waiting: deque[Request] = deque()  # taken from the inbox, not yet prefilling (the batch is full)
        self.running: Batch | None = None
        self.prefilling: Prefill | None = None
        self.idle = threading.Event()  # set while no row is decoding: the trainer waits on it between steps
        self.idle.set()
        self.stop_flag = threading.Event()
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [tok.eos_token_id])
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.stats = {"steps": 0, "prefills": 0, "rows": 0, "tokens": 0, "cancelled": 0, "decode_s": 0.0}
        self.on_step: Callable[[int, int, float], None] | None = None  # (rows, tokens, seconds) after each step
        self.mixer = Mixer(model)
        self._mixed: tuple[int, ...] | None = None  # the rows the model's mixture is weighed for
        # transformers 5 renamed the forward's KV-cache argument from past_key_values to cache
        params = inspect.signature(type(model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()

    def submit(self, prompt: list[int], adapters: list, weights: list[float], **kw) -> Request:
        req = Request(prompt, list(adapters), list(weights), **kw)
        if req.emit is None:
            req._q = queue.Queue()
            req.emit = req._q.put
        self.inbox.put(req)
        return req

    def grammars(self) -> Grammars:
        """The serving tokenizer's grammars (megamem.grammar), built on first use (~2 s) and kept."""
        with self._grammars_lock:
            if self._grammars is None:
                n_vocab = self.model.get_output_embeddings().weight.shape[0]  # the logits' width
                self._grammars = Grammars(self.tok, n_vocab, sorted(self.eos))
            return self._grammars

    def depth(self) -> int:
        """Requests waiting for a place in the batch."""
        return self.inbox.qsize() + len(self.waiting)

    def rate(self) -> float:
        """Tokens decoded per second of forwards so far (0 before the first)."""
        return self.stats["tokens"] / self.stats["decode_s"] if self.stats["decode_s"] else 0.0

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stop_flag.is_set():
            if not self._take():
                continue
            self.idle.clear()
            try:
                self.step()
            except Exception as exc:  # a fault in the scheduling itself: every row fails, the thread goes on
                log.exception("the engine's step failed")
                rows = list(self.waiting) + (self.prefilling.reqs if self.prefilling else [])
                rows += self.running.reqs if self.running else []
                self.waiting.clear()
                self.prefilling = self.running = None
                self._fail(rows, exc)
            if self.running is None and self.prefilling is None and not self.waiting:
                self.mixer.clear()
                self._mixed = None
                self.idle.set()

    def _take(self) -> bool:
        """Move the requests that arrived to `waiting`; with no work, wait for one (then gather for window_s).
        Returns whether there is work."""
        if self.running is None and self.prefilling is None and not self.waiting:
            try:
                self.waiting.append(self.inbox.get(timeout=0.5))
            except queue.Empty:
                return False
            deadline = time.perf_counter() + self.window_s
            while len(self.waiting) < self.max_batch:
                try:
                    self.waiting.append(self.inbox.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
        while True:
            try:
                self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                return True

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: drop cancelled rows, read a chunk of the newcomers' prompts (they join the batch when
        read), decode one token for every running row. A failed forward fails its rows, never the engine."""
        self._drop_cancelled()
        if self.prefilling is None:
            self._start_prefill()
        if self.prefilling is not None:
            group = self.prefilling
            try:
                self._prefill_chunk(group)
            except Exception as exc:
                self.prefilling = None
                self._fail(group.reqs, exc)
        if self.running is not None:
            batch = self.running
            try:
                self._decode_step(batch)
            except Exception as exc:
                self.running = None
                self._fail(batch.reqs, exc)

    # -- scheduling ---------------------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        """Rows whose client left end now, wherever they are: waiting, being read, or decoding."""
        for r in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(r)
            self._end(r, "cancelled")
        if self.prefilling is not None and any(r.cancelled for r in self.prefilling.reqs):
            p = self.prefilling
            keep = [b for b, r in enumerate(p.reqs) if not r.cancelled]
            for r in p.reqs:
                if r.cancelled:
                    self._end(r, "cancelled")
            if not keep:
                self.prefilling = None
            else:
                idx = torch.tensor(keep)
                p.reqs, p.ids, p.mask = [p.reqs[b] for b in keep], p.ids[idx], p.mask[idx]
                if p.cache is not None:
                    _select(p.cache, idx, 0)
        if self.running is not None and any(r.cancelled for r in self.running.reqs):
            for r in self.running.reqs:
                if r.cancelled:
                    self._end(r, "cancelled")
            self.running = _keep(self.running, [not r.cancelled for r in self.running.reqs])

    def _start_prefill(self) -> None:
        """Newcomers, as many as the batch has room for, left-padded into a group whose prompts are read next."""
        room = self.max_batch - (len(self.running.reqs) if self.running is not None else 0)
        if room <= 0 or not self.waiting:
            return
        reqs = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        width = max(len(r.prompt) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad, dtype=torch.long)  # (B, T) left-padded prompts
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for b, r in enumerate(reqs):
            ids[b, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[b, width - len(r.prompt) :] = 1
            r._gen = torch.Generator().manual_seed(r.seed) if r.seed is not None else None
        self.stats["rows"] += len(reqs)
        self.prefilling = Prefill(reqs, ids, mask)

    def _prefill_chunk(self, p: Prefill) -> None:
        """Read the group's next columns; after the last, each row picks its first token and the rows that go
        on join the running batch."""
        t0 = time.perf_counter()
        B, T = p.ids.shape
        end = min(T, p.done + max(1, self.prefill_tokens // B))
        pos = (p.mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) positions ignoring the padding
        logits, p.cache = self._forward(p.reqs, p.ids[:, p.done : end], p.mask[:, :end], pos[:, p.done : end], p.cache)
        p.done = end
        self.stats["prefills"] += 1
        if end == T:
            self.prefilling = None
            nxt, alive = self._advance(p.reqs, logits)
            joined = _keep(Batch(p.reqs, p.cache, p.mask, nxt), alive)
            self.running = _merge(self.running, joined) if joined is not None else self.running
        self.stats["decode_s"] += time.perf_counter() - t0

    def _decode_step(self, batch: Batch) -> None:
        """One token for every running row; rows that end leave the batch."""
        t0 = time.perf_counter()
        B = len(batch.reqs)
        batch.mask = torch.cat([batch.mask, torch.ones((B, 1), dtype=torch.long)], dim=1)  # (B, L + 1)
        pos = batch.mask.sum(-1, keepdim=True) - 1  # (B, 1) the new token's position: real tokens before it
        logits, batch.cache = self._forward(batch.reqs, batch.nxt[:, None], batch.mask, pos, batch.cache)
        batch.nxt, alive = self._advance(batch.reqs, logits)
        self.running = _keep(batch, alive)
        seconds = time.perf_counter() - t0
        self.stats["steps"] += 1
        self.stats["decode_s"] += seconds
        if self.on_step is not None:
            self.on_step(B, B, seconds)

    # -- the model ----------------------------------------------------------------------------------------------
    def _forward(self, reqs: list[Request], ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache):
        """One forward of rows `reqs` (ids (B, t), mask (B, L), positions (B, t)) with their mixture; returns the
        last position's logits (B, V) and the cache."""
        self._mix(reqs)
        kw = {self._cache_kw: cache} if cache is not None else {}
        res = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw, **self._last_only)
        cache = res["cache"] if "cache" in res else res["past_key_values"]
        _check_cache(cache)
        return res.logits[:, -1].float(), cache

    def _mix(self, reqs: list[Request]) -> None:
        """Weigh the gated layers for the forward's rows, unless they are weighed for these rows already."""
        key = tuple(r.serial for r in reqs)
        if key != self._mixed:
            live = (self.running.reqs if self.running else []) + (self.prefilling.reqs if self.prefilling else [])
            self.mixer.mix(reqs, live)
            self._mixed = key

    def _advance(self, reqs: list[Request], logits: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """Each row's next token from its logits (B, V), streamed; returns the tokens (B,) and which rows go on."""
        nxt = torch.full((len(reqs),), self.pad, dtype=torch.long)
        alive = []
        masked = mask_logits(logits, [r.constraint for r in reqs])  # (B, V) a grammar's disallowed tokens -inf
        for b, r in enumerate(reqs):
            if r.constraint is not None and r.constraint.error:
                r.error = f"the grammar failed: {r.constraint.error}"
                self._end(r, "error")
                alive.append(False)
                continue
            t = self._pick(masked[b], r)
            nxt[b] = t
            if r.logprobs is not None and t not in self.eos:
                lp = torch.log_softmax(logits[b], -1)  # (V,) the model's own distribution
                top = lp.topk(r.logprobs) if r.logprobs else None
                pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
                r.logprob_list.append(Logprob(t, float(lp[t]), pairs))
            alive.append(self._emit(r, t))
        return nxt, alive

    def _emit(self, r: Request, t: int) -> bool:
        """Take token t for row r: stream the text it completes, end the row on a stop token or string or at
        max_tokens. Returns whether the row goes on."""
        if t in self.eos:
            self._end(r, "stop")
            return False
        if r.constraint is not None and not r.constraint.consume(t):  # masked out, so only a grammar fault
            r.error = f"the grammar failed: {r.constraint.error}"
            self._end(r, "error")
            return False
        r.tokens.append(t)
        r.completion_tokens = len(r.tokens)
        self.stats["tokens"] += 1
        text = self.tok.decode(r.tokens, skip_special_tokens=True)
        cut = _stop_at(text, r.stop)
        if cut is not None:
            text = text[:cut]
        if len(text) > len(r.text) and not text.endswith("\ufffd"):  # whole characters only
            r.emit(Piece(text[len(r.text) :], len(r.tokens)))
            r.text = text
        if cut is not None or (r.constraint is not None and r.constraint.stopped):  # a grammar's reply is whole
            self._end(r, "stop")
            return False
        if len(r.tokens) >= r.max_tokens:
            self._end(r, "length")
            return False
        return True

    def _pick(self, logits: torch.Tensor, r: Request) -> int:
        """Greedy at temperature 0 (the paper's decoding) or below 1e-4 (where logits / T overflows float32),
        else nucleus sampling, always keeping the most likely token (a top_p too small to keep any)."""
        if r.temperature < 1e-4:
            return int(logits.argmax())
        p = torch.softmax(logits.double() / r.temperature, dim=-1)
        if r.top_p < 1:
            sp, si = p.sort(descending=True)
            keep = sp.cumsum(-1) - sp < r.top_p
            keep[0] = True
            p = torch.zeros_like(p).scatter(0, si[keep], sp[keep])
        if not torch.isfinite(p).all() or p.sum() <= 0:
            return int(logits.argmax())
        return int(torch.multinomial(p, 1, generator=r._gen))

    # -- ending rows --------------------------------------------------------------------------------------------
    def _end(self, r: Request, reason: str) -> None:
        """Finish a row: emit the text held back so far (a last character whose bytes never completed is final
        now, and shown as the library's decode shows it, "\ufffd"), then END; call its on_end."""
        if reason != "cancelled":
            text = self.tok.decode(r.tokens, skip_special_tokens=True)
            cut = _stop_at(text, r.stop)
            text = text if cut is None else text[:cut]
            if len(text) > len(r.text) and text.startswith(r.text):
                r.emit(Piece(text[len(r.text) :], len(r.tokens)))
                r.text = text
        else:
            self.stats["cancelled"] += 1
        r.finish_reason = reason
        r.emit(END)
        r.done.set()
        if r.on_end is not None:
            try:
                r.on_end()
            except Exception:  # the server's bookkeeping must not stop the engine
                log.exception("a request's on_end failed")

    def _fail(self, reqs: list[Request], exc: Exception) -> None:
        """A forward failed: its rows end with the error (the other rows and the engine go on)."""
        self._mixed = None
        self.mixer.clear()
        for r in reqs:
            if r.finish_reason is None:
                r.error = f"{type(exc).__name__}: {exc}"
                self._end(r, "error")


class Mixer:
    """The per-row gated mixture of the engine's forwards. Attaching adapters (stacking their A and B in every
    gated layer) costs about a third of a 16-row decode step for 16 rank-32 adapters on SmolLM2, so it is done
    for the adapters of all live rows (decoding or being read) at once, and a forward over some of those rows
    only re-weighs them (GatedLoRALinear.mix with (B, N) weights, zero for the adapters a row does not use).
    Adapters are attached again only when a row needs one that is not attached, or when more of the attached
    ones belong to rows that left than to live rows (each costs ~2% of a forward while attached). When no live
    row uses a memory, nothing is attached: the bare model."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.adapters: list = []  # attached, in order
        self.where: dict[int, int] = {}  # id(adapter) -> its column
        self.slots: list[tuple] = []  # (gated layer, the columns of the adapters it holds)

    def clear(self) -> None:
        clear(self.model)
        self.adapters, self.where, self.slots = [], {}, []

    def mix(self, reqs: list[Request], live: list[Request]) -> None:
        """Weigh the layers for rows `reqs` (a forward's), attaching the adapters of `live` first if needed."""
        needed = {id(a) for r in reqs for a in r.adapters}
        if not needed and not self.adapters:
            return  # the bare model
        in_use = _union(live + reqs)
        if not needed.issubset(self.where) or len(self.adapters) > 2 * len(in_use):
            self.attach(in_use)
        w = torch.zeros(len(reqs), len(self.adapters))  # (B, N)
        for b, r in enumerate(reqs):
            for a, x in zip(r.adapters, r.weights, strict=True):
                w[b, self.where[id(a)]] += x
        for layer, cols in self.slots:
            layer.mix(w[:, cols])

    def attach(self, adapters: list) -> None:
        """Stack `adapters` in the gated layers (each layer holds those that adapt it: inject.set_mixture)."""
        self.clear()
        if not adapters:
            return
        set_mixture(self.model, adapters, torch.ones(len(adapters)))
        self.adapters, self.where = adapters, {id(a): i for i, a in enumerate(adapters)}
        for name, layer in gated_layers(self.model).items():
            cols = [i for i, a in enumerate(adapters) if name in a.weights]
            if cols:
                self.slots.append((layer, torch.tensor(cols)))


def _union(reqs: list[Request]) -> list:
    """The adapters the rows use, once each, in order of first use."""
    out, seen = [], set()
    for r in reqs:
        for a in r.adapters:
            if id(a) not in seen:
                seen.add(id(a))
                out.append(a)
    return out


# -- the KV cache: rows leave (index-select), groups join (left-pad, concatenate) ------------------------------------
def _check_cache(cache) -> None:
    """The engine edits the cache's tensors directly: every layer must be a plain DynamicLayer (B, H, L, D)."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise RuntimeError(f"the engine batches models with a plain full-attention KV cache only, not {kinds}")


def _select(cache, idx: torch.Tensor, start: int) -> None:
    """Keep the cache rows `idx` (B',) and the time columns from `start` on."""
    for layer in cache.layers:
        layer.keys = layer.keys[idx, :, start:]
        layer.values = layer.values[idx, :, start:]


def _keep(batch: Batch, alive: list[bool]) -> Batch | None:
    """The batch with only the rows that go on (None if none does), without the padding columns at the left
    that no remaining row attends to."""
    if all(alive):
        return batch
    keep = [b for b, a in enumerate(alive) if a]
    if not keep:
        return None
    idx = torch.tensor(keep)
    mask = batch.mask[idx]  # (B', L)
    start = int(mask.any(0).nonzero()[0])  # the first column some remaining row attends to
    _select(batch.cache, idx, start)
    return Batch([batch.reqs[b] for b in keep], batch.cache, mask[:, start:], batch.nxt[idx])


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """t with n zeros prepended along dim."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _merge(running: Batch | None, joined: Batch) -> Batch:
    """The running batch with the newcomers' rows after its own: the shorter cache and mask left-padded to one
    length (masked: no row attends to padding), then concatenated along the batch axis."""
    if running is None:
        return joined
    L = max(running.mask.shape[1], joined.mask.shape[1])
    a, b = L - running.mask.shape[1], L - joined.mask.shape[1]
    for la, lb in zip(running.cache.layers, joined.cache.layers, strict=True):
        la.keys = torch.cat([_pad_left(la.keys, a, 2), _pad_left(lb.keys, b, 2)], dim=0)  # (B + B', H, L, D)
        la.values = torch.cat([_pad_left(la.values, a, 2), _pad_left(lb.values, b, 2)], dim=0)
    mask = torch.cat([_pad_left(running.mask, a, 1), _pad_left(joined.mask, b, 1)], dim=0)  # (B + B', L)
    return Batch(running.reqs + joined.reqs, running.cache, mask, torch.cat([running.nxt, joined.nxt]))


def _stop_at(text: str, stops: list[str]) -> int | None:
    """Where the first stop string starts in `text`, or None."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
