"""The long fault-injection run: the damage matrix of tests/test_faults.py and many kill -9 trials.

Same code as the CI tests (tests/faultlib.py): every (file kind, damage) of the matrix on a real store on the
tests' tiny model, then --trials SIGKILL trials over add / add-many / forget / repair (repair of a lost manifest,
a truncated one, a corrupted memory, an orphan), half killed at a hooked call chosen by a seeded RNG and half after
a random delay. Prints the counts as tables and writes them, with every failure, as JSON.

    python benchmarks/faults.py                      # 120 trials, seed 0, bench-runs/faults.json
    python benchmarks/faults.py --trials 400 --seed 7 --out /tmp/faults.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import faultlib as fl  # noqa: E402

KILL_COLUMNS = (
    "trials",
    "killed",
    "committed_lost",
    "foreign_deleted",
    "tracebacks",
    "verify_truthful",
    "repair_needed",
    "repair_clean",
    "leftovers_cleared",
    "failed",
)
DAMAGE_COLUMNS = (
    "cases",
    "skipped",
    "passed",
    "tracebacks",
    "foreign_deleted",
    "verify_truthful",
    "repair_clean",
    "answered",
    "failed",
)


def table(title: str, columns, rows: dict[str, dict]) -> str:
    width = max([len(title), *map(len, rows)])
    heads = [c.replace("_", " ") for c in columns]
    lines = [f"{title:<{width}}  " + "  ".join(heads)]
    for name, row in rows.items():
        lines.append(
            f"{name:<{width}}  " + "  ".join(f"{row.get(c, 0):>{len(h)}}" for c, h in zip(columns, heads, strict=True))
        )
    return "\n".join(lines)


def damage_row(results: list[dict]) -> dict:
    run = [r for r in results if not r["skipped"]]

    def clean(r, tag):
        return not any(f.startswith(tag) for f in r["failures"])

    return {
        "cases": len(results),
        "skipped": len(results) - len(run),
        "passed": sum(not r["failures"] for r in run),
        "tracebacks": sum(
            any(w in f for f in r["failures"] for w in (" raised ", " crash", "traceback", "internal")) for r in run
        ),
        "foreign_deleted": sum(not clean(r, "(3)") for r in run),
        "verify_truthful": sum(clean(r, "(2)") for r in run),
        "repair_clean": sum(clean(r, "(4)") for r in run),
        "answered": sum(clean(r, "(5)") for r in run),
        "failed": sum(bool(r["failures"]) for r in run),
    }


def run_damage(work: Path) -> list[dict]:
    model = fl.make_tiny_model(work / "model")
    base = fl.build_model_store(work / "model-store", model)
    results = []
    for n, (target, how) in enumerate(fl.damage_cases()):
        t0 = time.perf_counter()
        if how == "chmod000" and fl.is_root():
            results.append({"target": target, "damage": how, "skipped": True, "failures": [], "seconds": 0.0})
            continue
        case = work / f"damage-{n}"
        case.mkdir()
        fails = fl.run_damage_case(base, case, target, how)
        shutil.rmtree(case, ignore_errors=True)
        results.append(
            {
                "target": target,
                "damage": how,
                "skipped": False,
                "failures": fails,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
        print(f"  damage {target:<15} {how:<13} {'ok' if not fails else f'{len(fails)} failure(s)'}", flush=True)
    return results


def run_memoryllm_damage(work: Path) -> list[dict]:
    """The MemoryLLM damage matrix of tests/test_memoryllm_health.py (each file flipped, truncated, deleted, a
    letter of a stored text changed, a killed write's temporary pool), every case asking questions."""
    import test_memoryllm_health as mh

    model = fl.make_tiny_model(work / "memoryllm-model")
    base = mh.build_pool_store(
        work / "memoryllm-store", model, mh.save_untrained_params(model, work / "memoryllm-params.safetensors")
    )
    results = []
    for n, (target, how) in enumerate(mh.damage_cases()):
        t0 = time.perf_counter()
        case = work / f"memoryllm-damage-{n}"
        case.mkdir()
        fails = mh.run_pool_case(base, case, target, how)
        shutil.rmtree(case, ignore_errors=True)
        seconds = round(time.perf_counter() - t0, 2)
        results.append({"target": target, "damage": how, "skipped": False, "failures": fails, "seconds": seconds})
        print(f"  memoryllm {target:<9} {how:<13} {'ok' if not fails else f'{len(fails)} failure(s)'}", flush=True)
    return results


def run_kills(work: Path, trials: int, seed: int) -> tuple[list[dict], dict]:
    fake = fl.build_fake_store(work / "fake-store")
    plan = fl.trial_plan(trials, seed)
    calib = fl.calibrate(fake, work, {(t["op"], t["variant"]) for t in plan})
    results = []
    for trial in plan:
        folder = work / f"trial-{trial['n']}"
        folder.mkdir()
        t0 = time.perf_counter()
        r = fl.run_trial(fake, folder, trial, calib)
        r["seconds"] = round(time.perf_counter() - t0, 2)
        shutil.rmtree(folder, ignore_errors=True)
        results.append(r)
        verdict = "ok" if not r["failures"] else f"{len(r['failures'])} failure(s)"
        print(
            f"  trial {trial['n']:>4} {trial['op']:<8} {trial['variant'] or '':<18} {r['where']:<28} {verdict}",
            flush=True,
        )
    return results, {f"{k[0]} {k[1] or ''}".strip(): v for k, v in calib.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=120, help="kill trials over add/add-many/forget/repair")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE.parent / "bench-runs" / "faults.json", help="JSON results")
    ap.add_argument("--no-damage", action="store_true", help="skip the damage matrix")
    args = ap.parse_args()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="megamem-faults-"))
    try:
        damage = [] if args.no_damage else run_damage(work)
        pool_damage = [] if args.no_damage else run_memoryllm_damage(work)
        kills, calib = run_kills(work, args.trials, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0

    kill_rows = {op: fl.summarize([r for r in kills if r["op"] == op]) for op in fl.OPS}
    for variant in fl.REPAIR_DAMAGES:
        sub = [r for r in kills if r["variant"] == variant]
        if sub:
            kill_rows[f"  repair {variant}"] = fl.summarize(sub)
    kill_rows["all"] = fl.summarize(kills)
    damage_rows = {}
    for target in [*fl.FILE_TARGETS, *fl.DIR_TARGETS]:
        sub = [r for r in damage if r["target"] == target]
        if sub:
            damage_rows[target] = damage_row(sub)
    if damage:
        damage_rows["all"] = damage_row(damage)
    pool_rows = {}
    for target in dict.fromkeys(r["target"] for r in pool_damage):
        pool_rows[target] = damage_row([r for r in pool_damage if r["target"] == target])
    if pool_damage:
        pool_rows["all"] = damage_row(pool_damage)

    print()
    if damage:
        print(table("damage matrix", DAMAGE_COLUMNS, damage_rows))
        print()
    if pool_damage:
        print(table("memoryllm damage", DAMAGE_COLUMNS, pool_rows))
        print()
    print(table(f"kill -9 (seed {args.seed})", KILL_COLUMNS, kill_rows))
    failing = [(f"{r['target']} {r['damage']}", r["failures"]) for r in damage if r["failures"]]
    failing += [(f"memoryllm {r['target']} {r['damage']}", r["failures"]) for r in pool_damage if r["failures"]]
    failing += [
        (f"trial {r['n']} {r['op']} {r['variant'] or ''} {r['where']}", r["failures"]) for r in kills if r["failures"]
    ]
    untrue = Counter(u.split(":")[0] for r in kills for u in r["untruthful"])
    if failing:
        print("\nfailures (first of each):")
        for name, fails in failing:
            print(f"  {name}: {fails[0][:220]}")
    if untrue:
        print(
            f"\nverify false alarms in {sum(untrue.values())} trials (serious problems where the protocol says "
            "leftover), e.g.: " + next(u for r in kills for u in r["untruthful"])[:220]
        )
    print(f"\n{seconds:.0f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "trials": args.trials,
                "seed": args.seed,
                "seconds": round(seconds, 1),
                "calibration": calib,
                "kill_summary": kill_rows,
                "damage_summary": damage_rows,
                "damage": damage,
                "memoryllm_damage_summary": pool_rows,
                "memoryllm_damage": pool_damage,
                "kills": kills,
            },
            indent=2,
            default=str,
        ),
        encoding="utf-8",
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
