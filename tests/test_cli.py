"""The CLI on a tiny model: every command's --json, and bad input gets one line, exit 1, nothing stored."""

import json

import pytest
from typer.testing import CliRunner

from megamem.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def store(tmp_path, tiny_dir):
    """A store on the tiny model holding one memory."""
    path = tmp_path / "store"
    r = run(
        "add",
        "Zorblatt the heron lives on Quillon pier.",
        "-p",
        "A heron, Zorblatt, lives on Quillon pier.",
        "--id",
        "heron",
        "--epochs",
        "1",
        "--store",
        path,
        "--model",
        tiny_dir,
        "--json",
    )
    assert r.exit_code == 0, r.output
    return path


def listed(store):
    return [m["id"] for m in json.loads(run("list", "--store", store, "--json").stdout)]


def test_commands_json(store, tiny_dir):
    assert listed(store) == ["heron"]
    shown = json.loads(run("show", "heron", "--store", store, "--json").stdout)
    assert shown["text"].startswith("Zorblatt") and shown["n_keys"] == 2
    assert shown["metadata"]["paraphrases"] == ["A heron, Zorblatt, lives on Quillon pier."]
    info = json.loads(run("info", "--store", store, "--json").stdout)
    assert info["memories"] == 1 and info["base_model"] == str(tiny_dir) and info["key_function"] == "embedder"
    ans = json.loads(
        run("ask", "Where does Zorblatt live?", "--store", store, "--json", "--max-new-tokens", "4").stdout
    )
    assert [g["id"] for g in ans["gate"]] == ["heron"]
    ans = json.loads(
        run(
            "ask",
            "Where?",
            "--mode",
            "irag",
            "--threshold",
            "0.99",
            "--store",
            store,
            "--json",
            "--max-new-tokens",
            "3",
        ).stdout
    )
    assert ans["gate"] == [] and ans["mode"] == "irag" and ans["recall"] is not None
    assert json.loads(run("forget", "heron", "--store", store, "--json").stdout) == {"forgotten": "heron"}
    assert listed(store) == []


def test_add_from_files(tmp_path, store):
    f = tmp_path / "note.txt"
    f.write_text("The Orvalle festival is in March.\n", encoding="utf-8")
    assert run("add", "--file", f, "--epochs", "1", "--store", store).exit_code == 0
    j = tmp_path / "many.jsonl"
    j.write_text(
        '{"text": "Pim is an axolotl.", "id": "pim"}\n\n'
        '{"passage": "Ida paints.", "paraphrases": ["Ida is a painter."]}\n'
    )
    assert run("add", "--jsonl", j, "--epochs", "1", "--store", store).exit_code == 0
    assert len(listed(store)) == 4 and "pim" in listed(store)


def bad(store, *args):
    before = listed(store)
    r = run(*args, "--store", store)
    assert r.exit_code == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert listed(store) == before
    return lines[0]


def test_bad_input(tmp_path, store):
    assert "empty" in bad(store, "add", "")
    assert "empty" in bad(store, "add", "  \n\t ")
    assert "cannot read" in bad(store, "add", "--file", tmp_path / "missing.txt")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert "not UTF-8" in bad(store, "add", "--file", latin)
    j = tmp_path / "bad.jsonl"
    j.write_text('{"text": "fine"}\n{"text": "ok", \n')
    assert "line 2" in bad(store, "add", "--jsonl", j)
    j.write_text('{"text": "fine"}\n{"text": "ok"}\n{"paraphrases": []}\n')
    assert "line 3" in bad(store, "add", "--jsonl", j)
    j.write_text('{"text": "fine"}\n{"text": "   "}\n')
    assert "line 2" in bad(store, "add", "--jsonl", j)
    assert "context" in bad(store, "add", "word " * 200)  # the tiny model's context is 96 tokens
    assert "no memory with id 'nope'" in bad(store, "show", "nope")
    assert "no memory with id 'nope'" in bad(store, "forget", "nope")
    assert "unknown mode" in bad(store, "ask", "what?", "--mode", "poem")
    assert "exactly one" in bad(store, "add")
    assert "already exists" in bad(store, "add", "again", "--id", "heron")
    assert "unknown recipe 'slow'" in bad(store, "add", "fine text", "--recipe", "slow")


