"""Training MemoryLLM's memory-use parameters: a recipe read top to bottom (setup, loop, save), resumable.

Every step is an episode: write one or more texts into a fresh pool, then predict a target through it, with
the loss on the target's tokens only. The episodes (the paper's objective, on data the benchmarks never use):

- continue: write the first half of a passage, predict the second half as plain text;
- qa: write a wiki passage (sometimes a paraphrase), then up to `max_distractors` unrelated passages
  (retention), then answer one of its questions in the chat format of the QA mode;
- recall: write a passage, then reconstruct it in the chat format of the recall mode;
- compression: any of the above read through only the K newest tokens (a pool of one block), in a
  `compress` share of the episodes.

The held-out check is the continuation loss on passages of partitions nobody trains or benches on, with the
product's pool size: through the pool, without any pool (the base model), and with the text in the prompt.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..answer import qa_prompt, recall_prompt
from ..datasets import Record, load_partition
from ..errors import MegamemError
from ..model import chat_ids
from .model import MemoryLLM
from .pool import advance

TRAIN_PARTITIONS = (5, 6, 7, 8, 9)  # wiki and fictional: never in the MemoryLLM bench (0-1) or retention runs (2-3)
HELDOUT_PARTITION = 4  # the continuation-loss check


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved beside the checkpoint and checked on resume."""

    data: str = "../shared/data"
    partitions: list[int] = field(default_factory=lambda: list(TRAIN_PARTITIONS))
    steps: int = 2000  # optimizer steps
    accum: int = 2  # episodes per optimizer step
    lr: float = 3e-4  # the write LoRA
    vec_lr: float = 1e-3  # start and new-memory vectors
    warmup: int = 50
    train_blocks: int = 8  # pool blocks while training (the product uses MemoryConfig.blocks)
    max_distractors: int = 2
    compress: float = 0.2
    paraphrase: float = 0.3  # qa / recall episodes that write a paraphrase instead of the passage
    eval_every: int = 250
    eval_texts: int = 40
    heldout: int = HELDOUT_PARTITION
    seed: int = 0


@dataclass
class Episode:
    """Texts to write in order, then the read: `prompt` ids (no loss) followed by `target` ids (the loss)."""

    writes: list[str]
    prompt: list[int]
    target: list[int]
    blocks: int


# -- data --------------------------------------------------------------------------------------------


def training_records(cfg: TrainConfig) -> tuple[list[Record], list[Record]]:
    """(wiki, fictional) records of the training partitions."""
    root = Path(cfg.data)
    wiki = [r for p in cfg.partitions for r in load_partition(root / "mega-wiki2024", p)]
    fict = [r for p in cfg.partitions for r in load_partition(root / "mega-fictional", p)]
    return wiki, fict


def halves(mllm: MemoryLLM, text: str) -> tuple[str, list[int]]:
    """A passage cut in two by tokens: the first half as text (to write), the second half's ids (to predict)."""
    ids = mllm.tok(text, add_special_tokens=False)["input_ids"]
    cut = len(ids) // 2
    return mllm.tok.decode(ids[:cut]), ids[cut:]


def sample_episode(
    mllm: MemoryLLM, cfg: TrainConfig, wiki: list[Record], fict: list[Record], rng: random.Random
) -> Episode:
    """One training episode, drawn from the mix in the module docstring."""
    tok, end = mllm.tok, [mllm.tok.convert_tokens_to_ids("<|im_end|>")]
    blocks = 1 if rng.random() < cfg.compress else cfg.train_blocks
    kind = rng.choices(["continue", "qa", "recall"], weights=[0.35, 0.45, 0.2])[0]
    if kind == "continue":
        first, second = halves(mllm, rng.choice(wiki + fict).passage)
        return Episode([first], [tok.bos_token_id], second, blocks)
    rec = rng.choice(wiki)
    text = rng.choice(rec.paraphrases) if rec.paraphrases and rng.random() < cfg.paraphrase else rec.passage
    question, answer = rng.choice(rec.qa)
    if kind == "recall":
        prompt = chat_ids(tok, [("user", recall_prompt(question))], generation_prompt=True)
        return Episode([text], prompt, tok(rec.passage, add_special_tokens=False)["input_ids"] + end, blocks)
    others = [r.passage for r in rng.sample(wiki + fict, cfg.max_distractors + 1) if r is not rec]
    writes = [text] + others[: rng.randint(0, cfg.max_distractors)]
    prompt = chat_ids(tok, [("user", qa_prompt(question))], generation_prompt=True)
    return Episode(writes, prompt, tok(answer, add_special_tokens=False)["input_ids"] + end, blocks)


# -- the loss ----------------------------------------------------------------------------------------


def episode_loss(mllm: MemoryLLM, ep: Episode, drop_seed: int) -> torch.Tensor:
    """Mean cross-entropy of the target through a pool built from the episode's writes (with gradients)."""
    size = ep.blocks * mllm.cfg.new_tokens
    memory = None  # (L, 1, n, d)
    for u, text in enumerate(ep.writes):
        new = mllm.write(memory, torch.tensor([mllm.text_ids(text)]))  # (L, 1, K, d)
        memory = advance(memory, new, size, drop_seed, u)  # what Pool.updated does, with gradients
    return read_loss(mllm, mllm.prefix_kv(memory), ep.prompt, ep.target)


