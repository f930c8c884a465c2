"""Property-based fuzzing of megamem's input handling: the CLI (through `megamem.entry.run`), JSONL files and
the Python API, all on the tiny random model, fed hostile input (control characters, escape sequences, lone
surrogates, huge strings, path tricks, nan/inf/huge numbers, wrong types).

The properties, for every input:
- the CLI exits 0 or 1, never prints a traceback, and a failure ends in exactly one `error:` line (its last
  line) that is never an "internal error" (an exception megamem did not expect);
- nothing megamem prints holds a raw control character (only newline and tab);
- input that breaks a documented rule (checks.py) is refused, input that follows them is accepted (a text too
  long for the model's context or an id already taken are the only expected refusals);
- a refused add stores nothing: the store's listing is unchanged and it still verifies; on a new path no store
  is left behind;
- a JSONL file with a bad line names the first bad line ("line N") and stores nothing; with --keep-going
  exactly the good lines are stored and each skipped line is named by a warning;
- the API raises only MegamemError, and leaves the store unchanged when it does.

Each check collects its violations; a failure raises an AssertionError subclass named after the first violated
property (so Hypothesis reports different broken properties as different bugs). `test_known_bug_inputs` runs
the same checks on concrete inputs found while writing this file.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, assume, event, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.control import currently_in_test_context

from megamem.entry import run

# Hypothesis caches (unicode tables, constants) go to a temp folder, not the repository's .hypothesis/
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "megamem-test-fuzz-hypothesis")

TRACEBACK = "Traceback (most recent call last)"
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # what must never reach a terminal raw
TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # refused in texts (checks.py)
ID_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
MODES = ("qa", "recall", "irag")
HEARD = "Zorblatt the heron lives on Quillon pier."
SEED_MAX = 2**63 - 1  # the largest seed (and count) megamem accepts (checks.check_count)
COUNT_MAX = 2**63 - 1
BETA_MAX = 1e6  # the gate's largest beta: beta * score must stay finite (GateConfig)


def _gate_fields() -> set[str]:
    import dataclasses

    from megamem.gate import GateConfig

    return {f.name for f in dataclasses.fields(GateConfig)}


# The gate may have a null memory (the base model) that keeps a share of the weight: then the weights sum to less
# than 1 and a question may use no memory. The paper's gate (null_rate None, `ask --no-null`) always uses one.
HAS_NULL = "null_rate" in _gate_fields()


def fuzz(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        database=None,  # write nothing into the repository (.hypothesis/)
        phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],  # no explain phase: it traces (slow)
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


# -- running and judging ---------------------------------------------------------------------------------------
def tally(label: str) -> None:
    """Count an outcome in Hypothesis' statistics (--hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(label)


