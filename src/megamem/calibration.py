"""The null memory's score: where the gate stops routing a question to any memory.

A store's null score is read off its own keys: the calibration queries (data/null_queries.txt, 420
questions, requests and chit-chat about nothing a store holds, written for this and used for no
evaluation) are scored against every stored memory, and the null score is the value that their best
scores exceed only `null_rate` of the time (the (1 - null_rate) quantile). So it is in the key function's
own units (cosine or dot, any embedder, any model's activations), and it rises as a store grows and a
random query's best match gets closer. docs/tuning.md ("no memory") has the measurements behind it.

    >>> best = torch.tensor([0.1, 0.2, 0.3, 0.9])
    >>> round(null_score(best, 0.25), 2)   # the 75th percentile: one query in four passes
    0.45
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .keys import compute_keys
from .model import cache_root

QUERIES_FILE = "data/null_queries.txt"


@lru_cache(maxsize=1)
def calibration_queries() -> tuple[str, ...]:
    """The shipped calibration queries, one a line."""
    text = resources.files("megamem").joinpath(QUERIES_FILE).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _cache_file(key_function: str, model_name: str) -> Path:
    """Where the calibration keys of a key function (and, for activation keys, its model) are cached."""
    h = hashlib.sha256(
        "\n".join([key_function, model_name if key_function == "activation" else "", *calibration_queries()]).encode()
    )
    return cache_root() / "calibration" / f"{key_function}-{h.hexdigest()[:16]}.safetensors"


_KEYS: dict[Path, torch.Tensor] = {}


def calibration_keys(key_function: str, model_name: str, model=None, tok=None) -> torch.Tensor:
    """(n_queries, dim) keys of the calibration queries, computed once and cached on disk (a derived file:
    megamem's cache folder, not the store, so a read never writes to the store)."""
    path = _cache_file(key_function, model_name)
    if path in _KEYS:
        return _KEYS[path]
    keys = None
    if path.is_file():
        try:
            keys = load_file(str(path))["keys"]
        except Exception:  # a damaged cache file is recomputed
            keys = None
    if keys is None or keys.shape[0] != len(calibration_queries()):
        keys = compute_keys(key_function, list(calibration_queries()), model, tok).float()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{id(keys)}")
            save_file({"keys": keys.contiguous()}, str(tmp))
            tmp.replace(path)
        except OSError:
            pass  # an unwritable cache only costs recomputing
    _KEYS[path] = keys
    return keys


def null_score(best: torch.Tensor, null_rate: float) -> float:
    """The score that the calibration queries' best scores (`best`, one per query) exceed `null_rate` of the time."""
    return float(torch.quantile(best.float(), 1.0 - null_rate))


def best_scores(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """(n_queries,) each calibration query's best score over the key rows; both already prepared for the
    similarity (normalised for cosine). Sliced, so memory stays bounded at any store size."""
    best = torch.full((queries.shape[0],), float("-inf"))
    for start in range(0, keys.shape[0], chunk):
        best = torch.maximum(best, (queries @ keys[start : start + chunk].T).max(dim=1).values)
    return best


def store_null_score(calibration: torch.Tensor, keys: torch.Tensor, similarity: str, null_rate: float) -> float:
    """The null score of a store whose key rows are `keys` (n, dim), from raw calibration keys: what
    Memory.null_score computes, for callers that hold keys without a store (the bench)."""
    import torch.nn.functional as F

    if similarity == "cosine":
        calibration, keys = F.normalize(calibration.float(), dim=-1), F.normalize(keys.float(), dim=-1)
    return null_score(best_scores(calibration.float(), keys.float()), null_rate)
