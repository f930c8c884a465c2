"""The expected CPU time of a run, from one measured training step, prompt pass, decoding step and probe pass."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console

from ..train import Example, Recipe, batches, fit, train_adapter
from .config import BenchConfig, eval_steps, expand_methods
from .evaluation import Partition, skipped
from .infer import generate
from .methods import Shared, method_spec
from .prompts import conversation


def estimate_seconds(cfg: BenchConfig, shared: Shared, part: Partition, probe_s: float) -> tuple[float, dict]:
    """Expected CPU seconds of the whole run from one measured training step and one measured generation."""
    model, tok = shared.model, shared.tok
    texts = part.texts(0)
    n = len(part.records)
    fams = {method_spec(m).family for m in expand_methods(cfg.methods)}
    recipe3 = Recipe(lr=1e-12, epochs=1, batch_size=shared.recipe.batch_size, max_steps=3)

    def step_seconds(train: Callable[[Callable[[int, int, float], None]], object]) -> float:
        """Seconds per training step after the first (which pays one-off allocation and warm-up: timing it alone
        over-stated the full-FT step 3-4x)."""
        marks: list[float] = []
        train(lambda *_: marks.append(time.perf_counter()))
        return (marks[-1] - marks[0]) / max(len(marks) - 1, 1)

    full_step = lora_step = 0.0
    if fams & {"full", "full-l2", "full-ewc", "full-batch"}:
        full_step = step_seconds(lambda cb: fit(model, tok, texts, list(model.parameters()), recipe3, on_step=cb))
        shared.restore()
    if fams & {"mega", "irag", "lora", "lora-l2"}:
        lora_step = step_seconds(lambda cb: train_adapter(model, tok, texts, shared.spec, recipe3, cb))
    convs = [conversation("qa", part.cues[0])] * cfg.batch_size
    t0 = time.perf_counter()
    generate(model, tok, convs, 1)
    prefill_s = time.perf_counter() - t0  # a full batch's prompt pass
    t0 = time.perf_counter()
    generate(model, tok, convs, 9)
    tok_s = max(time.perf_counter() - t0 - prefill_s, 0.0) / 8  # one decoding step of a full batch
    per_mem_steps = len(batches([Example([], [])] * len(texts), shared.recipe))
    steps = eval_steps(n, cfg.eval_every)
    qa_per_mem = max(1, len(part.questions) // n) if part.questions else 0
    recall_len = max(part.recall_tokens) + cfg.recall_extra_tokens

    def eval_cost(k: int, irag: bool) -> float:
        batches_qa = -(-k * qa_per_mem // cfg.batch_size)
        batches_rec = -(-k // cfg.batch_size)
        # upper bounds: every batch full, every answer as long as allowed; QA adds the log-prob pass
        c = batches_rec * (prefill_s + recall_len * tok_s) + batches_qa * (2 * prefill_s + cfg.qa_tokens * tok_s)
        if irag:
            c += batches_qa * (prefill_s + recall_len * tok_s)
        return c + probe_s

    detail = {}
    for m in expand_methods(cfg.methods):
        fam = method_spec(m).family
        train = 0.0
        if skipped(m, part):
            continue
        if fam in ("mega", "irag", "lora", "lora-l2"):
            train = n * per_mem_steps * lora_step * (0 if fam == "irag" and "mega" in cfg.methods else 1)
        elif fam in ("full", "full-l2", "full-ewc"):
            train = n * per_mem_steps * full_step * (1.3 if fam != "full" else 1.0)
            if fam == "full-ewc":  # the Fisher: one backward pass per training text
                train += n * len(texts) * full_step * 0.5
        elif fam == "full-batch":
            train = n * per_mem_steps * full_step
        if fam in ("base", "rag", "mega", "irag"):  # outputs reused (see reuse): each step tests its new memories
            ev = sum(eval_cost(k - prev, fam == "irag") for prev, k in zip([0, *steps[:-1]], steps, strict=True))
        elif fam == "full-batch":
            ev = eval_cost(n, False)
        else:
            ev = sum(eval_cost(k, fam == "irag") for k in steps)
        detail[m] = train + ev
    return sum(detail.values()) * len(cfg.partitions), {
        "full_step_s": full_step,
        "lora_step_s": lora_step,
        "decode_step_s": tok_s,
        "prefill_s": prefill_s,
        "probe_s": probe_s,
        "per_method_s": {m: round(v * len(cfg.partitions)) for m, v in detail.items()},
    }


def print_estimate(console: Console, cfg: BenchConfig, n: int, total_s: float, timings: dict, per_method: bool) -> None:
    """Say the expected time up front (every run) and, for --estimate, each method's share."""
    console.print(
        f"expected CPU time: about {total_s / 60:.0f} min ({total_s:.0f} s) for the whole run, "
        f"{len(expand_methods(cfg.methods))} methods x "
        f"{n} memories x {len(cfg.partitions)} partition(s); measured: full-FT step "
        f"{timings['full_step_s']:.2f} s, LoRA step {timings['lora_step_s']:.2f} s, decode step "
        f"{timings['decode_step_s'] * 1000:.0f} ms and prompt pass {timings['prefill_s']:.2f} s "
        f"(batch {cfg.batch_size}), general probes {timings['probe_s']:.1f} s",
        highlight=False,
    )
    if per_method:
        for m, sec in timings["per_method_s"].items():
            console.print(f"  {m}: about {sec / 60:.0f} min", highlight=False)
