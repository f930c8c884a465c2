"""The gate's lexical re-rank (megamem.lexical): BM25 as bm25s computes it, grown one memory at a time, and
added in the gate only to the candidates the null memory lets through."""

from __future__ import annotations

from dataclasses import replace

import pytest
from faultlib import quick_recipe

from megamem import Item, Memory
from megamem.errors import MegamemError
from megamem.gate import GateConfig
from megamem.lexical import LexicalIndex, tokens

DOCS = [
    "The Skarvik ferry crosses Lake Tessin every winter.",
    "Ada Quimbleton designed the Harlow Cross tower in 1931.",
    "The ferry to Harlow runs at dawn; the old ferry is painted teal.",
    "Zorblatt the heron lives on Quillon pier.",
]
QUESTIONS = ["Which ferry crosses Lake Tessin to Harlow?", "Who designed the tower in 1931?", "heron pier pier"]


def test_scores_equal_bm25s_lucene():
    bm25s = pytest.importorskip("bm25s")
    reference = bm25s.BM25(method="lucene")
    reference.index([tokens(d) for d in DOCS], show_progress=False)
    ours = LexicalIndex(DOCS)
    for q in QUESTIONS:
        assert ours.scores(q, list(range(len(DOCS)))) == pytest.approx(list(reference.get_scores(tokens(q))), rel=1e-5)


def test_an_index_grown_one_memory_at_a_time_equals_one_built_at_once():
    grown = LexicalIndex(DOCS[:2])
    for d in DOCS[2:]:
        grown.add(d)
    whole = LexicalIndex(DOCS)
    for q in QUESTIONS:
        assert grown.scores(q, [3, 0, 2]) == pytest.approx(whole.scores(q, [3, 0, 2]))
    assert LexicalIndex().scores("anything", [0]) == [0.0]


@pytest.fixture()
def ferries(tiny_dir, tmp_path):
    """Two ferries one name apart, and a memory about something else."""
    mem = Memory(tmp_path / "store", model=str(tiny_dir), recipe=quick_recipe())
    mem.add_many(
        [
            Item("The Kelvoran ferry leaves Port Zask at dawn every day.", id="kelvoran"),
            Item("The Brisby ferry leaves Port Zask at noon every day.", id="brisby"),
            Item("Ada Quimbleton designed the Harlow Cross tower.", id="tower"),
        ]
    )
    return mem


def test_the_gate_adds_bm25_to_its_candidates_and_never_overrides_the_null_memory(ferries):
    mem = ferries
    q = "When does the Kelvoran ferry leave Port Zask?"
    plain = mem.scores(q)
    lex = mem.scores(q, replace(mem.gate, lexical=0.3))
    ids = mem.keys().ids
    gain = {i: float(lex[n] - plain[n]) for n, i in enumerate(ids)}
    assert gain["kelvoran"] == pytest.approx(0.3)  # the best BM25 among the candidates gets the full weight
    assert 0 < gain["brisby"] < 0.3  # shares "ferry", "Port", "Zask", not the name
    off = "What is the capital of France?"
    assert mem.route(off, replace(mem.gate, lexical=0.3)) == mem.route(off) == []  # the null memory decides
    mem.add("The Kelvoran ferry was painted teal in 2020.", id="paint")  # the cached index grows with the store
    assert mem.scores(q, replace(mem.gate, lexical=0.3)).shape[0] == 4
    with pytest.raises(MegamemError, match="lexical"):
        GateConfig(lexical=-1.0)


def test_coverage_is_the_share_of_the_questions_names_and_numbers():
    index = LexicalIndex(["The Kelvoran ferry left Port Zask in 2020.", "The Brisby ferry left Port Zask in 2021."])
    q = "When did the Kelvoran ferry leave Port Zask in 2020?"  # names Kelvoran, Port, Zask and the number 2020
    assert index.coverage(q, [0, 1]) == [1.0, 0.5]
    assert index.coverage("when did it leave?", [0, 1]) == [0.0, 0.0]  # names nothing: no say


def test_the_gate_adds_name_coverage_to_its_candidates(ferries):
    mem = ferries
    q = "When does the Kelvoran ferry leave Port Zask?"
    plain = mem.scores(q)
    named = mem.scores(q, replace(mem.gate, names=0.3))
    ids = mem.keys().ids
    gain = {i: float(named[n] - plain[n]) for n, i in enumerate(ids)}
    assert gain["kelvoran"] == pytest.approx(0.3) and gain["brisby"] == pytest.approx(0.2)  # 2 of its 3 names
    assert gain["tower"] == 0.0  # names none of them
    off = "What is the capital of France?"
    assert mem.route(off, replace(mem.gate, names=0.3)) == []  # the null memory still decides
    with pytest.raises(MegamemError, match="names"):
        GateConfig(names=-1.0)
