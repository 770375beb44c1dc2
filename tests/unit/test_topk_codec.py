"""Property tests for the CTTK top-k logits codec (cotune.wire.topk_codec).

Quantized-mode bounds checked here (derivation in docs/wire.md, "Error bounds"), with L = 2^bits - 1,
s = exp((l - l_max) / 2) the square root of an entry's probability relative to its row maximum, and t = -log(1 - m):

* per entry:    |s_decoded - s| <= 1 / (2L)                      (uniform quantizer in s; the zero level decodes to 1/(4L))
* per row:      KL(p || q) <= 5 (k - 1) / (4 L^2) * p_max         (p, q the renormalized original / decoded top-k)
* missing mass: |m_decoded - m| <= 2^-11 t + 2^-24                (t stored as float16)
* consistency:  sum(exp(decoded row)) == 1 - m_decoded
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cotune.wire.topk_codec import HEADER_SIZE, CodecError, decode_topk, encode_topk

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------------------------
# generators
# ----------------------------------------------------------------------------------------------------------------------


def make_topk(seed: int, n: int, k: int, vocab: int, style: str = "mixed", sort: bool = True):
    """Random but realistic top-k rows: distinct ids, log-probs of a normalized distribution with some missing mass."""
    rng = np.random.default_rng(seed)
    if n == 0:
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    if vocab <= 4 * k:
        ids = np.argsort(rng.random((n, vocab)), axis=1)[:, :k]
    else:
        # zipf-ish ids, made distinct per row by resampling collisions
        ids = np.minimum(rng.zipf(1.3, size=(n, k)) - 1, vocab - 1)
        for _ in range(50):
            srt = np.sort(ids, axis=1)
            if not (srt[:, 1:] == srt[:, :-1]).any():
                break
            dup_rows = np.unique(np.argwhere(srt[:, 1:] == srt[:, :-1])[:, 0])
            ids[dup_rows] = rng.integers(0, vocab, size=(dup_rows.size, k))
        else:
            ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)])
    temp = {"peaked": 0.2, "flat": 20.0, "mixed": None}[style] if style in ("peaked", "flat", "mixed") else None
    temps = rng.choice([0.1, 0.5, 1.0, 3.0, 30.0], size=(n, 1)) if temp is None else np.full((n, 1), temp)
    logits = rng.standard_normal((n, k)) * 4.0 / temps
    top_mass = rng.choice([1.0, 0.999, 0.9, 0.5, 1e-3], size=(n, 1)) * rng.uniform(0.5, 1.0, size=(n, 1))
    top_mass[0] = 1.0
    lp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    lp = lp + np.log(top_mass)
    if style == "ties":
        lp = np.round(lp, 1)
        lp -= np.maximum(np.log(np.exp(lp).sum(1, keepdims=True)), 0)
    if sort:
        o = np.argsort(-lp, axis=1, kind="stable")
        lp = np.take_along_axis(lp, o, 1)
        ids = np.take_along_axis(ids, o, 1)
    return ids.astype(np.int32), lp.astype(np.float32)


@st.composite
def topk_case(draw):
    vocab = draw(st.sampled_from([1, 2, 7, 64, 1000, 49152, 262144]) | st.integers(1, 300_000))
    k = draw(st.integers(1, min(vocab, 40)))
    n = draw(st.integers(0, 30))
    seed = draw(st.integers(0, 2**32 - 1))
    style = draw(st.sampled_from(["mixed", "peaked", "flat", "ties"]))
    sort = draw(st.booleans())
    ids, lp = make_topk(seed, n, k, vocab, style, sort)
    return ids, lp, vocab


def missing(lp: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.exp(lp.astype(np.float64)).sum(axis=1), 0.0, 1.0)


def by_id(ids, lp):
    o = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, o, 1), np.take_along_axis(lp.astype(np.float64), o, 1)


# ----------------------------------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(topk_case())
def test_lossless_round_trip_is_exact(case):
    ids, lp, vocab = case
    data = encode_topk(ids, lp, vocab, lossless=True)
    i2, l2, m2 = decode_topk(data)
    assert i2.dtype == np.int32 and l2.dtype == np.float32 and m2.dtype == np.float32
    assert i2.shape == ids.shape and l2.shape == lp.shape and m2.shape == (ids.shape[0],)
    np.testing.assert_array_equal(i2, ids)
    np.testing.assert_array_equal(l2.view(np.uint32), lp.view(np.uint32))
    np.testing.assert_array_equal(m2, missing(lp).astype(np.float32))


@SETTINGS
@given(topk_case(), st.integers(2, 16))
def test_quantized_round_trip_within_bounds(case, bits):
    ids, lp, vocab = case
    n, k = ids.shape
    data = encode_topk(ids, lp, vocab, bits=bits)
    i2, l2, m2 = decode_topk(data)
    assert i2.dtype == np.int32 and l2.dtype == np.float32 and m2.dtype == np.float32
    assert i2.shape == ids.shape and l2.shape == lp.shape and m2.shape == (n,)
    if n == 0:
        return
    assert np.isfinite(l2).all()
    # same id sets; rows come back sorted by log-probability, descending
    a_ids, a_lp = by_id(ids, lp)
    b_ids, b_lp = by_id(i2, l2)
    np.testing.assert_array_equal(a_ids, b_ids)
    assert np.all(l2[:, 1:] <= l2[:, :-1])
    L = (1 << bits) - 1
    # per entry, in the companded coordinate s = sqrt(p / p_max)
    s = np.exp(0.5 * (a_lp - a_lp.max(1, keepdims=True)))
    s_hat = np.exp(0.5 * (b_lp - b_lp.max(1, keepdims=True)))
    assert np.all(np.abs(s_hat - s) <= 0.5 / L + 2e-6)
    # renormalized KL
    p = np.exp(a_lp - a_lp.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(b_lp - b_lp.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    kl = (p * (np.log(np.maximum(p, 1e-300)) - np.log(q))).sum(1)
    bound = 1.25 * (k - 1) / L**2 * p.max(1) + 1e-6
    assert np.all(kl <= bound), (kl.max(), bound[np.argmax(kl - bound)])
    # missing mass and its consistency with the decoded row
    m = missing(lp)
    t = -np.log1p(-np.minimum(m, 1 - 1e-300))
    assert np.all(np.abs(m2 - m) <= 2.0**-11 * t + 2.0**-24 + 2e-6)
    np.testing.assert_allclose(np.exp(l2.astype(np.float64)).sum(1), 1.0 - m2.astype(np.float64), rtol=2e-5, atol=1e-7)
    assert np.all((m2 >= 0) & (m2 <= 1))


def test_quantized_keeps_order_of_sorted_input_and_ids_exactly():
    ids, lp = make_topk(1, 200, 32, 49152)
    i2, l2, _ = decode_topk(encode_topk(ids, lp, 49152))
    np.testing.assert_array_equal(i2, ids)  # sorted input, no ties: same order back


@pytest.mark.parametrize("vocab,k", [(1, 1), (2, 2), (5, 5), (262144, 1), (262144, 128), (1 << 24, 3)])
@pytest.mark.parametrize("lossless", [False, True])
def test_edge_shapes(vocab, k, lossless):
    ids, lp = make_topk(7, 50, k, vocab)
    if vocab == 1 << 24:
        ids = np.tile(np.array([vocab - 1, 0, 77], np.int32), (50, 1))
    i2, l2, m2 = decode_topk(encode_topk(ids, lp, vocab, lossless=lossless))
    np.testing.assert_array_equal(np.sort(i2, 1), np.sort(ids, 1))


def test_empty_payload():
    data = encode_topk(np.zeros((0, 4), np.int64), np.zeros((0, 4), np.float32), 100)
    i2, l2, m2 = decode_topk(data)
    assert i2.shape == (0, 4) and l2.shape == (0, 4) and m2.shape == (0,)


def test_accepts_other_int_and_float_dtypes():
    ids, lp = make_topk(3, 20, 8, 1000)
    a = decode_topk(encode_topk(ids.astype(np.int64), lp.astype(np.float64), 1000, lossless=True))
    b = decode_topk(encode_topk(ids.astype(np.uint16), lp, 1000, lossless=True))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_bits_trade_size_for_fidelity():
    ids, lp = make_topk(5, 2000, 32, 262144)
    sizes = [len(encode_topk(ids, lp, 262144, bits=b)) for b in (4, 6, 8, 10)]
    assert sizes == sorted(sizes)
    assert len(encode_topk(ids, lp, 262144)) < len(encode_topk(ids, lp, 262144, lossless=True))


# ----------------------------------------------------------------------------------------------------------------------
# encoder input validation
# ----------------------------------------------------------------------------------------------------------------------


def test_encode_rejects_bad_inputs():
    ids, lp = make_topk(2, 10, 8, 1000)
    bad_nan = lp.copy()
    bad_nan[3, 2] = np.nan
    bad_inf = lp.copy()
    bad_inf[1, 7] = -np.inf
    dup = ids.copy()
    dup[4, 1] = dup[4, 0]
    cases = [
        (dict(ids=ids, logprobs=bad_nan, vocab_size=1000), "finite"),
        (dict(ids=ids, logprobs=bad_inf, vocab_size=1000), "finite"),
        (dict(ids=ids, logprobs=lp, vocab_size=int(ids.max())), "outside"),
        (dict(ids=ids - ids.min() - 1, logprobs=lp, vocab_size=1000), "outside"),
        (dict(ids=ids, logprobs=lp[:, :7], vocab_size=1000), "shape"),
        (dict(ids=ids[0], logprobs=lp[0], vocab_size=1000), "2-D"),
        (dict(ids=dup, logprobs=lp, vocab_size=1000), "distinct"),
        (dict(ids=ids, logprobs=lp + 2.0, vocab_size=1000), "logits"),
        (dict(ids=ids.astype(np.float32), logprobs=lp, vocab_size=1000), "integers"),
        (dict(ids=ids, logprobs=lp, vocab_size=4), "k ="),
        (dict(ids=ids, logprobs=lp, vocab_size=0), "vocab_size"),
        (dict(ids=ids, logprobs=lp, vocab_size=True), "vocab_size"),
        (dict(ids=ids, logprobs=lp, vocab_size=(1 << 24) + 1), "vocab_size"),
        (dict(ids=ids, logprobs=lp, vocab_size=1000, bits=1), "bits"),
        (dict(ids=ids, logprobs=lp, vocab_size=1000, bits=17), "bits"),
        (dict(ids=np.zeros((3, 0), np.int32), logprobs=np.zeros((3, 0), np.float32), vocab_size=1000), "k ="),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ValueError, match=needle):
            encode_topk(**kwargs)


def test_codec_error_is_a_value_error():
    assert issubclass(CodecError, ValueError)


# ----------------------------------------------------------------------------------------------------------------------
# corrupted / hostile input
# ----------------------------------------------------------------------------------------------------------------------


def _payloads():
    out = []
    for seed, (n, k, vocab) in enumerate([(40, 8, 49152), (25, 32, 262144), (3, 1, 5), (60, 4, 300)]):
        ids, lp = make_topk(seed, n, k, vocab)
        out.append(encode_topk(ids, lp, vocab))
        out.append(encode_topk(ids, lp, vocab, lossless=True))
        out.append(encode_topk(ids, lp, vocab, bits=12))
    return out


PAYLOADS = _payloads()


def _refresh_crc(buf: bytearray) -> bytes:
    body = bytes(buf[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


def _decode_or_codec_error(data: bytes) -> None:
    try:
        ids, lp, mm = decode_topk(data)
    except CodecError:
        return
    # if it decodes, the result must still satisfy the invariants the decoder promises
    assert ids.dtype == np.int32 and lp.dtype == np.float32 and mm.dtype == np.float32
    assert np.isfinite(lp).all() and np.all((mm >= 0) & (mm <= 1))


@SETTINGS
@given(st.sampled_from(range(len(PAYLOADS))), st.data())
def test_truncation_raises_codec_error(i, data):
    payload = PAYLOADS[i]
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(CodecError):
        decode_topk(payload[:cut])


@SETTINGS
@given(st.sampled_from(range(len(PAYLOADS))), st.data())
def test_byte_flips_raise_codec_error(i, data):
    payload = bytearray(PAYLOADS[i])
    nflips = data.draw(st.integers(1, 4))
    for _ in range(nflips):
        pos = data.draw(st.integers(0, len(payload) - 1))
        payload[pos] ^= data.draw(st.integers(1, 255))
    if bytes(payload) == PAYLOADS[i]:
        return
    with pytest.raises(CodecError):
        decode_topk(bytes(payload))


@SETTINGS
@given(st.sampled_from(range(len(PAYLOADS))), st.data())
def test_flips_past_the_checksum_never_crash(i, data):
    """With the CRC fixed up, the structural validation must still hold: CodecError or a valid result."""
    payload = bytearray(PAYLOADS[i])
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(payload) - 5))
        payload[pos] = data.draw(st.integers(0, 255))
    _decode_or_codec_error(_refresh_crc(payload))


def _patch_header(payload: bytes, fmt: str, offset: int, value) -> bytes:
    buf = bytearray(payload)
    struct.pack_into(fmt, buf, offset, value)
    return _refresh_crc(buf)


@pytest.mark.parametrize(
    "fmt,offset,value,needle",
    [
        ("<4s", 0, b"XXXX", "magic"),
        ("<B", 4, 9, "version"),
        ("<B", 5, 7, "codec"),
        ("<B", 6, 40, "bits"),
        ("<B", 7, 0x80, "reserved"),
        ("<I", 8, 0, "k ="),
        ("<I", 8, 1 << 20, "k ="),
        ("<I", 12, 0, "vocab_size"),
        ("<I", 12, 0xFFFFFFFF, "vocab_size"),
        ("<Q", 16, 1 << 62, "rows"),
        ("<Q", 16, 10**9, "rows"),
        ("<I", 20 + 4, 1 << 31, "dictionary"),
        ("<Q", 32, 1 << 60, "truncated"),
        ("<Q", 64, 3, "header describes"),
    ],
)
def test_hostile_header_fields(fmt, offset, value, needle):
    payload = PAYLOADS[0]
    with pytest.raises(CodecError, match=needle):
        decode_topk(_patch_header(payload, fmt, offset, value))


def test_header_cannot_drive_a_huge_allocation():
    # a tiny payload claiming 2^40 rows is rejected before anything proportional to the claim is allocated
    ids, lp = make_topk(0, 4, 4, 100)
    data = _patch_header(encode_topk(ids, lp, 100), "<Q", 16, 1 << 40)
    with pytest.raises(CodecError, match="rows"):
        decode_topk(data)


def test_max_rows_is_enforced():
    ids, lp = make_topk(0, 10, 4, 100)
    data = encode_topk(ids, lp, 100)
    decode_topk(data, max_rows=10)
    with pytest.raises(CodecError, match="allowed"):
        decode_topk(data, max_rows=9)


def test_not_bytes_and_garbage():
    with pytest.raises(CodecError):
        decode_topk("hello")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="truncated"):
        decode_topk(b"")
    with pytest.raises(CodecError, match="magic"):
        decode_topk(b"\x00" * 200)
    decode_topk(memoryview(PAYLOADS[0]))
    decode_topk(bytearray(PAYLOADS[0]))


def test_decode_fuzz_loop():
    """Random bodies behind a valid header prefix, valid CRC: always CodecError or a valid result, never a hang."""
    rng = np.random.default_rng(1234)
    for trial in range(400):
        base = PAYLOADS[trial % len(PAYLOADS)]
        buf = bytearray(base)
        mode = trial % 4
        if mode == 0:  # random body
            body = rng.integers(0, 256, size=len(buf) - HEADER_SIZE, dtype=np.uint8).tobytes()
            buf[HEADER_SIZE:] = body
        elif mode == 1:  # random section shuffle
            a, b = sorted(rng.integers(HEADER_SIZE, len(buf) - 4, size=2))
            buf[a:b] = bytes(reversed(buf[a:b]))
        elif mode == 2:  # random header field bytes (magic and version kept)
            for _ in range(3):
                buf[int(rng.integers(6, HEADER_SIZE))] = int(rng.integers(0, 256))
        else:  # random length, random bytes
            buf = bytearray(base[:HEADER_SIZE]) + bytearray(rng.integers(0, 256, int(rng.integers(4, 400)), dtype=np.uint8))
        _decode_or_codec_error(_refresh_crc(buf))
