"""The options beside the paper's MinED projection (docs/alignment.md, "Projection options"): the first-token map (a
teacher token goes to the first token of the receiver's own encoding of its text) and skipping aligned positions
whose next tokens cover different text, both measured against MinED on real ARC-Easy text; their blobs and their
FedMKT plumbing."""

from __future__ import annotations

import numpy as np
import pytest

from cotune.align.mined import build_vocab_map
from cotune.align.seqalign import SequenceAlignment, align_pair, align_public_set, same_span
from cotune.align.tokenizers import EncodedPair, encode_pairs
from cotune.align.vocabmap import PROJECTIONS, VocabMap
from tests.unit.alignment_fixtures import token_id, tokenizer


@pytest.fixture(scope="module")
def gpt2_to_llama2():
    return build_vocab_map(tokenizer("gpt2"), tokenizer("llama2"))


# --------------------------------------------------------------------------------------------- the first-token map


def test_first_token_map_follows_the_receivers_own_encoding(gpt2_to_llama2):
    src, dst = tokenizer("gpt2"), tokenizer("llama2")
    first, mined = gpt2_to_llama2.table("first_token"), gpt2_to_llama2.table("mined")
    assert PROJECTIONS == ("mined", "first_token") and first.dtype == np.int32 and first.shape == mined.shape
    # ' lens' is '▁l' 'ens' on Llama-2 (no '▁lens' piece): the teacher's ' lens' teaches the student's next token
    for a, b in [("Ġlens", "▁l"), ("ens", "ens"), (".", "."), ("Ġ", "▁"), ("Ġthe", "▁the"), ("Ċ", "<0x0A>")]:
        assert first[token_id(src, a)] == token_id(dst, b), (a, dst.convert_ids_to_tokens(int(first[token_id(src, a)])))
    assert mined[token_id(src, "Ġlens")] != token_id(dst, "▁l")  # MinED: the nearest whole piece
    # no text to encode (a control token; a partial UTF-8 character): MinED's answer
    for t in ("<|endoftext|>", "ðŁĺ"):
        assert first[token_id(src, t)] == mined[token_id(src, t)]


def _vm(**kw):
    base = {"ids": np.array([3, 1, 2], np.int32), "distance": np.array([0, 1, 2], np.int32),
            "first_ids": np.array([3, 0, 2], np.int32), "src_hash": "a" * 64, "dst_hash": "b" * 64}
    return VocabMap(**(base | kw))


def test_vocab_map_blob_carries_both_tables():
    vm = _vm()
    again = VocabMap.from_bytes(vm.to_bytes())
    assert again == vm
    assert again.table("first_token").tolist() == [3, 0, 2] and again.table("mined").tolist() == [3, 1, 2]
    assert again != _vm(first_ids=np.array([3, 1, 2], np.int32))
    # a map from an older service has no first-token table: it still loads, and says so when the option asks for it
    old = VocabMap.from_bytes(_vm(first_ids=None, version="mined-bytes/1").to_bytes())
    assert old.first_ids is None and old.table("mined").tolist() == [3, 1, 2]
    with pytest.raises(ValueError, match="first-token"):
        old.table("first_token")
    with pytest.raises(ValueError, match="projection"):
        vm.table("nearest")
    with pytest.raises(ValueError, match="first_ids"):
        _vm(first_ids=np.array([1, 2], np.int32))
    with pytest.raises(ValueError, match="outside the receiver"):
        _vm(first_ids=np.array([0, 9, 0], np.int32)).check_sizes(3, 4)


# --------------------------------------------------------------------------------------------- same-span pairs


def _pair(ends, response_start):
    return EncodedPair(ids=tuple(range(len(ends))), ends=tuple(ends), response_start=response_start, response_bytes=1)


def test_same_span_compares_the_next_tokens():
    # text "ab cd", response " cd". src: bos | "ab" | " c" | "d"; dst: "a" | "b" | " cd"
    src, dst = _pair([0, 2, 4, 5], 2), _pair([1, 2, 5], 2)
    sp, dp = align_pair(src, dst)
    assert list(zip(sp.tolist(), dp.tolist())) == [(1, 1)]  # both end at 'b'
    assert same_span(src, dst, sp, dp).tolist() == [False]  # next: ' c' (src) vs ' cd' (dst)
    src = _pair([0, 2, 5], 2)  # bos | "ab" | " cd"
    sp, dp = align_pair(src, dst)
    assert same_span(src, dst, sp, dp).tolist() == [True]


