"""Consolidation (megamem.ops.consolidate): memories rehearsed into the store's cortex, their adapters retired."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from faultlib import quick_recipe
from typer.testing import CliRunner

import megamem.memory as memory_module
import megamem.ops.consolidate as consolidation
import megamem.store.cortex as cortex_files
from megamem import Item, Memory, schema
from megamem.adapters import LoraSpec
from megamem.cli import app
from megamem.errors import MegamemError
from megamem.inject import clear, set_mixture
from megamem.ops.consolidate import ConsolidationConfig, consolidate, rehearsal
from megamem.ops.merge import merge
from megamem.store.cortex import read_cortex
from megamem.store.health import verify
from megamem.train import collate, lm_loss

QUICK = ConsolidationConfig(rank=4, epochs=3, batch_size=2, drift_questions=4, recall_tokens=24, lr=1e-2)
TEXTS = {
    "heron": "Zorblatt the heron has lived on Quillon pier since 1998.",
    "ferry": "The Skarvik ferry crossed Lake Tessin 400 times in 2021.",
    "tower": "Ada Quimbleton designed the Harlow Cross tower in 1931.",
}


@pytest.fixture()
def mem(tiny_dir, tmp_path):
    m = Memory(tmp_path / "store", model=str(tiny_dir), recipe=quick_recipe())
    m.add_many([Item(t, id=i) for i, t in TEXTS.items()])
    return m


def mixtures(monkeypatch) -> list:
    """The mixture of every decode step from now on (a spy on the answer pipeline's decode)."""
    seen = []
    real = memory_module.decode

    def spy(model, tok, step):
        seen.append(step)
        return real(model, tok, step)

    monkeypatch.setattr("megamem.memory.decode", spy)
    return seen


def adapter_bytes(mem, memory_id: str) -> int:
    folder = mem.store.folder(memory_id)
    return sum((folder / n).stat().st_size for n in ("adapter_config.json", "adapter_model.safetensors"))


def test_consolidated_memories_keep_text_and_keys_and_the_cortex_answers_for_them(mem, monkeypatch):
    freed = adapter_bytes(mem, "heron") + adapter_bytes(mem, "ferry")
    report = consolidate(mem, ["heron", "ferry"], QUICK)
    assert report["consolidated"] == ["heron", "ferry"] and report["held"] == 2 and report["steps"] > 0
    assert report["bytes_freed"] == freed  # the adapters' files, nothing else
    assert [r.id for r in mem.list()] == ["heron", "ferry", "tower"]  # still memories: listed, searchable
    assert [schema.is_consolidated(r) for r in mem.list()] == [True, True, False]
    assert [m.id for m in mem.consolidated()] == ["heron", "ferry"] and mem.info()["consolidated"] == 2
    folder = mem.store.folder("heron")
    assert sorted(p.name for p in folder.iterdir()) == ["keys.safetensors", "memory.json"]
    assert verify(mem.path) == []  # a consolidated memory's folder is whole without an adapter
    with pytest.raises(MegamemError, match="'heron' is consolidated"):
        mem.adapter("heron")
    with pytest.raises(MegamemError, match="'heron' is consolidated"):
        mem.export("heron", mem.path.parent / "peft")
    result = CliRunner().invoke(app, ["export", "heron", "--out", str(mem.path.parent / "x"), "--store", str(mem.path)])
    assert result.exit_code == 1 and "'heron' is consolidated" in result.output
    fresh = Memory(mem.path)  # what a new process sees: derived from the store alone
    question = "Where does Zorblatt the heron live?"
    routed = fresh.route(question)
    assert routed[0][0] == "heron"  # the gate still finds it by its keys
    seen = mixtures(monkeypatch)
    fresh.ask(question, mode="qa", max_new_tokens=2)
    fresh.ask(question, mode="mega+rag", max_new_tokens=2)
    fresh.ask("How many legs does a spider have?", mode="qa", max_new_tokens=2)
    cortex = fresh.cortex()
    qa, rag, general = seen
    # the cortex stands in for heron's adapter at the gate's weight (ferry's too, if it was routed)
    weight = sum(w for i, w in routed if i in ("heron", "ferry"))
    assert list(qa.mixture.adapters) == [cortex] and qa.mixture.weights[0] == pytest.approx(weight)
    assert TEXTS["heron"] in rag.turns[-1][1]  # its text is still the context of the default mode
    assert fresh.route("How many legs does a spider have?") == [] and general.mixture.adapters == ()


def test_consolidate_forget_takes_them_out_of_the_store_and_mixes_the_cortex_always(mem, monkeypatch):
    with pytest.raises(MegamemError, match="contradict"):
        consolidate(mem, ["heron"], QUICK, keep_adapters=True, forget=True)
    report = consolidate(mem, ["heron", "ferry"], QUICK, forget=True)
    assert [r.id for r in mem.list()] == ["tower"] and report["bytes_freed"] > 0
    assert [m.text for m in mem.consolidated()] == [TEXTS["heron"], TEXTS["ferry"]]
    assert verify(mem.path) == []
    seen = mixtures(monkeypatch)
    mem.ask("Where does Zorblatt the heron live?", mode="qa", max_new_tokens=2)
    mem.ask("How many legs does a spider have?", mode="qa", max_new_tokens=2)
    mem.ask("Where does Zorblatt the heron live?", mode="qa", max_new_tokens=2, use_memory=False)
    # no key can call it in any more: every answer mixes the cortex in at weight 1
    assert all(s.mixture.adapters[0] is mem.cortex() and s.mixture.weights[0] == 1.0 for s in seen[:2])
    assert seen[2].mixture.adapters == ()


def test_forgetting_a_consolidated_memory_takes_it_out_of_the_cortex_record_too(mem, monkeypatch):
    consolidate(mem, ["heron", "ferry"], QUICK)
    mem.forget("heron")
    assert [r.id for r in mem.list()] == ["ferry", "tower"] and [m.id for m in mem.consolidated()] == ["ferry"]
    assert verify(mem.path) == []
    seen = mixtures(monkeypatch)
    mem.ask("How many legs does a spider have?", mode="qa", max_new_tokens=2)
    assert seen[0].mixture.adapters == ()  # every memory it holds is still routable: it stays gated
    with pytest.raises(MegamemError, match="'ferry' is consolidated"):
        merge(mem, ["ferry", "tower"])


def test_the_cortex_learns_its_rehearsals(mem):
    model, tok = mem.load()
    story = "Zorblatt the heron has lived on Quillon pier since 1998."
    examples = rehearsal(model, tok, story, QUICK)
    assert len(examples) >= 2  # the recall prompt and the QA prompt of each cloze question
    before = float(lm_loss(model, collate(examples, tok.pad_token_id)))
    cfg = replace(QUICK, epochs=30, lr=3e-2)
    cortex = consolidation.train_cortex(model, tok, examples, [], LoraSpec(rank=4, upper=1.0), cfg)
    set_mixture(model, [cortex], [1.0])
    try:
        after = float(lm_loss(model, collate(examples, tok.pad_token_id)))
    finally:
        clear(model)
    assert after < before - 0.25, (before, after)  # an untrained cortex (B = 0) gives exactly `before`


def test_a_second_consolidation_keeps_the_first_ones_and_replaces_the_version(mem):
    consolidate(mem, ["heron"], QUICK)
    first = json.loads((mem.path / "cortex" / "current.json").read_text())["version"]
    consolidate(mem, ["tower"], QUICK)
    record = json.loads((mem.path / "cortex" / "current.json").read_text())
    assert [m["id"] for m in record["memories"]] == ["heron", "tower"]
    assert record["version"] != first and not (mem.path / "cortex" / first).exists()
    assert sorted(p.name for p in (mem.path / "cortex").iterdir()) == sorted(["current.json", record["version"]])


def test_a_failed_switch_keeps_the_old_cortex_and_every_memory(mem, monkeypatch):
    consolidate(mem, ["heron"], QUICK)
    old = read_cortex(mem.path)

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(cortex_files, "write_json_atomic", boom)
    with pytest.raises(OSError):
        consolidate(mem, ["ferry"], QUICK)
    now = read_cortex(mem.path)
    assert now[2]["version"] == old[2]["version"] and [m.id for m in now[1]] == ["heron"]
    assert {r.id: schema.is_consolidated(r) for r in mem.list()} == {"heron": True, "ferry": False, "tower": False}
    assert mem.adapter("ferry") is not None  # nothing retired


def test_bad_requests_and_a_damaged_cortex_are_one_clear_error(mem, tmp_path):
    with pytest.raises(MegamemError, match="no memory with id 'nosuch'"):
        consolidate(mem, ["nosuch"], QUICK)
    assert read_cortex(mem.path) is None  # checked before any work
    with pytest.raises(MegamemError, match="drift weight"):
        ConsolidationConfig(drift=-1)
    run = CliRunner()
    for args, message in (
        ([], "give --ids or --older-than"),
        (["--older-than", "7x"], "--older-than must be"),
        (["--older-than", "9999d"], "no memory is older than 9999d"),
        (["--ids", "nosuch"], "no memory with id"),
        (["--ids", "heron", "--forget", "--keep-adapters"], "contradict each other"),
        (["--retrain", "--forget"], "give no --ids"),
    ):
        result = run.invoke(app, ["consolidate", *args, "--store", str(mem.path)])
        assert result.exit_code == 1 and message in result.output, result.output
    consolidate(mem, ["heron"], QUICK)
    weights = next((mem.path / "cortex").glob("v*/adapter_model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    fresh = Memory(mem.path)
    with pytest.raises(MegamemError, match="cortex .* is damaged"):
        fresh.cortex()
    assert torch.is_tensor(fresh.store.keys(fresh.show("tower")))  # the gated memories are untouched


def test_a_namespaces_memories_consolidate_into_its_own_cortex(mem, monkeypatch):
    """A tenant's cortex is mixed into that tenant's answers only, and consolidating never mixes namespaces."""
    acme = {schema.NAMESPACE: "acme"}
    mem.add_many(
        [Item(TEXTS["tower"], id="acme--tower", reserved=acme), Item("Bo sings.", id="acme--bo", reserved=acme)]
    )
    with pytest.raises(MegamemError, match="'acme--tower' is in namespace 'acme', not 'default'"):
        consolidate(mem, ["heron", "acme--tower"], QUICK)
    report = consolidate(mem, ["acme--tower"], QUICK)
    assert report["namespace"] == "acme" and (mem.path / "cortex" / "acme" / "current.json").is_file()
    assert mem.cortex() is None and mem.consolidated() == []  # the default namespace has none
    assert [m.id for m in mem.consolidated("acme")] == ["acme--tower"] and mem.info()["consolidated"] == 1
    seen = []
    real = memory_module.decode

    def spy(model, tok, step):
        seen.append(step.mixture.adapters)
        return real(model, tok, step)

    monkeypatch.setattr("megamem.memory.decode", spy)
    for namespace in ("acme", None, "globex"):
        mem.ask("Who designed the Harlow Cross tower?", mode="qa", max_new_tokens=2, namespace=namespace)
    cortex = mem.cortex("acme")
    assert cortex is not None and seen[0][0] is cortex
    assert all(a is not cortex for a in seen[1]) and all(a is not cortex for a in seen[2])
    assert verify(mem.path) == []


def test_the_answers_lever_trains_on_the_base_models_answer_reading_the_story(mem, monkeypatch):
    """ConsolidationConfig.answers: the QA example's target is what the base model answers with the story in
    context, not the cloze sentence (and its soft targets are read over that same answer)."""
    model, tok = mem.load()
    story = "Zorblatt the heron has lived on Quillon pier since 1998."
    asked = []

    def fake(model, tok, turns, max_new_tokens):
        asked.append(turns[-1][1])
        return "On Quillon pier."

    monkeypatch.setattr(consolidation, "complete", fake)
    plain = rehearsal(model, tok, story, QUICK)
    with_answers = rehearsal(model, tok, story, replace(QUICK, answers=True))
    assert asked and all(story in prompt for prompt in asked)  # it read the story
    targets = [tok.decode([t for t in ex.labels if t != -100]) for ex in with_answers[1::2]]
    assert all("On Quillon pier." in t for t in targets)
    assert not any("On Quillon pier." in tok.decode([t for t in ex.labels if t != -100]) for ex in plain[1::2])


def test_the_from_text_lever_rehearses_the_stored_text_not_a_recall(mem, monkeypatch):
    def no_recall(*_a, **_k):
        raise AssertionError("recalled through the adapter")

    monkeypatch.setattr(consolidation, "recall", no_recall)
    consolidate(mem, ["heron"], replace(QUICK, from_text=True))
    assert [m.recalled for m in mem.consolidated()] == [TEXTS["heron"]]