def cli(argv: list) -> tuple[int, str, str]:
    """Run the console entry in-process; (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def short(value: object, n: int = 1500) -> str:
    try:
        r = repr(value)
    except (RecursionError, ValueError):  # nested too deep, or an int past Python's 4300-digit str limit
        return f"<{type(value).__name__} too large to print>"
    return r if len(r) <= n else r[: n - 20] + f"...<{len(r)} chars>"


def describe(argv: list, rc: int, out: str, err: str) -> str:
    return f"argv={short([str(a) for a in argv], 800)}\n  rc={rc}\n  stdout={short(out)}\n  stderr={short(err)}"


_VIOLATIONS: dict[str, type] = {}


def violated(problems: list[tuple[str, str]]) -> None:
    """Raise for the collected problems, as an AssertionError subclass named after the first."""
    if not problems:
        return
    name = problems[0][0]
    cls = _VIOLATIONS.setdefault(name, type("Violation_" + re.sub(r"\W", "_", name), (AssertionError,), {}))
    raise cls("\n".join(f"[{n}] {d}" for n, d in problems))


def output_problems(rc: int, out: str, err: str, where: str) -> list[tuple[str, str]]:
    """The properties every command run must hold, whatever its input."""
    p = []
    if rc not in (0, 1):
        p.append(("exit-status", where))
    if TRACEBACK in out or TRACEBACK in err:
        p.append(("traceback", where))
    if rc == 1:
        lines = [line for line in err.split("\n") if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        if not lines or not lines[-1].startswith("error:") or len(errors) != 1:
            p.append(("one-error-line", where))
        if any("internal error" in line for line in errors):
            p.append(("internal-error", where))
    bad = RAW_CONTROL.search(out + err)
    if bad:
        p.append(("raw-control-char", f"{ascii(bad.group())} printed; {where}"))
    return p


def error_line(err: str) -> str:
    lines = [line for line in err.split("\n") if line.startswith("error:")]
    return lines[-1] if lines else ""


def listing(store: Path) -> list[dict]:
    rc, out, err = cli(["list", "--store", store, "--json"])
    assert rc == 0, f"list failed: {err}"
    return json.loads(out)


def ids_of(store: Path) -> list[str]:
    return [r["id"] for r in listing(store)]


def store_problems(store: Path) -> list[str]:
    from megamem.store.health import verify

    return [f"{p.kind} {p.path}: {p.message}" for p in verify(store) if p.serious]


# -- the documented input rules, as an independent oracle ------------------------------------------------------
def text_ok(t: object) -> bool:
    return (
        isinstance(t, str)
        and not TEXT_CONTROL.search(t)
        and not any(0xD800 <= ord(c) <= 0xDFFF for c in t)
        and bool(t.strip())
    )


def id_ok(i: object) -> bool:
    return isinstance(i, str) and ID_RULE.fullmatch(i) is not None


def metadata_ok(m: object) -> bool:
    if not isinstance(m, dict) or any(not isinstance(k, str) for k in m):
        return False
    try:
        enc = json.dumps(m, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return False
    try:
        enc.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return len(enc.encode("utf-8")) <= 64 * 1024


def real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def finite(x: object) -> bool:
    return real(x) and (isinstance(x, int) or math.isfinite(x))


def huge_int(x: object) -> bool:
    """An int too large for a float: the rules do not say what it means, so either answer is fine."""
    return isinstance(x, int) and not isinstance(x, bool) and abs(x) > 1e308


_INT = re.compile(r"\s*[+-]?[0-9]+\s*")
_FLOAT = re.compile(r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*|\s*[+-]?(nan|inf|infinity)\s*", re.I)
UNKNOWN = object()  # a string the option parser may or may not read as a number: the rules cannot say


def as_int(s: str):
    """An int option's value: the int, None when it is surely no integer, UNKNOWN when the parser may go either
    way (typer reads "1.0" as 1)."""
    if _INT.fullmatch(s):
        return int(s)
    try:
        float(s)
    except ValueError:
        return UNKNOWN if "_" in s else None
    return UNKNOWN


def as_float(s: str):
    if _FLOAT.fullmatch(s):
        return float(s)
    try:
        float(s)
    except ValueError:
        return None
    return UNKNOWN


def verdict(*checks) -> str:
    """'refused' if any check is False, else 'unpredictable' if any is UNKNOWN, else 'valid'."""
    if any(c is False for c in checks):
        return "refused"
    return "unpredictable" if any(c is UNKNOWN for c in checks) else "valid"


def number_ok(value, rule):
    return UNKNOWN if value is UNKNOWN else value is not None and rule(value)


# -- hostile values --------------------------------------------------------------------------------------------
PIECES = [
    "\x00", "\x01", "\x07", "\x08", "\x0b", "\x0c", "\x1b", "\x1b[31m", "\x1b]0;pwned\x07", "\x1b[2J", "\x7f",
    "\x80", "\x85", "\x9b", "\x9b31m", "\x9f", "\ud800", "\udcff", "\udfff", "\t", "\n", "\r", "\r\n", " ",
    "\u00a0", "\u2028", "\u2029", "\u202e", "\u200b", "\ufeff", "\ufffd", "é", "日本", "🙂", "\U0010ffff", "../x",
    "/", "\\", "..", "_", "'", '"', "{", "}", "[red]", "[/]", "%s", "$(id)", "nan", "inf", "heron", "Zorblatt",
]  # fmt: skip
SPECIAL_TEXTS = [
    "", " ", " \n\t\r ", "a\x00b", "\x00", "\x1b[31mred\x1b[0m", "bell\x07", "c1\x9b31m", "\udcff", "ok\ud800",
    "../x", "word " * 150, "x" * 3000, "日本語のテキスト", "Zorblatt", "-x", "[bold]markup[/bold]",
]  # fmt: skip
BIG_TEXTS = ["x" * 100_000, "é" * 20_000, "\x00" * 10_000]


def hostile_texts(big: bool = False) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=20),
        st.text(st.characters(max_codepoint=0xA0), max_size=12),
        st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=3)), min_size=1, max_size=6).map("".join),
        st.sampled_from(SPECIAL_TEXTS + (BIG_TEXTS if big else [])),
    )


TEXTS = hostile_texts(big=True)
ASK_TEXTS = hostile_texts(big=False)  # a question is not checked against the context: keep generation small
ID_POOL = [
    "a", "m-1", "Z_9", "x" * 128, "heron", "../x", "x" * 250, "x" * 129, "", " ", "-a", "_a", "a b", "a/b",
    "a.b", "ü", "a\x00", "a\x1b[31m", "\udcff", "a\n", "HERON", "x" * 10_000,
]  # fmt: skip
IDS = st.one_of(
    st.sampled_from(ID_POOL), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,8}", fullmatch=True), hostile_texts()
)
EPOCHS = ["1", "0", "-3", "-1", "2", "99999999999999999999", "1.0", "nan", "inf", "abc", "", "1e3"]
LRS = ["3e-3", "0.01", "1", "1e308", "5e-324", "0", "-0", "-1", "nan", "inf", "-inf", "1e309", "abc", "", "1_0"]
SEEDS = ["0", "1", "-1", str(SEED_MAX), str(SEED_MAX + 1), "99999999999999999999999", "1.5", "abc", ""]
RECIPES = ["fast", "paper", "slow", "", "FAST", "\x00"]
VALID_TEXTS = st.sampled_from(
    ["Pim the axolotl is the mascot.", "Ida paints.", "日本の猫。", "Émile 🙂 tabs\tand\nlines"]
)
ADD_TEXTS = st.one_of(VALID_TEXTS, TEXTS)
ADD_OPTS = st.lists(
    st.one_of(
        st.tuples(st.just("--id"), st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,8}", fullmatch=True), IDS)),
        st.tuples(st.just("-p"), ADD_TEXTS),
        st.tuples(st.just("--lr"), st.sampled_from(LRS)),
        st.tuples(st.just("--seed"), st.sampled_from(SEEDS)),
        st.tuples(st.just("--recipe"), st.sampled_from(RECIPES)),
        st.just(("--json",)),
        st.just(("--keep-going",)),
    ),
    max_size=3,
)


VALID_QUESTIONS = st.sampled_from(["Where does Zorblatt live?", "Who lives on Quillon pier?", "日本?", "What is 🙂?"])


def mostly(valid, hostile) -> st.SearchStrategy:
    """A valid value 4 times in 5, else a hostile one (lists are sampled from); so that some inputs get through."""
    valid = st.sampled_from(valid) if isinstance(valid, list) else valid
    hostile = st.sampled_from(hostile) if isinstance(hostile, list) else hostile
    return st.tuples(st.integers(0, 4), valid, hostile).map(lambda t: t[2] if t[0] == 0 else t[1])


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tiny_dir, tmp_path_factory) -> Path:
    """A store on the tiny model holding one memory, 'heron' (never forgotten by these tests)."""
    path = tmp_path_factory.mktemp("fuzz") / "store"
    rc, out, err = cli(["add", HEARD, "--id", "heron", "--epochs", "1", "--store", path, "--model", tiny_dir])
    assert rc == 0, err
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder for new stores and JSONL files."""
    return tmp_path_factory.mktemp("fuzz-work")


# -- 1. the CLI ---------------------------------------------------------------------------------------------------
def add_expectation(text: str, opts: list[tuple], epochs: str) -> str:
    """'refused' when the argv breaks a rule, 'valid' when it follows them, 'unpredictable' when click may read
    the TEXT as an option or the parser may read a number either way."""
    if text.startswith("-"):
        return "unpredictable"
    last = {o[0]: o[1] for o in opts if len(o) == 2 and o[0] != "-p"}
    paras = [o[1] for o in opts if o[0] == "-p"]
    checks = [
        last.get("--recipe", "fast") in ("fast", "paper"),
        number_ok(as_int(epochs), lambda e: 1 <= e <= COUNT_MAX),
        "--id" not in last or id_ok(last["--id"]),
        text_ok(text) and all(text_ok(p) for p in paras),
    ]
    if "--lr" in last:
        checks.append(number_ok(as_float(last["--lr"]), lambda lr: math.isfinite(lr) and lr > 0))
    if "--seed" in last:
        checks.append(number_ok(as_int(last["--seed"]), lambda s: s >= 0))
    return verdict(*checks)


def check_add(store: Path, work: Path, tiny_dir: Path, text: str, opts: list[tuple], epochs: str, new: bool):
    e = as_int(epochs)
    if e is UNKNOWN or (e is not None and e > 1):
        text = "\x00" + text  # never train more than one epoch: this text is refused before any training
    target = work / f"new-{uuid.uuid4().hex[:12]}" if new else store
    argv = ["add", text, *[x for o in opts for x in o], "--epochs", epochs, "--store", target]
    if new:
        argv += ["--model", tiny_dir]
    before = [] if new else listing(store)
    rc, out, err = cli(argv)
    where = describe(argv, rc, out, err)
    p = output_problems(rc, out, err, where)
    expect = add_expectation(text, opts, epochs)
    tally(f"add: {expect} input, rc {rc}")
    last = {o[0]: o[1] for o in opts if len(o) == 2 and o[0] != "-p"}
    if expect == "refused" and rc != 1:
        p.append(("invalid-input-accepted", where))
    if expect == "valid" and rc == 1:
        line = error_line(err)
        too_long = ("tokens as a training example" in line and "context" in line) or (
            "no memory left to add" in line and "tokens as a training example" in err  # --keep-going skipped it
        )
        taken = "already exists" in err and last.get("--id") in {r["id"] for r in before}
        seed = as_int(last.get("--seed", "0"))
        seed_refused = isinstance(seed, int) and seed > SEED_MAX and "seed" in line and "internal error" not in line
        if not (too_long or taken or seed_refused):
            p.append(("valid-input-refused", where))
    if rc != 0:
        if new:
            left = sorted(os.listdir(target)) if target.is_dir() else []
            if left:
                p.append(("store-created-by-failed-add", f"{target} holds {left}; {where}"))
        else:
            if listing(store) != before:
                p.append(("stored-on-failure", where))
            bad = store_problems(store)
            if bad:
                p.append(("store-damaged-by-failed-add", f"{bad}; {where}"))
    elif expect == "valid" and not new:
        after = listing(store)
        known = {r["id"] for r in before}
        added = [r for r in after if r["id"] not in known]
        if len(after) != len(before) + 1 or len(added) != 1:
            p.append(("add-stored-wrong-count", f"{len(before)} -> {len(after)}; {where}"))
        elif added[0]["text"] != text.strip() or ("--id" in last and added[0]["id"] != last["--id"]):
            p.append(("add-stored-wrong-memory", f"{short(added[0])}; {where}"))
    return p


