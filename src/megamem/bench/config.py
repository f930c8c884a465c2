"""A run's configuration: what it depends on (config.json), checked before anything is loaded and on resume."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..adapters import LoraSpec
from ..datasets import partition_files
from ..errors import MegamemError
from .methods import DEFAULT_LR, METHODS, method_spec
from .protocol import PROTOCOL_LORA
from .runlog import folder_lock

TARGETS = {
    "mlp": ("up_proj", "down_proj"),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
THIRDS = ("early", "mid", "late")  # the MLP targets on one third of the layers


@dataclass
class BenchConfig:
    """Everything a run depends on; saved as config.json and checked on resume."""

    data: str
    partitions: list[int] = field(default_factory=lambda: [0])
    memories: int | None = None
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    model: str | None = None
    epochs: int = 10
    max_steps: int | None = None
    lrs: dict[str, float] = field(default_factory=dict)
    rank: int | None = None  # None: the pinned protocol's rank (protocol.PROTOCOL_LORA), not the product's
    targets: str = "mlp"
    key_function: str = "embedder"
    beta: float | None = None
    eval_every: int = 1
    qa_tokens: int = 48
    recall_extra_tokens: int = 20
    mcq_limit: int | None = None
    text_paragraphs: int | None = 16
    general_qa: int = 60  # shipped general questions whose answers are compared with the base model's (0: off)
    general_null_rate: float | None = 0.01  # the product gate's null memory, for gated methods' general probes
    mmlu: str | None = None
    mmlu_subjects: list[str] | None = None
    mmlu_limit: int | None = 20
    judge_url: str | None = None
    judge_model: str | None = None
    seed: int = 0
    batch_size: int = 16
    threads: int | None = None

    def __post_init__(self) -> None:
        # the rates in effect, not only those given: config.json then says what ran, and a folder begun under
        # other default rates is refused instead of mixing them
        self.lrs = {**DEFAULT_LR, **self.lrs}

    def to_dict(self) -> dict:
        return asdict(self)


def expand_methods(names: list[str]) -> list[str]:
    """'all' -> the paper's Table 1 methods (memoryllm, a second memory system, is named on its own); others kept
    in the given order; unknown names are an error."""
    table1 = [name for name, cls in METHODS.items() if cls.in_all]
    out: list[str] = []
    for n in names:
        for m in table1 if n == "all" else [n]:
            method_spec(m)
            if m not in out:
                out.append(m)
    return out


def lora_spec(cfg: BenchConfig, n_layers: int) -> LoraSpec:
    """The adapter shape of the run (mega, irag, lora, lora-l2) from the ablation flags."""
    base = PROTOCOL_LORA  # another rank keeps its alpha / rank scaling
    rank = cfg.rank or base.rank
    sized = replace(base, rank=rank, alpha=base.alpha * rank / base.rank)
    if cfg.targets in TARGETS:
        return replace(sized, targets=TARGETS[cfg.targets])
    if cfg.targets in THIRDS:
        third = THIRDS.index(cfg.targets)
        lo, hi = third * n_layers // 3, (third + 1) * n_layers // 3
        return replace(sized, targets=TARGETS["mlp"], layers=tuple(range(lo, hi)))
    raise MegamemError(f"unknown targets {cfg.targets!r}; choose from mlp, attn, all, early, mid, late")


def eval_steps(n: int, every: int) -> list[int]:
    """The steps after which every seen memory is tested: each `every`-th and the last."""
    return sorted({k for k in range(1, n + 1) if k % every == 0} | {n})


def check_config(cfg: BenchConfig, out: Path) -> None:
    """Write config.json, or check a resumed run's config is the same except for its methods, partitions and
    threads.

    Methods and partitions may differ: one folder can be filled by several commands (say the full-FT methods
    on one machine, the rest on another, or partition 1 in a later session); config.json then lists every
    method and partition run into it, and the report's mean ± std covers every partition in the folder.
    """
    with folder_lock(out):
        _check_config(cfg, out)


def _check_config(cfg: BenchConfig, out: Path) -> None:
    path = out / "config.json"
    now = cfg.to_dict()
    if path.is_file():
        old = json.loads(path.read_text())
        same = {**old, "threads": now["threads"], "methods": now["methods"], "partitions": now["partitions"]}
        if same != now:
            diff = sorted(k for k in now if same.get(k) != now[k])
            raise MegamemError(f"{out} holds a run with another config (differs in {', '.join(diff)}); use a new --out")
        now["methods"] = list(dict.fromkeys([*old["methods"], *now["methods"]]))
        now["partitions"] = sorted({*old["partitions"], *now["partitions"]})
    path.write_text(json.dumps(now, indent=2))


def validate(cfg: BenchConfig) -> None:
    """Refuse bad input before loading anything."""
    if not Path(cfg.data).is_dir():
        raise MegamemError(f"data folder {cfg.data} does not exist")
    files = partition_files(cfg.data)
    if not cfg.partitions:
        raise MegamemError("--partitions must name at least one partition")
    for p in cfg.partitions:
        if not 0 <= p < len(files):
            raise MegamemError(f"partition {p} out of range: {cfg.data} has {len(files)}")
    if cfg.memories is not None and cfg.memories < 1:
        raise MegamemError("--memories must be at least 1")
    if cfg.eval_every < 1:
        raise MegamemError("--eval-every must be at least 1")
    if cfg.rank is not None and cfg.rank < 1:
        raise MegamemError("--rank must be at least 1")
    if cfg.batch_size < 1:
        raise MegamemError("--batch-size must be at least 1")
    expand_methods(cfg.methods)
    if cfg.targets not in TARGETS and cfg.targets not in THIRDS:
        raise MegamemError(f"unknown targets {cfg.targets!r}; choose from mlp, attn, all, early, mid, late")
