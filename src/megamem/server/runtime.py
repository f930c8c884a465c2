"""The server's parts: how it runs (ServerConfig), what it holds (Server: the serving Memory and its lock, the
engine, the job queue and its training worker, the key table, the metrics), and what a namespace may see.

The parts load in the background (Server.load, started by the app's lifespan); until `ready` is set every
route but /healthz and /metrics answers 503 (megamem.server.auth.ready).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .. import schema
from ..answer import MIN_WEIGHT
from ..backend import SERVE, require
from ..errors import MegamemError
from ..memory import Item, Memory
from ..store import Record
from ..train import Recipe
from . import tenants
from .db import connect
from .engine import Engine
from .errors import not_found
from .jobs import Job, JobQueue, Worker
from .tenants import Principal
from .views import matches_filters

log = logging.getLogger("megamem.server")


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs. open_access: no API keys, every caller is the default namespace (loopback use).
    min_weight: the answer pipeline's rule (megamem.answer.mixture), which chat passes to Memory.gated."""

    store: Path
    open_access: bool = False
    max_batch: int = 16
    batched: bool = True
    window_s: float = 0.005
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
        self.batch = Histogram("megamem_batch_rows", "rows per decoded batch", registry=r, buckets=(1, 2, 4, 8, 16, 32))

    def observe_batch(self, rows: int, tokens: int, seconds: float) -> None:
        """The engine's report after each batch (Engine.on_batch)."""
        self.batch.observe(rows)
        self.decode.inc(seconds)


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
        self._trainer: Memory | None = None  # the training worker's own Memory, made on its first job

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
            self.engine = Engine(model, tok, self.cfg.max_batch, self.cfg.window_s, self.cfg.batched)
            self.engine.on_batch = self.metrics.observe_batch
            self.engine.start()
            if self.cfg.worker:
                self.worker = Worker(self.cfg.store, self.train, lease_s=self.cfg.lease_s)
                self.worker.start()
            self.ready.set()
        except Exception as exc:  # reported by /healthz and the first request
            self.failed = str(exc) if isinstance(exc, MegamemError) else f"{type(exc).__name__}: {exc}"
            log.error("megamem serve could not start: %s", self.failed)

    def close(self) -> None:
        """Ask the engine and the worker to stop (they are daemon threads: the process never waits on them)."""
        if self.engine is not None:
            self.engine.stop_flag.set()
        if self.worker is not None:
            self.worker.stop.set()
            self.worker.wake.set()

    # -- the training worker's job ------------------------------------------------------------------------------
    def train(self, job: Job, progress) -> None:
        """Learn a job's memory with the worker's own Memory (its own model copy, so the engine's model state is
        never touched), pausing between steps while the engine decodes (chat stays responsive)."""
        if self._trainer is None:
            self._trainer = Memory(self.cfg.store, recipe=self.cfg.recipe)
        trainer = self._trainer
        rec = trainer.store.get(job.memory_id, missing_ok=True) if trainer.store is not None else None
        if rec is not None:  # (one this job committed is marked succeeded by JobQueue.claim, never handed here)
            raise MegamemError(f"a memory with id {schema.api_id(rec)!r} already exists")
        req = job.request
        item = Item(
            req["text"],
            req.get("paraphrases", []),
            req.get("metadata", {}),
            job.memory_id,
            origin=f"job {job.id}",
            replaces=req.get("replaces", []),
            reserved={schema.NAMESPACE: job.namespace, schema.JOB: job.id}
            | ({schema.USER: req["user_id"]} if req.get("user_id") else {})
            | ({schema.AGENT: req["agent_id"]} if req.get("agent_id") else {}),
        )

        def on_step(step: int, total: int, loss: float) -> None:
            """Report progress, then let a waiting chat batch go first."""
            progress(step, total)
            if self.engine is not None:
                self.engine.idle.wait(self.cfg.train_pause_s)

        trainer.add_many([item], on_step=on_step)

    # -- what a namespace may see ---------------------------------------------------------------------------------
    def scope(
        self,
        p: Principal,
        user_id: str | None = None,
        agent_id: str | None = None,
        ids: list[str] | None = None,
        filters: dict | None = None,
    ) -> list[Record]:
        """The caller's memories, narrowed by user, agent, ids and metadata filters (call under the lock)."""
        wanted = {schema.stored_id(p.namespace, i) for i in ids} if ids is not None else None
        out = []
        for r in self.mem.list():
            if not schema.owns(p.namespace, r):
                continue
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

    def owned(self, p: Principal, memory_id: str) -> Record:
        """The caller's memory by API id, or 404 (another namespace's memory is as absent as a missing one)."""
        try:
            api = schema.check_api_id(memory_id)
        except MegamemError:
            raise not_found("memory", memory_id) from None
        rec = self.mem.store.get(schema.stored_id(p.namespace, api), missing_ok=True) if self.mem.store else None
        if rec is None or not schema.owns(p.namespace, rec):
            raise not_found("memory", memory_id)
        return rec
