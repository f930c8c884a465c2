"""MemoryLLM's training recipe on the tiny model and a tiny data folder: it learns, saves, and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from megamem.cli import app
from megamem.errors import MegamemError
from megamem.memoryllm import MemoryConfig, MemoryLLM
from megamem.memoryllm.recipe import TrainConfig, plot_curve, read_log, train

SMALL = MemoryConfig(new_tokens=4, blocks=4, rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two partitions of wiki-shaped and story-shaped records (the layout of ../shared/data)."""
    root = tmp_path_factory.mktemp("data")
    for kind in ("mega-wiki2024", "mega-fictional"):
        (root / kind).mkdir()
        for p in range(2):
            lines = []
            for i in range(4):
                name = f"Zorb{p}{i}"
                rec = {"passage": f"{name} is a heron who lives on pier {i} and eats {p + i} fish a day."}
                if kind == "mega-wiki2024":
                    rec |= {"qa": [{"question": f"Where does {name} live?", "answer": f"pier {i}"}],
                            "paraphrases": [f"The heron {name} lives on pier {i}."]}  # fmt: skip
                lines.append(json.dumps(rec))
            (root / kind / f"partition-{p:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def config(data, steps: int) -> TrainConfig:
    return TrainConfig(data=str(data), partitions=[0], heldout=1, steps=steps, accum=1, eval_every=3,
                       eval_texts=3, train_blocks=2, warmup=2)  # fmt: skip


def fresh(tiny_dir) -> MemoryLLM:
    from megamem.model import load_model

    return MemoryLLM(*load_model(str(tiny_dir)), SMALL)


def test_training_changes_the_parameters_and_logs(tiny_dir, data, tmp_path):
    mllm = fresh(tiny_dir)
    before = [p.detach().clone() for p in mllm.trainable()]
    last = train(mllm, config(data, 6), tmp_path / "run")
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows if "heldout" in r] == [0, 3, 6]
    assert set(last["heldout"]) == {"pool", "none", "prompt"}
    changed = [not torch.equal(a, b) for a, b in zip(before, mllm.trainable(), strict=True)]
    names = ["start", "new_memory"] + [n for m in mllm._lora for n, _ in m.named_parameters() if "lora_" in n]
    assert all(changed), [
        n for n, c in zip(names, changed, strict=True) if not c
    ]  # the start vectors, the new-memory embedding and every LoRA matrix learn
    other = fresh(tiny_dir)
    other.load_params(tmp_path / "run" / "params.safetensors")
    assert torch.equal(other.new_memory.to(torch.bfloat16), mllm.new_memory.detach().to(torch.bfloat16))
    assert plot_curve(tmp_path / "run").stat().st_size > 0


def test_a_resumed_run_ends_where_an_unbroken_one_does(tiny_dir, data, tmp_path):
    whole = fresh(tiny_dir)
    train(whole, config(data, 6), tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop_after_4(step, total, row):
        if step == 4:
            raise Stop  # a kill between two checkpoints: step 4 is lost, the run goes on from step 3

    with pytest.raises(Stop):
        train(fresh(tiny_dir), config(data, 6), tmp_path / "broken", on_step=stop_after_4)
    resumed = fresh(tiny_dir)
    train(resumed, config(data, 6), tmp_path / "broken")
    for a, b in zip(whole.trainable(), resumed.trainable(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(MegamemError, match="other settings"):
        train(fresh(tiny_dir), config(data, 9), tmp_path / "broken")


def test_the_command(tiny_dir, data, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-run"
    args = ["train-memoryllm", "--out", out, "--data", data, "--partitions", "0", "--heldout", "1",
            "--steps", "1", "--eval-every", "1", "--model", tiny_dir]  # fmt: skip
    r = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert (out / "params.safetensors").is_file() and (out / "loss.png").is_file()
    for bad, message in [(["--steps", "0"], "--steps must be at least 1"), (["--partitions", "a"], "comma-separated"),
                         (["--data", tmp_path / "nowhere"], "no mega-wiki2024"),
                         (["--heldout", "7"], "there is no partition 7")]:  # fmt: skip
        r = runner.invoke(app, [str(a) for a in [*args, *bad]], catch_exceptions=False)
        assert r.exit_code == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
