"""Lexical scores for the gate: BM25 of a question against the memories the embedding proposes.

At thousands of memories the sentence embedder confuses memories that share a topic and a template (two
tennis tournaments, two council elections) and differ in a name or a number; BM25 counts exactly those rare
words. The routing benchmark (docs/scale.md) measured the hybrid cosine + lam * BM25 / (the best BM25 among
the candidates) at 10,000 memories above the cosine alone. The gate adds it only as a re-rank of the
cosine's top candidates, so its cost does not grow with the store and the null memory's decision stays the
cosine's (megamem.memory.Memory.scores).

Own code rather than bm25s: the gate needs an index that grows one memory at a time and scores a few
candidate documents, where bm25s indexes a fixed corpus and scores all of it; the scores equal bm25s's
"lucene" variant (tests/test_lexical.py checks it against bm25s).

    >>> index = LexicalIndex(["The Skarvik ferry crosses Lake Tessin.", "Ada designed the Harlow tower."])
    >>> [round(s, 3) for s in index.scores("Which ferry crosses Lake Tessin?", [0, 1])]
    [1.056, 0.0]

Name coverage: the share of a question's names and numbers (capitalised words that are not common sentence
words, and runs of digits) that a memory's document contains. Near-duplicates differ from the right memory
in exactly one name or number, which BM25 weighs against every other word and coverage does not; the routing
benchmark measured it on top of the hybrid (docs/scale.md).

    >>> index.coverage("Which ferry crosses Lake Tessin?", [0, 1])
    [1.0, 0.0]

Limits: words are runs of two or more letters or digits, lower-cased, English stop words dropped; no stemming
("hosted" does not match "host").
"""

from __future__ import annotations

import math
import re
from collections import Counter

_TOKEN = re.compile(r"(?u)\b\w\w+\b")
STOP_WORDS = frozenset(
    "a about above after again against all am an and any are as at be because been before being below between both "
    "but by can did do does doing down during each few for from further had has have having he her here hers herself "
    "him himself his how i if in into is it its itself just me more most my myself no nor not now of off on once only "
    "or other our ours ourselves out over own same she should so some such than that the their theirs them themselves "
    "then there these they this those through to too under until up very was we were what when where which while who "
    "whom why will with you your yours yourself yourselves".split()
)


# Capitalised words that are not names (sentence words, months, days): left out of a text's names.
COMMON = frozenset(
    "The A An It In On At By For From Of To As After Before During Since Until This That These Those He She They "
    "His Her Its Their Our We I You There Here When While Where Which Who Whose What With Without Also However "
    "Although But And Or Nor So Yet Following Born Prior Despite Upon Over Under Between Among Through Throughout "
    "Along Across About Around Against Within Each Every Both Many Most Some Several Such Other Another Once "
    "January February March April May June July August September October November December "
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
)
WORD = re.compile(r"\b[^\W\d_][\w'’-]*")  # a word starting with a letter, any script ("Ondřej")
NUMBER = re.compile(r"\b\d+\b")


def names(text: str) -> list[str]:
    """The capitalised words of `text` that may be names (common sentence words like "The" left out)."""
    return [w for w in WORD.findall(text) if w[0].isupper() and w not in COMMON]


def anchor_words(text: str) -> set[str]:
    """The names and numbers of a text: what tells a memory from its near-duplicates."""
    return set(names(text)) | set(NUMBER.findall(text))


def tokens(text: str) -> list[str]:
    """The words BM25 counts: lower-cased runs of 2+ word characters, stop words left out."""
    return [w for w in _TOKEN.findall(text.lower()) if w not in STOP_WORDS]


class LexicalIndex:
    """BM25 (Lucene's form: k1 1.5, b 0.75) over one document per memory, grown with `add`."""

    def __init__(self, documents: list[str] = (), k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.counts: list[Counter] = []
        self.anchors: list[set[str]] = []  # each memory's names and numbers, for coverage
        self.df: Counter = Counter()
        self.total = 0
        for d in documents:
            self.add(d)

    def add(self, document: str) -> None:
        """Index the next memory's document (memory number len(self) before the call)."""
        c = Counter(tokens(document))
        self.counts.append(c)
        self.anchors.append(anchor_words(document))
        self.df.update(c.keys())
        self.total += sum(c.values())

    def __len__(self) -> int:
        return len(self.counts)

    def scores(self, question: str, candidates: list[int]) -> list[float]:
        """BM25 of `question` against each candidate memory's document, in the order given."""
        n = len(self.counts)
        if not n or not candidates:
            return [0.0] * len(candidates)
        avg = max(self.total / n, 1e-9)
        words = tokens(question)
        idf = {w: math.log(1 + (n - self.df[w] + 0.5) / (self.df[w] + 0.5)) for w in set(words)}
        out = []
        for m in candidates:
            c = self.counts[m]
            norm = self.k1 * (1 - self.b + self.b * sum(c.values()) / avg)
            out.append(sum((idf[w] * c[w] / (c[w] + norm) for w in words if c[w]), 0.0))
        return out

    def coverage(self, question: str, candidates: list[int]) -> list[float]:
        """The share of the question's names and numbers each candidate's document contains (0 for all when
        the question has none), in the order given."""
        words = anchor_words(question)
        if not words:
            return [0.0] * len(candidates)
        return [len(words & self.anchors[m]) / len(words) for m in candidates]
