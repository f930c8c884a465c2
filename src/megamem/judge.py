"""The offline QA judge: is the gold answer in the model's answer, and is the answer one sentence?

Normalisation folds case, accents, punctuation, articles and thousands separators, and writes dates
in one form ("10 July 1995", "July 10, 1995" and "1995-07-10" all match). A gold word of 4+ letters
also matches a longer word it begins ("Fiji" in "Fijian"). An answer longer than one sentence, or
than `max_words`, is not credited: listing many facts must not earn a hit by chance.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

MONTHS = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
]
_MON = {m: i + 1 for i, m in enumerate(MONTHS)} | {m[:3]: i + 1 for i, m in enumerate(MONTHS)} | {"sept": 9}
_MON_RE = "|".join(sorted(_MON, key=len, reverse=True))
_ARTICLES = {"a", "an", "the"}
_DMY = re.compile(rf"\b(\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?({_MON_RE})\.?,?\s+(\d{{4}})\b")
_MDY = re.compile(rf"\b({_MON_RE})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?,?\s+(\d{{4}})\b")
_ISO = re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b")


def _fold(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    return "".join(c for c in text if not unicodedata.combining(c)).lower()


def _dates(text: str) -> str:
    def iso(y: str, m: int, d: str) -> str:
        return f" date{int(y):04d}{m:02d}{int(d):02d} "

    text = _ISO.sub(lambda g: iso(g[1], int(g[2]), g[3]), text)
    text = _DMY.sub(lambda g: iso(g[3], _MON[g[2]], g[1]), text)
    return _MDY.sub(lambda g: iso(g[3], _MON[g[1]], g[2]), text)


def normalize(text: str) -> list[str]:
    """Answer text as a list of comparable tokens."""
    text = _dates(_fold(text))
    text = re.sub(r"(?<=\d)[,](?=\d{3}\b)", "", text)
    text = re.sub(r"[^a-z0-9]+", " ", text)
    return [t for t in text.split() if t not in _ARTICLES]


def _token_match(gold: str, pred: str) -> bool:
    if gold == pred:
        return True
    return len(gold) >= 4 and gold.isalpha() and pred.startswith(gold)


def contains_answer(prediction: str, gold: str) -> bool:
    """Whether the gold answer's tokens stand, in order and contiguous, in the prediction."""
    g, p = normalize(gold), normalize(prediction)
    if not g:
        return False
    return any(
        all(_token_match(a, b) for a, b in zip(g, p[i : i + len(g)], strict=True)) for i in range(len(p) - len(g) + 1)
    )


_SENT_END = re.compile(
    r"(?<!\b[A-Z])(?<!\b(?:Mr|Ms|Dr|St|Jr|Sr|vs|No))(?<!\b(?:Mrs|etc))[.!?]+[\"')\]]*\s+(?=[A-Z0-9\"'(])"
)


def sentence_count(text: str) -> int:
    """Sentences in `text`: splits at . ! ? followed by a capital or digit, not after initials or titles."""
    text = text.strip()
    if not text:
        return 0
    return len([s for s in _SENT_END.split(text) if s.strip()])


def is_correct(prediction: str, gold: str, max_words: int = 40) -> bool:
    """The paper's judge: gold answer contained, answer at most one sentence (and not a long list)."""
    return (
        contains_answer(prediction, gold) and sentence_count(prediction) <= 1 and len(prediction.split()) <= max_words
    )


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD-style token F1 between normalised prediction and gold."""
    p, g = normalize(prediction), normalize(gold)
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if not p or not g or same == 0:
        return float(p == g)
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)
