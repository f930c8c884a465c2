"""Merge, split and consolidate killed at every step (megamem.store.intents): nothing lost, nothing doubled, and
`verify` truthful; consolidated ids kept; the cortex checked by verify and set aside by repair (issue 25)."""

from __future__ import annotations

import json

import opfaults
import pytest
from faultlib import quick_recipe

import megamem.store.files as files
from megamem import Item, Memory, schema
from megamem.errors import MegamemError
from megamem.ops.consolidate import ConsolidationConfig, bring_back, consolidate, withdraw
from megamem.ops.merge import merge, split
from megamem.store import cortex
from megamem.store.health import repair, verify

QUICK = ConsolidationConfig(rank=4, epochs=1, batch_size=2, drift_questions=2, recall_tokens=16, lr=1e-2)
TEXTS = {
    "ada-1": "Ada Quimbleton drew the Harlow tower in 1931.",
    "ada-2": "Ada Quimbleton was born in Harlow in 1899.",
    "ada-3": "Ada Quimbleton painted the Harlow tower.",
    "ferry": "The Skarvik ferry crossed Lake Tessin 400 times in 2021.",
}


class Killed(BaseException):
    """What a crash point raises in these tests: the operation stops there, as a kill would stop it."""


@pytest.fixture()
def mem(tiny_dir, tmp_path):
    m = Memory(tmp_path / "store", model=str(tiny_dir), recipe=quick_recipe())
    m.add_many([Item(t, id=i) for i, t in TEXTS.items()])
    m.warnings.clear()
    return m


DEAD = "4194303-1"  # a writer token no process has (pid_max is at most 4194304): a writer proven gone


def kill_at(monkeypatch, store, point: str, nth: int = 1) -> None:
    """Interrupt the running operation at its nth pass through `point`, and make its intent's writer one that is
    gone (as after a kill -9): the next writer settles it."""
    seen = []

    def hook(name: str) -> None:
        if name == point:
            seen.append(name)
            if len(seen) == nth:
                for f in (store / "intents").glob("*.json"):
                    f.write_text(json.dumps(json.loads(f.read_text()) | {"writer": DEAD}))
                raise Killed(point)

    monkeypatch.setattr(files, "crash_hook", hook)


def texts_kept(m: Memory) -> list[str]:
    """Every member text the store still holds: stored memories (a merged one as its members) and cortexes."""
    return opfaults.held_and_routed(m)[0]


def routed(m: Memory) -> list[str]:
    """The texts the gate can route to (superseded memories left out) and those the cortexes hold: each member
    once, or it is doubled."""
    return opfaults.held_and_routed(m)[1]


def kinds(m: Memory) -> set[str]:
    return {p.kind for p in verify(m.path) if p.serious}


def settled(m: Memory) -> None:
    """After the kill: verify names the interrupted operation; repair settles it; then 0 lost, 0 doubled, and
    verify says ok."""
    assert "interrupted" in kinds(m), verify(m.path)
    done = repair(m.path)
    assert any("finished" in line or "rolled back" in line for line in done), done
    fresh = Memory(m.path)
    assert sorted(texts_kept(fresh)) == sorted(TEXTS.values())
    assert sorted(routed(fresh)) == sorted(TEXTS.values())
    assert kinds(fresh) == set() and list((m.path / "intents").iterdir()) == []


@pytest.mark.parametrize(
    ("point", "nth"), [("merge:intent", 1), ("merge:committed", 1), ("merge:forgot", 1), ("merge:forgot", 2)]
)
def test_a_merge_killed_at_any_step_is_settled(mem, monkeypatch, point, nth):
    kill_at(monkeypatch, mem.path, point, nth)
    with pytest.raises(Killed):
        merge(mem, ["ada-1", "ada-2"], id="ada")
    monkeypatch.setattr(files, "crash_hook", None)
    settled(mem)