def read_loss(mllm: MemoryLLM, kv: list | None, prompt: list[int], target: list[int]) -> torch.Tensor:
    """Mean cross-entropy of `target` after `prompt`, reading the prefix `kv` (None: the base model alone)."""
    ids = torch.tensor([prompt + target])
    logits = mllm.forward_read(kv, ids, torch.ones_like(ids))
    pred = logits[0, len(prompt) - 1 : -1]  # (len(target), V)
    return F.cross_entropy(pred.float(), torch.tensor(target))


@torch.no_grad()
def heldout_losses(mllm: MemoryLLM, cfg: TrainConfig, product_blocks: int) -> dict[str, float]:
    """Continuation loss on held-out passages: through the pool, with no pool, and with the text in the prompt."""
    root = Path(cfg.data)
    recs = load_partition(root / "mega-wiki2024", cfg.heldout) + load_partition(root / "mega-fictional", cfg.heldout)
    rng = random.Random(12345)
    recs = rng.sample(recs, min(cfg.eval_texts, len(recs)))
    bos = mllm.tok.bos_token_id
    out = {"pool": 0.0, "none": 0.0, "prompt": 0.0}
    for r in recs:
        first, second = halves(mllm, r.passage)
        new = mllm.write(None, torch.tensor([mllm.text_ids(first)]))
        kv = mllm.prefix_kv(advance(None, new, product_blocks * mllm.cfg.new_tokens, 0, 0))
        out["pool"] += float(read_loss(mllm, kv, [bos], second)) / len(recs)
        out["none"] += float(read_loss(mllm, None, [bos], second)) / len(recs)
        first_ids = mllm.tok(first, add_special_tokens=False)["input_ids"]
        out["prompt"] += float(read_loss(mllm, None, [bos] + first_ids, second)) / len(recs)
    return out


# -- the recipe --------------------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10%: the factor on each group's learning rate."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def train(mllm: MemoryLLM, cfg: TrainConfig, out: Path, on_step=None) -> dict:
    """Train (or resume) into `out`: checkpoint.pt (resume state), params.safetensors (shipped), log.jsonl."""
    # setup
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.json"
    if (out / "checkpoint.pt").exists() and saved.exists() and json.loads(saved.read_text()) != asdict(cfg):
        raise MegamemError(f"{out} holds a run with other settings ({saved}); resume it with those or use a new --out")
    saved.write_text(json.dumps(asdict(cfg), indent=1))
    wiki, fict = training_records(cfg)
    opt = torch.optim.AdamW(
        [{"params": mllm.lora_params(), "lr": cfg.lr}, {"params": [mllm.start, mllm.new_memory], "lr": cfg.vec_lr}],
        weight_decay=0.0,
    )
    base_lrs = [cfg.lr, cfg.vec_lr]
    step, rng = 0, random.Random(cfg.seed)
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():  # resume: parameters, optimizer, step and the episode stream where they were
        state = torch.load(ckpt, weights_only=False)
        with torch.no_grad():
            for p, v in zip(mllm.trainable(), state["params"], strict=True):
                p.copy_(v)
        opt.load_state_dict(state["opt"])
        step = state["step"]
        rng.setstate(state["rng"])
    log = (out / "log.jsonl").open("a")
    if step == 0:
        log.write(json.dumps({"step": 0, "heldout": heldout_losses(mllm, cfg, mllm.cfg.blocks)}) + "\n")
        log.flush()

    # loop
    while step < cfg.steps:
        t0 = time.time()
        for g, base in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = base * lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for a in range(cfg.accum):
            ep = sample_episode(mllm, cfg, wiki, fict, rng)
            loss = episode_loss(mllm, ep, drop_seed=step * cfg.accum + a) / cfg.accum
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(mllm.trainable(), 1.0)
        opt.step()
        step += 1
        row = {"step": step, "loss": total, "seconds": time.time() - t0}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row["heldout"] = heldout_losses(mllm, cfg, mllm.cfg.blocks)
            torch.save(
                {"params": [p.detach().clone() for p in mllm.trainable()], "opt": opt.state_dict(), "step": step,
                 "rng": rng.getstate()},
                ckpt.with_suffix(".tmp"),
            )  # fmt: skip
            ckpt.with_suffix(".tmp").replace(ckpt)
            mllm.save_params(out / "params.safetensors", extra={"steps": str(step)})
        log.write(json.dumps(row) + "\n")
        log.flush()
        if on_step:
            on_step(step, cfg.steps, row)

    # save
    log.close()
    mllm.save_params(out / "params.safetensors", extra={"steps": str(step)})
    return read_log(out)[-1]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]


def plot_curve(out: Path) -> Path:
    """loss.png: the training loss (a running mean) and the held-out continuation losses, from log.jsonl."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MegamemError("the loss plot needs matplotlib: pip install 'megamem[bench]'") from None
    rows = read_log(out)
    steps = [r["step"] for r in rows if "loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    w = 25
    smooth = [sum(losses[max(0, i - w) : i + 1]) / len(losses[max(0, i - w) : i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, smooth, label="training episodes (running mean of 25)")
    held = [(r["step"], r["heldout"]) for r in rows if "heldout" in r]
    for key, label in (
        ("pool", "held-out, through the pool"),
        ("none", "held-out, no pool"),
        ("prompt", "held-out, text in prompt"),
    ):
        ax.plot([s for s, _ in held], [h[key] for _, h in held], marker="o", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.legend()
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
