"""Input checked before any work (issue 13): every case a hostile user tried gets one clear error, nothing is
trained or stored, read commands never create a store, and stored text can never drive the terminal."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megamem import GateConfig, Item, LoraSpec, Memory, Recipe
from megamem.entry import run
from megamem.errors import MegamemError

HERON = "Zorblatt the heron lives on Quillon pier."


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the console entry in-process; (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = run([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_error(capsys, *args) -> str:
    """Run a command that must fail: exit 1 and exactly one stderr line, an `error:` one; return it."""
    rc, _out, err = cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_dir) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "store"
    mem = Memory(path, model=str(tiny_dir), recipe=Recipe(epochs=1, min_tokens=0))
    mem.add(HERON, id="heron")
    return path


def ids(path: Path) -> list[str]:
    return [r.id for r in Memory(path, create=False).list()]


@pytest.fixture()
def no_training(monkeypatch):
    """Training that fails the test: proves a bad input was refused before any work was done."""

    def boom(*a, **k):
        raise AssertionError("training started before the input was checked")

    monkeypatch.setattr("megamem.learn.train_adapter", boom)
    monkeypatch.setattr("megamem.learn.train_adapters_batched", boom)


@pytest.mark.parametrize(
    "bad_id, message",
    [("../x", "may hold only"), ("x" * 250, "250 characters long"), ("a b", "may hold only"), ("é", "may hold only")],
)
def test_bad_id_is_refused_before_training(capsys, store, no_training, bad_id, message):
    assert message in one_error(capsys, "add", "A fine fact.", "--id", bad_id, "--store", store)
    assert ids(store) == ["heron"]


def test_jsonl_is_checked_whole_before_training(capsys, tmp_path, store, no_training):
    j = tmp_path / "m.jsonl"
    j.write_text('{"text": "Pim is an axolotl.", "id": "pim"}\n{"text": "Ida paints.", "id": "../x"}\n')
    assert "line 2" in one_error(capsys, "add", "--jsonl", j, "--store", store)
    for bad in ('{"text": "Ida paints.", "id": 12}', '{"text": "Ida paints.", "id": ["a"]}'):
        j.write_text('{"text": "Pim is an axolotl."}\n' + bad + "\n")
        assert "line 2" in one_error(capsys, "add", "--jsonl", j, "--store", store)
    j.write_text('{"text": "Pim is an axolotl.", "id": "pim"}\n{"text": "Ida paints.", "id": "pim"}\n')
    line = one_error(capsys, "add", "--jsonl", j, "--store", store)
    assert "line 2" in line and "twice" in line and "line 1" in line
    j.write_text('{"text": "Pim is an axolotl.", "id": "pim"}\n{"text": "Ida paints.", "id": "heron"}\n')
    assert "already exists" in one_error(capsys, "add", "--jsonl", j, "--store", store)
    assert ids(store) == ["heron"]


def test_keep_going_stores_the_good_lines_and_names_the_bad(capsys, tmp_path, store):
    j = tmp_path / "m.jsonl"
    j.write_text('{"text": "Pim is an axolotl.", "id": "pim"}\n{"text": 7}\n{"text": "Ida paints.", "id": "ida"}\n')
    rc, _out, err = cli(capsys, "add", "--jsonl", j, "--keep-going", "--epochs", "1", "--store", store)
    assert (
        rc == 1 and "warning: skipped" in err and "line 2" in err and err.strip().splitlines()[-1].startswith("error:")
    )
    assert ids(store) == ["heron", "pim", "ida"]
    for memory_id in ("pim", "ida"):
        Memory(store).forget(memory_id)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "0"], "epochs must be an integer of at least 1"),
        (["--epochs", "-3"], "epochs must be an integer of at least 1"),
        (["--lr", "-1"], "learning rate must be a finite number above 0"),
        (["--lr", "0"], "learning rate must be a finite number above 0"),
        (["--lr", "nan"], "learning rate must be a finite number above 0"),
        (["--seed", "-1"], "seed"),
    ],
)
def test_bad_training_numbers(capsys, store, no_training, flags, message):
    assert message in one_error(capsys, "add", "A fine fact.", *flags, "--store", store)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--beta", "nan"], "gate beta must be a finite number"),
        (["--beta", "inf"], "gate beta must be a finite number"),
        (["--beta", "-2"], "gate beta must be at least 0"),
        (["--threshold", "nan"], "gate threshold must be a finite number"),
        (["--max-new-tokens", "0"], "max new tokens must be an integer of at least 1"),
        (["--top-k", "-1"], "--top-k must be 0"),
        (["--mode", "poem"], "unknown mode 'poem'"),
    ],
)
def test_bad_question_options(capsys, store, flags, message):
    assert message in one_error(capsys, "ask", "Where does Zorblatt live?", *flags, "--store", store)


def test_numbers_checked_in_the_api_too():
    for bad in (dict(lr=-1.0), dict(epochs=0), dict(lr=float("nan")), dict(batch_size=0)):
        with pytest.raises(MegamemError):
            Recipe(**bad)
    for bad in (dict(beta=float("nan")), dict(threshold=float("inf")), dict(top_k=0)):
        with pytest.raises(MegamemError):
            GateConfig(**bad)


@pytest.mark.parametrize("text", ["null\x00byte", "red \x1b[31malert\x1b[0m", "bell\x07", "csi \x9b31m"])
def test_control_characters_are_refused(capsys, store, no_training, text):
    assert "control character" in one_error(capsys, "add", text, "--store", store)
    assert "control character" in one_error(capsys, "add", "A fine fact.", "-p", text, "--store", store)


def test_stored_control_characters_are_escaped_on_output(capsys, tmp_path, store):
    """A store written by another tool (or an older megamem) may hold escapes: they are printed escaped."""
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(store, copy)
    db = sqlite3.connect(copy / "manifest.sqlite")
    with db:
        db.execute("UPDATE memories SET text = ? WHERE id = 'heron'", ("Zorblatt \x1b[2J\x1b]0;pwned\x07 heron",))
    db.close()
    for args in (["ask", "Where does Zorblatt live?", "--show-gate", "--max-new-tokens", "2"], ["show", "heron"]):
        rc, out, err = cli(capsys, *args, "--store", copy)
        assert rc == 0 and "\x1b" not in out + err and "\x07" not in out + err, out
        assert "\\x1b" in out
    rc, out, _ = cli(capsys, "list", "--store", copy)
    assert rc == 0 and "\x1b" not in out
    rc, out, _ = cli(capsys, "show", "heron", "--json", "--store", copy)
    assert rc == 0 and "\x1b" not in out and json.loads(out)["text"].startswith("Zorblatt \x1b[2J")


@pytest.mark.parametrize("command", [["list"], ["info"], ["show", "x"], ["ask", "why?"], ["forget", "x"], ["verify"]])
def test_read_commands_never_create_a_store(capsys, tmp_path, command):
    path = tmp_path / "nothing-here"
    assert "no megamem store" in one_error(capsys, *command, "--store", path)
    assert not path.exists()


def test_api_read_of_a_missing_store_creates_nothing(tmp_path):
    mem = Memory(tmp_path / "new")
    assert mem.list() == [] and mem.info()["memories"] == 0
    assert not (tmp_path / "new").exists()
    with pytest.raises(MegamemError, match="no megamem store"):
        Memory(tmp_path / "new", create=False)


def test_a_model_that_cannot_load_leaves_no_store(capsys, tmp_path):
    path = tmp_path / "s"
    assert "cannot load model" in one_error(
        capsys, "add", "A fine fact.", "--model", tmp_path / "no-model", "--store", path
    )
    assert not path.exists()


def test_new_store_in_a_folder_with_other_files_is_refused(capsys, tmp_path, tiny_dir):
    (tmp_path / "mine.txt").write_text("keep me")
    line = one_error(capsys, "add", "A fine fact.", "--model", tiny_dir, "--epochs", "1", "--store", tmp_path)
    assert "not empty" in line and (tmp_path / "mine.txt").read_text() == "keep me"


def test_unwritable_store_location_is_one_error(capsys, tmp_path, tiny_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = one_error(capsys, "add", "A fine fact.", "--model", tiny_dir, "--epochs", "1", "--store", blocker / "s")
    assert "cannot create a store" in line or "not a folder" in line


def test_reopening_with_another_lora_spec_is_refused(store):
    with pytest.raises(MegamemError, match="was built with lora"):
        Memory(store, lora=LoraSpec(rank=4))
    Memory(store, lora=LoraSpec.from_dict(Memory(store).store.settings()["lora"]))  # the same spec is fine


def test_long_lived_memory_follows_other_processes(tmp_path, tiny_dir):
    path = tmp_path / "s"
    recipe = Recipe(epochs=1, min_tokens=0)
    reader = Memory(path, model=str(tiny_dir), recipe=recipe)
    assert reader.list() == []  # no store yet
    writer = Memory(path, model=str(tiny_dir), recipe=recipe)
    writer.add(HERON, id="heron")
    assert [r.id for r in reader.list()] == ["heron"]  # the store another object created
    assert reader.route("Where does Zorblatt live?")[0][0] == "heron"
    writer.add("Pim the axolotl is the mascot of the Quillon Institute.", id="pim")
    assert reader.route("Which animal is the Quillon mascot?", GateConfig(top_k=1))[0][0] == "pim"
    writer.forget("pim")
    assert [i for i, _ in reader.route("Which animal is the Quillon mascot?")] == ["heron"]
    assert [r.id for r in reader.list()] == ["heron"]


def test_demo_refuses_a_folder_that_is_not_its_own(capsys, tmp_path, store):
    user = tmp_path / "important"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    assert "not empty" in one_error(capsys, "demo", "--store", user)
    assert (user / "thesis.txt").read_text() == "years of work"
    assert "not the demo's" in one_error(capsys, "demo", "--store", store)
    assert ids(store) == ["heron"]


def test_items_in_the_api_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model loaded before the input was checked")

    monkeypatch.setattr("megamem.memory.load_model", no_model)
    mem = Memory(tmp_path / "s")
    for item in (Item("fact", id="../x"), Item("", id="ok"), Item("fact", metadata={"x": float("nan")}), Item(3)):
        with pytest.raises(MegamemError):
            mem.add_many([item])
    with pytest.raises(MegamemError, match="twice"):
        mem.add_many([Item("fact one", id="a"), Item("fact two", id="a")])
    assert not (tmp_path / "s").exists()


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    """SIGINT while the command line imports torch: one error line, exit 130, no traceback."""
    env = {**os.environ, "MEGAMEM_STORE": str(tmp_path / "none")}
    code = "import sys; from megamem.entry import main; sys.argv = ['megamem', 'list']; main()"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(0.8)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert proc.returncode in (1, 130)


def test_memory_added_elsewhere_during_training_is_seen(tmp_path, tiny_dir):
    """A commit by another writer while this object trains must not be masked by this object's own add."""
    path = tmp_path / "s"
    recipe = Recipe(epochs=1, min_tokens=0)
    mine = Memory(path, model=str(tiny_dir), recipe=recipe)
    mine.add(HERON, id="heron")
    other = Memory(path, model=str(tiny_dir), recipe=recipe)
    done = []

    def meanwhile(*_):
        if not done:
            done.append(other.add("Pim the axolotl is the mascot of the Quillon Institute.", id="pim"))

    mine.add("The Skarvik ferry crosses Lake Tessin every winter.", id="ferry", on_step=meanwhile)
    assert done and mine.route("Which animal is the Quillon mascot?", GateConfig(top_k=1))[0][0] == "pim"


def test_junk_in_tmp_is_named_once(capsys, store):
    junk = store / "tmp" / "junk"
    junk.write_text("not megamem's")
    try:
        rc, _out, err = cli(
            capsys, "add", "Ida paints the Vexmoor bridge.", "--id", "ida", "--epochs", "1", "--store", store
        )
        assert rc == 0 and err.count("tmp/junk") == 1, err  # the open and the write's sweep once, not twice
    finally:
        junk.unlink()
        Memory(store).forget("ida")
