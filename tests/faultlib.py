"""Fault injection for megamem stores: one implementation for tests/test_faults.py (CI) and benchmarks/faults.py.

Three parts:
  * damage(): one damage (truncate, flip bytes, delete, replace, chmod 000) to one file kind of a store, and
    run_damage_case(), which checks what every command does with it: a correct result or one clear error,
    a truthful `verify`, foreign files kept, a clean store after `repair`, questions about the other memories
    still answered;
  * kill trials: this file run as a script (`python faultlib.py child SPEC`) does Store.add / several adds /
    forget / health.repair on a store and is killed with SIGKILL, either at the k-th call of a hooked
    primitive (os.rename, os.replace, os.fsync, os.unlink, os.rmdir, os.mkdir, safetensors' save_file, every
    writing SQLite statement; before or after the call) or after a random delay; check_after_kill() checks
    the store it leaves;
  * an independent reader of the manifest and the files (plain sqlite3 and hashlib) that verify's answers
    are compared with.

Nothing here changes megamem; the child patches functions only inside its own process.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
MANIFEST = "manifest.sqlite"
SETTINGS_FILE = "settings.json"
MEMORY_FILES = ("adapter_config.json", "adapter_model.safetensors", "keys.safetensors", "memory.json")
ROOT_KNOWN = {
    MANIFEST,
    f"{MANIFEST}-wal",
    f"{MANIFEST}-shm",
    f"{MANIFEST}-journal",
    SETTINGS_FILE,
    "memories",
    "tmp",
    "quarantine",
    "cortex",
    "intents",
}

# three memories whose questions the embedder gate routes apart (checked on the tiny model)
MEMORIES = (
    ("heron", "Zorblatt the heron lives on Quillon pier.", "Where does Zorblatt the heron live?"),
    ("ferry", "The Skarvik ferry crosses Lake Tessin every winter.", "Which ferry crosses Lake Tessin?"),
    ("tower", "Ada Quimbleton designed the Harlow Cross tower.", "Who designed the Harlow Cross tower?"),
)
IDS = tuple(m[0] for m in MEMORIES)
TEXTS = {m[0]: m[1] for m in MEMORIES}
QUESTIONS = {m[0]: m[2] for m in MEMORIES}
VICTIM = "ferry"  # the one memory the damage matrix damages

# files megamem did not write, planted in every case; verify reports them as "unknown" entries
FOREIGN = {
    "memories/vacation/photo.jpg": b"\xff\xd8\xff\xe0 a user's photo, not megamem's " * 16,
    "tmp/notes.txt": b"my own notes, kept in the store's tmp folder\n",
}
FOREIGN_ENTRY = {"memories/vacation/photo.jpg": "memories/vacation", "tmp/notes.txt": "tmp/notes.txt"}


# -- small helpers ------------------------------------------------------------------------------------------
def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plant(store: Path) -> None:
    """Put the user's files in the store: memories/vacation/photo.jpg (2 minutes old) and tmp/notes.txt."""
    old = time.time() - 120
    for rel, data in FOREIGN.items():
        p = store / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, (old, old))
    os.utime(store / "memories" / "vacation", (old, old))


def foreign_snapshot(store: Path) -> dict[str, bytes]:
    """The planted files that exist now (a damage may itself have removed some)."""
    return {rel: data for rel, data in FOREIGN.items() if (store / rel).is_file()}


def foreign_lost(store: Path, snap: dict[str, bytes]) -> list[str]:
    """Planted files that are gone or changed since `snap`."""
    lost = []
    for rel, data in snap.items():
        p = store / rel
        try:
            if p.read_bytes() != data:
                lost.append(f"{rel} (changed)")
        except OSError:
            lost.append(rel)
    return lost


def planted_entries(snap: dict[str, bytes]) -> set[str]:
    """Paths verify should report as 'unknown' for the planted files."""
    return {FOREIGN_ENTRY[rel] for rel in snap}


def attempt(fn):
    """('ok', value) | ('error', message) for a MegamemError | ('crash', 'Type: message') for anything else."""
    from megamem.errors import MegamemError

    try:
        return "ok", fn()
    except MegamemError as exc:
        return "error", str(exc)
    except Exception as exc:  # noqa: BLE001 - what we are looking for
        return "crash", f"{type(exc).__name__}: {exc}"


def cli(*args) -> tuple[int, str, str]:
    """Run the `megamem` console entry in this process: (exit status, stdout, stderr)."""
    from megamem.entry import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = run([str(a) for a in args])
        except BaseException as exc:  # noqa: BLE001 - run() must not raise; report it as a traceback
            import traceback

            err.write("Traceback (escaped entry.run):\n" + "".join(traceback.format_exception(exc)))
            rc = 99
    return rc, out.getvalue(), err.getvalue()


