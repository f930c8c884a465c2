"""The published run records (docs/results/runs/*: config.json + metrics.jsonl) still give the tables they were
published with: each folder's results.md is rebuilt from its rows and compared byte for byte, and the compositional
record (no committed table) against the table it gave before the bench was reshaped (tests/data/bench_records)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from megamem.bench import compositional, report

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "docs" / "results" / "runs"
EXPECTED = Path(__file__).parent / "data" / "bench_records"
FOLDERS = sorted(p.name for p in RUNS.iterdir() if (p / "metrics.jsonl").is_file())


def records(name: str) -> tuple[SimpleNamespace, list[dict]]:
    """A record's config (the fields the report reads) and its rows."""
    cfg = SimpleNamespace(**json.loads((RUNS / name / "config.json").read_text()))
    lines = (RUNS / name / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return cfg, [json.loads(line) for line in lines if line.strip()]


def expected(name: str, file: str) -> str:
    committed = RUNS / name / file
    return (committed if committed.is_file() else EXPECTED / name / file).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", FOLDERS)
def test_record_gives_its_published_tables(name, tmp_path):
    cfg, rows = records(name)
    kinds = {r["kind"] for r in rows}
    checked = 0
    if "step" in kinds:
        report.write_report(tmp_path, rows, cfg)
        assert (tmp_path / "results.md").read_text(encoding="utf-8") == expected(name, "results.md")
        checked += 1
    if "compositional-step" in kinds:
        done = report.ordered(r["method"] for r in rows if r["kind"] == "compositional-step")
        beta = cfg.beta if cfg.beta is not None else compositional.BETA
        assert compositional._table(rows, done, beta) == expected(name, "compositional.md")
        checked += 1
    assert checked, f"{name} holds no step rows"
