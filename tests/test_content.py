"""Shipped evaluation content (general MCQ probe, general text, compositional questions): schema and counts."""

from __future__ import annotations

import json
from collections import Counter
from importlib.resources import files
from pathlib import Path

import pytest

WIKI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mega-wiki2024"
FIRST_N = 25


def _text(name: str) -> str:
    return files("megamem").joinpath(f"data/{name}").read_text(encoding="utf-8")


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in _text(name).splitlines() if line.strip()]


def test_general_mcq_schema_and_count():
    rows = _jsonl("general_mcq.jsonl")
    assert len(rows) >= 100
    for r in rows:
        assert set(r) == {"question", "choices", "answer", "subject"}, r
        assert isinstance(r["question"], str) and r["question"].strip()
        assert isinstance(r["subject"], str) and r["subject"].strip()
        assert isinstance(r["choices"], list) and len(r["choices"]) == 4, r
        assert all(isinstance(c, str) and c.strip() for c in r["choices"]), r
        assert len({c.strip().lower() for c in r["choices"]}) == 4, f"repeated choice: {r}"
        assert type(r["answer"]) is int and 0 <= r["answer"] <= 3, r


def test_general_mcq_balanced_and_unique():
    rows = _jsonl("general_mcq.jsonl")
    positions = Counter(r["answer"] for r in rows)
    assert max(positions.values()) <= 0.4 * len(rows), positions
    assert set(positions) == {0, 1, 2, 3}, positions
    questions = [r["question"].strip().lower() for r in rows]
    dupes = [q for q, n in Counter(questions).items() if n > 1]
    assert not dupes, dupes
    assert len({r["subject"] for r in rows}) >= 5


def test_general_text_paragraphs():
    paragraphs = [p.strip() for p in _text("general_text.txt").split("\n\n") if p.strip()]
    assert len(paragraphs) >= 30
    for p in paragraphs:
        assert len(p.split()) <= 100, p


def test_compositional_schema_and_count():
    rows = _jsonl("compositional.jsonl")
    assert len(rows) >= 25
    for r in rows:
        assert set(r) == {"question", "answer", "themes", "partitions"}, r
        assert isinstance(r["question"], str) and r["question"].strip()
        assert isinstance(r["answer"], str) and r["answer"].strip()
        assert len(r["answer"].split()) <= 6, r
        assert isinstance(r["themes"], list) and len(r["themes"]) == 2, r
        assert r["themes"][0] != r["themes"][1], r
        assert isinstance(r["partitions"], list) and len(r["partitions"]) == 2, r
        assert all(type(p) is int and p in (0, 1) for p in r["partitions"]), r
    assert len({r["question"] for r in rows}) == len(rows)
    within = [r for r in rows if r["partitions"][0] == r["partitions"][1]]
    assert len(within) >= 25


def test_compositional_themes_in_first_records():
    if not WIKI.is_dir():
        pytest.skip(f"wiki data folder {WIKI} is absent; cannot check compositional themes against it")
    themes = {}
    for p in (0, 1):
        path = WIKI / f"partition-{p:02d}.jsonl"
        if not path.is_file():
            pytest.skip(f"{path} is absent; cannot check compositional themes against it")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        themes[p] = {json.loads(line).get("theme") for line in lines[:FIRST_N]}
    for r in _jsonl("compositional.jsonl"):
        for theme, p in zip(r["themes"], r["partitions"], strict=True):
            assert theme in themes[p], f"{theme!r} is not among the first {FIRST_N} records of partition {p}"
