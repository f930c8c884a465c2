"""The command line acts on one namespace (the default one unless --namespace): it never routes to, lists, shows,
forgets, merges or consolidates another tenant's memory, and it shows and withdraws consolidated memories."""

from __future__ import annotations

import json

import pytest
from faultlib import quick_recipe
from typer.testing import CliRunner

from megamem import Item, Memory, schema
from megamem.cli import app
from megamem.ops.merge import subjects
from megamem.store.cortex import Consolidated, write_cortex

runner = CliRunner()
ACME = {schema.NAMESPACE: "acme"}
TOWER = "Ada Quimbleton designed the Harlow Cross tower in Quillon in 1931."
BORN = "Ada Quimbleton was born in Harlow Cross near Quillon in 1899 and studied stone there."


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def ok(*args):
    """A command's --json output, the command having succeeded."""
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def refused(*args) -> str:
    """A command's one `error:` line, the command having failed with exit 1."""
    r = run(*args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


@pytest.fixture()
def store(tiny_dir, tmp_path):
    """A store with the default namespace's memories and tenant acme's, two of each about Ada Quimbleton (stored
    as the server stores a tenant's: NAMESPACE--ID, the namespace in the metadata)."""
    path = tmp_path / "store"
    mem = Memory(path, model=str(tiny_dir), recipe=quick_recipe())
    mem.add_many(
        [
            Item("Zorblatt the heron lives on Quillon pier.", id="heron"),
            Item(TOWER, id="ada-1"),
            Item(BORN, id="ada-2"),
            Item(TOWER, id="acme--ada", reserved=ACME),
            Item(BORN, id="acme--born", reserved=ACME),
        ]
    )
    return path


def ids(rows: list[dict]) -> list[str]:
    return sorted(r["id"] for r in rows)


def test_ask_routes_within_the_default_namespace_unless_told_another(store):
    question = ["ask", "Who designed the Harlow Cross tower?", "--top-k", "0", "--no-null", "--max-new-tokens", "2"]
    # a dense gate with no null memory weighs every memory in scope: the tenant's must not be in it
    gate = [g["id"] for g in ok(*question, "--store", store)["gate"]]
    assert sorted(gate) == ["ada-1", "ada-2", "heron"]
    gate = [g["id"] for g in ok(*question, "--namespace", "acme", "--store", store)["gate"]]
    assert sorted(gate) == ["ada", "born"]  # the tenant's, under the ids it names them by
    assert [g["id"] for g in ok(*question, "--namespace", "globex", "--store", store)["gate"]] == []


def test_list_show_forget_and_export_see_the_namespace_only(store, tmp_path):
    assert ids(ok("list", "--store", store)) == ["ada-1", "ada-2", "heron"]
    assert ids(ok("list", "--namespace", "acme", "--store", store)) == ["ada", "born"]
    error = refused("show", "ada", "--store", store)
    assert "no memory with id 'ada' in namespace 'default'" in error and "--namespace acme" in error
    assert "no memory with id 'acme--ada'" in refused("show", "acme--ada", "--store", store)
    assert "namespace 'default'" in refused("forget", "born", "--store", store)
    assert "namespace 'acme'" in refused("forget", "heron", "--namespace", "acme", "--store", store)
    assert "namespace 'default'" in refused("export", "ada", "--out", tmp_path / "out", "--store", store)
    assert "namespace 'Acme'" in refused("list", "--namespace", "Acme", "--store", store)
    shown = ok("show", "ada", "--namespace", "acme", "--store", store)
    assert shown["id"] == "ada" and shown["text"] == TOWER and shown["metadata"][schema.NAMESPACE] == "acme"
    assert ok("forget", "ada", "--namespace", "acme", "--store", store) == {"forgotten": "ada"}
    assert sorted(r.id for r in Memory(store).list()) == ["acme--born", "ada-1", "ada-2", "heron"]


def test_add_with_a_namespace_stores_the_memory_as_the_server_does(store):
    added = ok(
        "add", "Bo sings at the Skarvik pier.", "--id", "bo", "--namespace", "acme", "--epochs", "1", "--store", store
    )
    assert [r["id"] for r in added] == ["bo"]
    rec = Memory(store).show("acme--bo")
    assert rec.metadata[schema.NAMESPACE] == "acme" and schema.owns("acme", rec) and not schema.owns("default", rec)
    (fresh,) = ok("add", "Mira bakes rye bread.", "--namespace", "acme", "--epochs", "1", "--store", store)
    assert schema.owns("acme", Memory(store).show(f"acme--{fresh['id']}"))  # a fresh id in the namespace too
    assert ids(ok("list", "--namespace", "acme", "--store", store)) == sorted(["ada", "born", "bo", fresh["id"]])
    assert "'--'" in refused("add", "x", "--id", "acme--x", "--store", store)
    assert "namespace 'NO'" in refused("add", "x", "--namespace", "NO", "--store", store)
    # another namespace's memory cannot be replaced (and so hidden from its own gate)
    assert "heron" in refused("add", "x", "--replaces", "heron", "--namespace", "acme", "--store", store)


def test_merge_suggests_and_merges_within_one_namespace(store):
    mem = Memory(store)
    assert subjects(mem) == [["acme--ada", "acme--born"], ["ada-1", "ada-2"]]  # never one group of all four
    assert subjects(mem, namespace="acme") == [["acme--ada", "acme--born"]]
    (everyone,) = subjects(mem, names=0.0, cosine=-1.0, namespace="default")  # any pair passes: one group
    assert sorted(everyone) == ["ada-1", "ada-2", "heron"]
    assert ok("merge", "--suggest", "--store", store)["subjects"] == [["ada-1", "ada-2"]]
    assert ok("merge", "--suggest", "--namespace", "acme", "--store", store)["subjects"] == [["ada", "born"]]
    assert "namespace 'default'" in refused("merge", "ada-1", "born", "--store", store)
    merged = ok("merge", "ada", "born", "--namespace", "acme", "--store", store)
    assert merged["members"] == ["ada", "born"]
    assert schema.owns("acme", Memory(store).show(f"acme--{merged['id']}"))  # a fresh id, in the namespace
    assert "namespace 'default'" in refused("split", merged["id"], "--store", store)


@pytest.fixture()
def consolidated(store):
    """The store with two default-namespace memories held by its cortex (their record written directly, with a
    memory's adapter as the cortex: what consolidation would leave, without the training)."""
    mem = Memory(store)
    held = [
        Consolidated("orla", "Orla the otter swims in Lake Tessin.", "Orla the otter swims.", {}, "2024-01-01"),
        Consolidated("pim", "Pim the axolotl is the mascot.", "Pim is the mascot.", {}, "2024-01-02"),
    ]
    write_cortex(mem.path, mem.adapter("heron"), held, {}, mem.model_name)
    return store


def test_show_and_list_the_memories_a_cortex_holds(consolidated):
    shown = ok("show", "orla", "--store", consolidated)
    assert shown["state"] == "consolidated" and shown["text"].startswith("Orla the otter")
    assert shown["recalled"] == "Orla the otter swims." and shown["created"] == "2024-01-01"
    r = run("show", "orla", "--store", consolidated)
    assert r.exit_code == 0 and "state: consolidated" in r.stdout
    assert "namespace 'acme'" in refused("show", "orla", "--namespace", "acme", "--store", consolidated)
    rows = ok("list", "--consolidated", "--store", consolidated)
    assert [(m["id"], m["state"]) for m in rows] == [("orla", "consolidated"), ("pim", "consolidated")]
    assert ok("list", "--consolidated", "--namespace", "acme", "--store", consolidated) == []
    assert ids(ok("list", "--store", consolidated)) == ["ada-1", "ada-2", "heron"]  # stored ones only
    assert "2 consolidated memories (list --consolidated)" in run("list", "--store", consolidated).stdout


def test_forget_withdraws_a_consolidated_memory_and_retrain_relearns_the_rest(consolidated):
    r = run("forget", "orla", "--store", consolidated)
    assert r.exit_code == 0, r.output
    said = " ".join(r.stdout.split())
    assert "removed orla from the cortex's record" in said and "stays in the cortex's weights" in said
    assert "megamem consolidate --retrain" in said
    assert [m.id for m in Memory(consolidated).consolidated()] == ["pim"]
    assert "no memory with id 'orla'" in refused("show", "orla", "--store", consolidated)
    assert "no memory with id 'orla'" in refused("forget", "orla", "--store", consolidated)
    assert "--retrain" in refused("consolidate", "--retrain", "--ids", "heron", "--store", consolidated)
    assert "no cortex" in refused("consolidate", "--retrain", "--namespace", "acme", "--store", consolidated)
    flags = ["--epochs", "1", "--rank", "4", "--drift", "0", "--store", consolidated]
    report = ok("consolidate", "--retrain", *flags)
    assert report["held"] == 1 and report["consolidated"] == []
    assert [m.id for m in Memory(consolidated).consolidated()] == ["pim"]
    assert ids(ok("list", "--store", consolidated)) == ["ada-1", "ada-2", "heron"]  # nothing stored was touched


def test_consolidate_takes_the_namespaces_memories_only(store, monkeypatch):
    taken = []

    def fake(mem, chosen, cfg, keep_adapters=False, on_step=None, namespace=None, retrain=False, forget=False):
        taken.append((chosen, namespace))
        return {"namespace": namespace, "consolidated": chosen, "held": 0, "seconds": 0, "bytes_freed": 0}

    monkeypatch.setattr("megamem.ops.consolidate.consolidate", fake)
    report = ok("consolidate", "--older-than", "0s", "--namespace", "acme", "--store", store)
    assert taken == [(["acme--ada", "acme--born"], "acme")] and report["consolidated"] == ["ada", "born"]
    ok("consolidate", "--older-than", "0s", "--store", store)
    assert sorted(taken[1][0]) == ["ada-1", "ada-2", "heron"] and taken[1][1] == "default"
    assert "namespace 'default'" in refused("consolidate", "--ids", "ada", "--store", store)
    assert len(taken) == 2


def test_a_memoryllm_store_has_no_namespaces(tmp_path, tiny_dir):
    from megamem.memoryllm import MemoryConfig

    path = tmp_path / "pool"
    assert "no namespaces" in refused("add", "x", "--backend", "memoryllm", "--namespace", "acme", "--store", path)
    assert not path.exists()
    config = MemoryConfig(new_tokens=4, blocks=4, rank=4, alpha=8.0)
    Memory(path, backend="memoryllm", model=str(tiny_dir), config=config).add_many([Item("Mira bakes.", id="mira")])
    assert ids(ok("list", "--store", path)) == ["mira"] and ok("show", "mira", "--store", path)["id"] == "mira"
    assert "no namespaces" in refused("list", "--namespace", "acme", "--store", path)
    assert "no namespaces" in refused("ask", "Who bakes?", "--namespace", "acme", "--store", path)