def test_alignment_blob_carries_same_span_and_filters_on_request():
    ta, tb = tokenizer("gpt2"), tokenizer("llama2")
    samples = [("Question: Which lens focuses light?\nAnswer:", " a convex lens"),
               ("Question: What is 2+2?\nAnswer:", " 4")]
    aligned = align_public_set(ta, tb, samples, max_length=64, public_set_hash="c" * 64)
    assert aligned.same_span is not None and aligned.same_span.dtype == np.uint8
    for i, (a, b) in enumerate(zip(encode_pairs(ta, samples, 64), encode_pairs(tb, samples, 64))):
        sp, dp = aligned.pairs(i)
        flags = same_span(a, b, sp, dp)
        kept = aligned.pairs(i, same_span_only=True)
        assert kept[0].tolist() == sp[flags].tolist() and kept[1].tolist() == dp[flags].tolist()
    assert not aligned.same_span.all()  # ' lens' vs '▁l' 'ens': a pair to skip
    again = SequenceAlignment.from_bytes(aligned.to_bytes())
    assert again == aligned and np.array_equal(again.same_span, aligned.same_span)
    old = SequenceAlignment.from_bytes(
        SequenceAlignment(**{**_fields(aligned), "same_span": None}).to_bytes())  # from an older service
    assert old.same_span is None and old.pairs(0)[0].tolist() == aligned.pairs(0)[0].tolist()
    with pytest.raises(ValueError, match="same-span"):
        old.pairs(0, same_span_only=True)
    with pytest.raises(ValueError, match="same_span"):
        SequenceAlignment(**{**_fields(aligned), "same_span": np.zeros(1, np.uint8)})


def _fields(a: SequenceAlignment) -> dict:
    return {k: getattr(a, k) for k in ("sample_offsets", "src_pos", "dst_pos", "src_hash", "dst_hash",
                                       "public_set_hash", "method", "same_span")}


# --------------------------------------------------------------------------------------------- measured on ARC


@pytest.mark.parametrize("dst_name", ["llama2", "mistral-hf"])
def test_gold_agreement_on_arc(dst_name, gpt2_to_llama2):
    """How often the projected id of the teacher's actual next token is the student's actual next token, over the
    aligned target positions of ARC-Easy train (GPT-2 teacher): MinED, the first-token map, MinED at same-span
    positions only."""
    from cotune.data import load_task

    src, dst = tokenizer("gpt2"), tokenizer(dst_name)
    vm = gpt2_to_llama2 if dst_name == "llama2" else build_vocab_map(src, dst)
    samples = [(e.prompt, e.response) for e in load_task("arc_easy", "train")]
    hits = {"mined": 0, "first_token": 0, "skip": 0}
    n = kept = 0
    for a, b in zip(encode_pairs(src, samples, 256), encode_pairs(dst, samples, 256)):
        sp, dp = align_pair(a, b)
        teacher_next = np.asarray(a.ids)[sp + 1]
        gold = np.asarray(b.ids)[dp + 1]
        same = same_span(a, b, sp, dp)
        hits["mined"] += int((vm.table("mined")[teacher_next] == gold).sum())
        hits["first_token"] += int((vm.table("first_token")[teacher_next] == gold).sum())
        hits["skip"] += int((vm.table("mined")[teacher_next] == gold)[same].sum())
        n += len(sp)
        kept += int(same.sum())
    mined, first, skip = hits["mined"] / n, hits["first_token"] / n, hits["skip"] / kept
    print(f"\nGPT-2 -> {dst_name}, {n} aligned ARC positions: gold agreement MinED {mined:.3f}, first-token "
          f"{first:.3f}, MinED at same-span positions {skip:.3f} (keeps {kept / n:.3f} of the positions)")
    assert first > 0.95 and first > mined + 0.05
    assert skip > 0.95 and 0.6 < kept / n < 0.95
