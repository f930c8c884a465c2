"""Fault injection: every file kind of a store damaged every way, kill -9 at random moments, locks, races and a
second process. The promises checked: a correct result or one clear error (never another exception); `verify`
names what is wrong and nothing else; nothing megamem did not write is ever deleted; `repair` leaves a clean
store; no committed memory is lost; the other memories keep answering.

The machinery is tests/faultlib.py; benchmarks/faults.py runs the same trials many more times.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import faultlib as fl  # noqa: E402

import megamem.store.manifest as store_mod  # noqa: E402
from megamem import Memory  # noqa: E402
from megamem.errors import MegamemError  # noqa: E402
from megamem.store import (
    Store,  # noqa: E402
    health,  # noqa: E402
)

AS_ROOT = fl.is_root()
CI_TRIALS = 16  # four rounds of add / add-many / forget / repair (each repair damage once)
CI_SEED = 20240607


@pytest.fixture(scope="module")
def model_store(tmp_path_factory, tiny_dir) -> Path:
    """A real store on the tiny model holding fl.MEMORIES (built once; each test copies it)."""
    return fl.build_model_store(tmp_path_factory.mktemp("faults") / "base", tiny_dir)


@pytest.fixture(scope="module")
def fake_store(tmp_path_factory) -> Path:
    """A Store-level store (fake adapters, random keys) holding m0..m3, for the kill trials and races."""
    return fl.build_fake_store(tmp_path_factory.mktemp("faults-fake") / "base")


@pytest.fixture(scope="module")
def calib(fake_store, tmp_path_factory) -> dict:
    plan = fl.trial_plan(CI_TRIALS, CI_SEED)
    return fl.calibrate(fake_store, tmp_path_factory.mktemp("calib"), {(t["op"], t["variant"]) for t in plan})


def copy(base: Path, tmp_path: Path, plant: bool = True) -> Path:
    store = tmp_path / "store"
    shutil.copytree(base, store)
    if plant:
        fl.plant(store)
    return store


def one_error(result, *words: str) -> str:
    """The single `error:` line of a failed command (asserting there is exactly one, naming `words`)."""
    rc, out, err = result
    why = fl.unclean(rc, out, err)
    assert rc == 1 and why is None, f"exit {rc}: {why or ''}\nstdout: {out}\nstderr: {err}"
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    return line


def quiet(args, result) -> None:
    """No traceback or internal error; a failure only as one error line (verify and repair report instead)."""
    rc, out, err = result
    if args[0] in ("verify", "repair"):
        assert "Traceback" not in out + err and "internal error" not in err, (args, err)
        assert rc in (0, 1) and (out.strip() or rc == 0), (args, out, err)
    else:
        assert fl.unclean(rc, out, err) is None, (args, err)


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder`, by relative path, with its sha256."""
    return {str(p.relative_to(folder)): fl.sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1a: the damage matrix ---------------------------------------------------------------------------------
def test_undamaged_store_verifies_clean(model_store, tmp_path):
    store = copy(model_store, tmp_path, plant=False)
    assert health.verify(store) == []
    rc, out, err = fl.cli("verify", "--store", store)
    assert rc == 0 and "ok:" in out, out + err
    fl.plant(store)
    found = [(p.kind, p.path) for p in health.verify(store)]
    assert sorted(found) == [("unknown", "memories/vacation"), ("unknown", "tmp/notes.txt")]
    before = tree(store / "memories")
    done = health.repair(store)
    assert not any((store / "quarantine").glob("*/*")), done
    assert tree(store / "memories") == before and fl.foreign_lost(store, fl.FOREIGN) == []
    mem = Memory(store, create=False)
    for mid in fl.IDS:
        assert mem.ask(fl.QUESTIONS[mid], max_new_tokens=2).gate[0][0] == mid
    assert not [w for w in mem.warnings if "damaged" in w]


@pytest.mark.parametrize("target,how", fl.damage_cases(), ids=[f"{t}-{h}" for t, h in fl.damage_cases()])
def test_damage(model_store, tmp_path, target, how):
    """(1) a correct list or one clear error; (2) verify names the damage's kind and path (exit 1); (3) the
    planted user files survive every command; (4) repair leaves only the planted entries, keeps the undamaged
    memories and quarantines the damaged one's record; (5) questions about the others still answered."""
    if how == "chmod000" and AS_ROOT:
        pytest.skip("root ignores file permissions")
    fails = fl.run_damage_case(model_store, tmp_path, target, how)
    assert not fails, "\n".join(fails)


# -- 1b: specific cases -------------------------------------------------------------------------------------
def test_truncated_manifest_is_one_error_and_no_folder_is_deleted(model_store, tmp_path, tiny_dir):
    store = copy(model_store, tmp_path)
    (store / "manifest.sqlite").write_bytes(b"")
    folders = tree(store / "memories")
    line = one_error(fl.cli("list", "--store", store), "manifest", "repair")
    assert "no memory was touched" in line
    one_error(fl.cli("add", "A new fact.", "--epochs", "1", "--store", store, "--model", tiny_dir), "manifest")
    one_error(fl.cli("forget", "heron", "--store", store), "manifest")
    rc, out, _ = fl.cli("verify", "--store", store)
    assert rc == 1 and "manifest" in out
    assert tree(store / "memories") == folders, "a command deleted or changed adapter files"
    fl.cli("repair", "--store", store)
    assert tree(store / "memories") == folders
    assert fl.store_list(store) == [(i, fl.TEXTS[i]) for i in fl.IDS]


def test_old_user_folder_survives_every_command(model_store, tmp_path, tiny_dir):
    store = copy(model_store, tmp_path)
    old = time.time() - 120
    extra = {
        "memories/empty-old": None,
        "tmp/olddir": None,
        "memories/readme.txt": b"mine\n",
        "tmp/heron.backup": b"a copy I made\n",
    }
    for rel, data in extra.items():
        p = store / rel
        p.mkdir() if data is None else p.write_bytes(data)
        os.utime(p, (old, old))
    snap = fl.foreign_snapshot(store)

    def intact(step: str) -> None:
        assert fl.foreign_lost(store, snap) == [], step
        for rel, data in extra.items():
            p = store / rel
            assert p.is_dir() if data is None else p.read_bytes() == data, f"{step} removed {rel}"

    for args in (
        ("list",),
        ("add", "The Orvalle festival is in March.", "--epochs", "1", "--model", tiny_dir),
        ("forget", "heron"),
        ("verify",),
        ("repair",),
        ("list",),
    ):
        rc, out, err = fl.cli(*args, "--store", store)
        quiet(args, (rc, out, err))
        assert rc == 0 or args[0] in ("verify", "repair"), (args, err)
        intact(args[0])
    assert "heron" not in [i for i, _ in fl.store_list(store)]


def test_junk_in_tmp_is_left_alone(model_store, tmp_path, tiny_dir):
    store = copy(model_store, tmp_path, plant=False)
    junk = store / "tmp" / "junk"
    junk.write_bytes(b"\x00\x01 not megamem's \xff")
    for args in (
        ("list",),
        ("info",),
        ("add", "A heron named Pip.", "--epochs", "1", "--model", tiny_dir),
        ("forget", "tower"),
        ("verify", "--json"),
        ("repair",),
    ):
        rc, out, err = fl.cli(*args, "--store", store)
        quiet(args, (rc, out, err))
        assert rc == 0 or args[0] in ("verify", "repair"), (args, err)
        assert junk.read_bytes() == b"\x00\x01 not megamem's \xff", f"{args[0]} touched tmp/junk"
        if args[0] == "verify":
            assert [(p["kind"], p["path"]) for p in fl.json_or_none(out)["problems"]] == [("unknown", "tmp/junk")]
    rc, _, err = fl.cli("list", "--store", store)
    assert rc == 0 and "tmp/junk" in err  # named as left alone


def test_memories_replaced_by_a_file_is_a_clear_error(model_store, tmp_path, tiny_dir):
    store = copy(model_store, tmp_path, plant=False)
    shutil.rmtree(store / "memories")
    (store / "memories").write_bytes(b"user data\n")
    for args in (
        ("list",),
        ("show", "heron"),
        ("info",),
        ("forget", "heron"),
        ("ask", "Where?"),
        ("add", "A fact.", "--epochs", "1", "--model", tiny_dir),
    ):
        one_error(fl.cli(*args, "--store", store), "memories")
    with pytest.raises(MegamemError, match="memories"):
        Store(store)
    with pytest.raises(MegamemError, match="memories"):
        Memory(store, create=False)
    rc, out, err = fl.cli("verify", "--json", "--store", store)
    assert rc == 1 and ("corrupt", "memories") in [(p["kind"], p["path"]) for p in fl.json_or_none(out)["problems"]]
    assert (store / "memories").read_bytes() == b"user data\n"


def test_store_under_a_regular_file_is_a_clear_error(tmp_path, tiny_dir):
    blocker = tmp_path / "x" / "file"
    blocker.parent.mkdir()
    blocker.write_bytes(b"a file, not a folder\n")
    store = blocker / "store"
    for args in (
        ("add", "A fact.", "--epochs", "1", "--model", tiny_dir),
        ("list",),
        ("verify",),
        ("repair",),
        ("info",),
    ):
        one_error(fl.cli(*args, "--store", store))
    with pytest.raises(MegamemError):
        Store(store, fl.fake_settings())
    with pytest.raises(MegamemError):
        Memory(store, model=str(tiny_dir), recipe=fl.quick_recipe()).add("A fact.")
    assert blocker.read_bytes() == b"a file, not a folder\n"


@pytest.mark.skipif(AS_ROOT, reason="root ignores file permissions")
def test_store_in_a_read_only_folder_is_a_clear_error(tmp_path, tiny_dir):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_error(fl.cli("add", "A fact.", "--epochs", "1", "--model", tiny_dir, "--store", ro / "store"))
        with pytest.raises(MegamemError):
            Store(ro / "store", fl.fake_settings())
    finally:
        ro.chmod(0o755)


LOCKER = textwrap.dedent("""
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    if sys.argv[2] == "exclusive-mode":
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
    db.execute("BEGIN EXCLUSIVE")
    db.execute("SELECT count(*) FROM memories").fetchall()
    print("locked", flush=True)
    sys.stdin.readline()
    db.execute("ROLLBACK")
""")


@pytest.mark.parametrize("how", ["begin-exclusive", "exclusive-mode"])
def test_locked_manifest_is_one_clear_error(model_store, tmp_path, tiny_dir, monkeypatch, how):
    store = copy(model_store, tmp_path, plant=False)
    monkeypatch.setattr(store_mod, "BUSY_TIMEOUT_S", 0.5)  # what MEGAMEM_BUSY_TIMEOUT=0.5 sets
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(store / "manifest.sqlite"), how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(MegamemError, match="locked"):
            s = Store(store, busy_timeout=0.5)
            s.add("x", fl.fake_adapter(), fl.fake_keys(), memory_id="x")
        one_error(fl.cli("forget", "heron", "--store", store), "locked")
        one_error(fl.cli("add", "A fact.", "--epochs", "1", "--store", store), "locked")
        rc, out, err = fl.cli("list", "--json", "--store", store)
        if rc == 0:  # WAL readers need no lock
            assert [m["id"] for m in fl.json_or_none(out)] == list(fl.IDS)
        else:
            one_error((rc, out, err), "locked")
        assert time.monotonic() - t0 < 60, "the busy timeout was not honoured"
    finally:
        locker.communicate("\n", timeout=30)
    assert health.verify(store) == []
    assert [i for i, _ in fl.store_list(store)] == list(fl.IDS)


def test_two_concurrent_adds_of_one_id(fake_store, tmp_path):
    store = copy(fake_store, tmp_path)
    snap = fl.foreign_snapshot(store)
    for r in range(3):
        go = tmp_path / f"go{r}"
        spec = {"path": str(store), "op": "add", "ids": [f"race{r}"], "mode": "plain", "go": str(go), "slow": 0.15}
        procs = [
            subprocess.Popen(
                [sys.executable, str(fl.HERE), "child", json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        for p in procs:
            assert p.stdout.readline().startswith("ready")
        go.touch()
        results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
        won = [res for res in results if res[0] == 0 and f"committed race{r}" in res[1]]
        lost = [res for res in results if res[0] == 3]
        assert len(won) == 1 and len(lost) == 1, results
        msg = lost[0][1]
        assert "already exists" in msg or "another process" in msg, msg
        for _rc, out, err in results:
            assert "Directory not empty" not in out + err and "Traceback" not in err, err
    assert [i for i, _ in fl.store_list(store)] == [*fl.FAKE_IDS, "race0", "race1", "race2"]
    assert fl.serious_except(health.verify(store), fl.planted_entries(snap)) == []
    assert [p.kind for p in health.verify(store) if not p.serious] == []
    assert sorted(p.name for p in (store / "tmp").iterdir()) == ["notes.txt"]
    assert fl.foreign_lost(store, snap) == []


OTHER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import faultlib as fl
    from megamem import Memory
    mem = Memory({store!r}, recipe=fl.quick_recipe())
    mem.add("Hootsworth the barn owl nests in the Vellmark clock tower.", id="owl")
    print("added", flush=True)
    sys.stdin.readline()
    mem.forget("heron")
    print("forgot", flush=True)
""")


def test_long_lived_memory_sees_another_process(model_store, tmp_path):
    store = copy(model_store, tmp_path, plant=False)
    mem = Memory(store, create=False)
    owl_q = "Where does Hootsworth the barn owl nest?"
    assert [r.id for r in mem.list()] == list(fl.IDS)
    assert mem.ask(fl.QUESTIONS["heron"], max_new_tokens=2).gate[0][0] == "heron"
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER.format(tests=str(fl.HERE.parent), store=str(store))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "added", other.stderr.read()
        assert [r.id for r in mem.list()] == [*fl.IDS, "owl"]
        assert mem.route(owl_q)[0][0] == "owl"
        assert mem.ask(owl_q, max_new_tokens=2).gate[0][0] == "owl"
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "forgot", other.stderr.read()
        assert [r.id for r in mem.list()] == ["ferry", "tower", "owl"]
        ans = mem.ask(fl.QUESTIONS["heron"], max_new_tokens=2)
        assert "heron" not in [g for g, _ in ans.gate]
        assert not [w for w in mem.warnings if "damaged" in w], mem.warnings
    finally:
        other.communicate(timeout=60)
    assert other.returncode == 0


# -- 1c: kill -9 at random moments ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", range(CI_TRIALS))
def test_kill_trial(fake_store, tmp_path, calib, n):
    """SIGKILL during add / several adds / forget / repair (at a hooked call chosen by a seeded RNG, or after a
    random delay): the store opens, verify reports only notes (or a repair makes it clean), no committed memory
    is lost, no planted file is deleted, and one more add clears every leftover."""
    trial = fl.trial_plan(CI_TRIALS, CI_SEED)[n]
    r = fl.run_trial(fake_store, tmp_path, trial, calib)
    assert not r["failures"], f"{trial['op']} {trial['variant'] or ''} killed {r['where']}:\n" + "\n".join(
        r["failures"]
    )


@pytest.mark.parametrize("op", ["add", "forget"])
def test_interrupted_write_is_reported_as_a_leftover(fake_store, tmp_path, op):
    """Killed between moving a memory's folder and committing (an add after its rename into memories/, a forget
    after its row's removal, before the folder goes): by the protocol the next writer rolls it back, so verify
    should call it a leftover note, not a serious 'orphan' that `repair` 're-lists' (repair then discards it)."""
    t = fl.prepare_trial(fake_store, tmp_path / "store", op, None)
    spec = {**t.spec, "mode": "hook", "only": "os.rename", "k": 1, "when": "after" if op == "add" else "before"}
    rc, out, err = fl.run_child(spec)
    assert rc == 9, err
    store = Path(t.spec["path"])
    mid = "new0" if op == "add" else "m1"
    assert (store / "memories" / mid).is_dir()
    found = health.verify(store)
    about = [p for p in found if p.path == f"memories/{mid}"]
    if not about or any(p.serious for p in about):
        health.repair(store)
        relisted = mid in [i for i, _ in fl.store_list(store)]
        pytest.fail(
            f"verify says {fl._fmt(about)}; but repair then {'re-lists' if relisted else 'discards'} "
            f"memories/{mid} (and the next add's sweep would discard it too)"
        )


def test_killed_manifest_rebuild_leaves_nothing_unswept(fake_store, tmp_path):
    """repair killed right after it committed the new manifest under tmp/ (before its checkpoint): after one more
    write nothing of megamem's may stay in tmp/, and verify must not call megamem's own files 'not megamem's'."""
    t = fl.prepare_trial(fake_store, tmp_path / "store", "repair", "lost-manifest")
    store = Path(t.spec["path"])
    snap = fl.foreign_snapshot(store)
    spec = {**t.spec, "mode": "hook", "only": "sql:COMMIT", "k": 1, "when": "after"}
    rc, out, err = fl.run_child(spec)
    assert rc == 9, err
    res = fl.check_after_kill(store, t, set(), snap)
    assert not res["failures"], "\n".join(res["failures"])
