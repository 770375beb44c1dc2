"""Compact, validated wire codec for top-k next-token log-probabilities (format CTTK v1).

    encode_topk(ids, logprobs, vocab_size, *, bits=8, lossless=False) -> bytes
    decode_topk(data, *, max_rows=None) -> (ids int32 [N, k], logprobs float32 [N, k], missing_mass float32 [N])

What is kept, and how (docs/wire.md has the byte layout and measured numbers):

* **Missing mass** m = 1 - sum(exp(logprobs)) per row travels explicitly. The quantized mode stores
  t = -log(1 - m) (the negative log of the row's top-k mass) as float16: relative precision 2^-11 on m when m is
  small and on 1 - m when it is small. The decoded log-probabilities are rebuilt so that sum(exp) == 1 - m exactly.
* **Log-probabilities (quantized mode)** are companded: each value becomes s = exp((l - l_max) / 2), the square root
  of its probability relative to the row maximum, and s is quantized uniformly to L = 2^bits - 1 levels. The square
  root is the variance-stabilising (Fisher / Hellinger) coordinate of a categorical distribution: KL(p || q) ~
  2 * sum (sqrt p - sqrt q)^2, so a uniform grid in s spends the same KL on every entry, which with entropy coding
  is the rate-optimal uniform quantizer. Per entry |s_decoded - s| <= 1 / (2L); the expected renormalized-top-k KL
  is about pmax * k / (6 L^2) (bits=8, k=32: <= 8e-5 nats). Level 0 (p_rel < 1/(4L^2)) decodes to s = 1/(4L).
  Rows are coded in descending order of log-probability, so levels are coded as non-negative gaps.
  Decoded quantized rows therefore come back sorted by log-probability, descending (ties in input order).
* **Ids** are remapped to their frequency rank within the payload (a dictionary of the distinct ids, most frequent
  first, travels in the payload) when that is smaller, else coded as raw ids. Each rank/id R is split into an
  exponent class bitlen(R) (entropy coded) and bitlen(R) - 1 raw mantissa bits.
* **Entropy coding**: the per-entry symbol (gap class, rank class) is coded with a numpy-vectorized interleaved rANS
  coder (static frequency tables per position-in-row context, 15-bit precision), all lanes advanced in lockstep.
* **Lossless mode** keeps the input order, the exact ids (same id coding) and the exact float32 log-probabilities and
  missing mass, for A/B checks.

Every decode failure raises CodecError; decoding never allocates more than a small constant times the payload size
before the data has proved that size (entries per payload byte are capped, see MAX_ENTRIES_PER_BYTE).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = [
    "CodecError",
    "encode_topk",
    "decode_topk",
    "peek_header",
    "MAGIC",
    "VERSION",
    "MAX_VOCAB",
    "MAX_K",
]


class CodecError(ValueError):
    """A top-k payload could not be decoded; the message says what is wrong with it."""


MAGIC = b"CTTK"
VERSION = 1
CODEC_QUANTIZED = 1
CODEC_LOSSLESS = 2
FLAG_DICT = 1

MAX_VOCAB = 1 << 24
MAX_K = 1 << 16
MIN_BITS, MAX_BITS = 2, 16
# A valid payload spends well over 2 bits per (id, logprob) entry; headers claiming more entries than this per payload
# byte are rejected before anything is allocated. The encoder guarantees it for its own output.
MAX_ENTRIES_PER_BYTE = 4
# Tolerances on "these are log-probabilities": sum(exp(row)) <= 1 + SUM_TOL.
SUM_TOL = 1e-2

_HEADER = struct.Struct("<4sBBBBIIQIIQQQQQ")  # 72 bytes
HEADER_SIZE = _HEADER.size
_TRAILER = 4  # crc32
_TABLES_HEAD = struct.Struct("<BBHI")  # prob_bits, n_ctx, alphabet, lanes

# rANS parameters: 32-bit state, 16-bit renormalisation, PROB_BITS-bit frequencies.
PROB_BITS = 15
_M = 1 << PROB_BITS
_RANS_L = 1 << 16
_MAX_CTX = 8
_GDIRECT = 16  # level gaps below this are their own symbol; larger gaps: exponent class + mantissa bits
_LANE_SYMBOLS = 1024  # target symbols per rANS lane
_MAX_LANES = 8192
_CHUNK = 1 << 20  # entries per chunk in the bit packer


# --------------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------------


def _bitlen(x: np.ndarray) -> np.ndarray:
    """bit_length of non-negative integers < 2^53, vectorized (0 -> 0, 1 -> 1, 2..3 -> 2, ...)."""
    return np.frexp(np.asarray(x, dtype=np.float64))[1].astype(np.int64)


def _bitlen_int(v: int) -> int:
    return int(v).bit_length()


def _n_gap_symbols(levels: int) -> int:
    """Number of gap classes for gaps in [0, levels]."""
    if levels < _GDIRECT:
        return levels + 1
    return _GDIRECT + (_bitlen_int(levels) - _bitlen_int(_GDIRECT) + 1)


def _gap_classes(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gap -> (class, mantissa width, mantissa)."""
    g = g.astype(np.int64, copy=False)
    b = _bitlen(g)
    big = g >= _GDIRECT
    cls = np.where(big, b + (_GDIRECT - _bitlen_int(_GDIRECT)), g)
    width = np.where(big, b - 1, 0)
    mant = np.where(big, g - (np.int64(1) << np.maximum(b - 1, 0)), 0)
    return cls, width, mant


