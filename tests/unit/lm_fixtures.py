"""What the model-runtime tests share: the real tokenizer they use, its skip mark, a cached model loader and toy examples."""

from __future__ import annotations

from pathlib import Path

import pytest

from cotune.data import shared_data_dir
from cotune.lm.model import load_causal_lm

SHARED = shared_data_dir() or Path("shared-data-not-found")
TOKENIZER = SHARED / "tokenizers" / "phi-2" / "tokenizer.json"
needs_tokenizer = pytest.mark.skipif(not TOKENIZER.exists(), reason=f"shared tokenizer data not found at {TOKENIZER}")

_TOKENIZERS: dict = {}


@pytest.fixture(scope="module")
def one_thread():
    """Models this small gain nothing from a second thread, and lose a lot when the cores are busy. A module makes it
    autouse with `pytestmark = pytest.mark.usefixtures("one_thread")` after importing it."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_cached(model_dir):
    """load_causal_lm semantics, with the (slow to parse) tokenizer loaded once per directory."""
    from transformers import AutoModelForCausalLM

    key = str(model_dir)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_causal_lm(model_dir, device="cpu")[1]
    return AutoModelForCausalLM.from_pretrained(key).eval(), _TOKENIZERS[key]


def toy_examples(n: int):
    """n short (prompt, response) examples a tiny model can fit."""
    from cotune.data.example import Example

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return [Example(prompt=f"Q: name {i} is", response=f" {words[i % 8]} {words[(i + 3) % 8]}.") for i in range(n)]
