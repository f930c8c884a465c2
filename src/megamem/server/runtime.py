"""The server's parts: how it runs (ServerConfig), what it holds (Server: the serving Memory and its lock, the
engine, the job queue and its training worker, the key table, the metrics), and what a namespace may see.

The parts load in the background (Server.load, started by the app's lifespan); until `ready` is set every
route but /healthz and /metrics answers 503 (megamem.server.auth.ready).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .. import schema
from ..answer import MIN_WEIGHT, Gated
from ..backend import SERVE, require
from ..errors import MegamemError
from ..gate import GateConfig
from ..learn import learn
from ..memory import Item, Memory
from ..store import Record
from ..train import Recipe
from . import tenants
from .db import connect
from .engine import PREFILL_TOKENS, Engine
from .errors import ApiError, not_found
from .history import Event
from .jobs import Cancelled, Job, JobQueue, Worker
from .pending import FAILED, LEARNING, LearningKeys, Pending, View, hidden_by, merge, with_learning
from .tenants import Principal
from .views import matches_filters

log = logging.getLogger("megamem.server")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # the Host names a loopback server answers by default
CANCEL_CHECK_S = 0.5  # how often a training job looks whether it was cancelled (one SQLite read)


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs. open_access: no API keys, every caller is the default namespace (loopback use).
    min_weight: the answer pipeline's rule (megamem.answer.mixture), which chat passes to Memory.gated.

    Fairness (what one caller may hold of the engine; docs/server.md):
      max_tokens_cap: the largest max_tokens a chat may ask (400 above it), and never more than the model's
        context. 4096: OpenAI-compatible servers' usual ceiling, ~2.5 min of SmolLM2-135M on 2 cores.
      key_chats: chats one API key may have waiting or decoding at once (429 beyond). 8: half the engine's 16
        rows, so one key can never fill the batch by itself, while a client library's usual pool of a few
        parallel requests fits.
      key_tokens: max_tokens one key may have waiting or decoding, summed (429 beyond). 16,384: four chats at
        the cap, or the 8 chats at 2,048, so one key's long answers cannot hold the engine for hours; a key
        with nothing in flight is always admitted, whatever its max_tokens.
    Under --open every caller is one caller. allowed_hosts: the Host names served (any port), others 400 (a
    DNS-rebinding page in a browser names its own host); the loopback names by default, so an app made by
    create_app is safe as it comes; None: no check at all; `megamem serve` gives the loopback names and its
    --allowed-hosts."""

    store: Path
    open_access: bool = False
    max_batch: int = 16
    batched: bool = True
    window_s: float = 0.005
    prefill_tokens: int = PREFILL_TOKENS
    max_tokens_cap: int = 4096
    key_chats: int = 8
    key_tokens: int = 16_384
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
    min_weight: float = MIN_WEIGHT
    max_body: int = 1_000_000
    max_waiting_jobs: int = 64
    lease_s: float = 60.0
    train_pause_s: float = 2.0  # the longest one training step waits for the engine to go idle
    worker: bool = True
    recipe: Recipe | None = None  # how jobs learn (default: the product's recipe)


class Metrics:
    """What /metrics reports, in a registry of the server's own (two servers in one process never mix)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("megamem_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("megamem_request_seconds", "request latency", ["route"], registry=r)
        self.tokens = Counter("megamem_generated_tokens", "completion tokens generated", registry=r)
        self.decode = Counter("megamem_decode_seconds", "seconds the engine spent decoding", registry=r)
        self.tps = Gauge("megamem_tokens_per_second", "generated tokens per decoding second", registry=r)
        self.queue = Gauge("megamem_job_queue_depth", "injection jobs queued or running", registry=r)
        self.engine = Gauge("megamem_engine_queue_depth", "chat requests waiting for the engine", registry=r)
        self.batch = Histogram("megamem_batch_rows", "rows per decode step", registry=r, buckets=(1, 2, 4, 8, 16, 32))
        self.refused = Counter("megamem_chats_refused", "chats refused by a key's limits (429)", registry=r)

    def observe_step(self, rows: int, tokens: int, seconds: float) -> None:
        """The engine's report after each decode step (Engine.on_step)."""
        self.batch.observe(rows)
        self.decode.inc(seconds)


