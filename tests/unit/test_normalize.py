"""Normalization of tokens to raw bytes, per tokenizer family, read from the tokenizer's own pipeline."""

from __future__ import annotations

import pytest

from cotune.align.normalize import (
    control_mask,
    normalized_forms,
    special_roles,
    tokenizer_family,
)
from tests.unit.alignment_fixtures import (
    HARD_TEXTS,
    forms,
    smollm2_gguf,
    token_id,
    tokenizer,
)


def test_byte_level_gpt2():
    tok, f = tokenizer("gpt2"), forms("gpt2")
    assert len(f) == 50257 and all(f)
    assert f[token_id(tok, "Ġ")] == b" "
    assert f[token_id(tok, "Ċ")] == b"\n"
    assert f[token_id(tok, "ĉ")] == b"\t"
    assert f[token_id(tok, "Ġthe")] == b" the"
    emoji = tok.backend_tokenizer.encode(" 😀", add_special_tokens=False).ids
    assert len(emoji) > 1 and b"".join(f[i] for i in emoji) == " 😀".encode()
    assert tokenizer_family(tok) == "byte-level-bpe"


def test_sentencepiece_llama2():
    tok, f = tokenizer("llama2"), forms("llama2")
    assert f[token_id(tok, "<0x0A>")] == b"\n"
    assert f[token_id(tok, "<0x09>")] == b"\t"
    assert f[token_id(tok, "<0xF0>")] == b"\xf0"
    assert f[token_id(tok, "▁the")] == b" the"
    assert f[token_id(tok, "▁▁")] == b"  "
    assert f[token_id(tok, "你")] == "你".encode()
    mask = control_mask(tok)
    assert mask[[0, 1, 2]].all() and mask.sum() == 3
    assert special_roles(tok) == {"bos": 1, "eos": 2, "unk": 0}
    assert tokenizer_family(tok) == "sentencepiece-bpe+byte-fallback"


def test_sentencepiece_gemma3():
    tok, f = tokenizer("gemma3"), forms("gemma3")
    assert len(f) == 262145
    assert f[token_id(tok, "\n")] == f[token_id(tok, "<0x0A>")] == b"\n"
    assert f[token_id(tok, "\t")] == b"\t"
    # whitespace runs are both model tokens and (non-special) added tokens: read as model tokens
    assert f[token_id(tok, "▁▁")] == b"  "
    assert f[token_id(tok, "😀")] == "😀".encode()
    assert special_roles(tok) == {"bos": 2, "eos": 106, "pad": 0, "unk": 3}
    assert control_mask(tok)[[0, 1, 2, 3, 105, 106]].all()


@pytest.mark.parametrize("name", ["gpt2", "llama2", "gemma3", "llama3", "qwen3", "phi2", "phi3", "falcon", "neox",
                                  "roberta", "mistral-hf"])
def test_tokens_concatenate_to_the_text(name):
    tok, f = tokenizer(name), forms(name)
    for text in HARD_TEXTS:
        ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
        joined = b"".join(f[i] for i in ids)
        data = text.encode()
        assert joined == data or (joined[:1] == b" " and joined[1:] == data), (name, text, joined)


def test_families():
    assert tokenizer_family(tokenizer("llama3")) == "byte-level-bpe"
    assert tokenizer_family(tokenizer("gemma3")) == "sentencepiece-bpe+byte-fallback"
    assert tokenizer_family(tokenizer("phi3")) == "sentencepiece-bpe+byte-fallback"
    assert tokenizer_family(tokenizer("qwen3")) == "byte-level-bpe"


def test_special_tokens_flagged_not_text():
    tok = tokenizer("llama3")
    mask = control_mask(tok)
    assert mask[128000:].all() and not mask[:128000].any()
    assert forms("llama3")[128000] == b"<|begin_of_text|>"


def test_smollm2_gguf_forms():
    from cotune.align.tokenizers import load_tokenizer

    tok = load_tokenizer(smollm2_gguf())
    f = normalized_forms(tok)
    assert len(f) == 49152 and tokenizer_family(tok) == "byte-level-bpe"
    assert f[token_id(tok, "Ċ")] == b"\n"
    assert control_mask(tok)[:17].all()
