"""Merging and splitting (megamem.ops.merge): one adapter for one subject's memories, and the members back again."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from faultlib import quick_recipe
from typer.testing import CliRunner

from megamem import Item, Memory
from megamem.cli import app
from megamem.errors import MegamemError
from megamem.ops.merge import MERGED, diverged, joined, merge, split, subjects
from megamem.store.health import verify
from megamem.train import train_adapter

ADA = {
    "ada-1": "Ada Quimbleton designed the Harlow Cross tower in Quillon in 1931.",
    "ada-2": "Ada Quimbleton was born in Harlow Cross near Quillon in 1899 and studied stone there.",
}
OTHER = {"ferry": "The Skarvik ferry crossed Lake Tessin 400 times in 2021."}
PARA = "In 1931 Ada Quimbleton drew the plans of the Harlow Cross tower in Quillon."


@pytest.fixture()
def mem(tiny_dir, tmp_path):
    m = Memory(tmp_path / "store", model=str(tiny_dir), recipe=quick_recipe())
    m.add_many(
        [
            Item(ADA["ada-1"], [PARA], {"topic": "tower"}, "ada-1"),
            Item(ADA["ada-2"], id="ada-2"),
            Item(OTHER["ferry"], id="ferry"),
        ]
    )
    m.warnings.clear()
    return m


def weights(adapter) -> dict[str, torch.Tensor]:
    return {f"{name}.{i}": t for name, ab in adapter.weights.items() for i, t in enumerate(ab)}


def same_adapter(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_merge_learns_one_adapter_on_the_joined_texts_and_forgets_the_members(mem):
    rec = merge(mem, ["ada-1", "ada-2"], id="ada")
    assert sorted(r.id for r in mem.list()) == ["ada", "ferry"]
    assert rec.text == ADA["ada-1"] + "\n\n" + ADA["ada-2"]
    assert rec.metadata["paraphrases"] == [PARA + "\n\n" + ADA["ada-2"]]  # a member without one gives its text
    held = rec.metadata[MERGED]
    assert [m["id"] for m in held] == ["ada-1", "ada-2"] and held[0]["metadata"] == {"topic": "tower"}
    assert held[0]["paraphrases"] == [PARA]
    # the adapter is the store's recipe on the joined texts, exactly
    model, tok = mem.load()
    want = train_adapter(model, tok, [rec.text, *rec.metadata["paraphrases"]], mem.lora, mem.recipe)
    stored = mem.adapter("ada")
    as_stored = {
        k: t.to(torch.bfloat16).to(stored_t.dtype)
        for (k, t), stored_t in zip(weights(want).items(), weights(stored).values(), strict=True)
    }
    assert as_stored.keys() == weights(stored).keys()
    assert all(torch.equal(as_stored[k], weights(stored)[k]) for k in as_stored)  # the store keeps bf16
    # keys: the joined texts' and every member text's, so a question worded like a member finds the merged memory
    assert rec.n_keys == 2 + 3
    assert mem.route("Who designed the Harlow Cross tower?")[0][0] == "ada"
    assert mem.warnings == [] and verify(mem.path) == []


def test_split_stores_the_members_again_as_a_fresh_add_would(mem, tiny_dir, tmp_path):
    merge(mem, ["ada-1", "ada-2"], id="ada")
    recs = split(mem, "ada")
    assert [r.id for r in recs] == ["ada-1", "ada-2"]
    assert sorted(r.id for r in mem.list()) == ["ada-1", "ada-2", "ferry"]
    again = mem.show("ada-1")
    assert again.text == ADA["ada-1"] and again.metadata == {"topic": "tower", "paraphrases": [PARA]}
    fresh = Memory(tmp_path / "fresh", model=str(tiny_dir), recipe=quick_recipe())
    fresh.add(ADA["ada-1"], [PARA], {"topic": "tower"}, id="ada-1")
    assert same_adapter(mem.adapter("ada-1"), fresh.adapter("ada-1"))
    assert mem.warnings == []  # no "may update" note between siblings
    with pytest.raises(MegamemError, match="not a merged memory"):
        split(mem, "ferry")


def test_what_a_member_replaced_stays_replaced_through_merge_and_split(mem):
    mem.add("Ada Quimbleton designed the Harlow Cross tower in 1932.", id="ada-3", replaces="ada-1")
    with pytest.raises(MegamemError, match="replaced by a newer one"):
        merge(mem, ["ada-1", "ada-2"])
    merge(mem, ["ada-3", "ada-2"], id="ada")
    mem.ask("x", mode="qa", max_new_tokens=1)  # derive the superseded set from the store
    assert "ada-1" in mem.superseded()  # ada-1 is still stored, and still out of the gate
    split(mem, "ada")
    assert mem.show("ada-3").metadata["megamem.replaces"] == ["ada-1"]
    mem.ask("x", mode="qa", max_new_tokens=1)
    assert "ada-1" in mem.superseded()


def test_merging_a_merged_memory_flattens_its_members(mem):
    mem.add_many([Item(f"Bo Quill {verb}.", id=f"bo-{verb}") for verb in ("sings", "swims", "runs")])
    merge(mem, ["bo-sings", "bo-swims"], id="bo")
    rec = merge(mem, ["bo", "bo-runs"], id="all")
    assert [m["id"] for m in rec.metadata[MERGED]] == ["bo-sings", "bo-swims", "bo-runs"]
    assert rec.text == "Bo Quill sings.\n\nBo Quill swims.\n\nBo Quill runs."
    assert [r.id for r in split(mem, "all")] == ["bo-sings", "bo-swims", "bo-runs"]


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (["ada-1"], "two or more"),
        (["ada-1", "ada-1"], "given twice"),
        (["ada-1", "nope"], "nope"),
        (["ada-1", "bad id!"], "merge id"),
    ],
)
def test_bad_merges_are_refused_before_anything_is_learned(mem, monkeypatch, ids, message):
    before = sorted((r.id, r.adapter_sha256) for r in mem.list())
    monkeypatch.setattr("megamem.learn.train_adapter", lambda *a, **k: pytest.fail("learned before checking"))
    with pytest.raises(MegamemError, match=message):
        merge(mem, ids)
    assert sorted((r.id, r.adapter_sha256) for r in mem.list()) == before


def test_members_of_different_namespaces_are_not_merged(mem):
    mem.add_many([Item("Ada Quimbleton likes tea.", id="ns-ada", reserved={"megamem.namespace": "acme"})])
    with pytest.raises(MegamemError, match="different namespaces"):
        merge(mem, ["ada-1", "ns-ada"])


def test_a_crash_before_the_members_are_forgotten_loses_nothing(mem, monkeypatch):
    def crash(memory_id):
        raise OSError("killed")

    monkeypatch.setattr(mem, "forget", crash)
    with pytest.raises(OSError):
        merge(mem, ["ada-1", "ada-2"], id="ada")
    assert sorted(r.id for r in mem.list()) == ["ada", "ada-1", "ada-2", "ferry"]  # all stored
    reopened = Memory(mem.path, model=mem.model_name)
    reopened.ask("x", mode="qa", max_new_tokens=1)
    assert {"ada-1", "ada-2"} <= reopened.superseded()  # and the gate already prefers the merged one
    assert reopened.route("Who designed the Harlow Cross tower?")[0][0] == "ada"


def test_a_merged_members_id_cannot_be_taken_by_a_new_memory(mem):
    merge(mem, ["ada-1", "ada-2"], id="ada")
    with pytest.raises(MegamemError, match="choose another id"):
        mem.add("Something else entirely.", id="ada-1")


def test_subjects_group_close_memories_that_name_the_same_things(mem):
    assert subjects(mem) == [["ada-1", "ada-2"]]
    assert subjects(mem, cosine=0.99) == []
    assert subjects(mem, names=0.0, cosine=-1.0) == [["ada-1", "ada-2", "ferry"]]
    merge(mem, ["ada-1", "ada-2"], id="ada")
    assert diverged(mem) == []
    assert diverged(mem, names=1.01) == [("ada", [["ada-1"], ["ada-2"]])]


def test_joined_texts():
    parts = [{"text": "A.", "paraphrases": ["a1", "a2"]}, {"text": "B.", "paraphrases": []}]
    assert joined(parts) == ("A.\n\nB.", ["a1\n\nB.", "a2\n\nB."])


def test_merge_and_split_from_the_command_line(mem):
    run = CliRunner().invoke
    res = run(app, ["merge", "--suggest", "--store", str(mem.path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["subjects"] == [["ada-1", "ada-2"]]
    res = run(app, ["merge", "ada-1", "ada-2", "--id", "ada", "--store", str(mem.path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"id": "ada", "members": ["ada-1", "ada-2"]}
    res = run(app, ["merge", "ada", "--store", str(mem.path)])
    assert res.exit_code == 1 and res.stderr.startswith("error: merge needs two or more")
    res = run(app, ["merge", "--store", str(mem.path)])
    assert res.exit_code == 1 and "--suggest" in res.stderr
    res = run(app, ["split", "ada", "--store", str(mem.path)])
    assert res.exit_code == 0 and "split ada into ada-1, ada-2" in res.stdout
    res = run(app, ["split", "ada", "--store", str(mem.path)])
    assert res.exit_code == 1 and res.stderr.startswith("error:") and "'ada'" in res.stderr


def test_a_merged_memory_is_trained_to_its_members_exposure(mem, monkeypatch):
    """Each member was learned with at least min_tokens example tokens; the merged memory's floor is that once per
    member (with one floor a merged memory saw each sentence about half as often, and answered worse)."""
    import megamem.memory

    mem.recipe = replace(mem.recipe, min_tokens=200)
    seen = []
    real = megamem.memory.learn

    def spy(model, tok, texts, lora, recipe, *a, **kw):
        seen.append(recipe)
        return real(model, tok, texts, lora, recipe, *a, **kw)

    monkeypatch.setattr(megamem.memory, "learn", spy)
    merge(mem, ["ada-1", "ada-2"], id="ada")
    assert seen[-1].min_tokens == 2 * 200 and seen[-1].epochs == mem.recipe.epochs
    mem.add(OTHER["ferry"] + " It sails at dawn.", id="again")
    assert seen[-1].min_tokens == 200  # a plain add keeps the store's recipe
