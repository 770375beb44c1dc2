"""Tokenizer loading for every format, special roles, the bundle, and encode_pair's character offsets."""

from __future__ import annotations

import gzip
import json

import pytest

from cotune.align.tokenizers import (
    EncodedPair,
    TokenizerLoadError,
    adds_bos,
    encode_pair,
    load_tokenizer,
    special_token_ids,
    tokenizer_bundle_bytes,
    tokenizer_from_bundle,
    tokenizer_hash,
)
from tests.unit.alignment_fixtures import (
    HARD_TEXTS,
    forms,
    gemma3_gguf,
    smollm2_gguf,
    token_id,
    tokenizer,
    tokenizer_path,
)

ARC_LIKE = [
    "Question: Which factor will most likely cause a person to develop a fever?\nAnswer:",
    "Question: Lichens are symbiotic organisms made of green algae and fungi. What do the green algae supply?\nAnswer:",
]


def ids_of(tok, text):
    return tok.backend_tokenizer.encode(text, add_special_tokens=False).ids


# --- formats ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama2", "mistral"])
def test_sentencepiece_model_matches_sentencepiece(name):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path(name)))
    tok = tokenizer(name)
    assert len(tok.get_vocab()) == sp.get_piece_size() == 32000
    for text in HARD_TEXTS + ARC_LIKE:
        assert ids_of(tok, text) == sp.encode(text), text


def test_mistral_model_equals_its_tokenizer_json():
    a, b = tokenizer("mistral"), tokenizer("mistral-hf")
    for text in HARD_TEXTS + ARC_LIKE:
        assert a(text)["input_ids"] == b(text)["input_ids"]


def test_llama3_tiktoken_model_matches_tiktoken_and_hf():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from cotune.align.tokenizers import LLAMA3_SPLIT_REGEX

    path = tokenizer_path("llama3")
    enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_SPLIT_REGEX, mergeable_ranks=load_tiktoken_bpe(str(path)),
                            special_tokens={})
    tok = tokenizer("llama3")
    assert len(tok.get_vocab()) == 128256
    assert special_token_ids(tok) == {"bos": 128000, "eos": 128001, "pad": 128004}
    for text in HARD_TEXTS + ARC_LIKE:
        assert ids_of(tok, text) == enc.encode(text)
        assert tok(text)["input_ids"] == tokenizer("llama3-hf")(text)["input_ids"]


def test_gpt2_vocab_and_merges():
    tok = tokenizer("gpt2")
    assert len(tok.get_vocab()) == 50257
    assert ids_of(tok, "Hello world\n") == [15496, 995, 198]
    assert special_token_ids(tok) == {"bos": 50256, "eos": 50256}
    assert not adds_bos(tok)


def test_hf_directory(tmp_path):
    src = tokenizer_path("phi2")
    (tmp_path / "tokenizer.json").write_bytes(src.read_bytes())
    (tmp_path / "tokenizer_config.json").write_bytes((src.parent / "tokenizer_config.json").read_bytes())
    tok = load_tokenizer(tmp_path)
    assert tokenizer_hash(tok) == tokenizer_hash(tokenizer("phi2"))


def test_gguf_smollm2():
    tok = load_tokenizer(smollm2_gguf())
    assert len(tok.get_vocab()) == 49152
    assert special_token_ids(tok) == {"bos": 1, "eos": 2, "pad": 2, "unk": 0}
    assert not adds_bos(tok)  # the GGUF says add_bos_token = false
    assert tok.backend_tokenizer.encode("x 12345", add_special_tokens=False).tokens[-5:] == list("12345")


def test_gguf_gemma3_matches_tokenizer_json():
    gg = load_tokenizer(gemma3_gguf())
    hf = tokenizer("gemma3")
    assert special_token_ids(gg) == {"bos": 2, "eos": 1, "pad": 0, "unk": 3}
    assert adds_bos(gg)
    for text in HARD_TEXTS + ARC_LIKE:
        assert gg(text)["input_ids"] == hf(text)["input_ids"]


# --- roles -----------------------------------------------------------------------------------------------------


def test_roles_follow_config_and_never_guess_text_tokens():
    # Qwen3's config says bos/unk are null; '<s>' and '<unk>' are ordinary text tokens in its vocabulary
    qwen = tokenizer("qwen3")
    assert special_token_ids(qwen) == {"eos": 151645, "pad": 151643}
    assert special_token_ids(tokenizer("llama2")) == {"bos": 1, "eos": 2, "unk": 0}
    assert special_token_ids(tokenizer("gemma3")) == {"bos": 2, "eos": 106, "pad": 0, "unk": 3}
    assert special_token_ids(tokenizer("neox")) == {"bos": 0, "eos": 0, "pad": 1}


def test_bos_decision():
    assert adds_bos(tokenizer("llama2")) and adds_bos(tokenizer("gemma3")) and adds_bos(tokenizer("llama3"))
    assert not adds_bos(tokenizer("qwen3")) and not adds_bos(tokenizer("phi3"))  # phi-3 config: add_bos_token false


