"""Questions a memory answers, made from its own sentences: cloze questions for training the QA format.

A memory trained only on "tell me a story" -> passage learns to recite: asked a question, it answers with the
passage's opening sentence, whatever was asked. Pairing each sentence of the memory with a question whose
answer is in that sentence teaches the adapter the question -> one relevant sentence mapping that the QA mode
asks for. The questions are made mechanically (no model, no evaluation data): one span of the sentence (a
date, a number, a name) is replaced by a question word, so the question shares the sentence's other words
and lacks exactly what the answer adds.

    >>> cloze("Ann Lee (born 4 May 1990) is a Welsh chemist.", 0)
    'what (born 4 May 1990) is a Welsh chemist?'

Limits: English-shaped text (sentence ends, capitalised names); a sentence with no date, number or name
gives no question; the sentence splitter is a heuristic (abbreviations such as "U.S." may split early).
"""

from __future__ import annotations

import random
import re
import zlib

# Sentence ends: . ! ? followed by space and an upper-case letter, digit or quote (not "U.S. team" inside).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z0-9])")
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
# Spans a question can ask for, most specific first, each with the question word that replaces it.
_SPANS: list[tuple[re.Pattern, str]] = [
    (re.compile(rf"\b(?:\d{{1,2}} {_MONTH}|{_MONTH} \d{{1,2}},?) \d{{4}}\b"), "when"),
    (re.compile(rf"\b{_MONTH} \d{{4}}\b"), "when"),
    (re.compile(r"\b(?:1[5-9]|20)\d\d(?:[–-]\d\d)?\b"), "when"),
    (re.compile(r"\b\d[\d,.]*(?: (?:percent|per cent|million|billion|people|years?|km|metres))?\b"), "how many"),
    (re.compile(r"\b(?:[A-Z][\w'’.-]+)(?: (?:of |the |de |and )?[A-Z][\w'’.-]+)*"), "what"),
]


def sentences(text: str) -> list[str]:
    """The sentences of `text`, stripped; empty ones dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def spans(sentence: str) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, question word) spans a question can ask for; the first word is skipped when
    it is only a capitalised sentence start (one word, not a name the rest of the sentence repeats)."""
    taken: list[tuple[int, int, str]] = []
    for pattern, word in _SPANS:
        for m in pattern.finditer(sentence):
            if any(m.start() < e and s < m.end() for s, e, _ in taken):
                continue
            if m.start() == 0 and word == "what" and " " not in m.group(0):
                continue
            taken.append((m.start(), m.end(), word))
    return sorted(taken)


def cloze(sentence: str, seed: int) -> str | None:
    """One question about `sentence`: a span chosen by `seed` (and the sentence, so each sentence varies)
    replaced by its question word, the closing stop turned into "?". None when there is nothing to ask."""
    asked = cloze_span(sentence, seed)
    return asked[0] if asked else None


def cloze_span(sentence: str, seed: int) -> tuple[str, str] | None:
    """(question, the span it asks for) for `sentence`, as cloze() chooses them; None when nothing to ask."""
    found = spans(sentence)
    if not found:
        return None
    rng = random.Random(seed * 1_000_003 + zlib.crc32(sentence.encode()))
    s, e, word = rng.choice(found)
    q = (sentence[:s] + word + sentence[e:]).strip()
    return re.sub(r"[.!;:]*$", "", q) + "?", sentence[s:e]


def questions(texts: list[str], per_sentence: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(question, sentence, span) for every sentence of `texts`, `per_sentence` questions each (distinct where
    the sentence allows), in order; the span is the part of the sentence the question asks for."""
    out = []
    for text in texts:
        for sentence in sentences(text):
            made: dict[str, str] = {}
            for k in range(per_sentence * 4):  # a few extra draws to find distinct spans
                asked = cloze_span(sentence, seed + k)
                if asked is not None:
                    made.setdefault(*asked)
                if len(made) == per_sentence:
                    break
            out += [(q, sentence, span) for q, span in made.items()]
    return out