def _rank_classes(r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = _bitlen(r)
    width = np.maximum(b - 1, 0)
    mant = np.where(b >= 1, r - (np.int64(1) << width), 0)
    return b, width, mant


def _pos_contexts(k: int, n_ctx: int) -> np.ndarray:
    """Context of each position in a row: min(bitlen(j), n_ctx - 1)."""
    return np.minimum(_bitlen(np.arange(k)), n_ctx - 1).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------------
# variable-width bit packing (LSB first; bit i of the stream is bit i % 8 of byte i // 8)
# --------------------------------------------------------------------------------------------------------------------


def _pack_bits(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Pack values[i] (< 2^widths[i], widths <= 57) back to back. Vectorized, in chunks."""
    values = values.astype(np.uint64, copy=False)
    widths = widths.astype(np.int64, copy=False)
    n = values.size
    total = int(widths.sum())
    nwords = (total + 63) // 64
    words = np.zeros(nwords + 1, dtype=np.uint64)
    base = 0
    for s in range(0, n, _CHUNK):
        w = widths[s : s + _CHUNK]
        v = values[s : s + _CHUNK]
        off = np.cumsum(w) - w + base
        base += int(w.sum())
        nz = w > 0
        if not nz.all():
            off, v = off[nz], v[nz]
        if off.size == 0:
            continue
        idx = off >> 6
        sh = (off & 63).astype(np.uint64)
        lo = v << sh
        hi = (v >> np.uint64(1)) >> (np.uint64(63) - sh)
        starts = np.flatnonzero(np.concatenate(([True], idx[1:] != idx[:-1])))
        widx = idx[starts]
        words[widx] |= np.bitwise_or.reduceat(lo, starts)
        words[widx + 1] |= np.bitwise_or.reduceat(hi, starts)
    return words[:nwords].astype("<u8").tobytes()[: (total + 7) // 8]


def _unpack_bits(data: bytes | memoryview, widths: np.ndarray) -> np.ndarray:
    """Inverse of _pack_bits; the caller has checked len(data) == ceil(sum(widths) / 8)."""
    widths = widths.astype(np.int64, copy=False)
    n = widths.size
    nbytes = len(data)
    nwords = (nbytes + 7) // 8
    buf = np.zeros((nwords + 2) * 8, dtype=np.uint8)
    buf[:nbytes] = np.frombuffer(data, dtype=np.uint8)
    words = buf.view("<u8").astype(np.uint64, copy=False)
    out = np.zeros(n, dtype=np.uint64)
    base = 0
    for s in range(0, n, _CHUNK):
        w = widths[s : s + _CHUNK]
        off = np.cumsum(w) - w + base
        base += int(w.sum())
        idx = off >> 6
        sh = (off & 63).astype(np.uint64)
        v = (words[idx] >> sh) | ((words[idx + 1] << np.uint64(1)) << (np.uint64(63) - sh))
        mask = (np.uint64(1) << w.astype(np.uint64)) - np.uint64(1)
        out[s : s + _CHUNK] = v & mask
    return out


# --------------------------------------------------------------------------------------------------------------------
# interleaved rANS, vectorized over lanes
# --------------------------------------------------------------------------------------------------------------------


def _normalize_freqs(counts: np.ndarray) -> np.ndarray:
    """counts [C, A] -> frequencies [C, A] summing to 2^PROB_BITS per context, >= 1 where count > 0."""
    counts = counts.astype(np.int64)
    C, A = counts.shape
    freq = np.zeros((C, A), dtype=np.int64)
    for c in range(C):
        cnt = counts[c]
        tot = int(cnt.sum())
        if tot == 0:
            freq[c, 0] = _M
            continue
        present = cnt > 0
        npres = int(present.sum())
        f = np.where(present, (cnt * (_M - npres)) // tot + 1, 0)
        f[int(np.argmax(cnt))] += _M - int(f.sum())
        freq[c] = f
    return freq


def _entropy_bits(counts: np.ndarray) -> float:
    """Total ideal code length (bits) of the symbols counted in counts [C, A] under per-context tables."""
    counts = counts.astype(np.float64)
    tot = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(counts > 0, counts / np.maximum(tot, 1), 1.0)
        return float(-(counts * np.log2(p)).sum())


def _rans_lanes(n: int) -> int:
    return int(min(_MAX_LANES, max(1, n // _LANE_SYMBOLS)))


def _rans_encode(tab_idx: np.ndarray, freq: np.ndarray) -> tuple[bytes, int]:
    """Encode symbols given as flat indices into freq [C, A] (ctx * A + sym). Returns (stream, lanes)."""
    n = tab_idx.size
    lanes = _rans_lanes(n)
    f_flat = freq.ravel().astype(np.uint32)
    cum = (np.cumsum(freq, axis=1) - freq).ravel().astype(np.uint32)
    f_all = f_flat[tab_idx]
    c_all = cum[tab_idx]
    xmax_all = f_all.astype(np.uint64) << np.uint64(32 - PROB_BITS)  # ((L >> PB) << 16) * f
    fdiv_all = f_all.astype(np.float64)
    x = np.full(lanes, _RANS_L, dtype=np.uint32)
    steps = (n + lanes - 1) // lanes
    emitted: list[np.ndarray] = []
    pb = np.uint32(PROB_BITS)
    sixteen = np.uint32(16)
    for i in range(steps - 1, -1, -1):
        a = i * lanes
        b = min(a + lanes, n)
        r = b - a
        xs = x[:r]
        m = xs >= xmax_all[a:b]
        if m.any():
            emitted.append((xs[m] & np.uint32(0xFFFF)).astype(np.uint16))
            xs >>= m.astype(np.uint32) * sixteen
        else:
            emitted.append(np.empty(0, dtype=np.uint16))
        q = np.floor(xs / fdiv_all[a:b]).astype(np.uint32)
        xs -= q * f_all[a:b]
        xs += (q << pb) + c_all[a:b]
    emitted.reverse()
    words = np.concatenate(emitted) if emitted else np.empty(0, dtype=np.uint16)
    return x.astype("<u4").tobytes() + words.astype("<u2").tobytes(), lanes


def _rans_decode(stream: bytes | memoryview, lanes: int, ctx_of_entry: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Decode len(ctx_of_entry) symbols; ctx_of_entry[i] is the (known) context of symbol i."""
    n = ctx_of_entry.size
    C, A = freq.shape
    if len(stream) < 4 * lanes or (len(stream) - 4 * lanes) % 2:
        raise CodecError("entropy-coded section is truncated or misaligned")
    x = np.frombuffer(stream, dtype="<u4", count=lanes).astype(np.uint32)
    words = np.frombuffer(stream, dtype="<u2", offset=4 * lanes).astype(np.uint32)
    if np.any(x < _RANS_L):
        raise CodecError("entropy-coded section is corrupted (bad initial coder state)")
    f_flat = freq.ravel().astype(np.uint32)
    cum2 = np.cumsum(freq, axis=1)
    cum = (cum2 - freq).ravel().astype(np.uint32)
    # slot -> symbol table per context
    slot_sym = np.empty((C, _M), dtype=np.int32)
    for c in range(C):
        slot_sym[c] = np.repeat(np.arange(A, dtype=np.int32), freq[c])
    slot_sym = slot_sym.ravel()
    ctx_base = ctx_of_entry.astype(np.int64) * _M
    ctx_a = ctx_of_entry.astype(np.int64) * A
    out = np.empty(n, dtype=np.int32)
    steps = (n + lanes - 1) // lanes
    pos = 0
    nwords = words.size
    mask_m = np.uint32(_M - 1)
    pb = np.uint32(PROB_BITS)
    for i in range(steps):
        a = i * lanes
        b = min(a + lanes, n)
        r = b - a
        xs = x[:r]
        slot = xs & mask_m
        s = slot_sym[ctx_base[a:b] + slot]
        fi = ctx_a[a:b] + s
        xs[:] = f_flat[fi] * (xs >> pb) + slot - cum[fi]
        out[a:b] = s
        m = xs < _RANS_L
        cnt = int(np.count_nonzero(m))
        if cnt:
            if pos + cnt > nwords:
                raise CodecError("entropy-coded section is truncated or corrupted (ran out of words)")
            xs[m] = (xs[m] << np.uint32(16)) | words[pos : pos + cnt]
            pos += cnt
    if pos != nwords or np.any(x != _RANS_L):
        raise CodecError("entropy-coded section is corrupted (coder did not end in its initial state)")
    return out


def _tables_bytes(freq: np.ndarray, lanes: int) -> bytes:
    C, A = freq.shape
    return _TABLES_HEAD.pack(PROB_BITS, C, A, lanes) + zlib.compress(freq.astype("<u2").tobytes(), 9)


def _parse_tables(sec: bytes | memoryview, expected_alphabet: int, n: int) -> tuple[np.ndarray, int]:
    if len(sec) < _TABLES_HEAD.size:
        raise CodecError("frequency-table section is truncated")
    pbits, C, A, lanes = _TABLES_HEAD.unpack_from(sec, 0)
    if pbits != PROB_BITS:
        raise CodecError(f"unsupported probability precision {pbits} bits (this build reads {PROB_BITS})")
    if not 1 <= C <= _MAX_CTX:
        raise CodecError(f"context count {C} out of range [1, {_MAX_CTX}]")
    if A != expected_alphabet:
        raise CodecError(f"alphabet size {A} does not match the header (expected {expected_alphabet})")
    if lanes != _rans_lanes(n):
        raise CodecError(f"rANS lane count {lanes} does not match {n} symbols (expected {_rans_lanes(n)})")
    want = C * A * 2
    d = zlib.decompressobj()
    try:
        raw = d.decompress(bytes(sec[_TABLES_HEAD.size :]), want + 1)
    except zlib.error as exc:
        raise CodecError(f"frequency tables are corrupted: {exc}") from None
    if len(raw) != want or not d.eof or d.unused_data or d.unconsumed_tail:
        raise CodecError("frequency tables have the wrong size or trailing bytes")
    freq = np.frombuffer(raw, dtype="<u2").astype(np.int64).reshape(C, A)
    if np.any(freq.sum(axis=1) != _M):
        raise CodecError("frequency tables are corrupted (a context does not sum to 2^PROB_BITS)")
    return freq, lanes


def _choose_contexts(tab_sym: np.ndarray, k: int, A: int) -> tuple[int, np.ndarray]:
    """Pick the number of position contexts (1 or the full set) that gives the smaller estimated output."""
    n = tab_sym.size
    full = min(_MAX_CTX, _bitlen_int(max(k - 1, 0)) + 1)
    best = None
    for C in sorted({1, full}):
        ctx_row = _pos_contexts(k, C)
        counts = np.bincount((np.tile(ctx_row, n // k) * A + tab_sym), minlength=C * A).reshape(C, A)
        freq = _normalize_freqs(counts)
        est = _entropy_bits(counts) / 8 + len(zlib.compress(freq.astype("<u2").tobytes(), 9))
        if best is None or est < best[0]:
            best = (est, C, freq)
    assert best is not None
    return best[1], best[2]


# --------------------------------------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------------------------------------


def _check_inputs(ids, logprobs, vocab_size, bits, lossless) -> tuple[np.ndarray, np.ndarray, int]:
    if isinstance(vocab_size, (bool, np.bool_)) or not isinstance(vocab_size, (int, np.integer)):
        raise ValueError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    vocab_size = int(vocab_size)
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} out of range [1, {MAX_VOCAB}]")
    if not lossless:
        if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
            raise ValueError(f"bits must be an int, got {type(bits).__name__}")
        if not MIN_BITS <= int(bits) <= MAX_BITS:
            raise ValueError(f"bits {bits} out of range [{MIN_BITS}, {MAX_BITS}]")
    ids = np.asarray(ids)
    lp = np.asarray(logprobs)
    if ids.ndim != 2:
        raise ValueError(f"ids must be a 2-D array [N, k], got shape {ids.shape}")
    if lp.shape != ids.shape:
        raise ValueError(f"logprobs shape {lp.shape} does not match ids shape {ids.shape}")
    if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    if not np.issubdtype(lp.dtype, np.floating):
        raise ValueError(f"logprobs must be floating point, got dtype {lp.dtype}")
    n, k = ids.shape
    if not 1 <= k <= min(MAX_K, vocab_size):
        raise ValueError(f"k = {k} must be in [1, min({MAX_K}, vocab_size={vocab_size})]")
    if n and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = np.argwhere((ids < 0) | (ids >= vocab_size))[0]
        raise ValueError(f"id {int(ids[tuple(bad)])} at row {bad[0]} is outside [0, vocab_size={vocab_size})")
    lp = lp.astype(np.float32, copy=False)
    if n and not np.isfinite(lp).all():
        bad = np.argwhere(~np.isfinite(lp))[0]
        raise ValueError(f"logprobs must be finite; row {bad[0]} has {lp[tuple(bad)]} (drop or clamp masked entries)")
    ids = ids.astype(np.int32, copy=False)
    if n and k > 1:
        srt = np.sort(ids, axis=1)
        dup = srt[:, 1:] == srt[:, :-1]
        if dup.any():
            row = int(np.argwhere(dup)[0][0])
            raise ValueError(f"row {row} repeats a token id; top-k ids must be distinct within a row")
    return ids, lp, vocab_size


def _row_logmass(lp: np.ndarray) -> np.ndarray:
    """log(sum(exp(row))) per row, float64, stable."""
    mx = lp.max(axis=1).astype(np.float64)
    s = np.exp(lp - mx[:, None].astype(np.float32)).sum(axis=1, dtype=np.float64)
    return mx + np.log(s)


def encode_topk(ids, logprobs, vocab_size: int, *, bits: int = 8, lossless: bool = False) -> bytes:
    """Encode top-k ids [N, k] and natural-log probabilities [N, k] (of the full-vocabulary softmax) to CTTK bytes.

    Raises ValueError on shape/dtype mismatch, ids outside [0, vocab_size), repeated ids in a row, NaN/Inf, or rows
    whose probabilities sum to more than 1 + 1e-2 (i.e. not log-probabilities, such as raw logits).
    """
    ids, lp, V = _check_inputs(ids, logprobs, vocab_size, bits, lossless)
    n, k = ids.shape
    bits = 32 if lossless else int(bits)
    codec = CODEC_LOSSLESS if lossless else CODEC_QUANTIZED
    if n == 0:
        return _assemble(codec, bits, 0, k, V, 0, 0, b"", b"", b"", b"", b"")

    logmass = _row_logmass(lp)
    if np.any(logmass > np.log1p(SUM_TOL)):
        row = int(np.argmax(logmass))
        raise ValueError(
            f"row {row}: probabilities sum to {np.exp(logmass[row]):.4g} > 1; logprobs must be log-probabilities "
            "(log_softmax over the full vocabulary), not logits"
        )

    if not lossless:
        # descending order by log-probability (stable), the common case is already sorted
        if k > 1 and not np.all(lp[:, 1:] <= lp[:, :-1]):
            order = np.argsort(-lp, axis=1, kind="stable")
            lp = np.take_along_axis(lp, order, axis=1)
            ids = np.take_along_axis(ids, order, axis=1)
        t = np.maximum(-logmass, 0.0)
        if np.any(t > 65504.0):
            raise ValueError("a row's top-k mass is below exp(-65504); not representable")
        t16 = t.astype(np.float16)
    flat_ids = ids.ravel()

    # --- ids: payload-frequency ranks, or raw ids, whichever is estimated smaller
    counts = np.bincount(flat_ids, minlength=V)
    order = np.argsort(-counts, kind="stable")
    n_dict = int(np.count_nonzero(counts))
    wv = _bitlen_int(V - 1)
    sorted_counts = counts[order[:n_dict]].astype(np.float64)
    ranks_b = _bitlen(np.arange(n_dict))
    raw_b = _bitlen(np.arange(V))

    def _cost(cnts: np.ndarray, b: np.ndarray) -> float:
        hist = np.bincount(b, weights=cnts)
        tot = hist.sum()
        p = hist[hist > 0] / tot
        return float(-(hist[hist > 0] * np.log2(p)).sum() + (cnts * np.maximum(b - 1, 0)).sum())

    use_dict = _cost(sorted_counts, ranks_b) + n_dict * wv < _cost(counts.astype(np.float64), raw_b)
    if use_dict:
        rank_of = np.empty(V, dtype=np.int32)
        rank_of[order] = np.arange(V, dtype=np.int32)
        R = rank_of[flat_ids]
        dict_ids = order[:n_dict]
        dict_sec = _pack_bits(dict_ids.astype(np.uint64), np.full(n_dict, wv, dtype=np.int64))
        rb_max = _bitlen_int(n_dict - 1)
    else:
        R = flat_ids
        dict_sec = b""
        n_dict = 0
        rb_max = _bitlen_int(V - 1)
    RB = rb_max + 1
    rcls, rw, rm = _rank_classes(R)

    # --- log-probabilities
    if lossless:
        A = RB
        sym = rcls
        widths = rw
        mant = rm
        vals = lp.astype("<f4").tobytes() + _lossless_missing(lp).astype("<f4").tobytes()
    else:
        L = (1 << bits) - 1
        r = lp - lp[:, :1]
        q = np.rint(np.exp(0.5 * r) * np.float32(L)).astype(np.int64)
        q[:, 0] = L
        gaps = np.empty_like(q)
        gaps[:, 0] = 0
        np.subtract(q[:, :-1], q[:, 1:], out=gaps[:, 1:])
        gcls, gw, gm = _gap_classes(gaps.ravel())
        GS = _n_gap_symbols(L)
        A = GS * RB
        sym = gcls * RB + rcls
        widths = gw + rw
        mant = (gm << rw) | rm
        vals = t16.astype("<f2").tobytes()

    C, freq = _choose_contexts(sym, k, A)
    ctx = np.tile(_pos_contexts(k, C), n)
    rans, lanes = _rans_encode(ctx * A + sym, freq)
    tables = _tables_bytes(freq, lanes)
    mant_sec = _pack_bits(mant, widths)
    return _assemble(codec, bits, n, k, V, n_dict, FLAG_DICT if use_dict else 0, dict_sec, tables, rans, mant_sec, vals)


def _lossless_missing(lp: np.ndarray) -> np.ndarray:
    mass = np.exp(lp.astype(np.float64)).sum(axis=1)
    return np.clip(1.0 - mass, 0.0, 1.0).astype(np.float32)


def _assemble(codec, bits, n, k, V, n_dict, flags, dict_sec, tables, rans, mant, vals) -> bytes:
    head = _HEADER.pack(
        MAGIC, VERSION, codec, bits, flags, k, V, n, n_dict, 0,
        len(dict_sec), len(tables), len(rans), len(mant), len(vals),
    )  # fmt: skip
    body = b"".join((head, dict_sec, tables, rans, mant, vals))
    if n * k > MAX_ENTRIES_PER_BYTE * (len(body) + _TRAILER):
        # cannot happen for real data (>= 2 bits/entry); kept as a guarantee that our output always decodes
        raise ValueError("payload is too compressible to meet the decoder's size cap")
    return body + struct.pack("<I", zlib.crc32(body))


# --------------------------------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------------------------------


def peek_header(data: bytes) -> dict:
    """Parse and check the fixed header only (no CRC, no body). Raises CodecError."""
    mv = memoryview(data)
    if len(mv) < HEADER_SIZE + _TRAILER:
        raise CodecError(f"truncated top-k payload: {len(mv)} bytes, the header alone needs {HEADER_SIZE + _TRAILER}")
    (magic, version, codec, bits, flags, k, V, n, n_dict, reserved,
     l_dict, l_tab, l_rans, l_mant, l_vals) = _HEADER.unpack_from(mv, 0)  # fmt: skip
    if magic != MAGIC:
        raise CodecError(f"not a Cotune top-k payload (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise CodecError(f"top-k payload version {version} is not supported (this build reads version {VERSION})")
    return dict(
        codec=codec, bits=bits, flags=flags, k=k, vocab_size=V, n_rows=n, n_dict=n_dict, reserved=reserved,
        lengths=(l_dict, l_tab, l_rans, l_mant, l_vals),
    )  # fmt: skip


def decode_topk(data: bytes, *, max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode CTTK bytes to (ids int32 [N, k], logprobs float32 [N, k], missing_mass float32 [N]).

    Quantized payloads come back with each row sorted by log-probability (descending); lossless ones in input order.
    Raises CodecError (a ValueError) on anything malformed, truncated, corrupted or over the limits.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"top-k payload must be bytes, got {type(data).__name__}")
    mv = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    h = peek_header(mv)
    codec, bits, flags, k, V, n, n_dict = (h[x] for x in ("codec", "bits", "flags", "k", "vocab_size", "n_rows", "n_dict"))
    l_dict, l_tab, l_rans, l_mant, l_vals = h["lengths"]
    total = HEADER_SIZE + l_dict + l_tab + l_rans + l_mant + l_vals + _TRAILER
    if total != len(mv):
        what = "truncated" if len(mv) < total else "has trailing bytes"
        raise CodecError(f"top-k payload {what}: header describes {total} bytes, got {len(mv)}")
    crc_stored = struct.unpack_from("<I", mv, len(mv) - _TRAILER)[0]
    if zlib.crc32(mv[: len(mv) - _TRAILER]) != crc_stored:
        raise CodecError("top-k payload checksum mismatch: the bytes were corrupted in transit or storage")
    if codec not in (CODEC_QUANTIZED, CODEC_LOSSLESS):
        raise CodecError(f"unknown top-k codec id {codec} (known: 1 quantized, 2 lossless)")
    if h["reserved"] != 0 or flags & ~FLAG_DICT:
        raise CodecError("reserved header fields are set; payload written by an incompatible encoder")
    if not 1 <= V <= MAX_VOCAB:
        raise CodecError(f"vocab_size {V} out of range [1, {MAX_VOCAB}]")
    if not 1 <= k <= min(MAX_K, V):
        raise CodecError(f"k = {k} out of range [1, min({MAX_K}, vocab_size={V})]")
    if codec == CODEC_QUANTIZED and not MIN_BITS <= bits <= MAX_BITS:
        raise CodecError(f"quantizer bits {bits} out of range [{MIN_BITS}, {MAX_BITS}]")
    if codec == CODEC_LOSSLESS and bits != 32:
        raise CodecError(f"lossless payload must declare 32 bits, got {bits}")
    if max_rows is not None and n > max_rows:
        raise CodecError(f"payload has {n} rows, more than the allowed {max_rows}")
    if n * k > MAX_ENTRIES_PER_BYTE * len(mv):
        raise CodecError(f"header claims {n} rows x k={k}, impossible in a {len(mv)}-byte payload")
    if n == 0:
        if any(h["lengths"]) or n_dict or flags:
            raise CodecError("empty payload carries sections")
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32)

    off = HEADER_SIZE
    secs = []
    for ln in (l_dict, l_tab, l_rans, l_mant, l_vals):
        secs.append(mv[off : off + ln])
        off += ln
    s_dict, s_tab, s_rans, s_mant, s_vals = secs
    nk = n * k

    # dictionary
    wv = _bitlen_int(V - 1)
    if flags & FLAG_DICT:
        if not 1 <= n_dict <= min(V, nk):
            raise CodecError(f"dictionary size {n_dict} out of range [1, {min(V, nk)}]")
        if l_dict != (n_dict * wv + 7) // 8:
            raise CodecError(f"dictionary section is {l_dict} bytes, expected {(n_dict * wv + 7) // 8}")
        dict_ids = _unpack_bits(s_dict, np.full(n_dict, wv, dtype=np.int64)).astype(np.int64)
        _check_zero_padding(s_dict, n_dict * wv, "dictionary")
        if dict_ids.size and int(dict_ids.max()) >= V:
            raise CodecError(f"dictionary holds id {int(dict_ids.max())} >= vocab_size {V}")
        srt = np.sort(dict_ids)
        if np.any(srt[1:] == srt[:-1]):
            raise CodecError("dictionary repeats a token id")
        rb_max = _bitlen_int(n_dict - 1)
        r_limit = n_dict
    else:
        if n_dict or l_dict:
            raise CodecError("dictionary fields set without the dictionary flag")
        dict_ids = None
        rb_max = _bitlen_int(V - 1)
        r_limit = V
    RB = rb_max + 1

    if codec == CODEC_QUANTIZED:
        L = (1 << bits) - 1
        GS = _n_gap_symbols(L)
        A = GS * RB
        if l_vals != 2 * n:
            raise CodecError(f"missing-mass section is {l_vals} bytes, expected {2 * n}")
    else:
        A = RB
        if l_vals != 4 * nk + 4 * n:
            raise CodecError(f"value section is {l_vals} bytes, expected {4 * nk + 4 * n}")

    freq, lanes = _parse_tables(s_tab, A, nk)
    C = freq.shape[0]
    ctx = np.tile(_pos_contexts(k, C), n)
    sym = _rans_decode(s_rans, lanes, ctx, freq).astype(np.int64)

    if codec == CODEC_QUANTIZED:
        gcls = sym // RB
        rcls = sym - gcls * RB
        gb = gcls - (_GDIRECT - _bitlen_int(_GDIRECT))  # bit length for escaped gaps
        big = gcls >= _GDIRECT
        gw = np.where(big, gb - 1, 0)
    else:
        rcls = sym
        gw = None
    rw = np.maximum(rcls - 1, 0)
    widths = rw if gw is None else gw + rw
    nbits = int(widths.sum())
    if l_mant != (nbits + 7) // 8:
        raise CodecError(f"mantissa section is {l_mant} bytes, the coded symbols need {(nbits + 7) // 8}")
    _check_zero_padding(s_mant, nbits, "mantissa")
    mant = _unpack_bits(s_mant, widths).astype(np.int64)
    rm = mant & ((np.int64(1) << rw) - 1)
    R = np.where(rcls >= 1, (np.int64(1) << rw) + rm, 0)
    if int(R.max()) >= r_limit:
        raise CodecError(f"a coded token rank/id {int(R.max())} is out of range (limit {r_limit})")
    ids = (dict_ids[R] if dict_ids is not None else R).astype(np.int32).reshape(n, k)
    if k > 1:
        srt = np.sort(ids, axis=1)
        if np.any(srt[:, 1:] == srt[:, :-1]):
            raise CodecError("a decoded row repeats a token id")

    if codec == CODEC_LOSSLESS:
        lp = np.frombuffer(s_vals, dtype="<f4", count=nk).astype(np.float32).reshape(n, k)
        mm = np.frombuffer(s_vals, dtype="<f4", offset=4 * nk, count=n).astype(np.float32)
        if not (np.isfinite(lp).all() and np.isfinite(mm).all()):
            raise CodecError("lossless payload holds NaN or Inf")
        if np.any((mm < 0) | (mm > 1)):
            raise CodecError("missing mass outside [0, 1]")
        logmass = _row_logmass(lp)
        if np.any(logmass > np.log1p(SUM_TOL)):
            raise CodecError("a row's probabilities sum to more than 1; not log-probabilities")
        if np.any(np.abs(mm - np.clip(1.0 - np.exp(logmass), 0.0, 1.0)) > 1e-3):
            raise CodecError("stored missing mass disagrees with the row's log-probabilities")
        return ids, lp, mm

    # quantized
    gm = mant >> rw
    gaps = np.where(big, (np.int64(1) << np.maximum(gb - 1, 0)) + gm, gcls).reshape(n, k)
    if np.any(gaps[:, 0] != 0):
        raise CodecError("first level gap of a row is not zero")
    q = L - np.cumsum(gaps, axis=1)
    if int(q.min()) < 0:
        raise CodecError("quantized levels underflow (corrupted gaps)")
    t = np.frombuffer(s_vals, dtype="<f2", count=n).astype(np.float64)
    if not np.isfinite(t).all() or np.any(t < 0):
        raise CodecError("stored top-k mass is not a finite value <= 1")
    levels = np.arange(L + 1, dtype=np.float64)
    s2 = (levels / L) ** 2
    s2[0] = (0.25 / L) ** 2
    logs2 = np.log(s2).astype(np.float32)
    e = s2.astype(np.float32)[q]
    lse = np.log(e.sum(axis=1, dtype=np.float64)) + t
    lp = logs2[q] - lse.astype(np.float32)[:, None]
    mm = (-np.expm1(-t)).astype(np.float32)
    return ids, lp, np.clip(mm, 0.0, 1.0)


def _check_zero_padding(sec: memoryview, nbits: int, what: str) -> None:
    if nbits % 8:
        last = sec[len(sec) - 1]
        if last >> (nbits % 8):
            raise CodecError(f"{what} section has non-zero padding bits")