@fuzz(60)
@given(text=ADD_TEXTS, opts=ADD_OPTS, epochs=mostly(["1"], EPOCHS), new=st.booleans())
@example(text="A fine memory.", opts=[("--id", "../x")], epochs="1", new=False)
@example(text="A fine memory.", opts=[("--id", "x" * 250)], epochs="1", new=True)
@example(text="A fine memory.", opts=[("--lr", "-1")], epochs="1", new=False)
@example(text="A fine memory.", opts=[("--lr", "0")], epochs="1", new=True)
@example(text="A fine memory.", opts=[], epochs="0", new=False)
@example(text="A fine memory.", opts=[], epochs="-3", new=True)
@example(text="a\x00b", opts=[], epochs="1", new=False)
@example(text="\x1b[31mred\x1b[0m", opts=[], epochs="1", new=True)
@example(text="fine", opts=[("-p", "\x1b[31m"), ("--id", "ok-id")], epochs="1", new=False)
def test_cli_add(store, work, tiny_dir, text, opts, epochs, new):
    violated(check_add(store, work, tiny_dir, text, opts, epochs, new))


def ask_expectation(question, mode, top_k, beta, threshold, max_new, null_rate=None) -> str:
    if question.startswith("-"):
        return "unpredictable"
    checks = [text_ok(question), mode in MODES, number_ok(as_int(max_new), lambda n: n >= 1)]
    if top_k is not None:
        checks.append(number_ok(as_int(top_k), lambda k: k >= 0))
    if beta is not None:
        checks.append(number_ok(as_float(beta), lambda b: math.isfinite(b) and 0 <= b <= BETA_MAX))
    if threshold is not None:
        checks.append(number_ok(as_float(threshold), math.isfinite))
    if null_rate is not None:
        checks.append(number_ok(as_float(null_rate), lambda r: math.isfinite(r) and 0 <= r < 1))
    return verdict(*checks)


def gate_problems(gate: list, use_memory: bool, threshold, n_memories: int, paper: bool) -> str | None:
    """Why a successful answer's gate is wrong, or None: weights are finite, in (0, 1] and sum to at most 1; with
    the paper's gate (no null memory) they sum to 1, and without a threshold at least one memory is used."""
    weights = [w for _, w in gate]
    if not use_memory:
        return None if not gate else f"memories used with use_memory off: {gate}"
    if any(not math.isfinite(w) or not 0 < w <= 1 + 1e-6 for w in weights):
        return f"weights not in (0, 1]: {weights}"
    if sum(weights) > 1 + 1e-3:
        return f"weights sum to {sum(weights)}"
    if paper and gate and abs(sum(weights) - 1) > 1e-3:
        return f"weights sum to {sum(weights)} with no null memory"
    if paper and threshold is None and n_memories and not gate:
        return f"no memory used although {n_memories} are stored, with no null memory and no threshold"
    return None


def check_ask(store, question, mode, top_k, beta, threshold, max_new, flags, null_rate=None):
    argv = ["ask", question, "--mode", mode, "--max-new-tokens", max_new, *sorted(flags), "--store", store]
    options = (("--top-k", top_k), ("--beta", beta), ("--threshold", threshold), ("--null-rate", null_rate))
    for name, value in options:
        if value is not None:
            argv[2:2] = [name, value]
    n = len(listing(store))
    rc, out, err = cli(argv)
    where = describe(argv, rc, out, err)
    p = output_problems(rc, out, err, where)
    expect = ask_expectation(question, mode, top_k, beta, threshold, max_new, null_rate)
    tally(f"ask: {expect} input, rc {rc}")
    if expect == "refused" and rc != 1:
        p.append(("invalid-input-accepted", where))
    if expect == "valid" and rc != 0:
        p.append(("valid-input-refused", where))
    if rc == 0 and "--json" in flags and expect == "valid":
        ans = json.loads(out)
        gate = [(g["id"], g["weight"]) for g in ans["gate"]]
        why = gate_problems(gate, "--no-memory" not in flags, threshold, n, "--no-null" in flags or not HAS_NULL)
        if why:
            p.append(("bad-gate", f"{why}; {where}"))
    return p


@fuzz(40)
@given(
    question=mostly(VALID_QUESTIONS, ASK_TEXTS),
    mode=mostly(list(MODES), ["poem", "", "QA", "\x1b"]),
    top_k=mostly([None, "0", "1", "2", "99999999999999999999999"], ["-1", "nan", "1.5", "x"]),
    beta=mostly([None, "0", "1", "50", "-0", "1e38"], ["-1", "nan", "inf", "-inf", "abc"]),
    threshold=mostly([None, None, "0.5", "-1", "-1e308", "2"], ["nan", "inf", "abc"]),
    max_new=mostly(["2", "1"], ["0", "-1", "nan", "abc", "1e3", "2.0"]),
    flags=st.sets(st.sampled_from(["--show-gate", "--json", "--no-memory", "--strict", *(["--no-null"] * HAS_NULL)])),
    null_rate=mostly([None, None, "0.01", "0.5", "0"], ["1", "-0.1", "nan", "abc"]) if HAS_NULL else st.none(),
)
@example(question="Where does Zorblatt live?", mode="qa", top_k=None, beta="nan", threshold=None, max_new="2",
         flags={"--json"}, null_rate=None)  # fmt: skip
@example(question="Where does Zorblatt live?", mode="irag", top_k="0", beta=None, threshold=None, max_new="0",
         flags={"--show-gate"}, null_rate=None)  # fmt: skip
@example(question="Where?\x1b[31m", mode="qa", top_k=None, beta=None, threshold=None, max_new="2",
         flags={"--show-gate"}, null_rate=None)  # fmt: skip
@example(question="Where does Zorblatt live?", mode="recall", top_k="1", beta="1", threshold="0.5", max_new="2",
         flags={"--show-gate"}, null_rate=None)  # fmt: skip
def test_cli_ask(store, question, mode, top_k, beta, threshold, max_new, flags, null_rate):
    violated(check_ask(store, question, mode, top_k, beta, threshold, max_new, flags, null_rate))