class Limits:
    """Per-key admission of chats: at most `chats` in flight (waiting or decoding) and `tokens` of their
    max_tokens summed; beyond, 429 with a Retry-After estimated from the engine's decode rate. admit() returns
    the chat's release (call it once the chat ends; calling it again does nothing)."""

    def __init__(self, chats: int, tokens: int) -> None:
        self.chats, self.tokens = chats, tokens
        self.lock = threading.Lock()
        self.held: dict[str, dict[int, int]] = {}  # key -> {ticket: max_tokens}
        self._next = 0

    def admit(self, key: str, tokens: int, rate: float) -> Callable[[], None]:
        """Admit a chat of `tokens` max_tokens for `key` (rate: the engine's tokens per second, 0 if unknown)."""
        with self.lock:
            held = self.held.setdefault(key, {})
            reason, wait = None, 0
            if len(held) >= self.chats:
                reason = f"this API key has {len(held)} chats in flight; the limit is {self.chats}"
                wait = min(held.values())
            elif held and sum(held.values()) + tokens > self.tokens:
                reason = (
                    f"this API key has {sum(held.values())} max_tokens in flight; with {tokens} more it exceeds "
                    f"the limit of {self.tokens}"
                )
                wait = sum(held.values()) + tokens - self.tokens
            if reason is None:
                self._next += 1
                ticket = self._next
                held[ticket] = tokens
                return lambda: self._release(key, ticket)
        retry = min(60, max(1, math.ceil(wait / (rate or 20.0))))  # seconds for that many tokens to decode
        raise ApiError(
            429,
            f"{reason}; retry after {retry} s",
            "rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry)},
        )

    def _release(self, key: str, ticket: int) -> None:
        with self.lock:
            held = self.held.get(key, {})
            held.pop(ticket, None)
            if not held:
                self.held.pop(key, None)


