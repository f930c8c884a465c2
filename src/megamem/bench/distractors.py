"""Distractor memories for routing at scale: invented facts and near-duplicates of real records, made offline.

A routing benchmark at 10^4-10^5 memories needs far more memories than the 1,000 records of ../shared/data,
and they must be hard: a question about "the 2024 Rwanda Challenger II" should meet other tennis tournaments
in Rwanda, not only cooking recipes. Two kinds, both seeded and made without a model:

- near_duplicate(record): the record's passage (and paraphrases, with the same substitutions) with some of its
  names and every number changed: the same topic, template and most of the words, but at least one word of
  the record's own name replaced, so a question that names the real subject still has one right memory.
- invented(): a short fact sheet (person, place, company, event, species, album) about an invented entity,
  from templates, in the shape of the wiki records (three sentences, 150-350 characters).

    >>> rng = random.Random(0)
    >>> invented_name(rng)[:1].isupper()
    True

Limits: English-shaped text; names are recognised as capitalised words (a sentence-initial common word such
as "The" is kept); a question that shares no name or number with its passage ("Who were the defending
champions mentioned?") cannot tell the original from a near-duplicate: `anchors` finds such questions, and
the routing benchmark reports them apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..datasets import Record
from ..lexical import NUMBER, WORD, names

__all__ = ["NUMBER", "anchors", "invented", "names", "near_duplicate"]

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "y"]
_CODAS = ["", "", "n", "r", "s", "l", "th", "nd", "sk", "m", "x"]


def anchors(question: str, passage: str) -> tuple[set[str], set[str]]:
    """(names, numbers) that a question shares with its passage: what lets it point at that one memory."""
    return set(names(question)) & set(names(passage)), set(NUMBER.findall(question)) & set(NUMBER.findall(passage))


def invented_name(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    """A pronounceable invented word, capitalised ("Kraeloth")."""
    n = rng.randint(*syllables)
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)
    return word.capitalize()


def _shift_number(text: str, rng: random.Random, avoid: set[str]) -> str:
    """Another number of the same kind, none of `avoid` (the original's numbers): a year stays a plausible year,
    a small count a small count."""
    n = int(text)
    while True:
        if 1500 <= n <= 2100:
            m = min(2099, max(1500, n + rng.choice([-1, 1]) * rng.randint(1, 40)))
        elif n <= 31:
            m = rng.randint(1, 31)
        else:
            m = max(1, int(n * rng.uniform(0.3, 3.0)))
        if str(m) not in avoid:
            return str(m)


def near_duplicate(record: Record, rng: random.Random, share: float = 0.5) -> tuple[str, list[str]] | None:
    """(passage, paraphrases) of a near-duplicate of `record`: about half (`share`) of its distinct names and
    every number replaced, always at least one word of the record's own name (its theme) and, for each of its
    questions that points at it only by names, one of those names, so that every question that names its
    subject still has exactly one right memory. None when the passage has no name to change."""
    texts = [record.passage, *record.paraphrases]
    found = sorted({w for t in texts for w in names(t)})
    if not found:
        return None
    changed = {w for w in found if rng.random() < share}
    own = [w for w in names(record.name) if w in found]
    changed.add(rng.choice(own) if own else rng.choice(found))
    for question, _ in record.qa:
        by_name, by_number = anchors(question, record.passage)
        if by_name and not by_number and not by_name & changed:
            changed.add(rng.choice(sorted(by_name)))
    mapping = {w: invented_name(rng) for w in sorted(changed)}
    numbers = {m for t in texts for m in NUMBER.findall(t)}
    num_map = {m: _shift_number(m, rng, numbers) for m in sorted(numbers)}

    def rewrite(text: str) -> str:
        text = WORD.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)
        return NUMBER.sub(lambda m: num_map.get(m.group(0), m.group(0)), text)

    out = [rewrite(t) for t in texts]
    return (out[0], out[1:]) if out[0] != record.passage else None


@dataclass(frozen=True)
class _Template:
    kind: str
    sentences: tuple[str, ...]


_PROFESSIONS = [
    "cellist",
    "architect",
    "chemist",
    "footballer",
    "novelist",
    "politician",
    "painter",
    "cyclist",
    "engineer",
    "film director",
    "historian",
    "sprinter",
    "jazz pianist",
    "botanist",
    "economist",
]
_TOPICS = [
    "river ecology",
    "medieval trade",
    "glass sculpture",
    "urban transport",
    "coastal erosion",
    "folk music",
    "early computing",
    "textile design",
    "mountain railways",
    "seed banks",
]
_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
_TEMPLATES = [
    _Template(
        "person",
        (
            "{A} {B} (born {day} {month} {year}) is a {nat} {prof} known for work on {topic}.",
            "{B} studied at the University of {C} and won the {D} Prize in {year2}.",
            "In {year3}, {B} moved to {E}, where {B} founded the {F} Institute.",
        ),
    ),
    _Template(
        "place",
        (
            "{A} is a town in the {B} District of {C}, with a population of {num} at the {year} census.",
            "It lies on the {D} River, {small} kilometres north of {E}.",
            "The town is known for its {topic} museum, opened in {year2}.",
        ),
    ),
    _Template(
        "company",
        (
            "{A} {B} is a {nat} company founded in {year} in {C} by {D} {E}.",
            "It makes equipment for {topic} and employs about {num} people.",
            "In {year2}, {A} {B} bought the {F} Group for {small} million euros.",
        ),
    ),
    _Template(
        "event",
        (
            "The {year} {A} {B} Cup was the {small}th edition of the {nat} {topic} competition.",
            "It was held in {C} from {day} to {day2} {month} {year}.",
            "The winner was {D} {E}, who beat {F} {G} in the final.",
        ),
    ),
    _Template(
        "species",
        (
            "{A} {b} is a species of beetle in the family {C}idae, first described in {year}.",
            "It is found only in the {D} Hills of {E}, at altitudes above {num} metres.",
            "The species was named after the {nat} entomologist {F} {G}.",
        ),
    ),
    _Template(
        "album",
        (
            "{A} {B} is the {small}th studio album by the {nat} band {C} {D}, released on {day} {month} {year}.",
            "It was recorded in {E} over {small2} weeks and produced by {F} {G}.",
            "The album reached number {small3} on the {nat} charts in {year}.",
        ),
    ),
]


def invented(rng: random.Random) -> tuple[str, str]:
    """(kind, passage) of a fact sheet about an invented entity, from a random template."""
    template = rng.choice(_TEMPLATES)
    year = rng.randint(1850, 2024)
    names = {k: invented_name(rng) for k in "ABCDEFG"}
    fields = {
        **names,
        "b": invented_name(rng).lower(),
        "nat": invented_name(rng, (1, 2)) + "ian",
        "prof": rng.choice(_PROFESSIONS),
        "topic": rng.choice(_TOPICS),
        "day": rng.randint(1, 14),
        "day2": rng.randint(15, 28),
        "month": rng.choice(_MONTHS),
        "year": year,
        "year2": year + rng.randint(20, 40),
        "year3": year + rng.randint(25, 50),
        "num": rng.randint(500, 90_000),
        "small": rng.randint(2, 19),
        "small2": rng.randint(2, 12),
        "small3": rng.randint(1, 40),
    }
    return template.kind, " ".join(s.format(**fields) for s in template.sentences)
