"""Shared fixtures: a tiny random Llama (fast, for mechanics) and the real default model (slow tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The default model's cached safetensors folder (dequantized on first use)."""
    from megamem.model import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tok(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tok) -> Path:
    """A 2-layer random Llama with the default model's tokenizer and a 96-token context, saved to disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny(tiny_dir):
    """A fresh copy of the tiny model and its tokenizer."""
    from megamem.model import load_model

    return load_model(str(tiny_dir))


def state_hash(model: torch.nn.Module) -> dict[str, int]:
    """A hash of every base tensor, by its name with the gated wrapper's '.base' removed."""
    import hashlib

    out = {}
    for name, t in model.state_dict().items():
        out[name.replace(".base.", ".")] = hashlib.sha256(t.detach().cpu().numpy().tobytes()).hexdigest()
    return out
