"""The batching engine: requests that arrive together are decoded together, each row with its own mixture.

One thread owns the serving model. It takes the requests waiting (up to `max_batch`, gathering for `window_s`
after the first), left-pads their prompts, sets the per-row gated mixture (inject.set_mixture with (B, N)
weights: row b computes W0·x + Σ_i w[b, i]·s_i·B_i·A_i·x) and decodes them in one forward per token with a KV
cache, streaming each row's text as it grows. This is S-LoRA / Punica's many-adapters-in-one-batch idea, for
weighted mixtures. Rows whose gate chose no memory carry zero weights; a batch where no row uses a memory runs
the bare model. Each request's mixture is decoded as given: the answer pipeline (megamem.answer.mixture) has
already dropped the terms under the min weight, one rule for every interface. Requests that arrive while a batch
decodes wait for the next one. A row decodes as the library's greedy `generate` does (one prompt, its positions
counted from its first real token, the same stop tokens), so a chat and Memory.ask answer with the same text.

    engine = Engine(model, tok); engine.start()
    req = engine.submit(prompt_ids, adapters, weights, max_tokens=64)
    for piece in req.pieces(): print(piece, end="")
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..inject import clear, set_mixture

END = object()  # the marker a request's stream ends with


@dataclass
class Request:
    """One completion to decode. Tokens arrive through `emit` (thread-safe; the server hands it an asyncio
    queue's put) as text pieces, then END; `finish_reason` and the token counts are set before END."""

    prompt: list[int]
    adapters: list = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    emit: Callable[[object], None] | None = None
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    _q: queue.Queue | None = None

    def pieces(self):
        """The text pieces as they are decoded (for callers without an event loop)."""
        while True:
            item = self._q.get()
            if item is END:
                return
            yield item


class Engine(threading.Thread):
    """The serving model's one thread; see the module docstring. `stats` counts what /metrics reports."""

    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        max_batch: int = 16,
        window_s: float = 0.005,
        batched: bool = True,
    ) -> None:
        super().__init__(name="megamem-engine", daemon=True)
        self.model, self.tok = model, tok
        self.max_batch = max_batch if batched else 1
        self.window_s = window_s
        self.inbox: queue.Queue[Request] = queue.Queue()
        self.idle = threading.Event()  # set while no batch decodes: the trainer waits on it between steps
        self.idle.set()
        self.stop_flag = threading.Event()
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [tok.eos_token_id])
        self.stats = {"batches": 0, "rows": 0, "tokens": 0, "decode_s": 0.0}
        self.on_batch: Callable[[int, int, float], None] | None = None  # (rows, tokens, seconds) after each batch
        # transformers 5 renamed the forward's KV-cache argument from past_key_values to cache
        params = inspect.signature(type(model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def submit(self, prompt: list[int], adapters: list, weights: list[float], **kw) -> Request:
        req = Request(prompt, list(adapters), list(weights), **kw)
        if req.emit is None:
            req._q = queue.Queue()
            req.emit = req._q.put
        self.inbox.put(req)
        return req

    def depth(self) -> int:
        return self.inbox.qsize()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            try:
                first = self.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.perf_counter() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.inbox.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
            batch = [r for r in batch if not r.cancelled]
            if not batch:
                continue
            self.idle.clear()
            try:
                self.decode(batch)
            except Exception as exc:  # a failed batch fails its requests, never the engine
                for r in batch:
                    if r.finish_reason is None:
                        r.error = f"{type(exc).__name__}: {exc}"
                        r.finish_reason = "error"
                        r.emit(END)
                        r.done.set()
            finally:
                clear(self.model)
                self.idle.set()

    def _mixture(self, batch: list[Request]) -> tuple[list, torch.Tensor | None]:
        """The adapters any row uses (once each) and the (B, N) weights; None when no row uses one. A row's terms
        are taken as given (the answer pipeline applied the min-weight rule); zero weights cost nothing
        (inject.set_mixture leaves out adapters no row weighs)."""
        adapters: list = []
        where: dict[int, int] = {}
        for r in batch:
            for a in r.adapters:
                if id(a) not in where:
                    where[id(a)] = len(adapters)
                    adapters.append(a)
        if not adapters:
            return [], None
        w = torch.zeros(len(batch), len(adapters))
        for b, r in enumerate(batch):
            for a, x in zip(r.adapters, r.weights, strict=True):
                w[b, where[id(a)]] += x
        return adapters, w

    @torch.no_grad()
    def decode(self, batch: list[Request]) -> None:
        t0 = time.perf_counter()
        B = len(batch)
        width = max(len(r.prompt) for r in batch)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        x = torch.full((B, width), pad, dtype=torch.long)  # (B, T) left-padded prompts
        mask = torch.zeros((B, width), dtype=torch.long)
        for b, r in enumerate(batch):
            x[b, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[b, width - len(r.prompt) :] = 1
        adapters, w = self._mixture(batch)
        if w is None:
            clear(self.model)
        else:
            set_mixture(self.model, adapters, w)
        gens = [torch.Generator().manual_seed(r.seed) if r.seed is not None else None for r in batch]
        out: list[list[int]] = [[] for _ in batch]
        live = [True] * B
        past = None
        steps = max(r.max_tokens for r in batch)
        ids = x
        for _ in range(steps):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]  # (B, t) positions ignoring the padding
            kw = {self._cache_kw: past} if past is not None else {}
            res = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
            past = res["cache"] if "cache" in res else res["past_key_values"]
            logits = res.logits[:, -1].float()  # (B, V)
            nxt = torch.empty(B, dtype=torch.long)
            for b, r in enumerate(batch):
                nxt[b] = self._pick(logits[b], r, gens[b]) if live[b] else pad
            for b, r in enumerate(batch):
                if not live[b]:
                    continue
                t = int(nxt[b])
                if t in self.eos:
                    self._end(r, "stop", out[b])
                    live[b] = False
                    continue
                out[b].append(t)
                r.completion_tokens = len(out[b])
                text = self.tok.decode(out[b], skip_special_tokens=True)
                cut = _stop_at(text, r.stop)
                if cut is not None:
                    text = text[:cut]
                if len(text) > len(r.text) and not text.endswith("\ufffd"):  # whole characters only
                    r.emit(text[len(r.text) :])
                    r.text = text
                if cut is not None:
                    self._end(r, "stop", out[b])
                    live[b] = False
                elif len(out[b]) >= r.max_tokens or r.cancelled:
                    self._end(r, "length", out[b])
                    live[b] = False
            if not any(live):
                break
            ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], dim=1)
        for b, r in enumerate(batch):
            if live[b]:
                self._end(r, "length", out[b])
        self.stats["batches"] += 1
        self.stats["rows"] += B
        self.stats["tokens"] += sum(len(o) for o in out)
        self.stats["decode_s"] += time.perf_counter() - t0
        if self.on_batch is not None:
            self.on_batch(B, sum(len(o) for o in out), time.perf_counter() - t0)

    def _pick(self, logits: torch.Tensor, r: Request, gen: torch.Generator | None) -> int:
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
        return int(torch.multinomial(p, 1, generator=gen))

    def _end(self, r: Request, reason: str, tokens: list[int]) -> None:
        """Finish a row: emit the text held back so far (a last character whose bytes never completed is final
        now, and shown as the library's decode shows it, "\ufffd"), then END."""
        text = self.tok.decode(tokens, skip_special_tokens=True)
        cut = _stop_at(text, r.stop)
        text = text if cut is None else text[:cut]
        if len(text) > len(r.text) and text.startswith(r.text):
            r.emit(text[len(r.text) :])
            r.text = text
        r.finish_reason = reason
        r.emit(END)
        r.done.set()


def _stop_at(text: str, stops: list[str]) -> int | None:
    """Where the first stop string starts in `text`, or None."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