class Server:
    """The parts: loaded in the background (healthz says 503 until `ready`)."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.ready = threading.Event()
        self.failed: str | None = None
        self.lock = threading.RLock()  # the serving Memory and the shared connections are not thread-safe
        self.mem: Memory | None = None
        self.engine: Engine | None = None
        self.worker: Worker | None = None
        self.db = None
        self.queue: JobQueue | None = None
        self.metrics = Metrics()
        self.limits = Limits(cfg.key_chats, cfg.key_tokens)
        self._trainer: Memory | None = None  # the training worker's own Memory, made on its first job
        self.learning_keys = LearningKeys()  # the keys of memories being learned (megamem.server.pending)
        self._loader: threading.Thread | None = None

    # -- start-up -----------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Open the store, load the model, start the engine and the worker; a failure is kept for /healthz and
        every request to report (the process stays up to say why)."""
        try:
            mem = Memory(self.cfg.store)
            require(mem, SERVE, "megamem serve")  # the store says what it can do (megamem.backend)
            if mem.key_function == "activation":  # its keys run the serving model, which the engine owns
                raise MegamemError("megamem serve needs a store keyed by the sentence embedder, not 'activation'")
            model, tok = mem.load()
            mem.prepare_store()
            self.db = connect(self.cfg.store)
            if not self.cfg.open_access and not tenants.has_keys(self.db):
                raise MegamemError(
                    f"the store has no API keys; create one (`megamem keys create --store {self.cfg.store} "
                    "--namespace NAME`) or serve with --open (no keys, loopback only)"
                )
            self.queue = JobQueue(self.cfg.store, self.cfg.lease_s, max_waiting=self.cfg.max_waiting_jobs)
            self.mem = mem
            cfg = self.cfg
            self.engine = Engine(model, tok, cfg.max_batch, cfg.window_s, cfg.batched, cfg.prefill_tokens)
            self.engine.on_step = self.metrics.observe_step
            self.engine.start()
            if self.cfg.worker:
                self.worker = Worker(self.cfg.store, self.train, lease_s=self.cfg.lease_s)
                self.worker.start()
            self.ready.set()
        except Exception as exc:  # reported by /healthz and the first request
            self.failed = str(exc) if isinstance(exc, MegamemError) else f"{type(exc).__name__}: {exc}"
            log.error("megamem serve could not start: %s", self.failed)

    def start(self) -> None:
        """Load in a background thread (healthz answers 503 meanwhile)."""
        self._loader = threading.Thread(target=self.load, name="megamem-load", daemon=True)
        self._loader.start()

    def close(self, wait_s: float = 60.0) -> None:
        """Stop the engine and the worker and wait (up to `wait_s` each) for them and for a load still running:
        a stopped app leaves nothing behind that still loads a model or decodes (a load beside another in one
        process is unsafe, see model.LOAD_LOCK; an app made and dropped in a test must not leak one)."""
        if self._loader is not None:
            self._loader.join(wait_s)
        threads = [t for t in (self.engine, self.worker) if t is not None]
        if self.engine is not None:
            self.engine.stop_flag.set()
        if self.worker is not None:
            self.worker.stop.set()
            self.worker.wake.set()
        for t in threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(wait_s)
                if t.is_alive():
                    log.warning("megamem serve: %s did not stop within %.0f s", t.name, wait_s)

    # -- the training worker's job ------------------------------------------------------------------------------
    def train(self, job: Job, progress) -> None:
        """Learn a job's memory with the worker's own Memory (its own model copy, so the engine's model state is
        never touched), pausing between steps while the engine decodes (chat stays responsive), then commit it
        under the serving lock if the job still stands: a delete (or a newer update) that cancelled it while it
        trained wins, and is seen within CANCEL_CHECK_S of training. An update (request["update"]) learns a new
        version under the memory's id; the old one is forgotten as the new one is committed (a crash between
        the two leaves the job running, so the restart learns it again: the memory is never lost, only late)."""
        if self._trainer is None:
            self._trainer = Memory(self.cfg.store, recipe=self.cfg.recipe)
        trainer = self._trainer
        req = job.request
        update = bool(req.get("update"))
        rec = trainer.store.get(job.memory_id, missing_ok=True) if trainer.store is not None else None
        if rec is not None and not update:  # (one this job committed is marked succeeded by JobQueue.claim)
            raise MegamemError(f"a memory with id {schema.api_id(rec)!r} already exists")
        replaces = req.get("replaces", [])
        if update and trainer.store is not None:  # the old version's replacements, those still stored
            replaces = [i for i in replaces if trainer.store.get(i, missing_ok=True) is not None]
        item = Item(
            req["text"],
            req.get("paraphrases", []),
            req.get("metadata", {}),
            None if update else job.memory_id,  # an update's id is stored already: validate checks the rest
            origin=f"job {job.id}",
            replaces=replaces,
            reserved={schema.NAMESPACE: job.namespace, schema.JOB: job.id}
            | ({schema.USER: req["user_id"]} if req.get("user_id") else {})
            | ({schema.AGENT: req["agent_id"]} if req.get("agent_id") else {})
            | ({schema.RUN: req["run_id"]} if req.get("run_id") else {}),
        )
        checked = replace(trainer.validate([item])[0], id=job.memory_id)
        last_check = time.monotonic()

        def on_step(step: int, total: int, loss: float) -> None:
            """Report progress, stop if the job was cancelled, then let the chats being decoded go first (at
            most train_pause_s)."""
            nonlocal last_check
            progress(step, total)
            if time.monotonic() - last_check > CANCEL_CHECK_S:
                last_check = time.monotonic()
                self._check_stands(job)
            if self.engine is not None:
                self.engine.idle.wait(self.cfg.train_pause_s)

        trainer.prepare_store()
        model, tok = trainer.load()
        texts = [[checked.text, *checked.paraphrases]]
        learned = learn(model, tok, texts, trainer.lora, trainer.recipe, trainer.key_function, on_step)[0]
        with self.lock:  # the routes change memories under this lock too: the job's state is final while we commit
            self._check_stands(job)
            if update and trainer.store.get(job.memory_id, missing_ok=True) is not None:
                trainer.forget(job.memory_id)
            trainer.commit(checked, learned.adapter, learned.keys)

    def _check_stands(self, job: Job) -> None:
        """Cancelled (a MegamemError: the job is not retried) unless the job is still running."""
        with self.lock:
            state = self.queue.state(job.id)
        if state != "running":
            raise Cancelled(f"job {job.id} was {state or 'removed'} while it trained; its memory was not stored")

    # -- what a namespace may see ---------------------------------------------------------------------------------
    def scope(
        self,
        p: Principal,
        user_id: str | None = None,
        agent_id: str | None = None,
        ids: list[str] | None = None,
        filters: dict | None = None,
        pending: bool = False,
        failed: bool = False,
    ) -> list[View]:
        """The caller's memories, narrowed by user, agent, ids and metadata filters (call under the lock).
        pending: with the memories being learned (megamem.server.pending: a newer version being learned stands
        for its stored one); failed: with those whose learning failed too. Without either: stored ones only."""
        jobs = []
        if pending or failed:  # read before the stored records (pending.merge says why)
            states = {s for s, wanted in ((LEARNING, pending), (FAILED, failed)) if wanted}
            jobs = [j for j in self.queue.latest(p.namespace) if Pending.of(j).state in states]
        wanted = {schema.stored_id(p.namespace, i) for i in ids} if ids is not None else None
        out = []
        for r in merge([r for r in self.mem.list() if schema.owns(p.namespace, r)], jobs):
            if user_id is not None and r.metadata.get(schema.USER) != user_id:
                continue
            if agent_id is not None and r.metadata.get(schema.AGENT) != agent_id:
                continue
            if wanted is not None and r.id not in wanted:
                continue
            if filters and not matches_filters(schema.user_metadata(r.metadata), filters):
                continue
            out.append(r)
        return out

    def split_learning(self, scope: list[View]) -> tuple[list[Record], list[Pending]]:
        """A scope's stored memories, less those that a memory being learned replaces (the recency rule applies
        from the moment a memory is added), and its memories being learned (failed ones are neither)."""
        learning = [r for r in scope if isinstance(r, Pending) and r.state == LEARNING]
        hidden = hidden_by(learning)
        return [r for r in scope if isinstance(r, Record) and r.id not in hidden], learning

    def with_learning(
        self, g: Gated, question: str, mode: str, cfg: GateConfig, stored: list[Record], learning: list[Pending]
    ) -> Gated:
        """The gate `g` over the stored memories, with the memories being learned taking part as their text
        (pending.with_learning). Call under the lock."""
        only = frozenset(r.id for r in stored)
        return with_learning(self.mem, g, question, mode, cfg, only, learning, self.learning_keys)

    def owned(self, p: Principal, memory_id: str) -> Record:
        """The caller's stored memory by API id, or 404 (another namespace's memory is as absent as a missing
        one)."""
        return self.view(p, memory_id, pending=False)  # type: ignore[return-value]  (without jobs: a Record)

    def view(self, p: Principal, memory_id: str, pending: bool = True) -> View:
        """The caller's memory by API id as the routes show it (stored, being learned or failed: pending.merge;
        pending False: stored only), or 404 (another namespace's memory is as absent as a missing one). Call
        under the lock."""
        try:
            api = schema.check_api_id(memory_id)
        except MegamemError:
            raise not_found("memory", memory_id) from None
        sid = schema.stored_id(p.namespace, api)
        jobs = self.queue.latest(p.namespace, sid) if pending else []
        rec = self.mem.store.get(sid, missing_ok=True) if self.mem.store else None
        stored = [rec] if rec is not None and schema.owns(p.namespace, rec) else []
        views = merge(stored, jobs)
        if not views:
            raise not_found("memory", memory_id)
        return views[0]

    def delete(self, p: Principal, rec: View) -> None:
        """Delete one of the caller's memories (as `view` or `scope` found it, under the lock): its unfinished or
        failed jobs are cancelled and the DELETE event recorded in one transaction, then its stored version is
        forgotten for good. In that order: a job that outlived the delete would store the memory again."""
        meta = schema.user_metadata(rec.metadata)
        meta.pop(schema.PARAPHRASES, None)  # (shown beside the metadata, never in it: views.memory_json)
        event = Event(
            p.namespace, rec.id, "DELETE", rec.text, None, user_id=rec.metadata.get(schema.USER), metadata=meta
        )
        self.queue.cancel(rec.id, "deleted before it was learned", event)
        if self.mem.store is not None and self.mem.store.get(rec.id, missing_ok=True) is not None:
            self.mem.forget(rec.id)
