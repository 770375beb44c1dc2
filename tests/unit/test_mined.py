"""Exact MinED vocabulary maps: equal to the exhaustive search, deterministic across processes, the hard cases,
special tokens by role, and the VocabMap blob."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cotune.align import mined
from cotune.align.mined import (
    agreement_sample,
    build_vocab_map,
    exhaustive_nearest,
    map_forms,
    target_preference,
)
from cotune.align.normalize import byte_fallback_mask, control_mask
from cotune.align.vocabmap import ALGORITHM_VERSION, VocabMap
from tests.unit.alignment_fixtures import forms, token_id, tokenizer, tokenizer_path

REPO = Path(__file__).resolve().parents[2]


# --- the reference and its tie-break ---------------------------------------------------------------------------


def test_exhaustive_tie_break():
    dst = [b"abd", b"abc", b"", b"abc", b"xyz", b"ab"]
    # distance 1 to 'abd', 'abc' (ids 1 and 3) and 'ab': the smallest bytes win ('ab' < 'abc' < 'abd')
    assert exhaustive_nearest(b"abe", dst) == (5, 1)
    assert exhaustive_nearest(b"abc", dst) == (1, 0)  # equal forms: the smallest id
    assert exhaustive_nearest(b"", dst) == (5, 2)  # empty target forms (holes) are never candidates
    assert exhaustive_nearest(b"q", dst, candidates=[False, False, False, False, True, False]) == (4, 3)


def test_distance_counts_bytes_not_characters():
    # 'é' is two bytes: one substituted character is two byte edits
    assert exhaustive_nearest("é".encode(), [b"e", "è".encode()]) == (1, 1)  # c3 a9 vs c3 a8
    assert exhaustive_nearest("é".encode(), [b"e"]) == (0, 2)


# --- equal to exhaustive on random vocabularies ----------------------------------------------------------------

_form = st.binary(min_size=0, max_size=14).map(lambda b: bytes(x % 7 + (0x61 if x % 3 else 0xE4) for x in b))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(src=st.lists(_form, min_size=1, max_size=60), dst=st.lists(_form, min_size=1, max_size=80))
def test_map_forms_equals_exhaustive(src, dst):
    if not any(dst):
        dst = dst + [b"a"]
    ids, dist = map_forms(src, dst, workers=1)
    for i, f in enumerate(src):
        assert (int(ids[i]), int(dist[i])) == exhaustive_nearest(f, dst), (f, dst)


@pytest.mark.parametrize("advantage, chunk", [(0, 4096), (10**9, 4096), (10**9, 3)])
def test_search_paths_agree(monkeypatch, advantage, chunk):
    """Pigeonhole path everywhere it is feasible, or the ring scan everywhere (in big or tiny chunks): same answers."""
    monkeypatch.setattr(mined, "RING_CHUNK", chunk)
    rng = random.Random(7)
    alphabet = b"abcde \n" + "é你".encode()
    dst = sorted({bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(400)})
    src = [bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(300)]
    monkeypatch.setattr(mined, "PIGEONHOLE_ADVANTAGE", advantage)
    ids, dist = map_forms(src, dst, workers=1)
    want = mined.exhaustive_nearest_many(src, dst)
    assert [(int(a), int(b)) for a, b in zip(ids, dist)] == want


# --- special tokens --------------------------------------------------------------------------------------------


def test_roles_and_fallbacks():
    src = [b"<s>", b"</s>", b"<pad>", b"<unk>", b"<ctl>", b"hello"]
    src_control = np.array([1, 1, 1, 1, 1, 0], bool)
    src_roles = {"bos": 0, "eos": 1, "pad": 2, "unk": 3}
    dst = [b"<|endoftext|>", b"hello", b"<ctl>", b"<unk>"]
    dst_control = np.array([1, 0, 1, 1], bool)
    ids, dist = map_forms(src, dst, src_control=src_control, dst_control=dst_control, src_roles=src_roles,
                          dst_roles={"eos": 0, "unk": 3})
    # bos -> eos (dst has no bos), eos -> eos, pad -> eos (no pad), unk -> unk, <ctl> by spelling, text by MinED
    assert ids.tolist() == [0, 0, 0, 3, 2, 1]
    assert dist[4] == 0 and dist[5] == 0


def test_equal_forms_prefer_the_lowest_rank_then_the_smallest_id():
    """Receiver ids sharing a byte form (a SentencePiece byte-fallback piece and the real piece): the rank decides,
    not the id; the exhaustive reference breaks ties the same way."""
    dst = [b".", b"a", b".", b"ab", b"ab"]
    rank = np.array([2, 1, 0, 1, 1], np.int8)  # id 0: the byte-fallback '<0x2E>', id 2: the real '.'
    ids, dist = map_forms([b".", b",", b"ab", b"abc"], dst, dst_rank=rank, workers=1)
    assert ids.tolist() == [2, 2, 3, 3] and dist.tolist() == [0, 1, 0, 1]
    for f, want in zip([b".", b",", b"ab", b"abc"], ids.tolist()):
        assert exhaustive_nearest(f, dst, rank=rank)[0] == want
    assert map_forms([b"."], dst, workers=1)[0].tolist() == [0]  # without ranks: the smallest id, as before


def test_control_tokens_are_never_text_targets():
    src = [b"<s>x", b"hello"]
    dst = [b"<s>", b"<s>x", b"hell"]
    ids, _ = map_forms(src, dst, dst_control=np.array([1, 1, 0], bool), dst_roles={"bos": 0})
    assert ids.tolist() == [2, 2]


# --- real tokenizer pairs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama2_to_gpt2():
    return build_vocab_map(tokenizer("llama2"), tokenizer("gpt2"))


@pytest.fixture(scope="module")
def gpt2_to_mistral():
    return build_vocab_map(tokenizer("gpt2"), tokenizer("mistral-hf"))


def _agreement(src_name, dst_name, vmap, n=400, seed=0):
    src_tok, dst_tok = tokenizer(src_name), tokenizer(dst_name)
    sample = random.Random(seed).sample(range(len(forms(src_name))), n)
    return agreement_sample(forms(src_name), forms(dst_name), vmap.ids, vmap.distance, sample,
                            src_control=control_mask(src_tok), dst_control=control_mask(dst_tok),
                            dst_rank=target_preference(dst_tok))


def test_agreement_llama2_to_gpt2(llama2_to_gpt2):
    assert _agreement("llama2", "gpt2", llama2_to_gpt2) == []


def test_agreement_gpt2_to_mistral(gpt2_to_mistral):
    assert _agreement("gpt2", "mistral-hf", gpt2_to_mistral) == []


def test_hard_cases_llama2_to_gpt2(llama2_to_gpt2):
    src, dst = tokenizer("llama2"), tokenizer("gpt2")
    m = dict(zip(range(len(llama2_to_gpt2.ids)), zip(llama2_to_gpt2.ids.tolist(), llama2_to_gpt2.distance.tolist())))

    def maps(a, b, d=0):
        assert m[token_id(src, a)] == (token_id(dst, b), d), (a, m[token_id(src, a)])

    maps("<0x0A>", "Ċ")  # newline byte token -> newline
    maps("<0x09>", "ĉ")  # tab
    maps("▁the", "Ġthe")  # leading space
    maps("<0xF0>", "ð")  # first byte of an emoji -> the same byte
    maps("▁▁", "Ġ", 1)  # two spaces: GPT-2 has no two-space token
    from rapidfuzz.distance import Levenshtein

    maps("<s>", "<|endoftext|>", Levenshtein.distance("<s>", "<|endoftext|>"))  # bos by role (GPT-2 bos)
    maps("</s>", "<|endoftext|>", Levenshtein.distance("</s>", "<|endoftext|>"))  # eos by role
    assert m[token_id(src, "<unk>")][0] == token_id(dst, "<|endoftext|>")  # unk -> no unk/pad in GPT-2 -> eos
    cjk = token_id(src, "你")
    f_src, f_dst = forms("llama2"), forms("gpt2")
    assert m[cjk] == exhaustive_nearest(f_src[cjk], f_dst, candidates=~control_mask(dst))


def test_hard_cases_gpt2_to_mistral(gpt2_to_mistral):
    src, dst = tokenizer("gpt2"), tokenizer("mistral-hf")
    ids = gpt2_to_mistral.ids
    assert ids[token_id(src, "Ċ")] == token_id(dst, "<0x0A>")
    assert ids[token_id(src, "Ġthe")] == token_id(dst, "▁the")
    assert ids[token_id(src, "<|endoftext|>")] == 2  # GPT-2's eos -> '</s>'
    assert gpt2_to_mistral.distance[token_id(src, "ĉ")] == 0


@pytest.fixture(scope="module")
def gpt2_to_llama2():
    return build_vocab_map(tokenizer("gpt2"), tokenizer("llama2"))


@pytest.mark.parametrize("dst_name", ["llama2", "mistral-hf"])
def test_gpt2_text_maps_to_real_pieces_not_byte_fallback(dst_name, gpt2_to_llama2, gpt2_to_mistral):
    """Equal byte forms: the piece the receiver itself produces beats its '<0xNN>' byte-fallback twin (which it
    never emits for that text); a byte-fallback id is a target only when no other receiver token has that form."""
    vmap = gpt2_to_llama2 if dst_name == "llama2" else gpt2_to_mistral
    src, dst = tokenizer("gpt2"), tokenizer(dst_name)
    for a, b in [(".", "."), (",", ","), (":", ":"), ("A", "A"), ("1", "1"), ("Ġ", "▁"), ("!", "!")]:
        got = int(vmap.ids[token_id(src, a)])
        assert got == token_id(dst, b), (a, dst.convert_ids_to_tokens(got))
        assert vmap.distance[token_id(src, a)] == 0
    fallback = byte_fallback_mask(dst)
    text_ids = ~control_mask(dst)
    f_dst = forms(dst_name)
    shared = {f for f in f_dst if f} & {f_dst[i] for i in np.flatnonzero(text_ids & ~fallback)}
    hits = np.flatnonzero(fallback[vmap.ids])
    assert all(f_dst[vmap.ids[i]] not in shared for i in hits)  # only forms no real piece has ('\n', high bytes)
    print(f"\nGPT-2 -> {dst_name}: {len(hits)} of {len(vmap.ids)} sender ids map to a byte-fallback id")
    assert len(hits) < 400  # 2,113 when the smallest id won


def test_target_preference_ranks():
    tok = tokenizer("llama2")
    rank = target_preference(tok)
    assert rank[token_id(tok, ".")] == 0 and rank[token_id(tok, "<0x2E>")] == 2
    assert rank[token_id(tok, "▁")] == 0 and rank[token_id(tok, "<0x20>")] == 2
    assert rank[token_id(tok, "<0x0A>")] == 2  # no other piece is a newline: still the only target for it
    assert byte_fallback_mask(tok).sum() == 256 and not byte_fallback_mask(tokenizer("gpt2")).any()


def test_map_is_keyed_by_content_hashes(llama2_to_gpt2):
    from cotune.align.tokenizers import tokenizer_hash

    assert llama2_to_gpt2.src_hash == tokenizer_hash(tokenizer("llama2"))
    assert llama2_to_gpt2.dst_hash == tokenizer_hash(tokenizer("gpt2"))
    assert llama2_to_gpt2.version == ALGORITHM_VERSION
    assert llama2_to_gpt2.ids.dtype == np.int32 and llama2_to_gpt2.ids.shape == (32000,)


def test_byte_identical_across_processes(llama2_to_gpt2):
    code = (
        "import hashlib, sys\n"
        "from cotune.align.tokenizers import load_tokenizer\n"
        "from cotune.align.mined import build_vocab_map\n"
        "m = build_vocab_map(load_tokenizer(sys.argv[1]), load_tokenizer(sys.argv[2]), workers=2)\n"
        "print(hashlib.sha256(m.to_bytes()).hexdigest())\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")  # a different hash seed than this process
    out = subprocess.run([sys.executable, "-c", code, str(tokenizer_path("llama2")), str(tokenizer_path("gpt2"))],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == hashlib.sha256(llama2_to_gpt2.to_bytes()).hexdigest()


# --- the blob --------------------------------------------------------------------------------------------------


def _vm(**kw):
    base = {"ids": np.array([3, 1, 2], np.int32), "distance": np.array([0, 1, 2], np.int32), "src_hash": "a" * 64,
                "dst_hash": "b" * 64}
    base.update(kw)
    return VocabMap(**base)


def test_vocab_map_round_trip_and_determinism():
    vm = _vm()
    data = vm.to_bytes()
    assert len({vm.to_bytes() for _ in range(10)}) == 1
    again = VocabMap.from_bytes(data)
    assert again == vm and again.version == ALGORITHM_VERSION
    from safetensors.numpy import load

    assert set(load(data)) == {"ids", "distance"}


@pytest.mark.parametrize(
    "data, needle",
    [
        (b"", "not a safetensors blob"),
        (b"\xff" * 16, "header length"),
        (b"\x08\x00\x00\x00\x00\x00\x00\x00notjson!", "bad header"),
    ],
)
def test_vocab_map_rejects_garbage(data, needle):
    with pytest.raises(ValueError, match=needle):
        VocabMap.from_bytes(data)


def test_vocab_map_rejects_bad_content():
    from cotune.wire.safetensors_io import dumps

    meta = {"src_hash": "a" * 64, "dst_hash": "b" * 64, "version": ALGORITHM_VERSION}
    with pytest.raises(ValueError, match="int32"):
        VocabMap.from_bytes(dumps({"ids": np.zeros(3, np.int64), "distance": np.zeros(3, np.int32)}, meta))
    with pytest.raises(ValueError, match="exactly tensors"):
        VocabMap.from_bytes(dumps({"ids": np.zeros(3, np.int32)}, meta))
    with pytest.raises(ValueError, match="lacks"):
        VocabMap.from_bytes(dumps({"ids": np.zeros(3, np.int32), "distance": np.zeros(3, np.int32)}, {"version": "x"}))
    with pytest.raises(ValueError, match="differ in length"):
        VocabMap.from_bytes(dumps({"ids": np.zeros(3, np.int32), "distance": np.zeros(2, np.int32)}, meta))
    with pytest.raises(ValueError, match="negative"):
        _vm(ids=np.array([-1, 0, 0], np.int32))
    with pytest.raises(ValueError, match="sha256"):
        _vm(src_hash="not-a-hash")
    with pytest.raises(ValueError, match="dst vocabulary"):
        _vm().check_dst_size(3)
