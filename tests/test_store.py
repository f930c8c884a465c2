"""The store: atomic add, forget for good, settings checked on open, corruption named."""

import subprocess
import sys
import textwrap

import pytest
import torch

from megamem.adapters import Adapter, LoraSpec
from megamem.errors import MegamemError
from megamem.store import Store

SETTINGS = {"base_model": "m1", "key_function": "embedder", "lora": LoraSpec().to_dict(), "gate": {}}


def _adapter(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Adapter(
        LoraSpec(rank=2),
        {"model.layers.0.mlp.up_proj": (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g))},
    )


def test_add_list_get_forget(tmp_path):
    s = Store(tmp_path / "s", SETTINGS)
    r = s.add("a fact", _adapter(), torch.randn(3, 4), {"k": "v"}, memory_id="m-1")
    assert [x.id for x in s.records()] == ["m-1"] and s.get("m-1").metadata == {"k": "v"}
    assert s.keys(r).shape == (3, 4)
    assert torch.equal(
        s.adapter(r).weights["model.layers.0.mlp.up_proj"][0], _adapter().weights["model.layers.0.mlp.up_proj"][0]
    )
    with pytest.raises(MegamemError, match="already exists"):
        s.add("again", _adapter(), torch.randn(1, 4), memory_id="m-1")
    s.forget("m-1")
    assert s.records() == [] and not s.folder("m-1").exists()
    with pytest.raises(MegamemError, match="no memory with id 'm-1'"):
        s.forget("m-1")
    reopened = Store(tmp_path / "s")
    assert reopened.records() == []


def test_settings_mismatch_is_an_error(tmp_path):
    Store(tmp_path / "s", SETTINGS)
    with pytest.raises(MegamemError, match="base_model 'm1', not 'm2'"):
        Store(tmp_path / "s", {**SETTINGS, "base_model": "m2"})
    with pytest.raises(MegamemError, match="key_function"):
        Store(tmp_path / "s", {**SETTINGS, "key_function": "activation"})
    with pytest.raises(MegamemError, match="no megamem store"):
        Store(tmp_path / "other")


def test_corrupted_adapter_is_named(tmp_path):
    s = Store(tmp_path / "s", SETTINGS)
    r = s.add("a fact", _adapter(), torch.randn(1, 4), memory_id="x")
    f = s.folder("x") / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-3] + b"\x00\x01\x02")
    with pytest.raises(MegamemError, match=r"memories/x/adapter_model.safetensors is corrupted"):
        s.adapter(r)


KILL = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from test_store import SETTINGS, _adapter
    import megamem.store.manifest as st
    where = sys.argv[1]
    if where == "files":      # die while writing the adapter files
        st.save_file = lambda *a, **k: os._exit(9)
    elif where == "rename":   # die right after the files are renamed into place, before the row
        real = os.rename
        st.os.rename = lambda a, b: (real(a, b), os._exit(9))
    s = st.Store({path!r}, SETTINGS)
    s.add("doomed", _adapter(1), torch.randn(1, 4), memory_id="doomed")
""")


@pytest.mark.parametrize("where", ["files", "rename"])
def test_killed_add_leaves_nothing(tmp_path, where):
    from pathlib import Path

    s = Store(tmp_path / "s", SETTINGS)
    s.add("kept", _adapter(), torch.randn(1, 4), memory_id="kept")
    s.close()
    code = KILL.format(tests=str(Path(__file__).parent), path=str(tmp_path / "s"))
    proc = subprocess.run([sys.executable, "-c", code, where], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    s = Store(tmp_path / "s")
    assert [r.id for r in s.records()] == ["kept"]
    left = sorted(p.name for p in (tmp_path / "s").glob("*/*") if "doomed" in p.name)
    assert left, "the dead writer left a folder behind"  # a read sweeps nothing
    s.adapter(s.get("kept"))  # the surviving memory is intact
    s.add("doomed again", _adapter(2), torch.randn(1, 4), memory_id="doomed")  # the id is free
    assert s.get("doomed").text == "doomed again"
    assert not any((tmp_path / "s" / "tmp").glob("*"))  # the first write swept the dead writer's files


def test_a_store_from_megamem_0_1_is_read_upgraded_and_repaired(tmp_path):
    """Schema 1 (no per-file checksums, no memory.json, no pending table): read as it is, migrated by the first
    write, and given memory.json and every file's checksum by repair."""
    import json
    import sqlite3

    from safetensors.torch import save_file

    from megamem.adapters import save_adapter
    from megamem.store.health import repair, verify

    path = tmp_path / "old"
    (path / "memories" / "m1").mkdir(parents=True)
    sha = save_adapter(_adapter(), path / "memories" / "m1", "m1")
    save_file({"keys": torch.randn(2, 4)}, str(path / "memories" / "m1" / "keys.safetensors"))
    db = sqlite3.connect(path / "manifest.sqlite")
    db.executescript(
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE memories (id TEXT PRIMARY KEY, text TEXT NOT NULL, created TEXT NOT NULL, key_function TEXT "
        "NOT NULL, base_model TEXT NOT NULL, adapter_sha256 TEXT NOT NULL, n_keys INTEGER NOT NULL, "
        "metadata TEXT NOT NULL);"
    )
    with db:
        db.executemany(
            "INSERT INTO settings VALUES (?, ?)",
            [(k, json.dumps(v)) for k, v in {**SETTINGS, "schema_version": 1}.items()],
        )
        db.execute(
            "INSERT INTO memories VALUES "
            "('m1', 'an old fact', '2026-11-01T00:00:00+00:00', 'embedder', 'm1', ?, 2, '{}')",
            (sha,),
        )
    db.close()
    s = Store(path)
    assert [r.id for r in s.records()] == ["m1"] and s.keys(s.get("m1")).shape == (2, 4)
    assert not (path / "settings.json").exists()  # a read changes nothing
    s.add("a new fact", _adapter(1), torch.randn(1, 4), memory_id="m2")  # the first write migrates
    assert Store(path).get("m2").files.keys() >= {"memory.json", "keys.safetensors"}
    assert (path / "settings.json").exists()
    done = repair(path)
    assert "memory.json" in Store(path).get("m1").files, done
    assert [p for p in verify(path) if p.serious] == []