def check_show_forget(store, command, memory_id, as_json):
    argv = [command, memory_id, *(["--json"] if as_json else []), "--store", store]
    before = ids_of(store)
    rc, out, err = cli(argv)
    where = describe(argv, rc, out, err)
    p = output_problems(rc, out, err, where)
    after = ids_of(store)
    if not memory_id.startswith("-"):
        if (rc == 0) != (memory_id in before):
            p.append((f"{command}-wrong-outcome", f"stored ids {short(before, 300)}; {where}"))
    if rc == 1 and re.search(r"damaged|repair", error_line(err)):
        p.append(("healthy-store-called-damaged", where))
    if command == "forget" and rc == 0:
        if after != [i for i in before if i != memory_id]:
            p.append(("forget-removed-wrong-memories", f"{before} -> {after}; {where}"))
    elif after != before:
        p.append((f"{command}-changed-the-store", f"{before} -> {after}; {where}"))
    if rc == 0 and command == "show" and not as_json and f"id: {memory_id}\n" not in out:
        p.append(("show-wrong-memory", where))
    return p


@fuzz(30)
@given(memory_id=IDS, as_json=st.booleans())
@example(memory_id="../x", as_json=False)
@example(memory_id="x" * 250, as_json=True)
@example(memory_id="heron", as_json=False)
@example(memory_id="a\x1b[31m", as_json=False)
def test_cli_show(store, memory_id, as_json):
    violated(check_show_forget(store, "show", memory_id, as_json))


@fuzz(30)
@given(memory_id=IDS, as_json=st.booleans())
@example(memory_id="../x", as_json=False)
@example(memory_id="x" * 250, as_json=True)
def test_cli_forget(store, memory_id, as_json):
    assume(memory_id != "heron")
    violated(check_show_forget(store, "forget", memory_id, as_json))


def check_read_command(store, work, command, where_to, as_json):
    targets = {
        "store": store,
        "missing": work / "no-such-store",
        "file": work / "a-file",
        "empty": work / "empty-dir",
        "nul": f"{work}/nul\x00x",
        "long": work / ("n" * 300),
        "escape": f"{work}/esc\x1b[31m",
    }
    (work / "a-file").write_text("not a store")
    (work / "empty-dir").mkdir(exist_ok=True)
    target = targets[where_to]
    argv = [command, *(["--json"] if as_json else []), "--store", target]
    rc, out, err = cli(argv)
    where = describe(argv, rc, out, err)
    p = output_problems(rc, out, err, where)
    if where_to == "store":
        if rc != 0:
            p.append(("healthy-store-refused", where))
        elif as_json:
            data = json.loads(out)
            if command == "list" and "heron" not in [r["id"] for r in data]:
                p.append(("list-lost-heron", where))
            if command == "info" and data["memories"] != len(listing(store)):
                p.append(("info-wrong-count", where))
            if command == "verify" and not data["ok"]:
                p.append(("store-does-not-verify", where))
    elif rc != 1:
        p.append(("non-store-accepted", where))
    if where_to in ("missing", "empty") and target.exists() and any(target.iterdir()):
        p.append(("read-command-wrote", where))
    return p


@fuzz(20)
@given(
    command=st.sampled_from(["list", "info", "verify"]),
    where_to=st.sampled_from(["store", "missing", "file", "empty", "nul", "long", "escape"]),
    as_json=st.booleans(),
)
def test_cli_read_commands(store, work, command, where_to, as_json):
    violated(check_read_command(store, work, command, where_to, as_json))


# -- 2. JSONL files -------------------------------------------------------------------------------------------------
GOOD_CHARS = st.one_of(
    st.characters(exclude_categories=("Cs", "Cc")),
    st.characters(exclude_categories=("Cs", "Cc")),
    st.characters(exclude_categories=("Cs", "Cc")),
    st.sampled_from(["\u2028", "\u2029", "\u202e", "\ufeff", "\t", " ", "é", "🙂"]),
)
GOOD_TEXT = st.text(GOOD_CHARS, min_size=1, max_size=8).filter(text_ok)  # short: always fits the tiny context
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=6,
)
DEEP = "[" * 5000 + "]" * 5000
BAD_TEXT_VALUES = ["", "   ", "a\x00b", "\x1b[31mred", "\ud800", "a\x85b", "bell\x07", 5, 1.5, None, True, ["a"],
                   {"t": "a"}]  # fmt: skip
BAD_ID_VALUES = ["../x", "x" * 250, "", "-a", "a b", "a/b", 12, ["a"], True, 1.5, {"a": 1}]
BAD_PARAS = ["not a list", 5, None, [5], [None], [["a"]], ["\x00"], [""], {"a": "b"}]
BAD_META = [[], "x", 5, None, True, {"a": float("nan")}, {"a": float("inf")}, {"big": "x" * 70_000},
            {"s": "\ud800"}]  # fmt: skip
RAW_BAD = [
    "{", '{"text": "ok", ', "not json", "[1, 2", '{"text": "ok"} trailing', "5", '"just a string"', "null", "[]",
    "true", "{'text': 'single quotes'}", '{"text": "a\\u0000b"}', '{"text": "\\u001b[31mred"}', '{"text": "\\ud800"}',
    '{"text": "ok", "metadata": {"a": NaN}}', '{"text": "ok", "id": 1e999}', '{"text": "ok", "metadata": Infinity}',
    '\ufeff{"text": "bom"}', '{"text": "ok", "paraphrases": "not a list"}', '{"text": "ok", "id": 12}',
    '{"text": "ok", "id": ["a"]}', '{"passage": null}', '{"paraphrases": ["ok"]}', '{"text": "ok"}{"text": "ok"}',
]  # fmt: skip
RAW_DEEP = [DEEP, '{"text": "ok", "metadata": {"d": ' + DEEP + "}}"]
BLANK = ["", "   ", "\t"]
NON_UTF8 = [b'{"text": "caf\xe9"}', b"\xff\xfe{}", b'{"text": "ok"}\x80', b"\xc3\x28", b'{"text": "ok\xed\xa0\x80"}']
POOL_IDS = ["a", "b", "c"]  # given a per-example prefix: duplicates within a file, never across examples


def _obj(text_key: str, values: st.SearchStrategy) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {text_key: values},
        optional={
            "paraphrases": st.one_of(st.lists(GOOD_TEXT, max_size=2), st.sampled_from(BAD_PARAS)),
            "metadata": st.one_of(
                st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3), st.sampled_from(BAD_META)
            ),
            "id": st.one_of(st.sampled_from(POOL_IDS), st.none(), st.sampled_from(BAD_ID_VALUES)),
            "extra": JSON_VALUES,
        },
    )


GOOD_OBJ = st.fixed_dictionaries(
    {"text": GOOD_TEXT},
    optional={
        "paraphrases": st.lists(GOOD_TEXT, max_size=2),
        "metadata": st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3),
        "id": st.sampled_from(POOL_IDS),
    },
)
ANY_TEXT_VALUE = st.one_of(GOOD_TEXT, GOOD_TEXT, st.sampled_from(BAD_TEXT_VALUES))
LINE = st.one_of(
    st.tuples(st.just("obj"), GOOD_OBJ, st.booleans()),
    st.tuples(st.just("obj"), GOOD_OBJ, st.booleans()),
    st.tuples(st.just("obj"), _obj("text", ANY_TEXT_VALUE) | _obj("passage", ANY_TEXT_VALUE), st.booleans()),
    st.tuples(st.just("raw"), st.sampled_from(RAW_BAD + RAW_DEEP + BLANK), st.just(False)),
)
LINES = st.lists(LINE, max_size=6)