@pytest.mark.parametrize(("point", "nth"), [("split:intent", 1), ("split:member", 1), ("split:members", 1)])
def test_a_split_killed_at_any_step_is_settled_and_runs_again(mem, monkeypatch, point, nth):
    merge(mem, ["ada-1", "ada-2"], id="ada")
    kill_at(monkeypatch, mem.path, point, nth)
    with pytest.raises(Killed):
        split(mem, "ada")
    monkeypatch.setattr(files, "crash_hook", None)
    # the probe's path: the next command (here the split again), not repair, settles it and finishes the job
    fresh = Memory(mem.path)
    if fresh.store.get("ada", missing_ok=True) is not None:
        assert [r.id for r in split(fresh, "ada")] == ["ada-1", "ada-2"]
    assert sorted(r.id for r in fresh.list()) == sorted(TEXTS)
    assert kinds(fresh) == set() and sorted(routed(fresh)) == sorted(TEXTS.values())


def test_a_nested_split_killed_after_a_member_routes_no_member_twice(mem, monkeypatch):
    merge(mem, ["ada-1", "ada-2"], id="ada")
    merge(mem, ["ada", "ada-3"], id="ada-all")  # a merged memory merged again: its members flatten
    kill_at(monkeypatch, mem.path, "split:member", 1)
    with pytest.raises(Killed):
        split(mem, "ada-all")
    monkeypatch.setattr(files, "crash_hook", None)
    fresh = Memory(mem.path)
    assert sorted(routed(fresh)) == sorted(TEXTS.values())  # the stored member is superseded by ada-all
    settled_lines = repair(mem.path)
    assert any("rolled back" in line for line in settled_lines)
    assert sorted(routed(Memory(mem.path))) == sorted(TEXTS.values())


@pytest.mark.parametrize(
    "point",
    [
        "consolidate:intent",
        "consolidate:written",
        "consolidate:switched",
        "consolidate:memory-file",
        "consolidate:retired",
    ],
)
def test_a_consolidation_killed_at_any_step_is_settled(mem, monkeypatch, point):
    consolidate(mem, ["ferry"], QUICK)
    kill_at(monkeypatch, mem.path, point)
    with pytest.raises(Killed):
        consolidate(mem, ["ada-1", "ada-2"], QUICK)
    monkeypatch.setattr(files, "crash_hook", None)
    settled(mem)
    versions = [p.name for p in (mem.path / "cortex").iterdir() if "-" in p.name]
    assert versions == [cortex.live_version(mem.path)]  # no orphaned version left behind


