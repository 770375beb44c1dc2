"""Tiny random-init causal LMs with real tokenizers, for tests and the 'tiny' preset."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "gpt2", "gemma3")


def _special_id(tokenizer, role: str, fallback: int | None) -> int | None:
    value = getattr(tokenizer, f"{role}_token_id", None)
    return int(value) if value is not None else fallback


def _config(tokenizer, arch: str, hidden: int, layers: int, heads: int):
    vocab = len(tokenizer)
    eos = _special_id(tokenizer, "eos", 0)
    bos = _special_id(tokenizer, "bos", eos)
    pad = _special_id(tokenizer, "pad", eos)
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=2048,
            tie_word_embeddings=True,  # like SmolLM2
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=2048,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=1,
            head_dim=hidden // heads,
            query_pre_attn_scalar=hidden // heads,
            max_position_embeddings=2048,
            sliding_window=64,
            tie_word_embeddings=True,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    raise ValueError(f"unknown tiny arch {arch!r}: expected one of {ARCHS}")


def make_tiny_model(
    tokenizer,
    out_dir: Path,
    *,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write a random-init HF causal LM directory (config, model.safetensors, tokenizer) with vocab = len(tokenizer).

    The same (tokenizer, arch, sizes, seed) always gives the same weights; the global RNG is left untouched.
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    config = _config(tokenizer, arch, hidden, layers, heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
