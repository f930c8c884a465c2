"""The continual-learning protocol: learn a partition's memories one at a time, test every memory seen so far.

One loaded model serves every method. After each finished step the method's state is saved and the
step's rows are appended to metrics.jsonl (one row per method x step x memory, then one 'step' row
that closes the step); a killed run resumes from the last closed step of each method.

The recipe, top to bottom: set up (the folder, the model, the probes, the expected time), loop over partitions,
methods and steps (learn, save, test), then save the report. What it calls lives in config (BenchConfig),
runlog (metrics.jsonl), methods (learning and answering), evaluation (one step's test) and estimate.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..gate import GateConfig
from ..inject import inject_for
from ..memory import default_gate
from ..model import load_model
from .config import BenchConfig, check_config, eval_steps, expand_methods, lora_spec, validate
from .estimate import estimate_seconds, print_estimate
from .evaluation import Partition, Probes, evaluate, make_probes, prepare, skipped
from .methods import Method, Shared, keep_base, make_method
from .methods import gate_matrix as gate_matrix  # re-exported: tests and benchmarks import it from here
from .protocol import PROTOCOL_RECIPE
from .report import write_report
from .runlog import append_rows, closed_steps, folder_lock, read_closed_rows, read_rows


def run_bench(
    cfg: BenchConfig, out: Path, console: Console | None = None, progress: bool = True, estimate_only: bool = False
) -> Path:
    """Run (or resume) the benchmark into `out`; returns the run folder. estimate_only: print the expected
    CPU time (from measured steps) and stop, writing nothing."""
    console = console or Console(stderr=True)
    validate(cfg)
    with torch_threads(cfg.threads):
        return _run_bench(cfg, out, console, progress, estimate_only)


def _run_bench(cfg: BenchConfig, out: Path, console: Console, progress: bool, estimate_only: bool) -> Path:
    # setup: the folder's closed rows, the model, the probes and the expected time
    methods = expand_methods(cfg.methods)
    rows: list[dict] = []
    if not estimate_only:
        check_config(cfg, out)
        rows = read_closed_rows(out)
    shared, gate = setup(cfg)
    t0 = time.perf_counter()
    probes = make_probes(cfg, shared.model, shared.tok)
    probe_s = (time.perf_counter() - t0) * 1.5
    first = prepare(cfg, cfg.partitions[0], shared.model, shared.tok)
    total_s, timings = estimate_seconds(cfg, shared, first, probe_s)
    shared.restore()
    print_estimate(console, cfg, len(first.records), total_s, timings, per_method=estimate_only)
    if estimate_only:
        return out
    (out / "timings.json").write_text(json.dumps({**timings, "expected_s": total_s}, indent=2))

    # the loop: every partition, every method, learned and tested memory by memory
    with progress_bar(console, progress) as bar:
        for i, p in enumerate(cfg.partitions):
            part = first if i == 0 else prepare(cfg, p, shared.model, shared.tok)
            shared.adapters, shared.caches = {}, {}  # memory indices name other adapters in another partition
            n = len(part.records)
            steps = eval_steps(n, cfg.eval_every)
            overall = bar.add_task(f"partition {p}", total=len(methods) * n)
            for name in methods:
                if skipped(name, part):
                    console.print(f"partition {p} has no questions: {name} (recall, then answer) is skipped")
                    bar.advance(overall, n)
                    continue
                method = make_method(name, shared, cfg.lrs)
                rows = _run_method(cfg, method, shared, part, probes, steps, gate, out, rows, bar, overall)
            bar.remove_task(overall)

    # save: the report over every method in the folder, also those another command added meanwhile
    with folder_lock(out):
        write_report(out, read_rows(out / "metrics.jsonl"), cfg)
    return out


def _run_method(
    cfg: BenchConfig,
    method: Method,
    shared: Shared,
    part: Partition,
    probes: Probes,
    steps: list[int],
    gate: GateConfig,
    out: Path,
    rows: list[dict],
    bar: Progress,
    overall,
) -> list[dict]:
    """Learn and test one method over a partition, resuming from its saved state and closed steps."""
    n = len(part.records)
    folder = out / "state" / f"p{part.index}" / method.name
    closed = closed_steps(rows, part.index, method.name)
    if method.batch_only:
        steps = [n]
    if all(k in closed for k in steps):  # finished: its rows are all there, whether or not its state is kept
        bar.advance(overall, n)
        return rows
    last = max(k for k in steps if k not in closed)  # nothing after the last untested step needs learning
    method.start()
    learned = method.load(folder)
    bar.update(overall, advance=learned if not method.batch_only else (n if learned else 0))
    sub = bar.add_task(f"  {method.name}", total=None)
    on_step: Callable[[int, int, float], None] = lambda s, t, _loss: bar.update(sub, completed=s, total=t)  # noqa: E731
    metrics = out / "metrics.jsonl"

    def test(k: int) -> None:
        bar.update(sub, description=f"  {method.name}: testing {k} memories", completed=0, total=None)
        t0 = time.perf_counter()
        new = evaluate(cfg, method, shared, part, probes, k, gate)
        new[-1]["seconds"] = round(time.perf_counter() - t0, 2)
        append_rows(metrics, new)
        rows.extend(new)
        closed.add(k)

    if learned in steps and learned not in closed:  # killed after saving the state, before closing the step
        test(learned)
    if method.batch_only:
        if not learned:
            bar.update(sub, description=f"  {method.name}: learning all {n} memories")
            method.learn_all([part.texts(i) for i in range(n)], on_step)
            method.save(folder, n)
            bar.update(overall, advance=n)
        if n not in closed:
            test(n)
    else:
        for k in range(learned + 1, last + 1):
            bar.update(sub, description=f"  {method.name}: learning memory {k}/{n}", completed=0, total=None)
            method.learn(k - 1, part.texts(k - 1), on_step)
            method.save(folder, k)
            if k in steps and k not in closed:  # closed already: its state was lost and relearned, its rows kept
                test(k)
            bar.update(overall, advance=1)
    bar.remove_task(sub)
    return rows


def setup(cfg: BenchConfig) -> tuple[Shared, GateConfig]:
    """Load the model once, add the gated layers of the run's adapter spec, keep its base weights."""
    model, tok = load_model(cfg.model)
    n_layers = int(model.config.num_hidden_layers)
    spec = lora_spec(cfg, n_layers).resolved(n_layers)
    inject_for(model, spec)
    recipe = replace(
        PROTOCOL_RECIPE,
        lr=cfg.lrs["mega"],
        epochs=cfg.epochs,
        seed=cfg.seed,
        max_steps=cfg.max_steps,
    )
    shared = Shared(model, tok, spec, recipe, keep_base(model), batch_size=cfg.batch_size)
    # the pinned protocol's gate: the store default's similarity, beta and top-k, without the null memory
    gate = replace(default_gate(cfg.key_function), null_rate=None)
    if cfg.beta is not None:
        gate = replace(gate, beta=cfg.beta)
    return shared, gate


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with n torch CPU threads (None: leave as is), restoring the previous count after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def progress_bar(console: Console, enabled: bool) -> Progress:
    """The run's progress bars: one per partition, one for the method learning or testing."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not enabled)
