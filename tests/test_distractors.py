"""The routing benchmark's distractors (megamem.bench.distractors): hard, seeded, and never ambiguous by design."""

from __future__ import annotations

import random

import pytest

from megamem.bench.distractors import NUMBER, anchors, invented, names, near_duplicate
from megamem.datasets import Record

RECORD = Record(
    passage="The 2024 Rwanda Challenger II was a tennis tournament played on clay courts in Kigali, Rwanda, "
    "between 4 and 10 March 2024. Ondřej Král won the singles title.",
    qa=[
        ("Which city in Rwanda hosted the Rwanda Challenger II?", "Kigali"),
        ("Who won the singles title of the Challenger in Kigali?", "Ondřej Král"),
        ("When did the 2024 Rwanda Challenger II begin?", "4 March 2024"),
    ],
    paraphrases=["In March 2024 Kigali, Rwanda, hosted the Rwanda Challenger II on clay; Ondřej Král won."],
    name="2024 Rwanda Challenger II",
)


def test_names_see_any_script_and_skip_sentence_words():
    assert names("The winner was Ondřej Král of Česko.") == ["Ondřej", "Král", "Česko"]
    assert anchors("Where did Ondřej Král win in 2024?", RECORD.passage) == ({"Ondřej", "Král"}, {"2024"})


@pytest.mark.parametrize("seed", range(40))
def test_a_near_duplicate_changes_what_every_naming_question_points_with(seed):
    made = near_duplicate(RECORD, random.Random(seed))
    assert made is not None
    passage, paraphrases = made
    assert len(paraphrases) == len(RECORD.paraphrases) and passage != RECORD.passage
    assert "tennis tournament played on clay courts" in passage  # the same topic and template
    own = set(names(RECORD.name))
    assert own - set(names(passage)), "no word of the subject's own name was changed"
    assert not set(NUMBER.findall(passage)) & set(NUMBER.findall(RECORD.passage))  # every number moved
    for question, _ in RECORD.qa:
        by_name, by_number = anchors(question, RECORD.passage)
        # what the question names its subject by is no longer all in the near-duplicate
        assert by_number or by_name - set(names(passage)), question


def test_distractors_are_seeded_and_shaped_like_the_wiki_records():
    assert near_duplicate(RECORD, random.Random(3)) == near_duplicate(RECORD, random.Random(3))
    rng = random.Random(0)
    made = [invented(rng) for _ in range(200)]
    again = random.Random(0)
    assert made == [invented(again) for _ in range(200)]
    assert {kind for kind, _ in made} == {"person", "place", "company", "event", "species", "album"}
    assert all(100 <= len(text) <= 400 and text.count(". ") >= 2 for _, text in made)
    assert near_duplicate(Record("only lower case words here."), random.Random(0)) is None
