"""A MemoryLLM store end to end on the tiny model: Memory(path, backend="memoryllm"), the CLI, its refusals.

Every refusal is checked to leave the pool file byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from megamem import Item, Memory
from megamem.cli import app
from megamem.errors import MegamemError
from megamem.memoryllm import MemoryConfig, Pool
from megamem.memoryllm.store import POOL, PoolMemory

SMALL = MemoryConfig(new_tokens=4, blocks=4, rank=4, alpha=8.0)
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def digest(path) -> str:
    return hashlib.sha256((path / POOL).read_bytes()).hexdigest()


@pytest.fixture()
def store(tmp_path, tiny_dir):
    path = tmp_path / "pool-store"
    mem = Memory(path, backend="memoryllm", model=str(tiny_dir), config=SMALL)
    mem.add_many([Item("Zorblatt the heron lives on Quillon pier.", id="heron"), Item("Mira bakes rye bread.")])
    return path


def test_memory_with_the_memoryllm_backend(store, tiny_dir):
    mem = Memory(store)  # the store says what it is
    assert isinstance(mem, PoolMemory)
    recs = mem.list()
    assert [r.id for r in recs][0] == "heron" and len(recs) == 2 and [r.update for r in recs] == [1, 2]
    assert mem.show("heron").text.startswith("Zorblatt")
    info = mem.info()
    assert info["backend"] == "memoryllm" and info["memories"] == 2 and info["updates"] == 2
    pool = Pool.load(store / POOL)
    assert pool.memory.shape[1] == SMALL.size and pool.updates == 2
    ans = mem.ask("Where does Zorblatt live?", max_new_tokens=4)
    assert ans.mode == "qa" and ans.gate == [] and isinstance(ans.text, str)
    assert mem.ask("Where does Zorblatt live?", mode="irag", max_new_tokens=4).recall is not None


def test_no_memory_is_the_base_model(store):
    mem = Memory(store)
    base = mem.ask("Where does Zorblatt live?", max_new_tokens=6, use_memory=False).text
    prompt = "Where does Zorblatt live? Answer should be no more than one sentence."
    assert mem.load().answer(Pool.empty(), [[("user", prompt)]], 6)[0] == base


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.forget("heron"), "cannot forget one memory"),
        (lambda m: m.forget("nobody"), "no memory 'nobody'"),
        (lambda m: m.ask("Where?", mode="rag"), "needs MEGa's gate"),
        (lambda m: m.ask("Where?", gate=m.gate.__class__(top_k=2)), "gate settings"),
        (lambda m: m.add_many([Item("A text.", paraphrases=["Another."])]), "paraphrases are MEGa's"),
        (lambda m: m.add_many([Item("A text.", id="heron")]), "already exists"),
        (lambda m: m.add_many([Item("   ")]), "text"),
        (lambda m: m.add("A text.", metadata={"k": object()}), "metadata"),
    ],
)
def test_refusals_leave_the_pool_as_it_was(store, call, message):
    before = digest(store)
    with pytest.raises(MegamemError, match=message):
        call(Memory(store))
    assert digest(store) == before


def test_a_failed_write_keeps_the_committed_pool(store, monkeypatch):
    before = digest(store)

    def broken(self, path, extra=None):
        path.write_bytes(b"half a pool")
        raise OSError("disk full")

    monkeypatch.setattr(Pool, "save", broken)
    with pytest.raises(OSError):
        Memory(store).add("Another memory.")
    assert digest(store) == before
    assert not [p for p in store.iterdir() if p.name.startswith(".pool")]  # the temporary file is gone
    assert len(Memory(store).list()) == 2


def test_mega_settings_and_mismatches_are_refused(store, tmp_path, tiny_dir):
    with pytest.raises(MegamemError, match="MEGa settings"):
        Memory(tmp_path / "other", backend="memoryllm", key_function="embedder")
    with pytest.raises(MegamemError, match="was made with"):
        Memory(store, backend="memoryllm", model="someone/else")
    with pytest.raises(MegamemError, match="unknown backend"):
        Memory(store, backend="rnn")
    with pytest.raises(MegamemError, match="is a MemoryLLM store"):
        Memory(store, backend="mega")


def test_cli_end_to_end(tmp_path, tiny_dir):
    path = tmp_path / "cli-pool"
    r = run("add", "Zorblatt the heron lives on Quillon pier.", "--id", "heron", "--backend", "memoryllm",
            "--store", path, "--model", tiny_dir, "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0]["id"] == "heron"
    assert run("add", "Mira bakes rye bread.", "--store", path).exit_code == 0  # the store says its backend
    listed = json.loads(run("list", "--store", path, "--json").stdout)
    assert [m["id"] for m in listed][0] == "heron" and len(listed) == 2
    r = run("ask", "Where does Zorblatt live?", "--store", path, "--max-new-tokens", "4", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["mode"] == "qa"
    before = digest(path)
    for args, message in [
        (("forget", "heron"), "cannot forget one memory"),
        (("keys", "create", "--namespace", "team"), "a memoryllm store, which `megamem serve` cannot serve"),
        (("keys", "list"), "so it has no API keys"),
        (
            ("export", "heron", "--out", tmp_path / "peft"),
            f"megamem export works on stores that have 'export'; this is a memoryllm store ({path})",
        ),
        (("merge", "heron", "other"), "megamem merge works on stores that have 'merge'; this is a memoryllm store"),
        (("split", "heron"), "megamem split works on stores that have 'merge'; this is a memoryllm store"),
        (("consolidate", "--ids", "heron"), "megamem consolidate works on stores that have 'consolidate'"),
        (("ask", "Where?", "--top-k", "2"), "gate settings"),
        (("ask", "Where?", "--mode", "mega+rag"), "needs MEGa's gate"),
        (("add", "More.", "--epochs", "2"), "trains nothing per memory"),
        (("add", "More.", "-p", "Paraphrase."), "paraphrases are MEGa's"),
    ]:
        r = run(*args, "--store", path)
        assert r.exit_code == 1, (args, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, r.stderr)
    assert digest(path) == before
    assert sorted(p.name for p in path.iterdir()) == [".lock", "memories.json", "memoryllm.json", "params.safetensors",
                                                      "pool.safetensors"]  # fmt: skip
    r = run("verify", "--store", path, "--json")  # verify and repair check and mend a MemoryLLM store too
    assert r.exit_code == 0 and json.loads(r.stdout) == {"store": str(path), "ok": True, "problems": []}
    r = run("repair", "--store", path)
    assert r.exit_code == 0 and r.stdout.strip() == f"ok: {path}" and digest(path) == before
    r = run("add", "x", "--backend", "lstm", "--store", tmp_path / "new")
    assert r.exit_code == 1 and "unknown backend" in r.stderr


def test_the_shipped_parameters_serve_the_default_model(tmp_path):
    """The trained parameters install with megamem, fit the default sizes, and a new store keeps its own copy."""
    from safetensors import safe_open

    from megamem.memoryllm.store import PARAMS, shipped_params
    from megamem.model import DEFAULT_MODEL

    path = shipped_params(DEFAULT_MODEL)
    assert path is not None and path.stat().st_size < 8_000_000  # a few MB, not a pool
    with safe_open(str(path), framework="pt") as f:
        assert MemoryConfig.from_meta(f.metadata()) == MemoryConfig()
    mem = Memory(tmp_path / "default-pool", backend="memoryllm")
    assert mem.warnings == []  # no "untrained" warning for the default model
    mem.add("Zorblatt the heron lives on Quillon pier.", id="heron")
    assert (tmp_path / "default-pool" / PARAMS).read_bytes() == path.read_bytes()
    assert Memory(tmp_path / "default-pool").ask("Where does Zorblatt live?", max_new_tokens=8).text
