"""Memories that change: a memory that replaces an older one wins in the gate; forgetting it brings the old back."""

import json

import pytest

from megamem import Item, Memory, Recipe
from megamem.entry import run
from megamem.errors import MegamemError
from megamem.updates import name_overlap, proper_names

OLD = "The Vexmoor bridge, which spans the river Ilsen, is painted bright green."
NEW = "In 2033 the Vexmoor bridge over the river Ilsen was repainted red."
OTHER = "The winter ferry across Lake Tessin is called the Skarvik and carries forty passengers."
QUESTION = "What colour is the Vexmoor bridge?"


@pytest.fixture()
def mem(tmp_path, tiny_dir):
    m = Memory(tmp_path / "store", model=str(tiny_dir), recipe=Recipe(epochs=1, min_tokens=0))
    m.add_many([Item(OLD, id="bridge-2031"), Item(OTHER, id="ferry")])
    return m


def routed(mem, question=QUESTION):
    return [i for i, _ in mem.route(question)]


def test_newer_memory_replaces_the_older_in_the_gate(mem):
    assert routed(mem)[0] == "bridge-2031"
    mem.add(NEW, id="bridge-2033", replaces="bridge-2031")
    assert routed(mem)[0] == "bridge-2033" and "bridge-2031" not in routed(mem)  # the older takes no part
    assert mem.show("bridge-2033").metadata["megamem.replaces"] == ["bridge-2031"]
    reader = Memory(mem.path)  # another process sees the same rule (it is derived from the stored records)
    assert routed(reader)[0] == "bridge-2033" and "bridge-2031" not in routed(reader)
    mem.forget("bridge-2033")
    assert routed(mem)[0] == "bridge-2031"  # forgetting the newer brings the older back
    assert routed(reader)[0] == "bridge-2031"


def test_without_replaces_both_are_mixed_and_a_likely_update_is_named(mem):
    mem.warnings.clear()
    mem.add(NEW, id="bridge-2033")
    assert set(routed(mem)) >= {"bridge-2031", "bridge-2033"}
    assert any("may update memory 'bridge-2031'" in w for w in mem.warnings), mem.warnings
    mem.warnings.clear()
    mem.add("Pim the axolotl is the mascot of the Quillon Institute.", id="pim")
    assert not any("may update" in w for w in mem.warnings)


def test_replacing_an_unknown_memory_is_refused_before_training(mem, monkeypatch):
    monkeypatch.setattr("megamem.learn.train_adapter", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(MegamemError, match="replaces 'nope', which is not a stored memory"):
        mem.add(NEW, replaces="nope")
    with pytest.raises(MegamemError, match="megamem's own"):
        mem.add(NEW, metadata={"megamem.replaces": ["ferry"]})


def test_replaces_in_a_jsonl_batch_and_on_the_command_line(mem, tmp_path, capsys):
    j = tmp_path / "m.jsonl"
    j.write_text(
        json.dumps({"text": OLD.replace("green", "blue"), "id": "b1"})
        + "\n"
        + json.dumps({"text": NEW, "id": "b2", "replaces": "b1"})
        + "\n"
    )
    assert run(["add", "--jsonl", str(j), "--epochs", "1", "--store", str(mem.path)]) == 0
    assert "b1" not in routed(Memory(mem.path))
    rc = run(["add", OTHER.replace("forty", "fifty"), "--replaces", "ferry", "--epochs", "1", "--store", str(mem.path)])
    assert rc == 0
    assert "ferry" not in routed(Memory(mem.path), "What is the Lake Tessin ferry called?")
    capsys.readouterr()
    assert run(["add", NEW, "--replaces", "../x", "--store", str(mem.path)]) == 1
    assert "replaces id" in capsys.readouterr().err


def test_names_are_the_capitalised_words_inside_sentences():
    assert proper_names("The Vexmoor bridge. Ida Carrow painted it.") == {"Vexmoor", "Carrow"}
    assert name_overlap(OLD, NEW) == 1.0 and name_overlap(OLD, OTHER) == 0.0
