"""A MemoryLLM store's integrity: every file checked when it is read, `verify` and `repair`, killed writes and
killed creations.

The damage matrix (benchmarks/faults.py runs it too: it imports `damage_cases`, `build_pool_store` and
`run_pool_case`): each file of a three-memory store on the tests' tiny model (memoryllm.json, params.safetensors,
pool.safetensors, memories.json) with 4 KB flipped, truncated to 0 and to half, or deleted; a letter changed in a
stored text (in the pool and in memories.json); a killed write's temporary pool left behind. After each, with a
user's file planted in the store: reading gives the right list or one clear `error:` line naming the file and
`megamem repair`; `verify` names the damage (kind and file) and nothing else; the user's file survives every
command; `repair` brings the store back with every text, in order, answering again (a re-written pool equal to
the one it replaces), the damaged file in quarantine/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import faultlib as fl
import pytest
import torch

from megamem import Item, Memory
from megamem.errors import MegamemError
from megamem.memoryllm import MemoryConfig, MemoryLLM, Pool

SMALL = MemoryConfig(new_tokens=4, blocks=4, rank=4, alpha=8.0)
SETTINGS, PARAMS, POOL, MEMORIES = "memoryllm.json", "params.safetensors", "pool.safetensors", "memories.json"
TARGETS = {"settings": SETTINGS, "params": PARAMS, "pool": POOL, "memories": MEMORIES}
DAMAGES = ("flip", "truncate0", "truncate_half", "delete")
WANT = [(i, text) for i, text, _ in fl.MEMORIES]
QUESTION = fl.QUESTIONS["heron"]
FOREIGN, FOREIGN_DATA = "notes.txt", b"a user's notes, kept in the store folder\n"
SERIOUS = ("manifest", "settings", "missing", "corrupt", "orphan", "unknown")


# -- the store and its damage ------------------------------------------------------------------------------------
def save_untrained_params(model_dir: Path, path: Path) -> Path:
    """The tiny model's untrained memory-use parameters as a file (what a store can be made from)."""
    from megamem.model import load_model

    MemoryLLM(*load_model(str(model_dir)), SMALL).save_params(path)
    return path


def build_pool_store(path: Path, model_dir: Path, params: Path | None = None) -> Path:
    """A MemoryLLM store on the tiny model holding fl.MEMORIES, made from `params` (a file: repair can restore
    the parameters from it) or from the untrained ones (None: megamem ships none for the tiny model)."""
    mem = Memory(path, backend="memoryllm", model=str(model_dir), config=SMALL, params=params)
    mem.add_many([Item(text, id=i) for i, text in WANT])
    return path


def damage_cases() -> list[tuple[str, str]]:
    return [(t, d) for t in TARGETS for d in DAMAGES] + [("pool", "letter"), ("memories", "letter"), ("temp", "left")]


