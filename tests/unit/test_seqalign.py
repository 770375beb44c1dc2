"""Sequence alignment by character offsets (and DTW for comparison) and the SequenceAlignment blob."""

from __future__ import annotations

import numpy as np
import pytest

from cotune.align.seqalign import SequenceAlignment, align_pair, align_public_set, dtw_path
from cotune.align.tokenizers import EncodedPair, encode_pair
from tests.unit.alignment_fixtures import forms, tokenizer


def pair(ends, response_start):
    return EncodedPair(ids=tuple(range(len(ends))), ends=tuple(ends), response_start=response_start, response_bytes=1)


def test_equal_boundaries_are_paired_between_target_positions():
    # text "ab cd" prompt "ab", response " cd"
    src = pair([0, 2, 5], response_start=2)  # bos | "ab" | " cd"
    dst = pair([1, 2, 3, 5], response_start=2)  # "a" | "b" | " c" | "d"
    sp, dp = align_pair(src, dst)
    # targets: src positions 1 (end 2); dst positions 1 (end 2), 2 (end 3). Shared end 2 only.
    assert sp.tolist() == [1] and dp.tolist() == [1]
    assert sp.dtype == np.int32 and dp.dtype == np.int32


def test_pieces_sharing_an_end_use_the_last_one():
    # an emoji as 4 byte pieces all ending at char 3; the distribution after the last piece predicts char 3
    src = pair([1, 2, 3, 3, 3, 3, 4, 5], response_start=2)
    dst = pair([1, 3, 5], response_start=1)
    sp, dp = align_pair(src, dst)
    assert list(zip(sp.tolist(), dp.tolist())) == [(5, 1)]


def test_no_shared_boundary_no_pairs_and_final_token_excluded():
    src = pair([2, 4, 6], response_start=1)
    dst = pair([1, 3, 5, 6], response_start=1)
    sp, dp = align_pair(src, dst)
    assert sp.size == 0 and dp.size == 0  # end 6 is shared but is the last token of both (no next token)


def test_pairs_before_the_response_are_not_targets():
    src = pair([1, 2, 3, 4], response_start=3)
    dst = pair([1, 2, 3, 4], response_start=3)
    sp, dp = align_pair(src, dst)
    assert sp.tolist() == [2] and dp.tolist() == [2]


ARC = [
    ("Question: Which factor will most likely cause a person to develop a fever?\nAnswer:",
     " a bacterial population in the bloodstream"),
    ("Question: What is 你好 in English? 😀\nAnswer:", " hello 👋"),
    ("Question:  two  spaces\tand a tab\nAnswer:", "  yes"),
]


@pytest.mark.parametrize("a, b", [("llama2", "gpt2"), ("gemma3", "llama3"), ("mistral-hf", "qwen3")])
def test_real_offsets_alignment_attaches_at_equal_ends(a, b):
    ta, tb = tokenizer(a), tokenizer(b)
    total = 0
    for prompt, response in ARC:
        ea, eb = encode_pair(ta, prompt, response), encode_pair(tb, prompt, response)
        sp, dp = align_pair(ea, eb)
        total += len(sp)
        for s, d in zip(sp.tolist(), dp.tolist()):
            assert ea.ends[s] == eb.ends[d]
            assert s in ea.target_positions and d in eb.target_positions
            assert s + 1 == len(ea.ends) or ea.ends[s + 1] > ea.ends[s]  # last of its end offset
            assert d + 1 == len(eb.ends) or eb.ends[d + 1] > eb.ends[d]
        # the boundary right before the response is always shared (prompt end), so the first response
        # token of both gets a target
        assert len(sp) and ea.ends[sp[0]] == len(prompt)
    assert total >= 9


def test_dtw_path_and_method():
    cost = np.array([[0, 1, 2], [1, 0, 1], [2, 1, 0]], float)
    pi, pj = dtw_path(cost)
    assert pi.tolist() == [0, 1, 2] and pj.tolist() == [0, 1, 2]
    ta, tb = tokenizer("llama2"), tokenizer("gpt2")
    prompt, response = ARC[0]
    ea, eb = encode_pair(ta, prompt, response), encode_pair(tb, prompt, response)
    sp, dp = align_pair(ea, eb, "dtw", src_forms=forms("llama2"), dst_forms=forms("gpt2"))
    assert len(sp) > 3 and len(set(dp.tolist())) == len(dp)
    assert all(s in ea.target_positions for s in sp.tolist()) and all(d in eb.target_positions for d in dp.tolist())
    sp2, _ = align_pair(ea, eb, "dtw", text=prompt + response)
    assert len(sp2) > 3
    with pytest.raises(ValueError, match="needs"):
        align_pair(ea, eb, "dtw")
    with pytest.raises(ValueError, match="unknown alignment method"):
        align_pair(ea, eb, "nope")