def line_bytes(line: tuple, tag: str) -> bytes:
    """One line of the file: an object serialised (ensure_ascii as drawn; pool ids get the example's prefix),
    a raw line, or raw bytes."""
    kind, value, ensure_ascii = line
    if kind == "bytes":
        return value
    if kind == "raw":
        return value.encode("utf-8")
    obj = dict(value)
    if obj.get("id") in POOL_IDS:
        obj["id"] = f"{tag}-{obj['id']}"
    text = json.dumps(obj, ensure_ascii=ensure_ascii)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: as a JSON escape
        return json.dumps(obj, ensure_ascii=True).encode("utf-8")


def judge_lines(lines: list[bytes]) -> list[tuple[str, tuple | None]]:
    """The oracle: each '\\n'-separated line (JSON lines' only separator) is blank, good (text, id) or bad."""
    seen: set[str] = set()
    verdicts = []
    for raw in lines:
        verdicts.append(_judge(raw, seen))
    return verdicts


def _judge(raw: bytes, seen: set[str]) -> tuple[str, tuple | None]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bad", None
    if not line.strip():
        return "blank", None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return "bad", None
    if not isinstance(obj, dict):
        return "bad", None
    text = obj["text"] if "text" in obj else obj.get("passage")
    paras = obj.get("paraphrases", [])
    memory_id = obj.get("id")
    if (
        not text_ok(text)
        or not isinstance(paras, list)
        or not all(text_ok(x) for x in paras)
        or not metadata_ok(obj.get("metadata", {}))
        or (memory_id is not None and (not id_ok(memory_id) or memory_id in seen))
    ):
        return "bad", None
    if memory_id is not None:
        seen.add(memory_id)
    return "good", (text.strip(), memory_id)


def check_jsonl(store: Path, work: Path, lines: list[tuple], keep_going: bool):
    tag = "j" + uuid.uuid4().hex[:10]
    raws = [line_bytes(line, tag) for line in lines]
    path = work / f"{tag}.jsonl"
    path.write_bytes(b"\n".join(raws) + (b"\n" if raws else b""))
    verdicts = judge_lines(raws)
    bad_lines = [n for n, (v, _) in enumerate(verdicts, 1) if v == "bad"]
    good = [item for v, item in verdicts if v == "good"]
    if currently_in_test_context():
        note(f"file: {short(path.read_bytes(), 3000)}\nverdicts: {[v for v, _ in verdicts]}")
    argv = ["add", "--jsonl", path, "--epochs", "1", *(["--keep-going"] if keep_going else []), "--store", store]
    before = listing(store)
    rc, out, err = cli(argv)
    where = describe(argv, rc, out, err) + f"\n  expected bad lines {bad_lines}, good {len(good)}"
    p = output_problems(rc, out, err, where)
    tally(f"jsonl: {len(good)} good, {len(bad_lines)} bad, keep_going={keep_going}, rc {rc}")
    after = listing(store)
    known = {r["id"] for r in before}
    added = [r for r in after if r["id"] not in known]
    first_bad = f"{path} line {bad_lines[0]}:" if bad_lines else None
    if not keep_going or not good:  # all or nothing
        if bad_lines or not good:
            if rc != 1:
                p.append(("bad-file-accepted", where))
            if first_bad and first_bad not in error_line(err):
                p.append(("error-does-not-name-first-bad-line", where))
            if after != before:
                p.append(("stored-from-bad-file", where))
        else:
            if rc != 0:
                p.append(("good-file-refused", where))
            p += stored_problems(added, good, where)
    else:  # keep going with at least one good line: exactly the good lines are stored
        p += stored_problems(added, good, where)
        warned = sorted(
            int(m.group(1))
            for m in re.finditer(rf"^warning: skipped {re.escape(str(path))} line (\d+):", err, flags=re.M)
        )
        if warned != bad_lines:
            p.append(("skipped-lines-misnamed", f"warned about lines {warned}; {where}"))
        if rc != (1 if bad_lines else 0):
            p.append(("keep-going-exit-status", where))
    if rc != 0 or not good:
        bad = store_problems(store)
        if bad:
            p.append(("store-damaged-by-failed-add", f"{bad}; {where}"))
    return p


def stored_problems(added: list[dict], good: list[tuple], where: str) -> list[tuple[str, str]]:
    given = sorted(i for _, i in good if i is not None)
    if len(added) != len(good):
        return [("stored-wrong-count", f"stored {len(added)}, expected {len(good)}; {where}")]
    p = []
    if not set(given) <= {r["id"] for r in added}:
        p.append(("stored-wrong-ids", f"stored {[r['id'] for r in added]}, expected {given}; {where}"))
    if sorted(r["text"] for r in added) != sorted(t for t, _ in good):
        p.append(("stored-wrong-texts", f"stored {[r['text'] for r in added]}; {where}"))
    return p


_OK = ("obj", {"text": "A fine memory."}, False)


@fuzz(50)
@given(lines=LINES, keep_going=st.booleans())
@example(lines=[_OK, ("obj", {"text": "Another one.", "id": 12}, False)], keep_going=False)
@example(lines=[_OK, ("obj", {"text": "Another one.", "id": ["a"]}, False)], keep_going=False)
@example(lines=[_OK, ("obj", {"text": "Another one.", "id": ["a"]}, False), ("raw", "", False)], keep_going=True)
@example(lines=[("obj", {"text": "x", "id": "../x"}, False), _OK], keep_going=True)
@example(lines=[("obj", {"text": "x", "id": "x" * 250}, False), ("raw", "{", False)], keep_going=False)
@example(lines=[("obj", {"text": "x", "id": "a"}, False), ("obj", {"text": "y", "id": "a"}, False)], keep_going=False)
@example(lines=[("obj", {"text": "x", "id": "a"}, False), ("obj", {"text": "y", "id": "a"}, False)], keep_going=True)
@example(lines=[("raw", "", False), ("raw", "   ", False)], keep_going=False)
def test_jsonl(store, work, lines, keep_going):
    violated(check_jsonl(store, work, lines, keep_going))


@fuzz(15)
@given(
    lines=st.lists(st.tuples(st.just("obj"), GOOD_OBJ, st.booleans()), max_size=3),
    at=st.integers(0, 3),
    junk=st.sampled_from(NON_UTF8),
    keep_going=st.booleans(),
)
def test_jsonl_non_utf8_line(store, work, lines, at, junk, keep_going):
    """A line that is not UTF-8 is a bad line like any other: named by its number, skipped with --keep-going."""
    lines = list(lines)
    lines.insert(min(at, len(lines)), ("bytes", junk, False))
    violated(check_jsonl(store, work, lines, keep_going))


# -- 3. the Python API ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(tiny_dir, tmp_path_factory):
    from megamem import Memory, Recipe

    mem = Memory(tmp_path_factory.mktemp("api") / "store", model=str(tiny_dir), recipe=Recipe(epochs=1, min_tokens=0))
    mem.add(HEARD, id="heron")
    return mem


def api_ids(mem) -> list[str]:
    return [r.id for r in mem.list()]


def attempt(fn):
    """(result, exception) of calling fn."""
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - the property is about which exceptions escape
        return None, exc


