"""Kill -9 inside merge, split and consolidate at every step boundary, then settle by `repair` or by running
the same command again; counts lost and doubled memories and whether `verify` told the truth (tests/opfaults.py).
Then the cortex's damage matrix: each damage must be reported by `verify`, and `repair` must leave a store that
verifies ok, answers, and holds the cortex's memories again (learned anew from its record).

    python benchmarks/op_kills.py                       # every point x both settling paths, once
    python benchmarks/op_kills.py --rounds 3 --out /tmp/op-kills.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import faultlib as fl  # noqa: E402
import opfaults as of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1, help="times every (point, settling path) is tried")
    ap.add_argument("--out", type=Path, default=HERE.parent / "bench-runs" / "op-kills.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="megamem-opkills-") as tmp:
        work = Path(tmp)
        model = fl.make_tiny_model(work / "model")
        templates = of.build_template(work / "templates", model)
        for _ in range(args.rounds):
            for op, point in of.POINTS:
                for settle in of.SETTLE:
                    r = of.trial(templates, work, op, point, settle)
                    results.append(r)
                    print(
                        f"  {point:<22} {settle:<7} {'ok' if not r['failures'] else r['failures'][0][:150]}", flush=True
                    )
        damage = [of.cortex_trial(templates["plain"], work, how) for how in of.CORTEX_DAMAGES]
        for r in damage:
            print(f"  cortex {r['damage']:<18} {'ok' if not r['failures'] else r['failures'][0][:150]}", flush=True)
    rows = {}
    for key in [*dict.fromkeys(op for op, _ in of.POINTS), "all"]:
        sub = [r for r in results if key in ("all", r["op"])]
        rows[key] = {
            "trials": len(sub),
            "lost": sum(len(r["lost"]) for r in sub),
            "doubled": sum(len(r["doubled"]) for r in sub),
            "verify_truthful": sum(not any("verify" in f for f in r["failures"]) for r in sub),
            "failed": sum(bool(r["failures"]) for r in sub),
        }
    print("\n| operation | trials | lost | doubled | verify truthful | failed |\n|---|---|---|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v['trials']} | {v['lost']} | {v['doubled']} | {v['verify_truthful']} | {v['failed']} |")
    print("\n| cortex damage | verify reported | lost after repair | verify ok after repair | failed |")
    print("|---|---|---|---|---|")
    for r in damage:
        ok = not any("verify after" in f for f in r["failures"])
        lost = len(r.get("lost", []))
        print(f"| {r['damage']} | {r.get('reported')} | {lost} | {ok} | {bool(r['failures'])} |")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"rounds": args.rounds, "summary": rows, "trials": results, "cortex": damage}, indent=2)
    )


if __name__ == "__main__":
    main()