def test_an_orphaned_cortex_version_is_reported_and_removed_by_the_next_write(mem):
    consolidate(mem, ["ferry"], QUICK)
    orphan = mem.path / "cortex" / "v20260101000000-deadbeef"
    orphan.mkdir()
    (orphan / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    assert any(p.kind == "leftover" and p.path.endswith(orphan.name) for p in verify(mem.path))
    consolidate(mem, ["ada-3"], QUICK)
    assert not orphan.exists()


def test_a_consolidated_id_is_kept_and_can_be_withdrawn(mem):
    consolidate(mem, ["ada-3"], QUICK)  # kept in the store: forget, not withdraw, takes it out
    with pytest.raises(MegamemError, match="'ada-3' is still stored"):
        withdraw(mem, "ada-3")
    mem.forget("ada-3")
    assert mem.consolidated() == [] and kinds(mem) == set()
    consolidate(mem, ["ferry"], QUICK, forget=True)
    with pytest.raises(MegamemError, match="consolidated memory's"):
        mem.add(TEXTS["ada-1"] + " Again.", id="ferry")
    assert [c.id for c in mem.consolidated()] == ["ferry"]  # the earlier one stays in the record
    gone = withdraw(mem, "ferry")
    assert gone.text == TEXTS["ferry"] and mem.consolidated() == []
    record = json.loads(cortex.pointer(mem.path).read_text())
    assert [w["id"] for w in record["withdrawn"]] == ["ferry"] and kinds(mem) == set()
    mem.add(TEXTS["ferry"], id="ferry")  # the id is free again
    with pytest.raises(MegamemError, match="no consolidated memory 'nosuch'"):
        withdraw(mem, "nosuch")
    report = consolidate(mem, [], QUICK, retrain=True)  # the record holds nothing: the cortex goes
    assert report["removed"] and mem.cortex() is None


@pytest.mark.parametrize("damage", ["flip-weights", "delete-config", "truncate-pointer", "edit-text", "copy"])
def test_a_damaged_cortex_fails_verify_and_repair_mends_it_or_brings_its_memories_back(mem, damage):
    consolidate(mem, ["ferry", "ada-3"], QUICK)
    live = mem.path / "cortex" / cortex.live_version(mem.path)
    pointer = cortex.pointer(mem.path)
    if damage == "flip-weights":
        w = live / "adapter_model.safetensors"
        data = bytearray(w.read_bytes())
        data[-4096:] = bytes(b ^ 0xFF for b in data[-4096:])
        w.write_bytes(bytes(data))
    elif damage == "truncate-pointer":
        pointer.write_bytes(pointer.read_bytes()[:100])
    elif damage == "edit-text":
        pointer.write_text(pointer.read_text().replace("Skarvik", "Skarvic"))
    elif damage == "copy":
        (live / "record.json").write_text("{")
    else:
        (live / "adapter_config.json").unlink()
    assert kinds(mem) & {"corrupt", "missing"}, verify(mem.path)
    if damage != "copy":
        with pytest.raises(MegamemError, match="cortex .* is damaged"):
            Memory(mem.path).ask("Which ferry crosses Lake Tessin?")
    displaced: dict = {}
    done = repair(mem.path, displaced)
    assert any("cortex" in line for line in done) and kinds(mem) == set(), (done, verify(mem.path))
    fresh = Memory(mem.path, recipe=quick_recipe())
    assert fresh.ask("Which ferry crosses Lake Tessin?").text is not None
    if damage in ("flip-weights", "delete-config"):  # the weights are gone: the memories are learned again
        assert fresh.cortex() is None and any((mem.path / "quarantine").rglob("current.json"))
        back = bring_back(fresh, displaced["default"])
        assert sorted(r.id for r in back) == ["ada-3", "ferry"]
        assert fresh.show("ferry").text == TEXTS["ferry"]
        # they were kept in the store (consolidated): each has its own adapter again, an ordinary memory
        assert not any(schema.is_consolidated(fresh.show(i)) for i in ("ferry", "ada-3"))
        assert fresh.adapter("ferry") is not None and kinds(fresh) == set()
    else:  # a whole copy of the record restores it, texts exactly as consolidated
        assert fresh.cortex() is not None and displaced == {"default": []}
        assert sorted(c.text for c in fresh.consolidated()) == sorted([TEXTS["ferry"], TEXTS["ada-3"]])
    assert sorted(texts_kept(fresh)) == sorted(TEXTS.values())


@pytest.mark.parametrize(("op", "point", "settle"), [("merge", "merge:committed", "again")])
def test_a_real_kill_inside_an_operation_loses_nothing(tiny_dir, tmp_path, op, point, settle):
    """The same, with the process killed by SIGKILL at the hooked step (MEGAMEM_CRASH_AT); the long run,
    benchmarks/op_kills.py, tries every step and both settling paths."""
    templates = opfaults.build_template(tmp_path / "templates", tiny_dir)
    result = opfaults.trial(templates, tmp_path, op, point, settle)
    assert result["failures"] == [], result


def test_megamem_repair_learns_a_damaged_cortexs_memories_again(mem):
    """The command line's repair sets the damaged cortex aside and learns its memories again (the gate has them)."""
    from typer.testing import CliRunner

    from megamem.cli import app

    consolidate(mem, ["ferry"], QUICK)
    (mem.path / "cortex" / cortex.live_version(mem.path) / "adapter_config.json").write_text("{")
    result = CliRunner().invoke(app, ["repair", "--store", str(mem.path)])
    assert result.exit_code == 0, result.output
    assert "back in the gate" in result.output
    fresh = Memory(mem.path)
    assert fresh.show("ferry").text == TEXTS["ferry"] and fresh.cortex() is None and kinds(fresh) == set()