def exception_problems(exc: BaseException | None, where: str) -> list[tuple[str, str]]:
    from megamem.errors import MegamemError

    if exc is not None and not isinstance(exc, MegamemError):
        return [
            ("non-megamem-exception", f"{type(exc).__module__}.{type(exc).__name__}: {short(str(exc), 300)}; {where}")
        ]
    return []


def after_api_problems(mem, before: list[str], exc, where: str) -> list[tuple[str, str]]:
    p = []
    if exc is not None:
        if api_ids(mem) != before:
            p.append(("api-failure-changed-the-store", where))
        bad = store_problems(mem.path)
        if bad:
            p.append(("store-damaged-by-failed-call", f"{bad}; {where}"))
    return p


class Thing:
    def __repr__(self) -> str:
        return "Thing()"


def deep_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


NON_STR = [None, 5, 1.5, True, b"bytes", ["a"], {"a": 1}, ("t",), Thing()]
API_TEXTS = st.one_of(TEXTS, st.sampled_from(NON_STR))
API_PARAS = st.one_of(
    st.lists(TEXTS, max_size=2),
    st.lists(st.sampled_from(NON_STR), min_size=1, max_size=2),
    st.sampled_from([(), [], None, 5, "abc", ("fine",), b"xy", {"a": "b"}, Thing()]),
)
API_META = st.one_of(
    st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=3),
    st.sampled_from(
        [
            None,
            {},
            [],
            "x",
            5,
            {1: "a"},
            {None: 1},
            {("t",): 1},
            {"a": float("nan")},
            {"a": float("-inf")},
            {"a": {1, 2}},
            {"a": b"x"},
            {"a": Thing()},
            {"big": "x" * 70_000},
            {"s": "\ud800"},
            {"\udcff": 1},
            {"deep": deep_list(5000)},
            {"n": 10**400},
            {"n": 10**5000},
        ]  # fmt: skip
    ),
)
API_IDS = st.one_of(IDS, st.sampled_from(NON_STR))
API_SEEDS = st.sampled_from([0, 1, SEED_MAX, SEED_MAX + 1, 10**23, -1, 1.5, True, "1", None])
API_LRS = st.sampled_from(
    [3e-3, 1e-2, 1, 1e308, 5e-324, 0, -1.0, float("nan"), float("inf"), 10**400, True, "0.01", None]
)


def api_add_expectation(mem, text, paraphrases, metadata, memory_id, seed, lr) -> str:
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0) or not (finite(lr) and lr > 0):
        return "unpredictable" if huge_int(lr) else "refused"
    if huge_int(lr) or not isinstance(paraphrases, (list, tuple)):
        return "unpredictable"  # any iterable passes (a str: one-character paraphrases); only types are checked
    if metadata is not None and not isinstance(metadata, dict):
        return "unpredictable"  # falsy non-dicts are read as {}
    ok = (
        text_ok(text)
        and isinstance(paraphrases, (list, tuple))
        and all(text_ok(x) for x in paraphrases)
        and (metadata is None or metadata_ok(metadata))
        and (memory_id is None or (id_ok(memory_id) and memory_id not in api_ids(mem)))
    )
    return "valid" if ok else "refused"


def check_api_add(api, text, paraphrases, metadata, memory_id, seed, lr):
    from megamem import Recipe

    before = api_ids(api)
    where = f"add(text={short(text, 200)}, paraphrases={short(paraphrases, 200)}, metadata={short(metadata, 200)}, " \
            f"id={short(memory_id, 200)}) with Recipe(seed={seed!r}, lr={lr!r})"  # fmt: skip
    expect = api_add_expectation(api, text, paraphrases, metadata, memory_id, seed, lr)
    saved = api.recipe

    def call():
        api.recipe = Recipe(epochs=1, min_tokens=0, seed=seed, lr=lr)
        return api.add(text, paraphrases, metadata, memory_id)

    try:
        rec, exc = attempt(call)
    finally:
        api.recipe = saved
    where += f" -> {short(rec, 200) if exc is None else type(exc).__name__ + ': ' + short(str(exc), 300)}"
    p = exception_problems(exc, where) + after_api_problems(api, before, exc, where)
    if expect == "refused" and exc is None:
        p.append(("invalid-input-accepted", where))
    if expect == "valid" and exc is not None:
        from megamem.errors import MegamemError

        too_long = "tokens as a training example" in str(exc)
        seed_refused = isinstance(exc, MegamemError) and seed > SEED_MAX and "seed" in str(exc)
        if not (too_long or seed_refused):
            p.append(("valid-input-refused", where))
    if exc is None:
        after = api_ids(api)
        if after[:-1] != before or after[-1] != rec.id or (memory_id is not None and rec.id != memory_id):
            p.append(("add-stored-wrong-memory", f"{before} -> {after}; {where}"))
    return p


@fuzz(40)
@given(text=API_TEXTS, paraphrases=API_PARAS, metadata=API_META, memory_id=API_IDS, seed=API_SEEDS, lr=API_LRS)
@example(text="A fine memory.", paraphrases=(), metadata=None, memory_id="../x", seed=0, lr=3e-3)
@example(text="A fine memory.", paraphrases=(), metadata=None, memory_id="x" * 250, seed=0, lr=3e-3)
@example(text="A fine memory.", paraphrases=(), metadata=None, memory_id=12, seed=0, lr=3e-3)
@example(text="A fine memory.", paraphrases=(), metadata=None, memory_id=["a"], seed=0, lr=3e-3)
@example(text="A fine memory.", paraphrases=(), metadata=None, memory_id=None, seed=0, lr=-1.0)
@example(text="A fine memory.", paraphrases=(), metadata=None, memory_id=None, seed=0, lr=0)
@example(text="a\x00b", paraphrases=(), metadata=None, memory_id=None, seed=0, lr=3e-3)
@example(text="\x1b[31mred", paraphrases=(), metadata=None, memory_id=None, seed=0, lr=3e-3)
@example(text=b"bytes", paraphrases=(), metadata=None, memory_id=None, seed=0, lr=3e-3)
def test_api_add(api, text, paraphrases, metadata, memory_id, seed, lr):
    violated(check_api_add(api, text, paraphrases, metadata, memory_id, seed, lr))


API_ITEMS = st.lists(
    st.builds(
        lambda text, paras, meta, memory_id: (text, paras, meta, memory_id),
        st.one_of(GOOD_TEXT, GOOD_TEXT, API_TEXTS),
        st.one_of(st.lists(GOOD_TEXT, max_size=1), API_PARAS),
        st.one_of(st.just({}), API_META),
        st.one_of(st.none(), st.from_regex(r"[a-z][a-z0-9]{5}", fullmatch=True), API_IDS),
    ),
    min_size=1,
    max_size=3,
)


