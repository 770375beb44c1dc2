"""Top-k projection into another vocabulary: duplicates sum, missing mass kept, bad ids dropped, vectorized."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cotune.align.projection import project_topk
from cotune.align.vocabmap import VocabMap


def as_dicts(ids, probs):
    rows = []
    for r in range(ids.shape[0]):
        d = {}
        for i, p in zip(ids[r].tolist(), probs[r].tolist()):
            if p > 0:
                d[i] = d.get(i, 0.0) + p
        rows.append(d)
    return rows


def reference(ids, probs, table):
    """The definition, one token at a time."""
    out, missing = [], []
    for row_ids, row_p in zip(ids.tolist(), probs.tolist()):
        missing.append(min(max(1.0 - sum(row_p), 0.0), 1.0))
        d = {}
        for i, p in zip(row_ids, row_p):
            if 0 <= i < len(table):
                d[int(table[i])] = d.get(int(table[i]), 0.0) + p
        total = sum(d.values())
        out.append({k: v / total for k, v in d.items() if v > 0} if total > 0 else {})
    return out, np.array(missing)


def test_duplicates_sum_and_missing_mass_is_kept():
    table = np.array([5, 5, 7, 5], np.int32)
    ids = np.array([[0, 1, 2, 3]])
    probs = np.array([[0.4, 0.2, 0.1, 0.1]], np.float32)
    out_ids, out_p, missing = project_topk(ids, probs, table)
    assert out_ids.dtype == np.int64 and out_p.dtype == np.float32 and missing.dtype == np.float32
    assert out_ids.shape == out_p.shape == (1, 4)
    assert as_dicts(out_ids, out_p)[0] == pytest.approx({5: 0.875, 7: 0.125})  # 0.7 and 0.1 of 0.8
    assert missing[0] == pytest.approx(0.2)
    # freed slots are padding
    assert sorted(zip(out_ids[0].tolist(), out_p[0].tolist()))[:2] == [(0, 0.0), (0, 0.0)]
    assert out_p.sum() == pytest.approx(1.0)


def test_out_of_range_ids_are_dropped_not_fatal():
    table = np.array([1, 2, 3], np.int32)
    ids = np.array([[0, 3, -1, 99], [7, -5, 3, 4]])
    probs = np.array([[0.5, 0.2, 0.2, 0.1], [0.5, 0.5, 0.0, 0.0]], np.float32)
    out_ids, out_p, missing = project_topk(ids, probs, table)
    assert as_dicts(out_ids, out_p)[0] == pytest.approx({1: 1.0})
    assert as_dicts(out_ids, out_p)[1] == {} and not out_ids[1].any()  # nothing survives: all padding
    assert missing.tolist() == [0.0, 0.0]


def test_accepts_a_vocab_map_and_validates_shapes():
    vm = VocabMap(ids=np.array([2, 0], np.int32), distance=np.zeros(2, np.int32), src_hash="", dst_hash="")
    out_ids, out_p, _ = project_topk(np.array([[1, 0]]), np.array([[0.25, 0.75]], np.float32), vm)
    assert as_dicts(out_ids, out_p) == [{0: 0.25, 2: 0.75}]
    with pytest.raises(ValueError, match=r"\[n, k\]"):
        project_topk(np.zeros((2, 3), int), np.zeros((2, 4), np.float32), vm)
    empty = project_topk(np.zeros((0, 8), int), np.zeros((0, 8), np.float32), vm)
    assert [a.shape for a in empty] == [(0, 8), (0, 8), (0,)]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 12),
    k=st.integers(1, 40),
    v_src=st.integers(1, 50),
    v_dst=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_the_definition(n, k, v_src, v_dst, seed):
    rng = np.random.default_rng(seed)
    table = rng.integers(0, v_dst, v_src).astype(np.int32)
    ids = rng.integers(-2, v_src + 2, (n, k))
    probs = rng.random((n, k)).astype(np.float32)
    probs /= probs.sum(axis=1, keepdims=True) * rng.uniform(1.0, 1.5)
    probs[rng.random((n, k)) < 0.2] = 0
    out_ids, out_p, missing = project_topk(ids, probs, table)
    want, want_missing = reference(ids, probs, table)
    got = as_dicts(out_ids, out_p)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        assert g == pytest.approx(w, abs=1e-6)
    assert np.allclose(missing, want_missing, atol=1e-6)
    for row_ids, row_p in zip(out_ids, out_p):  # ids are distinct among the non-padding slots
        real = row_ids[row_p > 0]
        assert len(set(real.tolist())) == len(real)


def test_large_batch_is_vectorized():
    rng = np.random.default_rng(0)
    table = rng.integers(0, 49152, 262144).astype(np.int32)
    ids = rng.integers(0, 262144, (50_000, 32))
    probs = np.full((50_000, 32), 1 / 40, np.float32)
    _, out_p, missing = project_topk(ids, probs, table)
    assert np.allclose(out_p.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(missing, 1 - 32 / 40, atol=1e-6)
