"""Injection spread over a Ray cluster: workers learn adapters, the driver alone writes the store.

Learning a memory is independent of every other memory (one adapter each, base weights frozen), so a cluster
only has to hand out texts and gather adapters. Ray does the handing out and the recovery: one actor per
worker slot loads the model once and learns memory after memory; an actor that dies is restarted by Ray and
its task run again (max_restarts / max_task_retries). The driver commits each finished memory through
Memory.commit, the same crash-safe one-writer path as a local add, so the store never sees a worker.

Exactly once: every memory gets its id on the driver before any work is sent, and a result is committed
only for an id not committed yet, so a task that Ray runs twice (a worker killed after it finished but
before its result arrived) stores one memory. A memory whose task still fails after the retries is not
stored and is named in the error; the ones committed before stay.

    >>> from megamem import Item, Memory
    >>> mem = Memory("store")                                    # doctest: +SKIP
    >>> add_many_ray(mem, [Item("Ann Lee is a Welsh chemist.")], "local", workers=2)  # doctest: +SKIP

Limits: the driver loads the model too (to check that every text fits before anything is sent); workers
must reach the same model name or path; results travel through Ray's object store (an adapter at the
default spec is ~1.2 MB).
"""

from __future__ import annotations

import os
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import replace

import torch

from ..adapters import Adapter, LoraSpec
from ..errors import MegamemError
from ..items import Item
from ..store import Record

RETRIES = 3  # restarts of a dead worker and re-runs of its task, each


class Learner:
    """One worker slot: the base model with gated layers, loaded once; learns one memory per call."""

    def __init__(self, model: str, lora: LoraSpec, recipe, key_function: str, threads: int) -> None:
        from ..inject import inject_for
        from ..model import load_model

        torch.set_num_threads(threads)
        self.lora, self.recipe, self.key_function = lora, recipe, key_function
        self.model, self.tok = load_model(model)
        inject_for(self.model, lora)

    def learn(self, texts: list[str]) -> tuple[Adapter, torch.Tensor]:
        """(adapter, keys) of one memory: its text and paraphrases, learned and keyed as a local add does
        (megamem.learn)."""
        from ..learn import learn

        (one,) = learn(self.model, self.tok, [texts], self.lora, self.recipe, self.key_function)
        return one.adapter, one.keys

    def pid(self) -> int:
        return os.getpid()


def _ray():
    try:
        import ray
    except ImportError:
        raise MegamemError("--ray needs the package ray: pip install 'megamem[ray]'") from None
    return ray


def connect(address: str, cpus: int | None) -> bool:
    """Join the cluster at `address` ('auto': the running one; 'local': a new instance on this machine with
    `cpus` CPUs). True when this call started Ray (the caller shuts it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    try:
        if address == "local":
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise MegamemError(f"cannot reach a Ray cluster at {address!r}: {exc}") from None
    return True


def add_many_ray(
    mem,
    items: list[Item],
    address: str = "local",
    workers: int | None = None,
    threads: int = 1,
    keep_going: bool = False,
    on_stored: Callable[[Record], None] | None = None,
) -> list[Record]:
    """Learn `items` on a Ray cluster and commit them to `mem`'s store as they finish (in finishing order).

    workers: actors to start (default: as many as the cluster's CPUs allow at `threads` each). Every item is
    checked first, as Memory.add_many does; nothing is sent to the cluster if one is bad (unless keep_going)."""
    from ..checks import check_count, first_of

    workers = None if workers is None else check_count(workers, "workers", maximum=4096)
    threads = check_count(threads, "threads per worker", maximum=1024)
    if not isinstance(address, str) or not address:
        raise MegamemError(f"the Ray address must be 'local', 'auto' or host:port, got {address!r}")
    ray = _ray()
    _, bad = mem.check(items)  # the cheap checks, before a cluster starts
    if bad and not keep_going:
        raise first_of(bad)
    started = connect(address, None if workers is None else workers * threads)
    try:
        checked = mem.validate(items, keep_going)  # and every text's fit to the model's context
        mem.prepare_store()
        # ids now, on the driver: a task Ray runs twice then commits once (the second finds its id taken)
        checked = [item if item.id is not None else replace(item, id=uuid.uuid4().hex[:12]) for item in checked]
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
        remote = ray.remote(num_cpus=threads, max_restarts=RETRIES, max_task_retries=RETRIES)(Learner)
        actors = [
            remote.remote(mem.model_name, mem.lora, mem.recipe, mem.key_function, threads)
            for _ in range(min(workers, len(checked)))
        ]
        return _gather(ray, mem, checked, actors, on_stored)
    finally:
        if started:
            ray.shutdown()


def _gather(ray, mem, items: list[Item], actors: list, on_stored) -> list[Record]:
    """Keep every actor busy with one memory, commit each result once, hand a failed memory to another actor."""
    queue = deque(range(len(items)))
    attempts = [0] * len(items)
    pending: dict = {}  # ObjectRef -> (actor, item index)
    committed: set[str] = set()
    failed: dict[int, str] = {}
    records: list[Record] = []

    def submit(actor) -> None:
        if queue:
            i = queue.popleft()
            attempts[i] += 1
            pending[actor.learn.remote([items[i].text, *items[i].paraphrases])] = (actor, i)

    for actor in actors:
        submit(actor)
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        actor, i = pending.pop(ref)
        try:
            adapter, keys = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            if isinstance(exc, ray.exceptions.RayActorError):  # dead for good (its restarts are used up)
                actors.remove(actor)
            if attempts[i] <= RETRIES and actors:
                queue.appendleft(i)  # to another (or the same, restarted) actor
            else:
                failed[i] = str(exc).splitlines()[0]
            for other in actors:  # a live actor with nothing in flight takes it
                if not any(a is other for a, _ in pending.values()):
                    submit(other)
            continue
        if items[i].id not in committed:
            committed.add(items[i].id)
            records.append(mem.commit(items[i], adapter, keys))
            if on_stored is not None:
                on_stored(records[-1])
        submit(actor)
    if queue:  # every actor died with memories still to learn
        failed.update({i: "no live worker left" for i in queue})
    if failed:
        names = ", ".join(items[i].origin or items[i].id for i in sorted(failed))
        first = failed[min(failed)]
        raise MegamemError(f"{len(failed)} memor{'y' if len(failed) == 1 else 'ies'} not learned ({names}): {first}")
    return records
