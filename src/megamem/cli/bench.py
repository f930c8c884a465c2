"""The research commands: bench (the continual-learning benchmark), train-memoryllm and demo. The bench's modules
load only when its command runs: they are heavy, and their own packages are an extra (megamem[bench])."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from ..bench.protocol import PROTOCOL_LORA
from ..errors import MegamemError
from .context import JsonOpt, ModelOpt, emit, err, out, progress, say, say_warning

T = TypeVar("T")


def _split(text: str | None, convert: Callable[[str], T], error: str) -> list[T]:
    """The comma-separated values of `text` (blank ones skipped), or `error` as the command's error line."""
    try:
        return [convert(x) for x in text.split(",") if x.strip()] if text else []
    except ValueError:
        raise MegamemError(error) from None


# -- bench ------------------------------------------------------------------------------------------------------
DataOpt = Annotated[Path, typer.Option("--data", help="Folder of partition-NN.jsonl files.")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Run folder (default bench-runs/DATA-pP).")]
PartitionsOpt = Annotated[str, typer.Option(help="Partitions, comma-separated.")]
MemoriesOpt = Annotated[int | None, typer.Option(help="First N memories of each partition.")]
MethodsOpt = Annotated[str, typer.Option(help="Comma-separated methods, or all.")]
EpochsOpt = Annotated[int, typer.Option(help="Training epochs per memory (all methods).")]
MaxStepsOpt = Annotated[int | None, typer.Option(help="Cap on optimiser steps per memory.")]
LrOpt = Annotated[list[str] | None, typer.Option("--lr", help="METHOD=RATE, or METHOD=R1,R2 for a sweep (repeatable).")]
EvalEveryOpt = Annotated[int, typer.Option(help="Test all seen memories every N memories.")]
RankOpt = Annotated[
    int | None,
    typer.Option(help=f"LoRA rank (mega, irag, lora, lora-l2; default: the pinned protocol's, {PROTOCOL_LORA.rank})."),
]
TargetsOpt = Annotated[str, typer.Option(help="mlp | attn | all | early | mid | late (MLP thirds).")]
KeyFunctionOpt = Annotated[str, typer.Option("--key-function", help="embedder | activation.")]
BetaOpt = Annotated[float | None, typer.Option(help="Gate softmax inverse temperature.")]
L2LambdaOpt = Annotated[str | None, typer.Option(help="full-l2 lambdas to sweep, comma-separated.")]
EwcLambdaOpt = Annotated[str | None, typer.Option(help="full-ewc lambdas to sweep, comma-separated.")]
LoraL2LambdaOpt = Annotated[str | None, typer.Option(help="lora-l2 lambdas to sweep, comma-separated.")]
MmluOpt = Annotated[str | None, typer.Option(help="Local MMLU folder (CSV release or HF parquet).")]
MmluSubjectsOpt = Annotated[str | None, typer.Option(help="MMLU subjects, comma-separated.")]
MmluLimitOpt = Annotated[int | None, typer.Option(help="MMLU questions per subject.")]
JudgeUrlOpt = Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint for an LLM judge.")]
JudgeModelOpt = Annotated[str | None, typer.Option(help="The LLM judge's model name.")]
McqLimitOpt = Annotated[int | None, typer.Option(help="Use only the first N shipped MCQ questions.")]
TextParagraphsOpt = Annotated[int, typer.Option(help="General-text paragraphs for the KL probe.")]
GeneralQaOpt = Annotated[
    int, typer.Option(help="General questions whose answers are compared with the base model's (0: off).")
]
BatchSizeOpt = Annotated[int, typer.Option(help="Prompts per batched generation.")]
ThreadsOpt = Annotated[
    int | None, typer.Option(help="Torch CPU threads (1 is far faster on a machine shared with other jobs).")
]
CompositionalOpt = Annotated[
    bool, typer.Option("--compositional", help="Two-passage questions (Table 2): mega, irag, rag, full-batch.")
]
EstimateOpt = Annotated[bool, typer.Option("--estimate", help="Print the expected CPU time (measured steps) and stop.")]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help="No progress bars.")]
# the BenchConfig fields the options give as they are (the others are parsed first)
PASSED = ("memories", "model", "epochs", "max_steps", "rank", "targets", "key_function", "beta", "eval_every", "mmlu",
          "mmlu_limit", "judge_url", "judge_model", "batch_size", "mcq_limit", "text_paragraphs", "general_qa",
          "threads")  # fmt: skip