def dead_writer() -> str:
    """A writer token (pid-starttime) of a process that has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return f"{proc.pid}-1"


def flip(path: Path) -> None:
    """XOR 4 KB (at most a quarter of a small JSON file) in the middle of the file's payload: a safetensors
    file's tensor data (so that its header still parses), a JSON file's text."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little") if path.suffix == ".safetensors" else 0
    n = min(4096, len(data) - start) if path.suffix == ".safetensors" else min(4096, len(data) // 4)
    at = start + (len(data) - start - n) // 2
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def damage(store: Path, target: str, how: str) -> str:
    """Apply one damage; return the name of the file it concerns."""
    if target == "temp":  # a write killed after its temporary pool was written: the file stays
        name = f".{POOL}.{dead_writer()}.{'ab' * 8}"
        (store / name).write_bytes(b"\0" * 65536)
        return name
    p = store / TARGETS[target]
    if how == "flip":
        flip(p)
    elif how == "letter":  # one letter of a stored text
        data = p.read_bytes()
        assert b"Quillon" in data
        p.write_bytes(data.replace(b"Quillon", b"Quillan", 1))
    elif how == "truncate0":
        p.write_bytes(b"")
    elif how == "truncate_half":
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif how == "delete":
        p.unlink()
    else:
        raise ValueError(how)
    return p.name


# -- one case -----------------------------------------------------------------------------------------------------
def run_pool_case(base: Path, work: Path, target: str, how: str, ask: bool = True) -> list[str]:
    """Copy `base` (build_pool_store), plant a user's file, damage it, check every command; return the failures,
    tagged like faultlib's: (1) reading, (2) verify, (3) the user's file, (4) repair, (5) texts and answers.
    ask=False skips the questions that load the model to answer (a refusal is always checked: it is quick)."""
    store = work / "store"
    shutil.copytree(base, store)
    (store / FOREIGN).write_bytes(FOREIGN_DATA)
    name = damage(store, target, how)
    fails: list[str] = []

    def kept(step: str) -> None:
        if not (store / FOREIGN).is_file() or (store / FOREIGN).read_bytes() != FOREIGN_DATA:
            fails.append(f"(3) {step} deleted or changed the user's {FOREIGN}")

    _reading(store, target, name, ask, fails)
    kept("list/info/ask")
    _verifying(store, target, how, name, fails)
    kept("verify")
    _repairing(store, base, how, name, ask, fails)
    kept("repair")
    return fails


def _reading(store: Path, target: str, name: str, ask: bool, fails: list[str]) -> None:
    """(1): list and info work unless the settings or the pool are damaged, ask unless the parameters are too;
    a refusal is one `error:` line naming the file and `megamem repair`."""
    for args in (("list", "--json"), ("info", "--json"), ("ask", QUESTION, "--max-new-tokens", "2")):
        fails_here = target in ("settings", "pool") or (target == "params" and args[0] == "ask")
        if args[0] == "ask" and not (ask or fails_here):
            continue
        rc, out, err = fl.cli(*args, "--store", store)
        why = fl.unclean(rc, out, err)
        if why:
            fails.append(f"(1) `megamem {args[0]}`: {why}")
        if rc == 0 and fails_here:
            fails.append(f"(1) `megamem {args[0]}` read the damaged {name} as if nothing happened: {out[:200]}")
        elif rc != 0 and not fails_here:
            fails.append(f"(1) `megamem {args[0]}` failed although {name} is not needed for it: {err.strip()}")
        elif rc != 0 and (name not in err or f"megamem repair --store {store}" not in err):
            fails.append(f"(1) `megamem {args[0]}`'s error does not name {name} and `megamem repair`: {err.strip()}")
        if rc == 0 and args[0] == "list" and [(d["id"], d["text"]) for d in json.loads(out)] != WANT:
            fails.append(f"(1) `megamem list` printed {out[:300]}")


def _verifying(store: Path, target: str, how: str, name: str, fails: list[str]) -> None:
    """(2): verify names the damage with the right kind and file, the user's file as unknown, and nothing else."""
    rc, out, err = fl.cli("verify", "--json", "--store", store)
    data = fl.json_or_none(out)
    if rc != 1 or data is None:
        fails.append(f"(2) `megamem verify` exit {rc} (want 1, JSON): {out[:300]} {err[:300]}")
        return
    got = {(p["kind"], p["path"]) for p in data["problems"]}
    if target == "temp":
        want = {("leftover", name)}
    else:
        kind = "settings" if target == "settings" else ("missing" if how == "delete" else "corrupt")
        want = {(kind, name)}
    if got != want | {("unknown", FOREIGN)}:
        fails.append(f"(2) `megamem verify` reported {sorted(got)}, not {sorted(want)} and the user's file")


def _repairing(store: Path, base: Path, how: str, name: str, ask: bool, fails: list[str]) -> None:
    """(4), (5): repair leaves only the user's file to report, the damaged file in quarantine, every text kept
    in order, a pool equal to the undamaged one, and questions answered."""
    rc, out, err = fl.cli("repair", "--json", "--store", store)
    data = fl.json_or_none(out)
    if data is None:
        fails.append(f"(4) `megamem repair` exit {rc}: {fl.unclean(rc, out, err) or err.strip()[:600]}")
        return
    left = [p for p in data["problems"] if (p["kind"], p["path"]) != ("unknown", FOREIGN)]
    if left or rc != 1:  # exit 1: the user's file is still there (left alone)
        fails.append(f"(4) `megamem repair` exit {rc}, problems left: {left}; it did {data['done']}")
    quarantined = sorted(p.name for p in store.glob("quarantine/*/*"))
    want_q = [] if how in ("delete", "left") else [name]
    if quarantined != want_q:
        fails.append(f"(4) quarantine holds {quarantined}, not {want_q}")
    if any(p.name.startswith(".") and p.name != ".lock" for p in store.iterdir()):
        fails.append(f"(4) a temporary file is still there: {sorted(p.name for p in store.iterdir())}")
    rc, out, err = fl.cli("list", "--json", "--store", store)
    if rc != 0 or [(d["id"], d["text"]) for d in json.loads(out)] != WANT:
        fails.append(f"(5) after repair `megamem list` exit {rc}: {out[:300]} {err[:300]}")
    before, after = Pool.load(base / POOL), fl.attempt(lambda: Pool.load(store / POOL))
    if after[0] != "ok" or after[1].updates != before.updates or not torch.equal(after[1].memory, before.memory):
        fails.append(f"(4) after repair the pool is not the one the texts make: {after}")
    rc, out, err = fl.cli("ask", QUESTION, "--max-new-tokens", "2", "--store", store) if ask else (0, "", "")
    if rc != 0:
        fails.append(f"(5) after repair `megamem ask` exit {rc}: {err.strip()}")


# -- the tests ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tiny_dir, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("pool-base")
    return build_pool_store(work / "store", tiny_dir, save_untrained_params(tiny_dir, work / "params.safetensors"))


@pytest.mark.parametrize(("target", "how"), damage_cases())
def test_damage_matrix(base, tmp_path, target, how):
    """Every damage; the questions that load the model only for some (benchmarks/faults.py asks in every case)."""
    assert run_pool_case(base, tmp_path, target, how, ask=how in ("flip", "left")) == []


def test_every_file_is_checked_when_read(base, tmp_path, monkeypatch):
    """A damaged pool, list or settings is an error naming the file on open or list; damaged parameters one
    before the model loads (not after seconds of loading it)."""
    cases = [(POOL, "flip"), (POOL, "letter"), (SETTINGS, "letter"), (PARAMS, "flip")]
    for n, (name, how) in enumerate(cases):
        store = tmp_path / f"s{n}"
        shutil.copytree(base, store)
        p = store / name
        if how == "flip":
            flip(p)
        else:  # a letter of the stored text; the drop seed in the settings
            old, new = (b"Quillon", b"Quillan") if name == POOL else (b'"seed": 0', b'"seed": 1')
            assert old in p.read_bytes()
            p.write_bytes(p.read_bytes().replace(old, new, 1))
        if name == PARAMS:
            monkeypatch.setattr("megamem.memoryllm.store.load_model", lambda *a: pytest.fail("the model loaded"))
            with pytest.raises(MegamemError, match=f"{PARAMS} is damaged.*megamem repair --store"):
                Memory(store).ask(QUESTION, max_new_tokens=2)
            continue
        with pytest.raises(MegamemError, match=f"{name} is damaged.*megamem repair --store"):
            Memory(store).list()


def test_parameters_with_no_good_copy_are_not_mended(tmp_path, tiny_dir):
    """A store made with the untrained parameters of a model megamem ships none for: damaged parameters cannot
    be restored; repair says so and changes nothing (the pool and its texts stay as they are)."""
    store = build_pool_store(tmp_path / "store", tiny_dir)
    flip(store / PARAMS)
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    rc, out, err = fl.cli("repair", "--json", "--store", store)
    done = " ".join(json.loads(out)["done"])
    assert rc == 1 and "cannot be mended" in done and "the pool and its texts are left as they are" in done, out
    assert err == ""
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before
    assert [(r.id, r.text) for r in Memory(store).list()] == WANT


def test_both_lists_damaged_keeps_what_it_can_and_says_so(base, tmp_path):
    """A letter changed in the pool's list and in memories.json: repair keeps the memories as the pool lists
    them, says the texts may hold the damage, and puts both damaged files in quarantine."""
    store = tmp_path / "store"
    shutil.copytree(base, store)
    for name in (POOL, MEMORIES):
        p = store / name
        p.write_bytes(p.read_bytes().replace(b"Skarvik", b"Skarvek", 1))
    rc, out, err = fl.cli("repair", "--json", "--store", store)
    done = json.loads(out)["done"]
    assert rc == 0 and any("failed its checksum in both" in line for line in done), out
    assert sorted(p.name for p in store.glob("quarantine/*/*")) == [MEMORIES, POOL]
    listed = [(r.id, r.text) for r in Memory(store).list()]
    assert listed == [(i, t.replace("Skarvik", "Skarvek")) for i, t in WANT]
    assert fl.cli("verify", "--store", store)[0] == 0


def test_a_killed_writes_temporary_file_goes_with_the_next_write(base, tmp_path):
    """Only the store's own temporary files whose writer is gone are removed: a running writer's and a user's
    look-alike stay; verify reports each."""
    store = tmp_path / "store"
    shutil.copytree(base, store)
    from megamem.store.files import writer_token

    dead, live, foreign = (
        f".{POOL}.{dead_writer()}.{'cd' * 8}",
        f".{POOL}.{writer_token()}.{'ef' * 8}",
        f".{POOL}.backup",
    )
    for name in (dead, live, foreign):
        (store / name).write_bytes(b"\0" * 4096)
    rc, out, _ = fl.cli("verify", "--json", "--store", store)
    got = {(p["kind"], p["path"]) for p in json.loads(out)["problems"]}
    assert got == {("leftover", dead), ("in-progress", live), ("unknown", foreign)}
    Memory(store).add("Mira bakes rye bread on Sundays.", id="bread")
    assert not (store / dead).exists() and (store / live).exists() and (store / foreign).exists()
    assert [r.id for r in Memory(store).list()] == [*(i for i, _ in WANT), "bread"]


def test_memories_json_one_commit_behind_is_a_note_and_caught_up(base, tmp_path):
    """A write killed between the pool's commit and memories.json's: verify notes it (not a problem), and the
    next write brings memories.json up to date."""
    store = tmp_path / "store"
    shutil.copytree(base, store)
    doc = json.loads((store / MEMORIES).read_text())
    from megamem.memoryllm.files import PoolRecord, write_memories

    write_memories(store, doc["settings"], [PoolRecord(**r) for r in doc["records"][:-1]])
    rc, out, _ = fl.cli("verify", "--json", "--store", store)
    assert rc == 0 and [(p["kind"], p["path"]) for p in json.loads(out)["problems"]] == [("leftover", MEMORIES)]
    Memory(store).add("Mira bakes rye bread on Sundays.", id="bread")
    ids = [r["id"] for r in json.loads((store / MEMORIES).read_text())["records"]]
    assert ids == [*(i for i, _ in WANT), "bread"] and fl.cli("verify", "--store", store)[0] == 0


class Killed(BaseException):
    """Stands for the process dying at a point of the creation (write_atomic leaves no temporary file)."""


@pytest.mark.parametrize("killed_at", ["write_memories", "write_pool", "write_settings"])
def test_a_killed_creation_is_one_clear_error_and_repair_finishes_it(tmp_path, tiny_dir, monkeypatch, killed_at):
    """Killed after the parameters (and memories.json, and the empty pool): read commands say what to run in
    one line; repair finishes the creation (the settings' copy is in memories.json) or says to add again; the
    add then works either way."""
    import megamem.memoryllm.store as pool_store

    store = tmp_path / "store"

    def die(*args, **kw):
        raise Killed

    monkeypatch.setattr(pool_store, killed_at, die)
    with pytest.raises(Killed):
        Memory(store, backend="memoryllm", model=str(tiny_dir), config=SMALL).add("A first memory.")
    monkeypatch.undo()
    for args in (("list",), ("info",), ("ask", QUESTION)):
        rc, out, err = fl.cli(*args, "--store", store)
        assert rc == 1 and fl.unclean(rc, out, err) is None, (args, err)
        assert "creation did not finish" in err and f"megamem repair --store {store}" in err, err
        assert "megamem add --backend memoryllm" in err
    rc, out, err = fl.cli("verify", "--json", "--store", store)
    assert rc == 1 and [p["kind"] for p in json.loads(out)["problems"]] == ["settings"]
    rc, out, err = fl.cli("repair", "--json", "--store", store)
    done = " ".join(json.loads(out)["done"])
    finished = killed_at != "write_memories"  # killed before memories.json: no copy of the settings to finish from
    assert rc == (0 if finished else 1) and err == "", out
    assert ("written again from its copy" in done) if finished else ("creates it again" in done), out
    rc, out, err = fl.cli("add", "A first memory.", "--backend", "memoryllm", "--model", tiny_dir, "--store", store)
    assert rc == 0, err
    assert [r.text for r in Memory(store).list()] == ["A first memory."]
    assert fl.cli("verify", "--store", store)[0] == 0


def test_an_old_store_reads_and_repair_adds_checksums(base, tmp_path):
    """A store written before the checks (settings without their checksum, a pool without checksums, no
    memories.json) reads as before; verify notes it; repair adds the checksums and memories.json."""
    from safetensors.torch import save_file

    store = tmp_path / "store"
    shutil.copytree(base, store)
    settings = json.loads((store / SETTINGS).read_text())
    (store / SETTINGS).write_text(json.dumps({k: v for k, v in settings.items() if k not in ("sha256", "layout")}))
    pool = Pool.load(store / POOL)
    meta = Pool.metadata(store / POOL)
    old = {"records": meta["records"], "updates": meta["updates"], "seed": meta["seed"], "format": meta["format"]}
    save_file({"memory": pool.memory}, str(store / POOL), metadata=old)
    (store / MEMORIES).unlink()
    assert [(r.id, r.text) for r in Memory(store).list()] == WANT
    rc, out, _ = fl.cli("verify", "--json", "--store", store)
    assert rc == 0 and {p["kind"] for p in json.loads(out)["problems"]} == {"old"}
    rc, out, _ = fl.cli("repair", "--store", store)
    assert rc == 0, out
    rc, out, _ = fl.cli("verify", "--json", "--store", store)
    assert rc == 0 and json.loads(out)["problems"] == []
    assert torch.equal(Pool.load(store / POOL).memory, pool.memory)


def test_a_creation_killed_while_copying_the_parameters_is_written_anew(tmp_path, tiny_dir):
    """All a creation killed that early leaves is its temporary parameters file: read commands name the folder
    as an unfinished MemoryLLM store (not 'not empty'), and the next add sweeps the file and creates the store."""
    store = tmp_path / "store"
    store.mkdir()
    temp = store / f".{PARAMS}.{dead_writer()}.{'12' * 8}"
    temp.write_bytes(b"\0" * 1024)
    rc, out, err = fl.cli("list", "--store", store)
    assert rc == 1 and fl.unclean(rc, out, err) is None and "creation did not finish" in err, err
    rc, out, err = fl.cli("repair", "--json", "--store", store)  # nothing to finish from: it says so, changes nothing
    assert rc == 1 and "creates it again" in " ".join(json.loads(out)["done"]) and err == "", (out, err)
    assert [p.name for p in store.iterdir()] == [temp.name]
    rc, out, err = fl.cli("add", "A first memory.", "--backend", "memoryllm", "--model", tiny_dir, "--store", store)
    assert rc == 0, err
    assert not temp.exists() and [r.text for r in Memory(store).list()] == ["A first memory."]
    other = tmp_path / "user-folder"  # a file that is merely named like a store's is not taken for one
    other.mkdir()
    (other / PARAMS).write_bytes(b"\x10" + b"\0" * 7 + b'{"a": 1}' + b"\0" * 8)
    rc, out, err = fl.cli("verify", "--store", other)
    assert rc == 1 and err == f"error: no megamem store at {other}\n", err
