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
    """A 2-layer random Llama with the default model's tokenizer and a 96-token context, saved to disk (built by
    faultlib.make_tiny_model, which the long fault run uses outside pytest too)."""
    from faultlib import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


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