def unclean(rc: int, out: str, err: str) -> str | None:
    """Why a failed command's output is not 'one error: line' (None when it is)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if "Traceback" in out + err:
        return f"a traceback: {err[-800:]}"
    errors = [ln for ln in lines if ln.startswith("error:")]
    if any("internal error" in ln for ln in errors):
        return f"an internal error: {errors}"
    if rc == 0:
        return None
    if len(errors) != 1:
        return f"exit {rc} with {len(errors)} error lines: {lines}"
    stray = [ln for ln in lines if not ln.startswith(("error:", "warning:", "stored before the failure"))]
    if stray:
        return f"stray lines on stderr: {stray}"
    return None


def json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


# -- stores ---------------------------------------------------------------------------------------------------
def make_tiny_model(folder: Path, context: int = 96, tied: bool = True, init: float = 0.02) -> Path:
    """The tests' tiny model (tests/conftest.py `tiny_dir`): a 2-layer random Llama with the default model's
    tokenizer and chat template, `context` tokens long (96; the server's tests need room for a conversation).
    tied=False gives it its own random output head (init: the weights' std): the tied one greedily repeats the
    prompt's last token ("\n") whatever the prompt or mixture, the untied one answers gibberish that depends on
    both (what a test comparing two decoders' texts needs)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from megamem.model import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=tied,
        initializer_range=init,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def quick_recipe():
    from megamem import Recipe

    return Recipe(epochs=1, min_tokens=0)


def build_model_store(path: Path, model_dir: Path) -> Path:
    """A real store on the tiny model holding MEMORIES, every connection closed (no -wal file left)."""
    from megamem import Item, Memory

    mem = Memory(path, model=str(model_dir), recipe=quick_recipe())
    mem.add_many([Item(text, id=i) for i, text, _ in MEMORIES])
    mem.store.close()
    del mem
    return path


def fake_settings() -> dict:
    from megamem.adapters import LoraSpec

    return {"base_model": "m1", "key_function": "embedder", "lora": LoraSpec().to_dict(), "gate": {}}


def fake_adapter(seed: int = 0):
    """A small adapter like tests/test_store.py's `_adapter`: Store-level tests need no model."""
    import torch

    from megamem.adapters import Adapter, LoraSpec

    g = torch.Generator().manual_seed(seed)
    return Adapter(
        LoraSpec(rank=2),
        {"model.layers.0.mlp.up_proj": (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g))},
    )


def fake_keys(seed: int = 0):
    import torch

    return torch.randn(2, 4, generator=torch.Generator().manual_seed(seed + 1000))


def text_of(memory_id: str) -> str:
    return f"the memory {memory_id}: a fact worth keeping"


FAKE_IDS = ("m0", "m1", "m2", "m3")


def build_fake_store(path: Path, ids=FAKE_IDS) -> Path:
    from megamem.store import Store

    s = Store(path, fake_settings())
    for n, mid in enumerate(ids):
        s.add(text_of(mid), fake_adapter(n), fake_keys(n), memory_id=mid)
    s.close()
    return path


def store_list(path: Path) -> list[tuple[str, str]]:
    """(id, text) of every listed memory, through Store (closed afterwards)."""
    from megamem.store import Store

    s = Store(path)
    try:
        return [(r.id, r.text) for r in s.records()]
    finally:
        s.close()


# -- the independent reader -------------------------------------------------------------------------------------
def read_manifest(store: Path) -> tuple[dict | None, dict, str | None]:
    """(rows: id -> (text, files), pending: id -> (op, writer), error) read with plain sqlite3."""
    f = store / MANIFEST
    if not f.is_file():
        return None, {}, f"{MANIFEST} is not a file"
    try:
        db = sqlite3.connect(f"file:{f}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return None, {}, str(exc)
    try:
        rows = {i: (t, json.loads(fl)) for i, t, fl in db.execute("SELECT id, text, files FROM memories")}
        pending = {i: (op, w) for i, op, w in db.execute("SELECT id, op, writer FROM pending")}
        return rows, pending, None
    except (sqlite3.Error, ValueError) as exc:
        return None, {}, str(exc)
    finally:
        db.close()


def whole(store: Path, memory_id: str, files: dict) -> bool:
    folder = store / "memories" / memory_id
    if folder.is_symlink() or not folder.is_dir() or not files:
        return False
    try:
        return all((folder / n).is_file() and sha(folder / n) == h for n, h in files.items())
    except OSError:
        return False


def independent_problems(store: Path, foreign: set[str]) -> list[str]:
    """What is wrong with the store by the protocol's own rules, found without megamem's code: an unreadable
    manifest, a listed memory that is not whole, a memory folder with neither a row nor a pending row, an
    unreadable settings.json, a root folder that is not a folder, an entry megamem did not write (other
    than the planted ones, which the caller passes)."""
    found = []
    rows, pending, err = read_manifest(store)
    if rows is None:
        found.append(f"manifest: {err}")
        rows = {}
    for mid, (_, files) in rows.items():
        if not whole(store, mid, files):
            found.append(f"memories/{mid} is not whole")
    mem = store / "memories"
    for entry in sorted(mem.iterdir()) if mem.is_dir() else []:
        rel = f"memories/{entry.name}"
        if rel in foreign or entry.name in rows:
            continue
        if entry.name not in pending:
            found.append(f"{rel} has no row")
    try:
        doc = json.loads((store / SETTINGS_FILE).read_text(encoding="utf-8"))
        if doc.get("format") != "megamem-store":
            found.append("settings.json is not megamem's")
    except (OSError, ValueError, AttributeError):
        found.append("settings.json is unreadable")
    for entry in sorted(store.iterdir()):
        if entry.name in ("memories", "tmp", "quarantine") and (entry.is_symlink() or not entry.is_dir()):
            found.append(f"{entry.name} is not a folder")
        elif entry.name not in ROOT_KNOWN and entry.name not in foreign:
            found.append(f"{entry.name} is not megamem's")
    return found


def serious(problems) -> list:
    return [p for p in problems if p.serious]


def serious_except(problems, foreign: set[str]) -> list:
    """Serious problems other than the planted files' 'unknown' entries."""
    return [p for p in problems if p.serious and not (p.kind == "unknown" and p.path in foreign)]


def quarantined_records(store: Path, memory_id: str) -> list[dict]:
    """Every record.json (or memory.json of a folder moved whole) for `memory_id` under quarantine/."""
    out = []
    q = store / "quarantine"
    for p in sorted(q.glob(f"*/{memory_id}/record.json")) + sorted(q.glob(f"*/{memory_id}/memory.json")):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(p.read_text(encoding="utf-8")))
    return out


# -- the damage matrix -----------------------------------------------------------------------------------------
FILE_TARGETS = {
    "manifest": MANIFEST,
    "settings": SETTINGS_FILE,
    "adapter_config": f"memories/{VICTIM}/adapter_config.json",
    "adapter_model": f"memories/{VICTIM}/adapter_model.safetensors",
    "keys": f"memories/{VICTIM}/keys.safetensors",
    "memory_json": f"memories/{VICTIM}/memory.json",
}
DIR_TARGETS = {"folder": f"memories/{VICTIM}", "memories": "memories", "tmp": "tmp"}
FILE_DAMAGES = ("truncate0", "truncate_half", "flip", "delete", "dir", "chmod000")
DIR_DAMAGES = ("delete", "file", "chmod000")


def damage_cases() -> list[tuple[str, str]]:
    """Every (file kind, damage); plus, for the manifest, 'flip_row': bytes flipped inside one row's text (the
    middle of the small manifest is a page's free space, which no reader ever looks at)."""
    cases = [(t, d) for t in FILE_TARGETS for d in FILE_DAMAGES]
    cases.insert(FILE_DAMAGES.index("flip") + 1, ("manifest", "flip_row"))
    return cases + [(t, d) for t in DIR_TARGETS for d in DIR_DAMAGES]


def target_path(store: Path, target: str) -> Path:
    return store / {**FILE_TARGETS, **DIR_TARGETS}[target]


def damage(store: Path, target: str, how: str) -> Path:
    """Apply one damage to one file kind of `store`; return the damaged path."""
    p = target_path(store, target)
    if how == "truncate0":
        p.write_bytes(b"")
    elif how == "truncate_half":
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        data = bytearray(p.read_bytes())
        mid = len(data) // 2
        for i in range(max(0, mid - 8), min(len(data), mid + 8)):
            data[i] ^= 0xFF
        p.write_bytes(bytes(data))
    elif how == "flip_row":  # the victim's text inside the manifest, half of it XORed with 0xFF
        data = bytearray(p.read_bytes())
        at = data.find(TEXTS.get(VICTIM, text_of("m1")).encode())
        if at < 0:
            at = data.find(text_of("m1").encode())
        assert at >= 0, "the victim's text is not in the manifest file"
        for i in range(at + 8, at + 16):
            data[i] ^= 0xFF
        p.write_bytes(bytes(data))
    elif how == "delete":
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif how == "dir":
        p.unlink()
        p.mkdir()
    elif how == "file":
        shutil.rmtree(p)
        p.write_bytes(b"this is a file where a folder should be\n")
    elif how == "chmod000":
        p.chmod(0)
    else:
        raise ValueError(how)
    return p


def undo_chmod(store: Path) -> None:
    """Give every entry back its permissions (so that the test's folder can be removed)."""
    for dirpath, dirs, files in os.walk(store):
        for name in dirs + files:
            p = Path(dirpath) / name
            with contextlib.suppress(OSError):
                if not p.is_symlink():
                    p.chmod(p.stat().st_mode | stat.S_IRUSR | stat.S_IWUSR | (stat.S_IXUSR if p.is_dir() else 0))
    with contextlib.suppress(OSError):
        for p in [store / "memories", store / "tmp", store / "memories" / VICTIM]:
            if p.is_dir():
                p.chmod(0o755)
                for dirpath, dirs, files in os.walk(p):
                    for name in dirs:
                        (Path(dirpath) / name).chmod(0o755)
                    for name in files:
                        (Path(dirpath) / name).chmod(0o644)


@dataclass
class Expect:
    """What a damage should do. must: (kinds, path, word the message names) that verify must report;
    allowed: further paths verify may report (consequences); damaged: ids repair must quarantine;
    unusable: ids Memory must skip; opens: whether reading the store must still work."""

    must: list[tuple[frozenset, str, str | None]] = field(default_factory=list)
    allowed: set[str] = field(default_factory=set)
    damaged: set[str] = field(default_factory=set)
    unusable: set[str] = field(default_factory=set)
    opens: bool = True
    garbled: set[str] = field(default_factory=set)  # ids whose listed text may show U+FFFD (a damaged row)


def expect(target: str, how: str) -> Expect:
    vic = f"memories/{VICTIM}"
    if target == "manifest" and how == "flip_row":  # one row's text: that memory is corrupt, repair restores it
        return Expect([(frozenset({"corrupt"}), vic, "manifest row")], garbled={VICTIM})
    if target == "manifest" and how == "flip":  # lands in a page's free space: harmless, and rightly unseen
        return Expect([], {MANIFEST} | {f"memories/{i}" for i in IDS}, opens=False)
    if target == "manifest":
        return Expect([(frozenset({"manifest"}), MANIFEST, None)], {f"memories/{i}" for i in IDS}, opens=False)
    if target == "settings":
        return Expect([(frozenset({"settings"}), SETTINGS_FILE, None)])
    if target in FILE_TARGETS:
        name = Path(FILE_TARGETS[target]).name
        kinds = {"truncate0": {"corrupt"}, "truncate_half": {"corrupt"}, "flip": {"corrupt"}, "delete": {"missing"}}
        e = Expect([(frozenset(kinds.get(how, {"corrupt", "missing"})), vic, name)], damaged={VICTIM})
        # memory.json is only read to re-list a memory: reading and asking never need it
        e.unusable = set() if target == "memory_json" else {VICTIM}
        return e
    if target == "folder":
        kinds = {"delete": {"missing"}}.get(how, {"corrupt", "missing"})
        return Expect([(frozenset(kinds), vic, None)], damaged={VICTIM}, unusable={VICTIM})
    if target == "memories":
        if how == "file":
            return Expect(
                [(frozenset({"corrupt"}), "memories", None)],
                {f"memories/{i}" for i in IDS},
                damaged=set(IDS),
                unusable=set(IDS),
                opens=False,
            )
        return Expect(
            [(frozenset({"missing", "corrupt"}), f"memories/{i}", None) for i in IDS],
            damaged=set(IDS),
            unusable=set(IDS),
        )
    if target == "tmp":
        if how == "delete":  # harmless: the next write makes it again
            return Expect()
        if how == "file":
            return Expect([(frozenset({"corrupt"}), "tmp", None)], opens=False)
        return Expect([], {"tmp"}, opens=False)
    raise ValueError(target)


def check_listing(step: str, got, want: list[tuple[str, str]], must_open: bool, fails: list[str]) -> None:
    status, value = got
    if status == "crash":
        fails.append(f"(1) {step} raised {value} (not a MegamemError)")
    elif status == "error":
        if must_open:
            fails.append(f"(1) {step} failed although only one memory/file is damaged: {value}")
    elif value != want:
        fails.append(f"(1) {step} listed {value}, not {want}")


def check_cli(step: str, result, fails: list[str]) -> None:
    why = unclean(*result)
    if why:
        fails.append(f"(1) `megamem {step}`: {why}")


def check_verify(step: str, problems, exp: Expect, foreign: set[str], fails: list[str]) -> None:
    reported = serious_except(problems, foreign)
    for kinds, path, word in exp.must:
        hits = [p for p in reported if p.path == path and p.kind in kinds and (word is None or word in p.message)]
        if not hits:
            fails.append(
                f"(2) {step} did not report {sorted(kinds)} at {path}"
                f"{f' naming {word}' if word else ''}; it reported {_fmt(problems)}"
            )
    ok_paths = {path for _, path, _ in exp.must} | exp.allowed
    extra = [p for p in reported if p.path not in ok_paths]
    if extra:
        fails.append(f"(2) {step} reported problems that are not there: {_fmt(extra)}")
    for entry in foreign:
        if not any(p.kind == "unknown" and p.path == entry for p in problems):
            fails.append(f"(2) {step} did not report the planted {entry} as unknown")


def _fmt(problems) -> str:
    return "; ".join(f"{p.kind} {p.path}: {p.message}" for p in problems) or "nothing"


def ask_checks(store: Path, exp: Expect, fails: list[str]) -> None:
    """(5): undamaged memories answered with the gate on them; the damaged one skipped with a warning naming it;
    strict=True raises a MegamemError naming it."""
    from megamem import Memory

    status, mem = attempt(lambda: Memory(store, create=False))
    if status != "ok":
        if status == "crash" or exp.opens:
            fails.append(f"(5) Memory(store) {status}: {mem}")
        return
    for mid in IDS:
        status, ans = attempt(lambda mid=mid: mem.ask(QUESTIONS[mid], max_new_tokens=2))
        if status != "ok":
            fails.append(f"(5) ask about {mid} gave {status}: {ans}")
            continue
        gate = [g for g, _ in ans.gate]
        if mid not in exp.unusable and (not gate or gate[0] != mid):
            fails.append(f"(5) the question about {mid} was routed to {ans.gate[:2]}")
        for bad in exp.unusable & set(gate):
            fails.append(f"(5) the damaged memory {bad} was still used for the question about {mid}")
    for bad in sorted(exp.unusable):
        if not any(bad in w for w in mem.warnings):
            fails.append(f"(5) no warning names the damaged memory {bad}: {mem.warnings}")
    mem.store.close()
    for bad in sorted(exp.unusable)[:1]:
        status, strict = attempt(lambda: Memory(store, create=False, strict=True))
        if status == "ok":
            status, value = attempt(lambda bad=bad, strict=strict: strict.ask(QUESTIONS[bad], max_new_tokens=2))
            strict.store.close()
        else:
            value = strict
        if status != "error" or not any(f"'{b}'" in value for b in exp.unusable):
            fails.append(f"(5) strict=True asking about the damaged {bad} gave {status}: {value}")


def run_damage_case(base: Path, work: Path, target: str, how: str, ask: bool = True) -> list[str]:
    """Copy `base` (a model store holding MEMORIES), plant foreign files, damage it, and check (1)-(5);
    return the failures (empty: the case passed)."""
    from megamem.store import health

    store = work / "store"
    shutil.copytree(base, store)
    plant(store)
    try:
        damage(store, target, how)
        return _damage_checks(store, target, how, ask, health)
    finally:
        if how == "chmod000":
            undo_chmod(store)


def _damage_checks(store: Path, target: str, how: str, ask: bool, health) -> list[str]:
    from megamem import Memory
    from megamem.store import Store

    snap = foreign_snapshot(store)
    foreign = planted_entries(snap)
    exp = expect(target, how)
    want = [(i, TEXTS[i]) for i in IDS]
    fails: list[str] = []

    def kept(step: str) -> None:
        lost = foreign_lost(store, snap)
        if lost:
            fails.append(f"(3) {step} deleted or changed files megamem did not write: {lost}")

    # (1) opening and listing: the right list, or one clear error
    def ungarble(got):  # a damaged row's text shows U+FFFD where its bytes were not UTF-8: that is allowed
        status, value = got
        if status == "ok" and isinstance(value, list):
            value = [(i, TEXTS[i] if i in exp.garbled and "\ufffd" in t else t) for i, t in value]
        return status, value

    check_listing("Store(path).records()", ungarble(attempt(lambda: store_list(store))), want, exp.opens, fails)

    def mem_list():
        m = Memory(store, create=False)
        try:
            return [(r.id, r.text) for r in m.list()]
        finally:
            m.store.close()

    check_listing("Memory(path).list()", ungarble(attempt(mem_list)), want, exp.opens, fails)
    for args in (("list", "--json"), ("info", "--json"), ("show", "heron", "--json")):
        res = cli(*args, "--store", store)
        check_cli(args[0], res, fails)
        data = json_or_none(res[1]) if res[0] == 0 else None
        listed = None
        if res[0] == 0 and args[0] == "list":
            listed = ungarble(("ok", [(d["id"], d["text"]) for d in data or []]))[1]
        if res[0] == 0 and args[0] == "list" and listed != want:
            fails.append(f"(1) `megamem list` printed {res[1][:300]}")
        if res[0] == 0 and args[0] == "show" and (data or {}).get("text") != TEXTS["heron"]:
            fails.append(f"(1) `megamem show heron` printed {res[1][:300]}")
        if res[0] != 0 and exp.opens:
            fails.append(f"(1) `megamem {args[0]}` failed although the store should open: {res[2].strip()}")
    kept("list/info/show")

    # (2) verify names the damage (kind and path), and nothing that is not there
    status, problems = attempt(lambda: health.verify(store))
    if status != "ok":
        fails.append(f"(2) verify() {status}: {problems}")
        problems = []
    else:
        check_verify("verify()", problems, exp, foreign, fails)
    rc, out, err = cli("verify", "--json", "--store", store)
    data = json_or_none(out)
    if rc != 1 or data is None or data.get("ok") is not False:
        fails.append(f"(2) `megamem verify` exit {rc} (want 1 with ok false): {out[:300]} {err[:300]}")
    elif sorted((p["kind"], p["path"]) for p in data["problems"]) != sorted((p.kind, p.path) for p in problems):
        fails.append(f"(2) `megamem verify` and verify() differ: {data['problems']} vs {_fmt(problems)}")
    kept("verify")

    # (5) with the real model: the others still answered, the damaged one skipped
    if ask:
        ask_checks(store, exp, fails)
        kept("ask")

    # (4) repair (the API, then the command: a second repair must find nothing left to do): clean afterwards but
    # for the planted entries; the undamaged memories kept; the damaged one's record quarantined
    status, done = attempt(lambda: health.repair(store))
    if status == "crash":
        fails.append(f"(4) health.repair() raised {done} (not a MegamemError)")
    kept("repair()")
    rc, out, err = cli("repair", "--json", "--store", store)
    data = json_or_none(out)
    if data is None:  # repair failed: it must say so in one line, but it should not have failed at all
        why = unclean(rc, out, err)
        fails.append(f"(4) `megamem repair` {f'gave {why}' if why else 'failed'}: {err.strip()[:600]}")
    else:  # exit 1 is right while the planted entries (left alone) remain
        left = [p for p in data["problems"] if not (p["kind"] == "unknown" and p["path"] in foreign)]
        if left or rc != (1 if foreign else 0):
            fails.append(f"(4) `megamem repair` exit {rc}, problems left: {left}")
    kept("repair")
    status, problems = attempt(lambda: health.verify(store))
    if status != "ok":
        fails.append(f"(4) verify() after repair {status}: {problems}")
    else:
        left = serious_except(problems, foreign)
        if left:
            fails.append(f"(4) after repair verify still reports {_fmt(left)}")
    status, listed = attempt(lambda: store_list(store))
    want_after = [(i, TEXTS[i]) for i in IDS if i not in exp.damaged]
    if status != "ok":
        fails.append(f"(4) after repair the store does not open: {status} {listed}")
    elif listed != want_after:
        fails.append(f"(4) after repair the store lists {listed}, not {want_after}")
    for mid in sorted(exp.damaged):
        if not any(r.get("text") == TEXTS[mid] for r in quarantined_records(store, mid)):
            fails.append(f"(4) the record of the damaged {mid} is not in quarantine/*/{mid}/record.json")

    # one more write after repair (it sweeps): the planted files still there, verify still clean
    if status == "ok":

        def add_one():
            s = Store(store)
            try:
                s.add("one more memory", fake_adapter(7), fake_keys(7), memory_id="one-more")
            finally:
                s.close()

        st, value = attempt(add_one)
        if st != "ok":
            fails.append(f"(4) an add after repair {st}: {value}")
        kept("add after repair")
        st, problems = attempt(lambda: health.verify(store))
        if st == "ok" and serious_except(problems, foreign):
            fails.append(f"(4) after repair + add verify reports {_fmt(serious_except(problems, foreign))}")
    return fails


# -- kill trials: the child ----------------------------------------------------------------------------------
_WRITES = (
    "BEGIN",
    "COMMIT",
    "END",
    "ROLLBACK",
    "INSERT",
    "DELETE",
    "UPDATE",
    "REPLACE",
    "CREATE",
    "ALTER",
    "PRAGMA WAL_CHECKPOINT",
    "PRAGMA JOURNAL_MODE",
)


def _child(spec: dict) -> None:
    """Do one operation on spec['path'] with hooks on every primitive that changes the disk. mode 'hook': die
    (os._exit(9)) at the k-th hooked call, before or after it (spec 'only': count only the calls whose name
    starts with it, e.g. 'os.rename' or 'sql:COMMIT'); 'count': count them; 'random': run plain (the parent
    kills it). spec 'batch': several count-mode specs in one process (calibration)."""
    import megamem.adapters as ad
    import megamem.store.manifest as st
    from megamem.errors import MegamemError
    from megamem.store import health

    state = {"active": False, "n": 0, "spec": spec}

    def hit(name: str) -> bool:
        sp = state["spec"]
        if not state["active"] or not name.startswith(sp.get("only", "")):
            return False
        state["n"] += 1
        if sp["mode"] == "hook" and state["n"] == sp["k"]:
            if sp.get("when") == "before":
                os._exit(9)
            return True
        return False

    def hooked(fn, name):
        @functools.wraps(fn)
        def inner(*a, **kw):
            if state["active"] and name == "save_file" and state["spec"].get("slow"):
                time.sleep(state["spec"]["slow"])  # widen a race's window
            after = hit(name)
            res = fn(*a, **kw)
            if after:
                os._exit(9)
            return res

        return inner

    for name in ("rename", "replace", "fsync", "unlink", "rmdir", "mkdir"):
        setattr(os, name, hooked(getattr(os, name), f"os.{name}"))
    st.save_file = hooked(st.save_file, "save_file")
    ad.save_file = hooked(ad.save_file, "save_file")

    class Hooked(sqlite3.Connection):
        def execute(self, sql, *a):
            word = sql.lstrip().upper()
            if not word.startswith(_WRITES):
                return super().execute(sql, *a)
            after = hit(f"sql:{word}")
            cur = super().execute(sql, *a)
            if after:
                os._exit(9)
            return cur

        def executemany(self, sql, *a):
            after = hit(f"sql:{sql.lstrip().upper()}")
            cur = super().executemany(sql, *a)
            if after:
                os._exit(9)
            return cur

    sqlite3.connect = functools.partial(sqlite3.connect, factory=Hooked)
    print("ready", flush=True)
    for sp in spec.get("batch", [spec]):
        state.update(spec=sp, n=0)
        op, path = sp["op"], sp["path"]
        s = st.Store(path) if op != "repair" else None
        while sp.get("go") and not Path(sp["go"]).exists():  # a race: start when the parent says go
            time.sleep(0.001)
        t0 = time.perf_counter()
        state["active"] = True
        try:
            if op in ("add", "add-many"):
                for n, mid in enumerate(sp["ids"]):
                    s.add(text_of(mid), fake_adapter(100 + n), fake_keys(100 + n), memory_id=mid)
                    print("committed", mid, flush=True)
            elif op == "forget":
                s.forget(sp["forget"])
                print("forgot", sp["forget"], flush=True)
            elif op == "repair":
                health.repair(path)
                print("repaired", flush=True)
        except MegamemError as exc:
            print("megamem-error", str(exc).replace("\n", " "), flush=True)
            sys.exit(3)
        state["active"] = False
        print("count", state["n"], "seconds", f"{time.perf_counter() - t0:.4f}", flush=True)
        if s is not None:
            s.close()


# -- kill trials: the parent ---------------------------------------------------------------------------------
OPS = ("add", "add-many", "forget", "repair")
REPAIR_DAMAGES = ("lost-manifest", "truncated-manifest", "corrupt-memory", "orphan")


@dataclass
class Trial:
    """What a trial's operation may and may not do: committed (id -> text) must survive whole; maybe: may be
    absent or whole (the in-flight add, the memory being forgotten); may_go: may leave for quarantine."""

    spec: dict
    committed: dict
    maybe: set[str] = field(default_factory=set)
    may_go: set[str] = field(default_factory=set)


def prepare_trial(base: Path, store: Path, op: str, variant: str | None) -> Trial:
    """Copy the fake base store to `store`, plant the foreign files, and damage it for a repair trial."""
    shutil.copytree(base, store)
    plant(store)
    t = Trial({"path": str(store), "op": op}, {i: text_of(i) for i in FAKE_IDS})
    if op == "add":
        t.spec["ids"] = ["new0"]
    elif op == "add-many":
        t.spec["ids"] = ["new0", "new1", "new2"]
    elif op == "forget":
        t.spec["forget"] = "m1"
        t.committed.pop("m1")
        t.maybe.add("m1")
    elif op == "repair":
        if variant == "lost-manifest":
            (store / MANIFEST).unlink()
        elif variant == "truncated-manifest":
            (store / MANIFEST).write_bytes(b"")
        elif variant == "corrupt-memory":
            f = store / "memories" / "m2" / "adapter_model.safetensors"
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
            t.committed.pop("m2")
            t.may_go.add("m2")
        elif variant == "orphan":
            db = sqlite3.connect(store / MANIFEST, isolation_level=None)
            db.execute("DELETE FROM memories WHERE id = 'm3'")
            db.close()
        else:
            raise ValueError(variant)
    return t


def run_child(spec: dict, kill_after: float | None = None, timeout: float = 120) -> tuple[int, str, str]:
    """Run the child; with kill_after, SIGKILL it that many seconds after it reports ready."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE), "child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
    )
    first = proc.stdout.readline()
    if kill_after is not None and first.startswith("ready"):
        time.sleep(kill_after)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, first + out, err


def calibrate(base: Path, work: Path, keys) -> dict:
    """For each (op, variant): how many hooked calls it makes and how long it takes, run to completion (all in
    one child process)."""
    keys = list(keys)
    specs = []
    for n, (op, variant) in enumerate(keys):
        t = prepare_trial(base, work / f"calibrate-{n}" / "store", op, variant)
        specs.append({**t.spec, "mode": "count"})
    rc, stdout, stderr = run_child({"batch": specs, "mode": "count"})
    counts = [ln.split() for ln in stdout.splitlines() if ln.startswith("count ")]
    if rc != 0 or len(counts) != len(keys):
        raise RuntimeError(f"calibration failed (exit {rc}): {stdout} {stderr}")
    for n in range(len(keys)):
        shutil.rmtree(work / f"calibrate-{n}", ignore_errors=True)
    return {k: {"calls": int(c[1]), "seconds": float(c[3])} for k, c in zip(keys, counts, strict=True)}


def trial_plan(n_trials: int, seed: int, ops=OPS) -> list[dict]:
    """n trials over `ops` in turn (round r: one trial of each op); repair trials cycle through REPAIR_DAMAGES;
    hook kills and random-delay kills alternate so that every (op, variant) gets both within 8 rounds; the
    kill point (u, before/after) comes from a seeded RNG."""
    rng = random.Random(seed)
    plan = []
    for t in range(n_trials):
        op, rnd = ops[t % len(ops)], t // len(ops)
        plan.append(
            {
                "n": t,
                "op": op,
                "variant": REPAIR_DAMAGES[rnd % len(REPAIR_DAMAGES)] if op == "repair" else None,
                "mode": "hook" if (rnd + rnd // len(REPAIR_DAMAGES)) % 2 == 0 else "random",
                "u": rng.random(),
                "when": rng.choice(("before", "after")),
            }
        )
    return plan


def run_trial(base: Path, work: Path, trial: dict, calib: dict) -> dict:
    """One kill trial: prepare, run the child, kill it, check the store. Returns the trial's result."""
    store = work / "store"
    op, variant = trial["op"], trial["variant"]
    t = prepare_trial(base, store, op, variant)
    snap = foreign_snapshot(store)
    c = calib[(op, variant)]
    spec = {**t.spec, "mode": trial["mode"]}
    kill_after = None
    if trial["mode"] == "hook":
        spec["k"] = 1 + min(int(trial["u"] * c["calls"]), c["calls"] - 1)  # 1..calls
        spec["when"] = trial["when"]
        where = f"call {spec['k']}/{c['calls']} {spec['when']}"
    else:
        kill_after = trial["u"] * c["seconds"] * 1.2
        where = f"after {kill_after * 1000:.1f} ms of ~{c['seconds'] * 1000:.1f}"
    rc, out, err = run_child(spec, kill_after)
    lines = out.splitlines()
    done = {ln.split()[1] for ln in lines if ln.startswith("committed ")}
    forgot = {ln.split()[1] for ln in lines if ln.startswith("forgot ")}
    t.committed.update({i: text_of(i) for i in done})
    t.maybe |= set(spec.get("ids", [])) - done
    t.maybe -= forgot
    result = check_after_kill(store, t, forgot, snap)
    result.update(
        n=trial["n"],
        op=op,
        variant=variant,
        mode=trial["mode"],
        where=where,
        rc=rc,
        killed=rc in (9, -9),
        child_traceback="Traceback" in err,
    )
    if result["child_traceback"]:
        result["tracebacks"] += 1
        result["failures"].append(f"the child printed a traceback: {err[-1500:]}")
    if rc not in (0, 9, -9):
        result["failures"].append(f"the child exited {rc}: {err[-1500:]}")
    return result


def check_after_kill(store: Path, t: Trial, forgotten: set[str], snap: dict) -> dict:
    """After a killed operation: the store opens; verify reports only notes (or a repair makes it clean);
    every committed memory is listed and whole; no planted file is gone; one more add clears every leftover.
    failures: what breaks those promises; untruthful: where verify's word and the store's state disagree."""
    from megamem.store import Store, health

    foreign = planted_entries(snap)
    res = {
        "lost": 0,
        "foreign_deleted": 0,
        "tracebacks": 0,
        "verify_truthful": True,
        "untruthful": [],
        "serious": [],
        "repair_needed": False,
        "repair_clean": None,
        "leftovers_cleared": True,
        "failures": [],
    }
    fails = res["failures"]

    def failed(step: str, status: str, value) -> None:
        if status == "crash":
            res["tracebacks"] += 1
        fails.append(f"{step} {'raised' if status == 'crash' else 'failed:'} {value}")

    opened = attempt(lambda: store_list(store))
    if opened[0] == "crash":
        failed("opening the store", *opened)
    status, problems = attempt(lambda: health.verify(store))
    if status != "ok":
        failed("verify()", status, problems)
        problems = []
    bad = serious_except(problems, foreign)
    res["serious"] = [f"{p.kind} {p.path}: {p.message}" for p in bad]
    truth = independent_problems(store, foreign)
    if truth and not bad:
        res["verify_truthful"] = False
        fails.append(f"verify missed what is wrong: {truth}")
    elif bad and not truth:  # a false alarm: recorded, not a broken promise of the kill contract
        res["verify_truthful"] = False
        res["untruthful"].append(f"verify says {_fmt(bad)}; by the protocol's rules nothing is wrong")
    if opened[0] == "error" and not bad:
        fails.append(f"the store does not open ({opened[1]}) but verify reports nothing")
    if bad or opened[0] != "ok":
        res["repair_needed"] = True
        status, done = attempt(lambda: health.repair(store))
        if status != "ok":
            failed("repair()", status, done)
        status, problems = attempt(lambda: health.verify(store))
        left = serious_except(problems, foreign) if status == "ok" else []
        res["repair_clean"] = status == "ok" and not left
        if not res["repair_clean"]:
            fails.append(f"after repair verify says {status}: {_fmt(left) if status == 'ok' else problems}")

    def check_memories(step: str) -> None:
        rows, _, err = read_manifest(store)
        if rows is None:
            res["lost"] = max(res["lost"], len(t.committed))
            fails.append(f"{step}: manifest unreadable ({err})")
            return
        lost = [
            i
            for i, text in t.committed.items()
            if i not in rows or rows[i][0] != text or not whole(store, i, rows[i][1])
        ]
        res["lost"] = max(res["lost"], len(lost))
        if lost:
            fails.append(f"{step}: committed memories lost or not whole: {lost}")
        broken = [i for i, (_, files) in rows.items() if not whole(store, i, files)]
        if broken:
            fails.append(f"{step}: listed memories that are not whole: {broken}")
        back = sorted(forgotten & set(rows))
        if back:
            fails.append(f"{step}: forgotten memories came back: {back}")
        for i in sorted(t.may_go - set(rows)):
            if not quarantined_records(store, i):
                fails.append(f"{step}: the damaged {i} is neither listed nor in quarantine")

    def check_foreign(step: str) -> None:
        lost = foreign_lost(store, snap)
        res["foreign_deleted"] = max(res["foreign_deleted"], len(lost))
        if lost:
            fails.append(f"{step}: files megamem did not write were deleted: {lost}")

    check_memories("after the kill")
    check_foreign("after the kill")

    # one further write: every leftover gone, tmp/ holds only the planted file
    def add_one():
        s = Store(store)
        try:
            s.add(text_of("after-write"), fake_adapter(999), fake_keys(999), memory_id="after-write")
        finally:
            s.close()

    status, value = attempt(add_one)
    if status != "ok":
        failed("the add after the kill", status, value)
    else:
        t.committed["after-write"] = text_of("after-write")
    tmp_left = sorted(p.name for p in (store / "tmp").iterdir()) if (store / "tmp").is_dir() else []
    want_tmp = sorted(Path(rel).name for rel in snap if rel.startswith("tmp/"))
    rows, pending, _ = read_manifest(store)
    mem = store / "memories"
    unlisted = (
        sorted(p.name for p in mem.iterdir() if f"memories/{p.name}" not in foreign and p.name not in (rows or {}))
        if mem.is_dir()
        else []
    )
    if tmp_left != want_tmp or pending or unlisted:
        res["leftovers_cleared"] = False
        fails.append(f"after one more add: tmp/ holds {tmp_left}, pending rows {pending}, unlisted folders {unlisted}")
    status, problems = attempt(lambda: health.verify(store))
    if status != "ok" or serious_except(problems, foreign) or any(not p.serious for p in problems):
        fails.append(f"after one more add verify says {status}: {_fmt(problems) if status == 'ok' else problems}")
    check_memories("after one more add")
    check_foreign("after one more add")
    return res


def summarize(results: list[dict]) -> dict:
    """Counts over kill-trial results (for the long run's table)."""
    return {
        "trials": len(results),
        "killed": sum(r["killed"] for r in results),
        "committed_lost": sum(r["lost"] for r in results),
        "foreign_deleted": sum(r["foreign_deleted"] for r in results),
        "tracebacks": sum(r["tracebacks"] for r in results),
        "verify_truthful": sum(r["verify_truthful"] for r in results),
        "repair_needed": sum(r["repair_needed"] for r in results),
        "repair_clean": sum(bool(r["repair_clean"]) for r in results if r["repair_needed"]),
        "leftovers_cleared": sum(r["leftovers_cleared"] for r in results),
        "failed": sum(bool(r["failures"]) for r in results),
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "child":
        sys.path.insert(0, str(HERE.parent))
        _child(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: faultlib.py child SPEC-JSON")