def check_api_add_many(api, items, keep_going):
    from megamem import Item

    before = api_ids(api)
    where = f"add_many({short(items, 600)}, keep_going={keep_going})"
    rec, exc = attempt(lambda: api.add_many([Item(t, p, m, i) for t, p, m, i in items], keep_going=keep_going))
    where += f" -> {short(rec, 300) if exc is None else type(exc).__name__ + ': ' + short(str(exc), 300)}"
    p = exception_problems(exc, where)
    if not keep_going:
        p += after_api_problems(api, before, exc, where)
    seen = set(before)
    verdicts = []  # True / False per item, None where the rules do not say
    for t, paras, meta, i in items:
        if not isinstance(paras, (list, tuple)):
            verdicts.append(None)  # any iterable passes (a str: one-character paraphrases); only types are checked
            continue
        ok = (
            text_ok(t)
            and isinstance(paras, (list, tuple))
            and all(text_ok(x) for x in paras)
            and metadata_ok(meta)
            and (i is None or (id_ok(i) and i not in seen))
        )
        if ok and i is not None:
            seen.add(i)  # only a memory that passes every check claims its id
        verdicts.append(ok)
    if None in verdicts:
        return p
    # a text of at most 8 characters always fits the tiny model's context; a longer one may not
    fits = [ok and all(len(x) <= 8 for x in [items[n][0], *items[n][1]]) for n, ok in enumerate(verdicts)]
    too_long = exc is not None and ("tokens as a training example" in str(exc) or "no memory left" in str(exc))
    if (not keep_going and not all(verdicts)) or not any(verdicts):
        if exc is None:
            p.append(("invalid-input-accepted", where))
    elif exc is not None and not (too_long and not (all(fits) if not keep_going else any(fits))):
        p.append(("valid-input-refused", where))
    elif exc is None and not sum(fits) <= len(rec) <= sum(verdicts):
        p.append(("add-many-stored-wrong-count", f"expected {sum(fits)} to {sum(verdicts)}; {where}"))
    return p


@fuzz(25)
@given(items=API_ITEMS, keep_going=st.booleans())
@example(items=[("fine", [], {}, "12"), ("fine", [], {}, 12)], keep_going=False)
@example(items=[("fine", [], {}, "dup"), ("again", [], {}, "dup")], keep_going=False)
def test_api_add_many(api, items, keep_going):
    violated(check_api_add_many(api, items, keep_going))


def check_api_lookup(api, op, memory_id):
    before = api_ids(api)
    where = f"{op}({short(memory_id, 300)})"
    rec, exc = attempt(lambda: getattr(api, op)(memory_id))
    where += f" -> {short(rec, 200) if exc is None else type(exc).__name__ + ': ' + short(str(exc), 300)}"
    p = exception_problems(exc, where) + after_api_problems(api, before, exc, where)
    found = isinstance(memory_id, str) and memory_id in before
    if (exc is None) != found:
        p.append((f"{op}-wrong-outcome", where))
    if exc is not None and re.search(r"damaged|repair", str(exc)):
        p.append(("healthy-store-called-damaged", where))
    if op == "forget" and exc is None and api_ids(api) != [i for i in before if i != memory_id]:
        p.append(("forget-removed-wrong-memories", where))
    if op == "show" and api_ids(api) != before:
        p.append(("show-changed-the-store", where))
    return p


@fuzz(30)
@given(op=st.sampled_from(["show", "forget"]), memory_id=API_IDS)
@example(op="show", memory_id="../x")
@example(op="forget", memory_id="x" * 250)
@example(op="show", memory_id=12)
def test_api_show_forget(api, op, memory_id):
    assume(memory_id != "heron")
    violated(check_api_lookup(api, op, memory_id))


SIMILARITIES = ["cosine", "dot", "COSINE", "", None, 5, ["dot"]]
BETAS = [0, 1, 50, 50.0, -1, float("nan"), float("inf"), 1e308, 3.5e38, 10**400, True, "1", None]
TOP_KS = [None, 1, 2, 0, -1, 2**70, 2.0, True, "2"]
THRESHOLDS = [None, 0.5, -1, 0.99, float("nan"), float("inf"), 10**400, "0.5", True]
NULL_RATES = [None, None, 0.01, 0.5, 0, 0.99, 1, -0.1, float("nan"), "0.1", True]
GATE_KW = st.fixed_dictionaries(
    {},
    optional={
        "similarity": st.sampled_from(SIMILARITIES),
        "beta": st.sampled_from(BETAS),
        "top_k": st.sampled_from(TOP_KS),
        "threshold": st.sampled_from(THRESHOLDS),
        **({"null_rate": st.sampled_from(NULL_RATES)} if HAS_NULL else {}),
    },
)


def gate_expectation(kw: dict) -> str:
    if any(huge_int(v) for v in kw.values()):
        return "unpredictable"
    sim, beta = kw.get("similarity", "cosine"), kw.get("beta", 50.0)
    top_k, threshold, null_rate = kw.get("top_k", 4), kw.get("threshold"), kw.get("null_rate")
    ok = (
        sim in ("cosine", "dot")
        and finite(beta)
        and 0 <= beta <= BETA_MAX
        and (top_k is None or (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1))
        and (threshold is None or finite(threshold))
        and (null_rate is None or (finite(null_rate) and 0 <= null_rate < 1))
    )
    return "valid" if ok else "refused"


def check_api_ask(api, question, mode, gate_kw, max_new, use_memory):
    from megamem import GateConfig

    before = api_ids(api)
    where = f"ask({short(question, 200)}, mode={mode!r}, gate=GateConfig(**{gate_kw!r}) if any, " \
            f"max_new_tokens={max_new!r}, use_memory={use_memory})"  # fmt: skip

    def call():
        gate = GateConfig(**gate_kw) if gate_kw is not None else None
        return api.ask(question, mode=mode, gate=gate, max_new_tokens=max_new, use_memory=use_memory)

    ans, exc = attempt(call)
    where += f" -> {short(ans, 300) if exc is None else type(exc).__name__ + ': ' + short(str(exc), 300)}"
    p = exception_problems(exc, where) + after_api_problems(api, before, exc, where)
    gate_expect = "valid" if gate_kw is None else gate_expectation(gate_kw)
    valid_call = (
        text_ok(question)
        and mode in MODES
        and isinstance(max_new, int)
        and not isinstance(max_new, bool)
        and max_new >= 1
    )
    if (not valid_call or gate_expect == "refused") and exc is None:
        p.append(("invalid-input-accepted", where))
    if valid_call and gate_expect == "valid":
        if exc is not None:
            p.append(("valid-input-refused", where))
        else:
            threshold = (gate_kw or {}).get("threshold")
            paper = not HAS_NULL or (GateConfig(**gate_kw) if gate_kw is not None else api.gate).null_rate is None
            why = gate_problems(ans.gate, use_memory, threshold, len(before), paper)
            if why:
                p.append(("bad-gate", f"{why}; {where}"))
    return p


@fuzz(30)
@given(
    question=st.one_of(ASK_TEXTS, st.sampled_from(NON_STR)),
    mode=st.sampled_from([*MODES, "poem", "", None, 5, ["qa"]]),
    gate_kw=st.none() | GATE_KW,
    max_new=st.sampled_from([1, 2, 0, -1, 2.5, "2", True]),
    use_memory=st.booleans(),
)
@example(question="Where does Zorblatt live?", mode="qa", gate_kw={"beta": float("nan")}, max_new=2, use_memory=True)
@example(question="Where does Zorblatt live?", mode="qa", gate_kw=None, max_new=0, use_memory=True)
@example(question="Where\x00?", mode="qa", gate_kw=None, max_new=2, use_memory=True)
@example(question=5, mode="qa", gate_kw=None, max_new=2, use_memory=True)
def test_api_ask(api, question, mode, gate_kw, max_new, use_memory):
    violated(check_api_ask(api, question, mode, gate_kw, max_new, use_memory))


