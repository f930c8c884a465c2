"""The bench's metrics: recall cosine (and its random-pair floor), the offline QA judge, and an optional LLM judge."""

from __future__ import annotations

import json
import urllib.request

import torch
import torch.nn.functional as F

from ..errors import MegamemError
from ..judge import is_correct, token_f1
from ..keys import embedder_keys


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) cosine similarities between two sets of row vectors."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def recall_cosines(outputs: list[str], passages: list[str]) -> list[float]:
    """Sentence-embedder cosine between each recall output and its own passage."""
    if not outputs:
        return []
    sims = cosine_matrix(embedder_keys(outputs), embedder_keys(passages))
    return [float(sims[i, i]) for i in range(len(outputs))]


def random_pair_floor(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine between non-matching pairs (row i of a with row j != i of b, len(b) >= len(a)): chance level."""
    sims = cosine_matrix(a, b)
    if sims.shape[1] < 2:
        return float("nan")
    off = torch.ones_like(sims, dtype=torch.bool)
    idx = torch.arange(sims.shape[0])
    off[idx, idx] = False
    return float(sims[off].mean())


def qa_scores(prediction: str, gold: str) -> dict[str, float]:
    """The offline judge's verdict (contained + one sentence) and token F1 of one answer."""
    return {"qa_acc": float(is_correct(prediction, gold)), "qa_f1": token_f1(prediction, gold)}


JUDGE_PROMPT = (
    "Question: {q}\nGold answer: {a}\nModel answer: {p}\n"
    "Is the model answer correct and at most one sentence? Reply with exactly YES or NO."
)


def llm_judge(url: str, model: str, question: str, gold: str, prediction: str, timeout: float = 60.0) -> float:
    """1.0 if an OpenAI-compatible chat endpoint judges the answer correct, else 0.0 (optional metric)."""
    body = {
        "model": model,
        "temperature": 0,
        "max_tokens": 3,
        "messages": [{"role": "user", "content": JUDGE_PROMPT.format(q=question, a=gold, p=prediction)}],
    }
    req = urllib.request.Request(
        url.rstrip("/") + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = json.loads(resp.read())["choices"][0]["message"]["content"]
    except Exception as exc:  # any network or format problem: the judge is optional, name it and stop
        raise MegamemError(f"LLM judge at {url} failed: {exc}") from exc
    return 1.0 if text.strip().upper().startswith("YES") else 0.0