def bench(
    ctx: typer.Context,
    data: DataOpt,
    out_dir: OutOpt = None,
    partitions: PartitionsOpt = "0",
    memories: MemoriesOpt = None,
    methods: MethodsOpt = "all",
    model: ModelOpt = None,
    epochs: EpochsOpt = 10,
    max_steps: MaxStepsOpt = None,
    lr: LrOpt = None,
    eval_every: EvalEveryOpt = 1,
    rank: RankOpt = None,
    targets: TargetsOpt = "mlp",
    key_function: KeyFunctionOpt = "embedder",
    beta: BetaOpt = None,
    l2_lambda: L2LambdaOpt = None,
    ewc_lambda: EwcLambdaOpt = None,
    lora_l2_lambda: LoraL2LambdaOpt = None,
    mmlu: MmluOpt = None,
    mmlu_subjects: MmluSubjectsOpt = None,
    mmlu_limit: MmluLimitOpt = 20,
    judge_url: JudgeUrlOpt = None,
    judge_model: JudgeModelOpt = None,
    mcq_limit: McqLimitOpt = None,
    text_paragraphs: TextParagraphsOpt = 16,
    general_qa: GeneralQaOpt = 60,
    batch_size: BatchSizeOpt = 16,
    threads: ThreadsOpt = None,
    compositional: CompositionalOpt = False,
    estimate: EstimateOpt = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """Continual-learning benchmark: learn memories one at a time, test all seen so far, write a run folder."""
    # the bench's own packages are an extra: a missing one is a MegamemError naming it
    from ..bench.compositional import run_compositional
    from ..bench.config import BenchConfig
    from ..bench.run import run_bench

    lambdas = {
        "full-l2": (l2_lambda, "--l2-lambda"),
        "full-ewc": (ewc_lambda, "--ewc-lambda"),
        "lora-l2": (lora_l2_lambda, "--lora-l2-lambda"),
    }
    names, lrs = _learning_rates(lr or [], _method_names(methods, compositional, lambdas))
    parts = _split(partitions, int, f"--partitions takes comma-separated integers, got {partitions!r}")
    subjects = [s.strip() for s in mmlu_subjects.split(",")] if mmlu_subjects else None
    passed = {k: ctx.params[k] for k in PASSED}
    cfg = BenchConfig(data=str(data), partitions=parts, methods=names, lrs=lrs, mmlu_subjects=subjects, **passed)
    if compositional:
        folder = out_dir or Path("bench-runs") / f"{data.name}-compositional"
        run_compositional(cfg, folder, console=err, progress=not no_progress)
    else:
        folder = out_dir or Path("bench-runs") / f"{data.name}-p{'-'.join(map(str, parts))}"
        run_bench(cfg, folder, console=err, progress=not no_progress, estimate_only=estimate)
    if estimate:
        return
    out.print(f"results: {folder / ('compositional.md' if compositional else 'results.md')}", highlight=False)


def _method_names(methods: str, compositional: bool, lambdas: dict[str, tuple[str | None, str]]) -> list[str]:
    """The methods to run: --methods expanded (only the compositional ones with --compositional), and a regularised
    family given lambdas (family: (lambdas, flag)) replaced by one variant a lambda."""
    from ..bench.compositional import METHODS as COMPOSITIONAL
    from ..bench.config import expand_methods
    from ..bench.spec import MethodSpec

    names = expand_methods([m.strip() for m in methods.split(",") if m.strip()])
    if compositional:
        names = [m for m in names if m in COMPOSITIONAL]
    for family, (text, flag) in lambdas.items():
        lams = _split(text, float, f"{flag} takes comma-separated numbers, got {text!r}")
        if lams:
            names = [m for m in names if m != family] + [str(MethodSpec(family, lam=x)) for x in lams]
    return names


def _learning_rates(items: list[str], names: list[str]) -> tuple[list[str], dict[str, float]]:
    """(methods, rates) after the --lr items: METHOD=RATE sets a method's rate; METHOD=R1,R2,... sweeps it, as one
    variant METHOD~R a rate in place of METHOD."""
    from ..bench.spec import MethodSpec

    lrs = {}
    for item in items:
        key, _, val = item.partition("=")
        rates = _split(val, float, f"--lr takes comma-separated numbers, got {val!r}")
        if not rates:
            raise MegamemError(f"--lr takes METHOD=RATE[,RATE...], got {item!r}")
        if len(rates) == 1:
            lrs[key.strip()] = rates[0]
        else:
            spec = MethodSpec.parse(key.strip())
            names = [m for m in names if m != key.strip()] + [str(replace(spec, lr=x)) for x in rates]
    return names, lrs


# -- train-memoryllm ---------------------------------------------------------------------------------------------
TrainOutOpt = Annotated[Path, typer.Option("--out", help="Run folder: checkpoint, params, log, loss plot.")]
TrainDataOpt = Annotated[Path, typer.Option("--data", help="The data folder (mega-wiki2024/, mega-fictional/).")]
TrainPartitionsOpt = Annotated[str, typer.Option(help="Training partitions, comma-separated.")]
HeldoutOpt = Annotated[int, typer.Option(help="The partition of the held-out continuation check.")]
StepsOpt = Annotated[int, typer.Option(help="Optimizer steps.")]
AccumOpt = Annotated[int, typer.Option(help="Episodes per step.")]
TrainEvalEveryOpt = Annotated[int, typer.Option("--eval-every", help="Steps between held-out checks and saves.")]
TorchThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads for torch.")]


def train_memoryllm(
    out_dir: TrainOutOpt = Path("bench-runs/memoryllm-train"),
    data: TrainDataOpt = Path("../shared/data"),
    partitions: TrainPartitionsOpt = "5,6,7,8,9",
    heldout: HeldoutOpt = 4,
    steps: StepsOpt = 1000,
    accum: AccumOpt = 2,
    eval_every: TrainEvalEveryOpt = 200,
    model: ModelOpt = None,
    threads: TorchThreadsOpt = None,
) -> None:
    """Train MemoryLLM's memory-use parameters (resumable: run it again with the same --out to go on)."""
    from ..memoryllm import MemoryLLM
    from ..memoryllm.recipe import TrainConfig, plot_curve, train
    from ..model import load_model

    parts = _split(partitions, int, f"--partitions must be comma-separated numbers, got {partitions!r}")
    for name, value in (("--steps", steps), ("--accum", accum), ("--eval-every", eval_every), ("--threads", threads)):
        if value is not None and value < 1:
            raise MegamemError(f"{name} must be at least 1, got {value}")
    _check_partitions(data, [*parts, heldout])
    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg = TrainConfig(
        data=str(data), partitions=parts, steps=steps, accum=accum, eval_every=eval_every, heldout=heldout
    )
    mllm = MemoryLLM(*load_model(model))
    with progress(False) as bar:
        task = bar.add_task("training", total=steps, loss=0.0)
        last = train(mllm, cfg, out_dir, on_step=lambda s, n, row: bar.update(task, completed=s, loss=row["loss"]))
    try:
        plot = str(plot_curve(out_dir))
    except MegamemError as exc:  # the plot is the bench extra's; the trained parameters are saved without it
        say_warning(str(exc))
        plot = "not drawn"
    say(f"held-out continuation loss: {last.get('heldout')}")
    say(f"parameters: {out_dir / 'params.safetensors'}; loss curve: {plot}")


def _check_partitions(data: Path, wanted: list[int]) -> None:
    """An error unless both data sets of `data` have every partition in `wanted`."""
    for kind in ("mega-wiki2024", "mega-fictional"):
        files = sorted((data / kind).glob("*.jsonl")) if (data / kind).is_dir() else []
        if not files:
            raise MegamemError(f"{data} has no {kind}/ partitions (see ../shared/data/README.md)")
        missing = [p for p in wanted if not 0 <= p < len(files)]
        if missing:
            raise MegamemError(f"{data / kind} has {len(files)} partitions; there is no partition {missing[0]}")


# -- demo --------------------------------------------------------------------------------------------------------
DemoStoreOpt = Annotated[
    Path | None, typer.Option("--store", help="Demo store folder: new, empty, or an earlier demo's store.")
]


def demo(store: DemoStoreOpt = None, as_json: JsonOpt = False) -> None:
    """Inject the bundled demo memories and compare the base model's answers with megamem's."""
    from ..demo import run_demo

    rows = run_demo(store, progress=not as_json)
    emit(as_json, rows, lambda: None)