def test_store_built_with_other_model_is_refused(store):
    r = run("add", "x", "--store", store, "--model", "some/other-model")
    assert r.exit_code == 1 and "was built with base_model" in r.stderr


def test_top_k_and_dense_gate(store):
    assert run("add", "Pim the axolotl is the mascot.", "--id", "pim", "--epochs", "1", "--store", store).exit_code == 0

    def gate(*flags):
        out = run(
            "ask",
            "Which heron?",
            "--beta",
            "1",
            "--no-null",
            *flags,
            "--store",
            store,
            "--json",
            "--max-new-tokens",
            "2",
        )
        return [g["id"] for g in json.loads(out.stdout)["gate"]]

    assert gate("--top-k", "1") == ["heron"]
    # the gate weighs the memory the question is about above the other (a softmax over one memory could not fail)
    out = run(
        "ask", "Where does Zorblatt the heron live?", "--no-null", "--store", store, "--json", "--max-new-tokens", "2"
    )
    weights = {g["id"]: g["weight"] for g in json.loads(out.stdout)["gate"]}
    assert set(weights) == {"heron", "pim"} and weights["heron"] > 0.9 > weights["pim"]
    assert sum(weights.values()) == pytest.approx(1.0)
    assert sorted(gate("--top-k", "0")) == ["heron", "pim"]  # 0: the dense gate mixes every memory


def test_int8_store_and_export_from_the_command_line(tmp_path, tiny_dir):
    path = tmp_path / "int8"
    r = run(
        "add",
        "The Skarvik ferry crosses Lake Tessin.",
        "--id",
        "ferry",
        "--epochs",
        "1",
        "--adapter-dtype",
        "int8",
        "--store",
        path,
        "--model",
        tiny_dir,
    )
    assert r.exit_code == 0, r.output
    assert json.loads(run("info", "--store", path, "--json").stdout)["adapter_dtype"] == "int8"
    r = run("export", "ferry", "--out", tmp_path / "peft", "--store", path, "--json")
    assert r.exit_code == 0 and (tmp_path / "peft" / "adapter_model.safetensors").is_file(), r.output
    for args, message in (
        (["export", "nosuch", "--out", tmp_path / "other"], "no memory with id"),
        (["export", "ferry", "--out", tmp_path / "peft"], "not an empty folder"),
        (["export", "ferry", "--out", tmp_path / "x", "--dtype", "int4"], "export dtype"),
        (["add", "more", "--adapter-dtype", "int4"], "unknown adapter dtype"),
        (["add", "more", "--adapter-dtype", "float32"], "built with adapter_dtype"),
    ):
        r = run(*args, "--store", path)
        assert r.exit_code == 1 and message in r.output, r.output


def test_a_bad_port_or_age_is_one_error_line(tmp_path):
    """serve with a port out of range or taken, and consolidate --older-than past what a date can count back: one
    `error:` line each, before anything loads (they were a traceback, uvicorn's own message, an OverflowError)."""
    import socket

    run = CliRunner()
    for port in ("70000", "-1"):
        result = run.invoke(app, ["serve", "--store", str(tmp_path / "s"), "--open", "--port", port])
        assert result.exit_code == 1 and "error: --port must be from 1 to 65535" in result.output, result.output
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        result = run.invoke(app, ["serve", "--store", str(tmp_path / "s"), "--open", "--port", port])
    assert result.exit_code == 1 and f"error: cannot listen on 127.0.0.1:{port}" in result.output, result.output
    result = run.invoke(app, ["consolidate", "--store", str(tmp_path / "s"), "--older-than", "99999999999d"])
    assert result.exit_code == 1 and "longer than megamem counts back" in result.output, result.output
    assert not (tmp_path / "s").exists()  # nothing was created
