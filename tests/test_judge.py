"""The offline judge's edge cases: dates, morphology, punctuation, one-sentence rule, F1."""

import pytest

from megamem.judge import contains_answer, is_correct, normalize, sentence_count, token_f1


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("He was born on July 10, 1995.", "10 July 1995"),
        ("Born 10th of July 1995.", "July 10, 1995"),
        ("The date was 1995-07-10.", "10 July 1995"),
        ("She represented the Fijian national team.", "Fiji"),
        ("The team won 1,200 votes.", "1200"),
        ("It is painted TEAL!", "teal"),
        ("The café opened in Zürich.", "Cafe opened in Zurich"),
        ("It was won by the Lakers.", "Lakers"),
    ],
)
def test_contains_despite_surface_differences(pred, gold):
    assert contains_answer(pred, gold)


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("The bridge was stolen.", "teal"),  # substring inside another word does not count
        ("Born 11 July 1995.", "10 July 1995"),  # a different day
        ("He plays rugby.", "Wheelchair rugby"),  # part of the answer only
        ("It is in Fiji.", "Fijian"),  # prefix only matches the other way round
        ("", "anything"),
    ],
)
def test_does_not_contain(pred, gold):
    assert not contains_answer(pred, gold)


def test_sentence_count():
    assert sentence_count("Dr. Smith met J. R. R. Tolkien in 1950.") == 1
    assert sentence_count("It measured 3.5 metres. It was red.") == 2
    assert sentence_count("Yes! He did? Sure.") == 3
    assert sentence_count("  ") == 0


def test_one_sentence_rule_and_lists_are_not_credited():
    assert is_correct("The bridge is teal.", "teal")
    assert not is_correct("The bridge is red. Or maybe teal.", "teal")
    listing = "It could be red, blue, green, " + ", ".join(["yellow"] * 40) + " or teal."
    assert not is_correct(listing, "teal")


def test_token_f1():
    assert token_f1("wheelchair rugby player", "Wheelchair rugby") == pytest.approx(0.8)
    assert token_f1("nothing alike", "teal") == 0.0
    assert token_f1("The Teal", "teal") == 1.0
    assert normalize("The  Big, Apple") == ["big", "apple"]