# --- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("tokenizer.json", b"", "empty"),
        ("tokenizer.json", b"{not json", "does not parse"),
        ("tokenizer.json", json.dumps({"hello": "world"}).encode(), "neither a tokenizer.json"),
        ("tokenizer.json", json.dumps({"model": {"type": "Nope"}}).encode(), "not a valid tokenizer.json"),
        ("tokenizer.json.gz", b"\x1f\x8b\x08\x00garbage", "gzip"),
        ("tokenizer.model", b"\x00\x01\x02garbage bytes that are no protobuf", "SentencePiece"),
        ("tokenizer.model", b"aGVsbG8= 0\nd29ybGQ= 5\n", "permutation"),
        ("weights.bin", b"\x13\x37" * 50, "unrecognised tokenizer file"),
    ],
)
def test_unreadable_files_raise_clear_errors(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TokenizerLoadError) as info:
        load_tokenizer(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value) or name in str(info.value)


def test_missing_path_and_missing_merges(tmp_path):
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(TokenizerLoadError, match="no merges file"):
        load_tokenizer(vocab)


def test_truncated_gzip_tokenizer_json(tmp_path):
    data = gzip.compress(tokenizer_path("phi2").read_bytes())
    path = tmp_path / "tokenizer.json.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenizerLoadError):
        load_tokenizer(path)


# --- bundle ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama2", "gpt2", "phi3"])
def test_bundle_round_trip(name):
    from cotune.align.normalize import control_mask, normalized_forms

    tok = tokenizer(name)
    again = tokenizer_from_bundle(tokenizer_bundle_bytes(tok))
    assert tokenizer_hash(again) == tokenizer_hash(tok)
    assert special_token_ids(again) == special_token_ids(tok)
    assert normalized_forms(again) == forms(name)
    assert (control_mask(again) == control_mask(tok)).all()
    for text in HARD_TEXTS:
        assert encode_pair(again, text[:9], text[9:]) == encode_pair(tok, text[:9], text[9:])


def test_bundle_errors():
    with pytest.raises(TokenizerLoadError, match="not valid JSON"):
        tokenizer_from_bundle(b"\xff\xfe")
    with pytest.raises(TokenizerLoadError, match="format"):
        tokenizer_from_bundle(b'{"format": "other"}')


# --- encode_pair -----------------------------------------------------------------------------------------------


def _check_ends(name, text, split):
    """Every token's end offset is where its bytes end in the text (the end of the character for a piece
    inside a character), ends never decrease, and response_start is the first token ending in the response."""
    tok = tokenizer(name)
    f = forms(name)
    enc = encode_pair(tok, text[:split], text[split:])
    first = 1 if adds_bos(tok) else 0
    ids, ends = enc.ids[first:], enc.ends[first:]
    assert list(ends) == sorted(ends) and ends[-1] == len(text)
    data = text.encode()
    joined = b"".join(f[i] for i in ids)
    skip = len(joined) - len(data)  # SentencePiece's dummy-prefix space
    assert skip in (0, 1) and joined[skip:] == data
    cum = -skip
    for i, token in enumerate(ids):
        cum += len(f[token])
        shared_with_next = i + 1 < len(ends) and ends[i + 1] == ends[i]
        if not shared_with_next and cum > 0:
            assert text[: ends[i]].encode() == data[:cum], (name, text, i)
    assert enc.response_start == next((i for i, e in enumerate(enc.ends) if e > split), len(enc.ids))
    assert enc.response_bytes == len(text[split:].encode())


@pytest.mark.parametrize("name", ["llama2", "gpt2", "gemma3", "llama3", "mistral-hf", "phi3"])
@pytest.mark.parametrize("text", HARD_TEXTS)
def test_encode_pair_ends(name, text):
    _check_ends(name, text, len(text) // 2)


def test_encode_pair_sentencepiece_leading_spaces_and_bytes():
    tok = tokenizer("llama2")
    enc = encode_pair(tok, "Q:", " 😀\n")
    assert enc.ids[0] == 1  # bos
    # '▁' then the emoji as four byte-fallback pieces, all ending at the emoji's end, then '<0x0A>'
    pieces = [tok.convert_ids_to_tokens(i) for i in enc.ids]
    assert pieces[-5:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "<0x0A>"]
    assert enc.ends[-5:] == (4, 4, 4, 4, 5)
    assert isinstance(enc, EncodedPair) and enc.target_positions == range(enc.response_start - 1, len(enc.ids) - 1)


@pytest.mark.parametrize("name", ["llama2", "gpt2", "gemma3"])
def test_encode_pairs_batch_equals_single(name):
    from cotune.align.tokenizers import encode_pairs

    tok = tokenizer(name)
    samples = [(t[:7], t[7:]) for t in HARD_TEXTS] + [(p, " yes") for p in ARC_LIKE]
    assert encode_pairs(tok, samples, 24) == [encode_pair(tok, p, r, 24) for p, r in samples]


def test_encode_pair_truncation_keeps_response():
    tok = tokenizer("gpt2")
    enc = encode_pair(tok, "word " * 300, "the answer", max_length=64)
    assert len(enc.ids) == 64
    assert tok.decode(enc.ids[enc.response_start :]) == " answer" or "answer" in tok.decode(enc.ids[enc.response_start - 1 :])


def test_token_ids_helper_sanity():
    assert token_id(tokenizer("gpt2"), "Ċ") == 198
