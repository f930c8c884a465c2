"""Telling when a new memory probably updates an older one: close keys and the same names.

A correction ("In 2033 the Vexmoor bridge was repainted red") is about the same subject as what it
corrects, so its key is close to the older memory's and it names the same things. Neither alone is
enough: related but distinct memories (two matches of one tournament) also have close keys. Measured on
the shipped pairs (data/contradictions.jsonl, 30 invented corrections) against wiki partitions 0-1 (100
real articles, each with its nearest other article), MiniLM keys (docs/results.md, "Memories that change"):

    cosine >= 0.6 and name overlap >= 0.67:  43% of the corrections flagged,  7% of the articles
    cosine >= 0.6 and name overlap >= 0.5:   73%,                            18%
    cosine >= 0.8 alone:                     30%,                             0%

megamem uses the first (a warning should rarely be wrong) and only suggests: the recency rule itself
needs the user's word (`replaces`), since a flagged pair may well be two true facts.

    >>> sorted(proper_names("In 2033 the Vexmoor bridge was repainted red by Ida Carrow."))
    ['Carrow', 'Ida', 'Vexmoor']
"""

from __future__ import annotations

import re

LIKELY_COSINE = 0.6
LIKELY_NAMES = 0.67
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[^\W\d_][\w'-]*")


def proper_names(text: str) -> set[str]:
    """Capitalised words that do not start a sentence: a cheap stand-in for the names a text mentions."""
    out = set()
    for sentence in _SENTENCE.split(text):
        words = _WORD.findall(sentence)
        out.update(w for w in words[1:] if w[0].isupper())
    return out


def name_overlap(a: str, b: str) -> float:
    """|names(a) & names(b)| / the smaller set's size; 0 when either text names nothing."""
    na, nb = proper_names(a), proper_names(b)
    return len(na & nb) / min(len(na), len(nb)) if na and nb else 0.0


def likely_update(cosine: float, a: str, b: str) -> bool:
    """Whether text `a` probably updates `b` (or the reverse), given their best key cosine."""
    return cosine >= LIKELY_COSINE and name_overlap(a, b) >= LIKELY_NAMES