def test_dtw_pairs_only_the_ends_of_warped_groups():
    """A token warped onto several tokens of the other side pairs with the LAST of them only: the position whose
    next token starts where its own next token does. Text 'x lens focus' (response ' lens focus'): src 'x' | ' lens' |
    ' focus', dst 'x' | ' le' | 'ns' | ' focus'; DTW warps ' lens' onto ' le' and 'ns'. dst position 1 (' le', next
    'ns') must not take src position 1 (' lens', next ' focus'): exactly the offsets pairs remain."""
    src = EncodedPair(ids=(0, 1, 2), ends=(1, 6, 12), response_start=1, response_bytes=11)
    dst = EncodedPair(ids=(0, 1, 2, 3), ends=(1, 4, 6, 12), response_start=1, response_bytes=11)
    sp, dp = align_pair(src, dst, "dtw", src_forms=[b"x", b" lens", b" focus"],
                        dst_forms=[b"x", b" le", b"ns", b" focus"])
    want = align_pair(src, dst)
    assert list(zip(sp.tolist(), dp.tolist())) == list(zip(want[0].tolist(), want[1].tolist())) == [(0, 0), (1, 2)]


@pytest.mark.parametrize("a, b", [("gpt2", "llama2"), ("llama2", "gpt2")])
def test_real_dtw_pairs_against_offsets(a, b):
    """DTW over real tokenizations of ARC-Easy: one pair per position on both sides (no position attached to two
    distributions), and most pairs are the exact offsets pairs. What remains are DTW's own misalignments (a short
    token warped onto a similar-looking neighbour), not positions inside a warped group."""
    from cotune.align.tokenizers import encode_pairs
    from cotune.data import load_task

    samples = [(e.prompt, e.response) for e in load_task("arc_easy", "train", limit=300)]
    n = exact = 0
    for ea, eb in zip(encode_pairs(tokenizer(a), samples, 256), encode_pairs(tokenizer(b), samples, 256)):
        sp, dp = align_pair(ea, eb, "dtw", src_forms=forms(a), dst_forms=forms(b))
        assert len(set(sp.tolist())) == len(sp) and len(set(dp.tolist())) == len(dp)
        off = set(zip(*(x.tolist() for x in align_pair(ea, eb))))
        n += len(sp)
        exact += sum(p in off for p in zip(sp.tolist(), dp.tolist()))
    print(f"\nDTW {a} -> {b}: {n} pairs, {exact / n:.3f} equal to an offsets pair")
    # 0.863 both ways; 0.812 (gpt2 -> llama2) / 0.864 when each receiver position took its group's last sender
    assert exact / n > 0.85


def test_align_public_set_and_blob():
    ta, tb = tokenizer("llama2"), tokenizer("gpt2")
    seen = []
    aligned = align_public_set(ta, tb, ARC, max_length=64, public_set_hash="c" * 64,
                               progress=lambda done, total: seen.append((done, total)))
    assert aligned.num_samples == 3 and seen[-1] == (3, 3)
    for i, (prompt, response) in enumerate(ARC):
        sp, dp = aligned.pairs(i)
        want = align_pair(encode_pair(ta, prompt, response, 64), encode_pair(tb, prompt, response, 64))
        assert sp.tolist() == want[0].tolist() and dp.tolist() == want[1].tolist()
    data = aligned.to_bytes()
    assert len({aligned.to_bytes() for _ in range(5)}) == 1
    again = SequenceAlignment.from_bytes(data)
    assert again == aligned and again.method == "offsets" and again.public_set_hash == "c" * 64
    dtw = align_public_set(ta, tb, ARC, method="dtw")
    assert dtw.method == "dtw" and dtw.num_samples == 3
    with pytest.raises(IndexError):
        aligned.pairs(3)


def test_sequence_alignment_validation():
    ok = {"sample_offsets": np.array([0, 1], np.int64), "src_pos": np.array([1], np.int32),
              "dst_pos": np.array([2], np.int32), "src_hash": "", "dst_hash": "", "public_set_hash": "", "method": "offsets"}
    SequenceAlignment(**ok)
    with pytest.raises(ValueError, match="end at"):
        SequenceAlignment(**dict(ok, sample_offsets=np.array([0, 2], np.int64)))
    with pytest.raises(ValueError, match="int32"):
        SequenceAlignment(**dict(ok, src_pos=np.array([1], np.int64)))
    with pytest.raises(ValueError, match="method"):
        SequenceAlignment(**dict(ok, method="magic"))
    with pytest.raises(ValueError, match="safetensors"):
        SequenceAlignment.from_bytes(b"\x00" * 4)
    from cotune.wire.safetensors_io import dumps

    with pytest.raises(ValueError, match="format"):
        SequenceAlignment.from_bytes(dumps({"src_pos": np.zeros(1, np.int32)}, {"format": "other"}))
