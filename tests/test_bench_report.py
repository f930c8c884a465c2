"""The report over a folder's rows: a method stopped part-way through a partition is not averaged as final."""

from megamem.bench import report


def step_rows(method: str, partition: int, steps: list[int], end: int | None, recall: float) -> list[dict]:
    """A method's step rows and first-memory rows; `end` None: rows written before step rows carried it."""
    rows = []
    for k in steps:
        row = {"kind": "step", "partition": partition, "method": method, "step": k, "mean_recall_cos": recall + k}
        if end is not None:
            row["memories"] = end
        rows += [row, {"kind": "memory", "partition": partition, "method": method, "step": k, "memory": 0}]
        rows[-1]["recall_cos"] = recall + k
    return rows


def test_partial_partition_left_out_of_the_final_state(tmp_path):
    rows = step_rows("mega", 0, [2, 4], 4, 0.5) + step_rows("mega", 1, [2, 4], 4, 0.7)
    rows += step_rows("full", 0, [2, 4], 4, 0.1) + step_rows("full", 1, [2], 4, 0.9)  # full stopped at 2 of 4
    final = report.final_rows(rows)
    assert [(r["partition"], r["step"]) for r in final["mega"]] == [(0, 4), (1, 4)]
    assert [(r["partition"], r["step"]) for r in final["full"]] == [(0, 4)]
    table = report.results_table(rows, ["mega", "full"])
    assert "| full | 1 | 4 | 4.100 |" in table  # partition 0 alone, not averaged with partition 1's step 2
    assert "| mega | 2 | 4 | 4.600 ± 0.141 |" in table
    first = report.first_memory_table(rows, ["mega", "full"])
    assert "| full | 4 | 4.100 |" in first
    assert [r["partition"] for r in report.finished_rows(rows) if r["method"] == "full"] == [0] * 4

    class Cfg:
        data, model, epochs, targets, rank = "d", None, 1, "mlp", None

    report.write_report(tmp_path, rows, Cfg())
    assert "full in partition 1 (2 of 4 memories)" in (tmp_path / "results.md").read_text()


def test_rows_without_memories_count_the_furthest_step():
    """Rows written before step rows carried 'memories': a partition ends at the furthest step any method reached."""
    rows = step_rows("mega", 1, [2, 4], None, 0.5) + step_rows("full", 1, [2], None, 0.1)
    assert report.progress(rows) == {("mega", 1): (4, 4), ("full", 1): (2, 4)}
    assert list(report.final_rows(rows)) == ["mega"]
