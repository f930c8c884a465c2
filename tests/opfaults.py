"""Kill -9 trials inside merge, split and consolidate (megamem.store.intents), shared by tests/test_operations.py
and benchmarks/op_kills.py.

A trial: a store of three memories on the tests' tiny model (for split, two of them merged first); the `megamem`
command run in a child process with MEGAMEM_CRASH_AT naming one step boundary, where it SIGKILLs itself; then
`verify` (it must name the interrupted operation), then the settling path (`repair`, or the same command again),
then the checks: 0 texts lost (each is a stored memory, a merged memory's member or a cortex's), 0 doubled (each
routed or consolidated once), `verify` ok.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from faultlib import MEMORIES, quick_recipe

TEXTS = {i: t for i, t, _ in MEMORIES}
CONSOLIDATE = ["--epochs", "1", "--rank", "4"]
# (operation, crash point) -> the command, after the store's set-up
POINTS = (
    ("merge", "merge:intent"),
    ("merge", "merge:committed"),
    ("merge", "merge:forgot"),
    ("split", "split:intent"),
    ("split", "split:member"),
    ("split", "split:members"),
    ("consolidate", "consolidate:intent"),
    ("consolidate", "consolidate:written"),
    ("consolidate", "consolidate:switched"),
    ("consolidate", "consolidate:memory-file"),
    ("consolidate", "consolidate:retired"),
)
SETTLE = ("repair", "again")  # what the user runs after the kill


def command(op: str) -> list[str]:
    if op == "merge":
        return ["merge", "heron", "ferry", "--id", "hf"]
    if op == "split":
        return ["split", "hf"]
    return ["consolidate", "--ids", "heron", "--ids", "ferry", *CONSOLIDATE]


def megamem(store: Path, *args: str, crash: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in a child process (MEGAMEM_CRASH_AT=crash kills it at that step)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MEGAMEM_CRASH_AT", None)
    if crash:
        env["MEGAMEM_CRASH_AT"] = crash
    return subprocess.run(
        [sys.executable, "-m", "megamem", *args, "--store", str(store)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def build_template(folder: Path, model_dir: Path) -> dict[str, Path]:
    """The stores trials start from, once: 'plain' (three memories) and 'merged' (heron and ferry merged as hf)."""
    from megamem import Item, Memory
    from megamem.ops.merge import merge

    out = {}
    for name in ("plain", "merged"):
        mem = Memory(folder / name, model=str(model_dir), recipe=quick_recipe())
        mem.add_many([Item(t, id=i) for i, t in TEXTS.items()])
        if name == "merged":
            merge(mem, ["heron", "ferry"], id="hf")
        mem.store.close()
        out[name] = folder / name
    return out


def held_and_routed(mem) -> tuple[list[str], list[str]]:
    """(every member text the store holds: stored memories, a merged one as its members, and the cortexes';
    the texts the gate routes to, superseded memories left out, and the cortexes'): each member once in the
    second, or it is doubled."""
    from megamem.schema import MERGED, is_consolidated
    from megamem.store import cortex

    out = mem.superseded()
    in_cortex = {c.id for ns in cortex.namespaces(mem.path) for c in mem.consolidated(ns)}
    held: list[str] = []
    routed: list[str] = []
    stored = set()
    for r in mem.list():
        if is_consolidated(r) and r.id not in in_cortex:
            continue  # its adapter retired and no cortex holding it: what it learned is lost
        stored.add(r.id)
        texts = [p["text"] for p in r.metadata[MERGED]] if MERGED in r.metadata else [r.text]
        held += texts
        if r.id not in out:
            routed += texts
    for ns in cortex.namespaces(mem.path):  # a consolidated memory still stored is counted once, above
        held += [c.text for c in mem.consolidated(ns) if c.id not in stored]
        routed += [c.text for c in mem.consolidated(ns) if c.id not in stored]
    return held, routed


def check(store: Path) -> dict:
    """What the store holds after settling: texts lost, texts doubled, verify's serious problems."""
    from megamem import Memory
    from megamem.store.health import verify

    mem = Memory(store)
    held, routed = held_and_routed(mem)
    lost = sorted(set(TEXTS.values()) - set(held))
    doubled = sorted(t for t, n in Counter(routed).items() if n > 1)
    serious = [f"{p.kind} {p.path}: {p.message}" for p in verify(store) if p.serious]
    mem.store.close()
    return {"lost": lost, "doubled": doubled, "serious": serious}


def trial(templates: dict[str, Path], work: Path, op: str, point: str, settle: str) -> dict:
    """One kill trial; its result with the failures found (an empty list: it held)."""
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(templates["merged" if op == "split" else "plain"], store)
    failures = []
    killed = megamem(store, *command(op), crash=point)
    if killed.returncode != -9:
        failures.append(f"not killed at {point}: exit {killed.returncode} {killed.stderr[-300:]}")
    seen = megamem(store, "verify", "--json")
    found = json.loads(seen.stdout or "{}").get("problems", [])
    if not any(p["kind"] == "interrupted" for p in found):
        failures.append(f"verify did not report the interrupted {op}: {found}")
    after = megamem(store, "repair") if settle == "repair" else megamem(store, *command(op))
    if after.returncode != 0 or "Traceback" in after.stderr:
        failures.append(f"{settle} failed: exit {after.returncode} {after.stderr[-300:]}")
    state = check(store)
    failures += [f"lost: {t}" for t in state["lost"]] + [f"doubled: {t}" for t in state["doubled"]]
    failures += [f"verify after {settle}: {s}" for s in state["serious"]]
    return {"op": op, "point": point, "settle": settle, **state, "failures": failures}


CORTEX_DAMAGES = (
    "flip-weights",
    "flip-config",
    "truncate-pointer",
    "edit-text",
    "damage-copy",
    "delete-weights",
    "orphan-version",
)


def damage_cortex(store: Path, how: str) -> None:
    """Damage the live cortex of `store` one way (or leave an orphaned version beside it)."""
    from megamem.store import cortex

    live = store / "cortex" / cortex.live_version(store)
    pointer = cortex.pointer(store)
    if how.startswith("flip-"):
        f = live / ("adapter_model.safetensors" if how == "flip-weights" else "adapter_config.json")
        data = bytearray(f.read_bytes())
        data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
        f.write_bytes(bytes(data))
    elif how == "truncate-pointer":
        pointer.write_bytes(pointer.read_bytes()[:100])
    elif how == "edit-text":
        pointer.write_text(pointer.read_text().replace("Skarvik", "Skarvic"))
    elif how == "damage-copy":
        (live / cortex.COPY).write_text("{")
    elif how == "delete-weights":
        (live / "adapter_model.safetensors").unlink()
    else:
        shutil.copytree(live, store / "cortex" / "v20260101000000-0rphan00")


def cortex_trial(template: Path, work: Path, how: str) -> dict:
    """Consolidate two memories, damage the cortex, then: verify must report it; `megamem repair` must leave a
    store that verifies ok and that asks can use; the memories the cortex held come back (learned again)
    (its record restored from a whole copy, or its memories learned again)."""
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(template, store)
    failures = []
    done = megamem(store, "consolidate", "--ids", "heron", "--ids", "ferry", *CONSOLIDATE)
    if done.returncode != 0:
        return {"damage": how, "failures": [f"consolidate failed: {done.stderr[-300:]}"]}
    damage_cortex(store, how)
    found = json.loads(megamem(store, "verify", "--json").stdout or "{}").get("problems", [])
    expect = "leftover" if how == "orphan-version" else None
    reported = (
        any(p["kind"] == expect for p in found) if expect else any(p["kind"] in ("corrupt", "missing") for p in found)
    )
    if not reported:
        failures.append(f"verify missed {how}: {found}")
    fixed = megamem(store, "repair")
    if fixed.returncode != 0 or "Traceback" in fixed.stderr:
        failures.append(f"repair failed: exit {fixed.returncode} {fixed.stderr[-300:]}")
    asked = megamem(store, "ask", "Which ferry crosses Lake Tessin?")
    if asked.returncode != 0:
        failures.append(f"ask after repair failed: {asked.stderr[-300:]}")
    state = check(store)
    failures += [f"lost: {t}" for t in state["lost"]]
    failures += [f"doubled: {t}" for t in state["doubled"]] + [f"verify after repair: {s}" for s in state["serious"]]
    if how == "orphan-version" and (store / "cortex" / "v20260101000000-0rphan00").exists():
        failures.append("the orphaned version is still there after repair")
    return {"damage": how, "reported": reported, **state, "failures": failures}