CONFIG_VALUES = [0, 1, -1, 2, 32, 2**70, 10**400, 0.5, -0.0, 1e308, 1e-320, float("nan"), float("inf"), True,
                 False, None, "1", "", [], [1], {}, (), ("up_proj",), ("nope",), (0, 1), Thing()]  # fmt: skip
RECIPE_FIELDS = ["lr", "epochs", "batch_size", "weight_decay", "seed", "max_steps", "paraphrases", "min_tokens"]
LORA_FIELDS = ["targets", "rank", "alpha", "dropout", "rslora", "layers", "upper"]


def recipe_expectation(kw: dict) -> str:
    if any(huge_int(v) for v in kw.values()):
        return "unpredictable"

    def count(v, minimum):
        return isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= COUNT_MAX

    d = {"lr": 3e-3, "epochs": 5, "batch_size": 1, "weight_decay": 0.0, "seed": 0, "max_steps": None,
         "paraphrases": 1, "min_tokens": 1000, **kw}  # fmt: skip
    ok = (
        finite(d["lr"])
        and d["lr"] > 0
        and count(d["epochs"], 1)
        and count(d["batch_size"], 1)
        and finite(d["weight_decay"])
        and d["weight_decay"] >= 0
        and count(d["seed"], 0)
        and (d["max_steps"] is None or count(d["max_steps"], 1))
        and (d["paraphrases"] is None or count(d["paraphrases"], 0))
        and count(d["min_tokens"], 0)
    )
    return "valid" if ok else "refused"


def check_config(cls_name: str, kw: dict):
    import megamem

    cls = getattr(megamem, cls_name)
    where = f"{cls_name}(**{short(kw, 400)})"
    obj, exc = attempt(lambda: cls(**kw))
    where += f" -> {short(obj, 300) if exc is None else type(exc).__name__ + ': ' + short(str(exc), 300)}"
    p = exception_problems(exc, where)
    expect = {"Recipe": recipe_expectation, "GateConfig": gate_expectation}.get(cls_name, lambda _: "unpredictable")(kw)
    if expect == "refused" and exc is None:
        p.append(("invalid-config-accepted", where))
    if expect == "valid" and exc is not None:
        p.append(("valid-config-refused", where))
    return p


@fuzz(120)
@given(
    data=st.one_of(
        st.tuples(st.just("Recipe"), st.dictionaries(st.sampled_from(RECIPE_FIELDS), st.sampled_from(CONFIG_VALUES))),
        st.tuples(
            st.just("GateConfig"),
            st.dictionaries(
                st.sampled_from(["similarity", "beta", "top_k", "threshold", *(["null_rate"] * HAS_NULL)]),
                st.sampled_from(CONFIG_VALUES + SIMILARITIES),
            ),
        ),
    )
)
@example(data=("Recipe", {"epochs": 0}))
@example(data=("Recipe", {"epochs": -3}))
@example(data=("Recipe", {"lr": -1}))
@example(data=("Recipe", {"lr": 0}))
@example(data=("GateConfig", {"beta": float("nan")}))
def test_api_recipe_and_gate_config(data):
    violated(check_config(*data))


@fuzz(40)
@given(kw=st.dictionaries(st.sampled_from(LORA_FIELDS), st.sampled_from(CONFIG_VALUES)))
def test_api_lora_spec(kw):
    """A LoraSpec is either made or refused with MegamemError."""
    violated(check_config("LoraSpec", kw))


# -- 4. inputs found while writing this file ------------------------------------------------------------------------
_FINE = "A fine memory."
KNOWN = {
    # the CLI
    "cli-show-surrogate-id": lambda s, w, t, a: check_show_forget(s, "show", "\udcff", False),
    "cli-forget-surrogate-id": lambda s, w, t, a: check_show_forget(s, "forget", "\udcff", False),
    "cli-add-seed-overflow-new-store": lambda s, w, t, a: check_add(
        s, w, t, _FINE, [("--seed", "99999999999999999999999")], "1", True
    ),
    "cli-add-seed-overflow": lambda s, w, t, a: check_add(s, w, t, _FINE, [("--seed", str(SEED_MAX + 1))], "1", False),
    "cli-ask-beta-1e308": lambda s, w, t, a: check_ask(
        s, "Where does Zorblatt live?", "qa", None, "1e308", None, "2", {"--json", *(["--no-null"] * HAS_NULL)}
    ),  # fmt: skip
    # JSONL
    "jsonl-u2028-in-text": lambda s, w, t, a: check_jsonl(s, w, [("obj", {"text": "a\u2028b"}, False)], False),
    "jsonl-u2028-in-metadata-shifts-line-numbers": lambda s, w, t, a: check_jsonl(
        s, w, [("obj", {"text": "ok", "metadata": {"note": "x\u2028y"}}, False), ("raw", '{"text": 5}', False)], True
    ),
    "jsonl-nel-in-bad-text-shifts-line-numbers": lambda s, w, t, a: check_jsonl(
        s, w, [("obj", {"text": "a\x85b"}, False), _OK, ("raw", "{", False)], True
    ),
    "jsonl-deep-nesting": lambda s, w, t, a: check_jsonl(s, w, [_OK, ("raw", DEEP, False)], False),
    "jsonl-non-utf8-line": lambda s, w, t, a: check_jsonl(s, w, [_OK, ("bytes", NON_UTF8[0], False)], False),
    "jsonl-non-utf8-line-keep-going": lambda s, w, t, a: check_jsonl(s, w, [_OK, ("bytes", NON_UTF8[0], False)], True),
    # the API
    "api-add-paraphrases-none": lambda s, w, t, a: check_api_add(a, _FINE, None, None, None, 0, 3e-3),
    "api-item-paraphrases-none": lambda s, w, t, a: check_api_add_many(a, [(_FINE, None, {}, None)], False),
    "api-add-metadata-deep": lambda s, w, t, a: check_api_add(a, _FINE, (), {"d": deep_list(5000)}, None, 0, 3e-3),
    "api-add-seed-overflow": lambda s, w, t, a: check_api_add(a, _FINE, (), None, None, 10**23, 3e-3),
    "api-show-list-id": lambda s, w, t, a: check_api_lookup(a, "show", ["a"]),
    "api-forget-list-id": lambda s, w, t, a: check_api_lookup(a, "forget", ["a"]),
    "api-show-surrogate-id": lambda s, w, t, a: check_api_lookup(a, "show", "\udcff"),
    "api-ask-beta-1e308": lambda s, w, t, a: check_api_ask(
        a, "Where?", "qa", {"beta": 1e308, **({"null_rate": None} if HAS_NULL else {})}, 2, True
    ),
    "api-recipe-lr-huge-int": lambda s, w, t, a: check_config("Recipe", {"lr": 10**400}),
    "api-gate-threshold-huge-int": lambda s, w, t, a: check_config("GateConfig", {"threshold": 10**400}),
    "api-lora-rank-str": lambda s, w, t, a: check_config("LoraSpec", {"rank": "8"}),
}


@pytest.mark.parametrize("case", sorted(KNOWN))
def test_known_bug_inputs(case, store, work, tiny_dir, api):
    violated(KNOWN[case](store, work, tiny_dir, api))
