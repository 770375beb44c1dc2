"""Round trip and validation of logits shards (cotune.wire.logits_shard)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cotune.wire.logits_shard import MAX_METADATA_BYTES, decode_shard, encode_shard
from cotune.wire.topk_codec import CodecError
from cotune.wire.topk_types import SampleLogits

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
META = {"party_id": "client-1", "tokenizer_hash": "ab" * 32, "public_set_hash": "cd" * 32, "run_id": "r1", "round": "3"}


def make_samples(seed: int, n_samples: int, k: int, vocab: int, max_len: int = 40) -> list[SampleLogits]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_samples):
        n = int(rng.integers(0, max_len + 1))
        start = int(rng.integers(0, 1000))
        if rng.random() < 0.5:
            positions = np.arange(start, start + n, dtype=np.int32)  # a contiguous response span
        else:
            positions = (start + np.cumsum(rng.integers(1, 5, size=n))).astype(np.int32)
        ids = np.argsort(rng.random((n, min(vocab, 4 * k))), axis=1)[:, :k].astype(np.int32)
        ids = (ids * (vocab // min(vocab, 4 * k))).astype(np.int32)
        logits = rng.standard_normal((n, k)) * 3
        lp = logits - np.log(np.exp(logits).sum(1, keepdims=True)) + np.log(rng.uniform(0.3, 1.0, size=(n, 1)))
        lp = -np.sort(-lp, axis=1)
        out.append(SampleLogits(positions, ids, lp.astype(np.float32), float(rng.uniform(0.3, 3.0))))
    return out


def _refresh_crc(buf: bytearray) -> bytes:
    body = bytes(buf[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n_samples=st.integers(0, 12),
    k=st.integers(1, 16),
    vocab=st.sampled_from([64, 49152, 262144]),
    lossless=st.booleans(),
)
def test_round_trip(seed, n_samples, k, vocab, lossless):
    samples = make_samples(seed, n_samples, k, vocab)
    data = encode_shard(samples, vocab_size=vocab, metadata=META, lossless=lossless)
    got, meta = decode_shard(data, expected_vocab_size=vocab, max_samples=n_samples)
    assert meta == META
    assert len(got) == len(samples)
    for a, b in zip(samples, got):
        np.testing.assert_array_equal(b.positions, a.positions)
        assert b.positions.dtype == np.int32 and b.ids.dtype == np.int32 and b.logprobs.dtype == np.float32
        assert b.loss_bpb == a.loss_bpb
        assert b.missing_mass is not None and b.missing_mass.shape == (len(a.positions),)
        if lossless:
            np.testing.assert_array_equal(b.ids, a.ids)
            np.testing.assert_array_equal(b.logprobs, a.logprobs)
            np.testing.assert_array_equal(b.missing_mass, a.missing_mass)
        else:
            np.testing.assert_array_equal(np.sort(b.ids, 1), np.sort(a.ids, 1))
            np.testing.assert_allclose(b.missing_mass, a.missing_mass, atol=1e-3)
            np.testing.assert_allclose(np.exp(b.logprobs).sum(1), 1 - b.missing_mass, rtol=1e-4, atol=1e-6)


def test_contiguous_positions_cost_almost_nothing():
    samples = make_samples(0, 50, 8, 49152)
    for s in samples:
        s.positions = np.arange(5, 5 + len(s.positions), dtype=np.int32)
    n = sum(len(s.positions) for s in samples)
    data = encode_shard(samples, vocab_size=49152)
    assert len(data) < n * 30  # k=8: about 17 bytes of top-k per position plus small framing


def test_empty_shard_and_empty_samples():
    got, meta = decode_shard(encode_shard([], vocab_size=100))
    assert got == [] and meta == {}
    empty = SampleLogits(np.zeros(0, np.int32), np.zeros((0, 4), np.int32), np.zeros((0, 4), np.float32), 1.0)
    got, _ = decode_shard(encode_shard([empty, empty], vocab_size=100))
    assert [len(s.positions) for s in got] == [0, 0]
    assert got[0].ids.shape == (0, 4) and got[0].logprobs.shape == (0, 4)


def test_encode_validation():
    good = make_samples(1, 3, 4, 1000, max_len=10)
    for s in good:
        if len(s.positions) == 0:
            s.positions = np.array([1, 2], np.int32)
            s.ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int32)
            s.logprobs = np.log(np.full((2, 4), 0.2, np.float32))

    def variant(**change):
        s = good[0]
        fields = dict(positions=s.positions, ids=s.ids, logprobs=s.logprobs, loss_bpb=s.loss_bpb)
        fields.update(change)
        return [SampleLogits(**fields)] + good[1:]

    p = good[0].positions
    cases = [
        (variant(positions=p[::-1].copy()), {}, "strictly increasing"),
        (variant(positions=p - 10_000), {}, "positions"),
        (variant(positions=p.astype(np.float32)), {}, "integer"),
        (variant(loss_bpb=float("nan")), {}, "finite"),
        (variant(loss_bpb=float("inf")), {}, "finite"),
        (variant(ids=good[0].ids[:, :3], logprobs=good[0].logprobs[:, :3]), {}, "share one k"),
        (variant(ids=good[0].ids[:-1]), {}, r"\[.*k\]"),
        (good, {"metadata": {"round": 3}}, "str"),
        (good, {"metadata": {"x": "y" * (MAX_METADATA_BYTES + 1)}}, "bytes"),
        (good, {"vocab_size": 5}, "outside"),
        ([object()], {}, "SampleLogits"),
    ]
    for samples, kw, needle in cases:
        kw = {"vocab_size": 1000, **kw}
        with pytest.raises(ValueError, match=needle):
            encode_shard(samples, **kw)


@pytest.fixture(scope="module")
def shard() -> bytes:
    return encode_shard(make_samples(3, 8, 8, 49152), vocab_size=49152, metadata=META)


def test_decode_limits(shard):
    with pytest.raises(CodecError, match="vocab_size"):
        decode_shard(shard, expected_vocab_size=262144)
    with pytest.raises(CodecError, match="allowed"):
        decode_shard(shard, max_samples=7)
    decode_shard(shard, max_samples=8)


@SETTINGS
@given(st.data())
def test_truncation_and_flips_raise_codec_error(shard, data):
    cut = data.draw(st.integers(0, len(shard) - 1))
    with pytest.raises(CodecError, match="logits shard"):
        decode_shard(shard[:cut])
    buf = bytearray(shard)
    pos = data.draw(st.integers(0, len(buf) - 1))
    buf[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CodecError, match="logits shard"):
        decode_shard(bytes(buf))


def test_structural_fuzz_with_valid_crc(shard):
    rng = np.random.default_rng(99)
    for trial in range(300):
        buf = bytearray(shard)
        for _ in range(int(rng.integers(1, 5))):
            buf[int(rng.integers(4, len(buf) - 4))] = int(rng.integers(0, 256))
        try:
            samples, meta = decode_shard(_refresh_crc(buf))
        except CodecError as exc:
            assert str(exc).startswith("logits shard:")
            continue
        for s in samples:  # whatever decodes is still valid
            assert np.all(s.positions >= 0) and np.all(np.diff(s.positions.astype(np.int64)) > 0)
            assert np.isfinite(s.logprobs).all() and np.isfinite(s.loss_bpb)


def test_garbage_and_hostile_counts():
    with pytest.raises(CodecError, match="logits shard"):
        decode_shard(b"\x00" * 4096)
    with pytest.raises(CodecError, match="logits shard"):
        decode_shard("nope")  # type: ignore[arg-type]
    data = bytearray(encode_shard(make_samples(0, 2, 4, 100), vocab_size=100))
    struct.pack_into("<I", data, 8, 0xFFFFFFFF)  # n_samples
    with pytest.raises(CodecError, match="header describes"):
        decode_shard(_refresh_crc(data))
