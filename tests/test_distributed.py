"""Injection on a Ray cluster (megamem.ops.distributed): workers learn, the driver commits each memory exactly once.

One local Ray instance (ray.init(num_cpus=2)) serves the whole module; the tiny model keeps each memory fast.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch
from faultlib import quick_recipe

ray = pytest.importorskip("ray")

from megamem import Item, Memory  # noqa: E402
from megamem.cli import app  # noqa: E402
from megamem.errors import MegamemError  # noqa: E402
from megamem.ops.distributed import add_many_ray  # noqa: E402
from megamem.store.health import verify  # noqa: E402

TEXTS = [
    f"The {name} lighthouse on Quillon island was built in {1800 + i} by Ada Skarvik."
    for i, name in enumerate(["north", "south", "east", "west", "old", "new"])
]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _items(n: int) -> list[Item]:
    return [Item(t, id=f"m{i}") for i, t in enumerate(TEXTS[:n])]


def test_workers_learn_what_a_local_add_learns_and_each_memory_is_stored_once(cluster, tiny_dir, tmp_path):
    remote = Memory(tmp_path / "ray", model=str(tiny_dir), recipe=quick_recipe())
    records = add_many_ray(remote, _items(4), "local", workers=2)
    assert sorted(r.id for r in records) == ["m0", "m1", "m2", "m3"]
    assert sorted(r.id for r in remote.list()) == ["m0", "m1", "m2", "m3"]
    local = Memory(tmp_path / "local", model=str(tiny_dir), recipe=quick_recipe(), train_group=1)
    local.add_many(_items(4))
    for i in range(4):
        a, b = remote.adapter(f"m{i}"), local.adapter(f"m{i}")
        assert a.weights.keys() == b.weights.keys()
        for name in a.weights:  # the same seed and recipe: the same adapter, up to float rounding of threads
            for x, y in zip(a.weights[name], b.weights[name], strict=True):
                torch.testing.assert_close(x, y, atol=2e-2, rtol=0)  # bf16 files: one rounding step
        assert torch.equal(remote.store.keys(remote.show(f"m{i}")), local.store.keys(local.show(f"m{i}")))
    assert remote.route(TEXTS[2])[0][0] == "m2"  # the committed keys route


def _kill_first_learner(done: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first Ray actor process caught learning (its title is ray::Learner.learn)."""
    import psutil

    while not done.is_set() and not killed:
        for p in psutil.process_iter(["pid", "cmdline"]):
            if "ray::Learner.learn" in " ".join(p.info["cmdline"] or []):
                os.kill(p.info["pid"], signal.SIGKILL)
                killed.append(p.info["pid"])
                return
        time.sleep(0.05)


def test_a_worker_killed_while_learning_loses_and_doubles_no_memory(cluster, tiny_dir, tmp_path):
    mem = Memory(tmp_path / "store", model=str(tiny_dir), recipe=quick_recipe())
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_learner, args=(done, killed))
    killer.start()
    try:
        records = add_many_ray(mem, _items(6), "local", workers=2)
    finally:
        done.set()
        killer.join()
    assert killed, "no worker was caught learning"
    ids = [r.id for r in records]
    assert sorted(ids) == [f"m{i}" for i in range(6)] and len(set(ids)) == 6
    assert sorted(r.id for r in mem.list()) == [f"m{i}" for i in range(6)]
    assert verify(mem.path) == []  # every committed memory whole, nothing half-written


def test_a_bad_memory_stops_everything_before_the_cluster_is_asked(tiny_dir, tmp_path, monkeypatch):
    import megamem.ops.distributed

    def no_cluster(*_a, **_k):
        raise AssertionError("a cluster was asked for a batch that could not go")

    monkeypatch.setattr(megamem.ops.distributed, "connect", no_cluster)
    mem = Memory(tmp_path / "store", model=str(tiny_dir), recipe=quick_recipe())
    with pytest.raises(MegamemError, match="memory 2 text"):
        add_many_ray(mem, [Item("fine"), Item("")], "local", workers=1)
    with pytest.raises(MegamemError, match="workers must be an integer"):
        add_many_ray(mem, [Item("fine")], "local", workers=0)
    assert not (tmp_path / "store").exists()


def test_cli_add_jsonl_on_ray(cluster, tiny_dir, tmp_path):
    from typer.testing import CliRunner

    lines = tmp_path / "big.jsonl"
    lines.write_text("".join(json.dumps({"text": t, "id": f"c{i}"}) + "\n" for i, t in enumerate(TEXTS[:3])))
    store = tmp_path / "store"
    result = CliRunner().invoke(
        app,
        [
            "add",
            "--jsonl",
            str(lines),
            "--ray",
            "local",
            "--workers",
            "2",
            "--store",
            str(store),
            "--model",
            str(tiny_dir),
            "--epochs",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(r["id"] for r in json.loads(result.stdout)) == ["c0", "c1", "c2"]
    bad = CliRunner().invoke(app, ["add", "some text", "--workers", "2", "--store", str(store)])
    assert bad.exit_code != 0 and "--workers goes with --ray" in bad.output
