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
_LANE_SYMBOLS = 512  # target symbols per rANS lane (each lane costs a 4-byte final state)
_MAX_LANES = 16384
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


class _Layout:
    """The symbol alphabet of a payload and per-symbol lookup tables.

    Quantized: symbol = gap_class * RB + rank_class. Lossless: symbol = rank_class.
    rank class c of rank R: c = bitlen(R); R = rbase[c] + (c - 1 mantissa bits).
    gap class g of a level gap G: G < 16 -> g = G, no mantissa; else g = bitlen(G) + 11, G = gbase[g] + (bitlen - 1) bits.
    Rank mantissas form one bit stream (every entry), gap mantissas a second one (entries with a gap >= 16 only).
    """

    def __init__(self, quantized: bool, levels: int, rb_max: int):
        RB = rb_max + 1
        rc = np.arange(RB, dtype=np.int64)
        rw = np.maximum(rc - 1, 0)
        rbase = np.where(rc >= 1, np.int64(1) << rw, 0)
        if quantized:
            GS = _n_gap_symbols(levels)
            gc = np.arange(GS, dtype=np.int64)
            direct = gc < _GDIRECT
            gb = gc - (_GDIRECT - _bitlen_int(_GDIRECT))
            gw = np.where(direct, 0, gb - 1)
            gbase = np.where(direct, gc, np.int64(1) << np.maximum(gb - 1, 0))
            g_of, r_of = np.divmod(np.arange(GS * RB, dtype=np.int64), RB)
            self.gbase = gbase
        else:
            # alphabet >= 2 (the frequency normaliser needs a spare); a symbol past the last class decodes to a rank
            # that fails validation
            r_of = np.minimum(np.arange(max(2, RB), dtype=np.int64), RB)
            rw = np.append(rw, 0)
            rbase = np.append(rbase, np.int64(1) << 40)
            g_of = np.zeros_like(r_of)
            gw = np.zeros(1, np.int64)
            gbase = np.zeros(1, np.int64)
        self.RB = RB
        self.A = r_of.size
        self.sym_rw = rw[r_of].astype(np.uint8)
        self.sym_gw = gw[g_of].astype(np.uint8)
        self.sym_rbase = rbase[r_of].astype(np.int64)
        self.sym_gbase = gbase[g_of].astype(np.int32)


def _class_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bitlen class and mantissa (value - 2^(class-1)) of non-negative ints."""
    c = _bitlen(values)
    return c, np.where(c >= 1, values - (np.int64(1) << np.maximum(c - 1, 0)), 0)


def _class_ranges(n_dict: int) -> list[tuple[int, int]]:
    """Rank ranges of the rank classes: class 0 = [0, 1), class c >= 1 = [2^(c-1), 2^c), cut at n_dict."""
    out = [(0, min(1, n_dict))]
    c = 1
    while (1 << (c - 1)) < n_dict:
        out.append((1 << (c - 1), min(1 << c, n_dict)))
        c += 1
    return out


def _ef_params(s: int, V: int) -> tuple[int, int, int, int]:
    """Elias-Fano layout of s sorted values in [0, V): (low bits l, high bit-vector length, low bytes, high bytes)."""
    low = max(0, _bitlen_int(V // s) - 1)
    nbits_high = ((V - 1) >> low) + s
    return low, nbits_high, (s * low + 7) // 8, (nbits_high + 7) // 8


def _ef_encode(vals: np.ndarray, V: int) -> bytes:
    s = vals.size
    low, nbh, _, _ = _ef_params(s, V)
    vals = vals.astype(np.int64)
    lo = _pack_bits(vals & ((1 << low) - 1), np.full(s, low, dtype=np.uint32)) if low else b""
    bits = np.zeros(nbh, dtype=np.uint8)
    bits[(vals >> low) + np.arange(s)] = 1
    return lo + np.packbits(bits, bitorder="little").tobytes()


def _ef_decode(buf: memoryview, s: int, V: int) -> np.ndarray:
    low, nbh, lb, hb = _ef_params(s, V)
    _check_zero_padding(buf[:lb], s * low, "dictionary")
    lo = _unpack_bits(buf[:lb], np.full(s, low, dtype=np.uint32)).astype(np.int64) if low else np.zeros(s, np.int64)
    pos = np.flatnonzero(np.unpackbits(np.frombuffer(buf[lb : lb + hb], dtype=np.uint8), bitorder="little"))
    if pos.size != s or (s and int(pos[-1]) >= nbh):
        raise CodecError("dictionary section is corrupted (Elias-Fano bit vector)")
    vals = ((pos - np.arange(s)) << low) | lo
    if s and (int(vals[-1]) >= V or np.any(np.diff(vals) <= 0)):
        raise CodecError("dictionary section is corrupted (ids not increasing within a class, or >= vocab_size)")
    return vals


def _dict_nbytes(n_dict: int, V: int) -> int:
    return sum(sum(_ef_params(b - a, V)[2:]) for a, b in _class_ranges(n_dict))


def _pos_contexts(k: int, n_ctx: int) -> np.ndarray:
    """Context of each position in a row: min(bitlen(j), n_ctx - 1)."""
    return np.minimum(_bitlen(np.arange(k)), n_ctx - 1).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------------
# variable-width bit packing (LSB first; bit i of the stream is bit i % 8 of byte i // 8)
# --------------------------------------------------------------------------------------------------------------------


def _pack_bits(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Pack values[i] (< 2^widths[i], widths <= 32) back to back, LSB first. Vectorized over 32-bit words, in chunks.

    Bits of different values never overlap, so a word's OR equals the sum of its contributions (< 2^32): per-word
    sums are differences of a running uint32 sum (mod 2^32, exact) at each word's last contributor, which is several
    times faster than ufunc.reduceat."""
    values = values.astype(np.uint32, copy=False)
    widths = widths.astype(np.uint32, copy=False)
    n = values.size
    if n == 0:
        return b""
    total = int(widths.sum(dtype=np.int64))
    nwords = (total + 31) // 32
    words = np.zeros(nwords + 2, dtype=np.uint32)
    base = 0  # bit offset of the chunk
    for s in range(0, n, _CHUNK):
        w = widths[s : s + _CHUNK]
        v = values[s : s + _CHUNK]
        wb, rem = divmod(base, 32)
        off = np.cumsum(w, dtype=np.uint32)
        base += int(off[-1])
        off -= w
        off += np.uint32(rem)
        idx = off >> np.uint32(5)
        sh = off & np.uint32(31)
        lo = v << sh
        hi = (v >> np.uint32(1)) >> (np.uint32(31) - sh)
        ends = np.flatnonzero(idx[1:] != idx[:-1])
        ends = np.append(ends, idx.size - 1)
        widx = idx[ends].astype(np.int64) + wb
        for part, shift in ((lo, 0), (hi, 1)):
            g = np.cumsum(part, dtype=np.uint32)[ends]  # wraps mod 2^32; the differences are exact word sums
            g[1:] -= g[:-1]
            words[widx + shift] |= g
    return words[:nwords].astype("<u4").tobytes()[: (total + 7) // 8]


def _unpack_bits(data: bytes | memoryview, widths: np.ndarray) -> np.ndarray:
    """Inverse of _pack_bits (uint32 values); the caller has checked len(data) == ceil(sum(widths) / 8)."""
    widths = widths.astype(np.uint32, copy=False)
    n = widths.size
    if n == 0:
        return np.zeros(0, dtype=np.uint32)
    nbytes = len(data)
    nwords = (nbytes + 3) // 4
    buf = np.zeros((nwords + 2) * 4, dtype=np.uint8)
    buf[:nbytes] = np.frombuffer(data, dtype=np.uint8)
    words = buf.view("<u4")
    out = np.empty(n, dtype=np.uint32)
    base = 0
    one = np.uint32(1)
    for s in range(0, n, _CHUNK):
        w = widths[s : s + _CHUNK]
        wb, rem = divmod(base, 32)
        off = np.cumsum(w, dtype=np.uint32)
        base += int(off[-1])
        off -= w
        off += np.uint32(rem)
        idx = (off >> np.uint32(5)).astype(np.int64)
        idx += wb
        sh = off & np.uint32(31)
        v = words[idx] >> sh
        v |= (words[idx + 1] << one) << (np.uint32(31) - sh)
        v &= (one << w) - one
        out[s : s + _CHUNK] = v
    return out


# --------------------------------------------------------------------------------------------------------------------
# interleaved rANS, vectorized over lanes
# --------------------------------------------------------------------------------------------------------------------


def _normalize_freqs(counts: np.ndarray) -> np.ndarray:
    """counts [C, A] -> frequencies [C, A] summing to 2^PROB_BITS per context, each in [0, 2^PROB_BITS - 1] and
    >= 1 where count > 0. (No frequency reaches 2^PROB_BITS, so every coder quantity fits in uint32; a context with a
    single symbol gives 1 to a neighbouring symbol, costing 4e-5 bits per symbol.)"""
    counts = counts.astype(np.int64)
    C, A = counts.shape
    freq = np.zeros((C, A), dtype=np.int64)
    for c in range(C):
        cnt = counts[c]
        tot = int(cnt.sum())
        present = cnt > 0
        npres = int(present.sum())
        if npres <= 1:
            top = int(np.argmax(cnt)) if tot else 0
            freq[c, top] = _M - 1
            freq[c, (top + 1) % A] = 1
            continue
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
    """Encode symbols given as flat indices into freq [C, A] (ctx * A + sym). Returns (stream, lanes).

    Symbol i is coded by lane i % lanes at step i // lanes; lanes run in lockstep (one numpy op per step for all)."""
    n = tab_idx.size
    lanes = _rans_lanes(n)
    f = freq.ravel().astype(np.uint32)
    cum = (np.cumsum(freq, axis=1) - freq).ravel().astype(np.uint32)
    # floor(x / f) as float64 x * (1/f) + eps: exact for x < 2^32, f < 2^15 (error < 2^-20 < eps < 1/f - 2^-20)
    rcp_tab = 1.0 / np.maximum(f, 1).astype(np.float64)
    x = np.full(lanes, _RANS_L, dtype=np.uint32)
    steps = (n + lanes - 1) // lanes
    emitted: list[np.ndarray] = []
    xmax_tab = f << np.uint32(32 - PROB_BITS)  # ((L >> PB) << 16) * f < 2^32 since f < 2^PB
    mf_tab = np.uint32(_M) - f  # x' = (q << PB) + (x - q f) + c = x + q (M - f) + c
    tab_idx = tab_idx.astype(np.intp, copy=False)  # intp indices gather ~2x faster than int32 ones
    s16 = np.uint32(16)
    eps = 2.0**-18
    for i in range(steps - 1, -1, -1):
        a = i * lanes
        b = min(a + lanes, n)
        xs = x[: b - a]
        ti = tab_idx[a:b]
        m = xs >= xmax_tab[ti]
        words = xs[m]
        if words.size:
            emitted.append(words.astype(np.uint16))  # the low 16 bits
            xs[m] = words >> s16
        q = xs * rcp_tab[ti]
        q += eps
        qi = q.astype(np.uint32)
        qi *= mf_tab[ti]
        xs += qi
        xs += cum[ti]
    emitted.reverse()
    words = np.concatenate(emitted) if emitted else np.empty(0, dtype=np.uint16)
    return x.astype("<u4").tobytes() + words.astype("<u2").tobytes(), lanes


def _rans_decode(stream: bytes | memoryview, lanes: int, ctx_row: np.ndarray, n: int, freq: np.ndarray) -> np.ndarray:
    """Decode n symbols; symbol i has context ctx_row[i % len(ctx_row)]. Returns int32 symbols."""
    C, A = freq.shape
    if len(stream) < 4 * lanes or (len(stream) - 4 * lanes) % 2:
        raise CodecError("entropy-coded section is truncated or misaligned")
    x = np.frombuffer(stream, dtype="<u4", count=lanes).astype(np.uint32)
    words = np.frombuffer(stream, dtype="<u2", offset=4 * lanes).astype(np.uint32)
    if np.any(x < _RANS_L):
        raise CodecError("entropy-coded section is corrupted (bad initial coder state)")
    # per (context, slot): the symbol, and (freq << 16 | slot - cum) so that x' = freq * (x >> PB) + (slot - cum)
    cum = np.cumsum(freq, axis=1) - freq
    sym_tab = np.empty((C, _M), dtype=np.int32)
    fb_tab = np.empty((C, _M), dtype=np.uint32)
    slots = np.arange(_M, dtype=np.int64)
    for c in range(C):
        s = np.repeat(np.arange(A, dtype=np.int32), freq[c])
        sym_tab[c] = s
        fb_tab[c] = (freq[c][s] << 16) | (slots - cum[c][s])
    sym_tab = sym_tab.ravel()
    fb_tab = fb_tab.ravel()
    k = ctx_row.size
    # context base offset of every symbol, as a repeating pattern (uint32, period k)
    reps = (n + k - 1) // k
    cbase = np.tile(ctx_row.astype(np.intp) * _M, reps)[:n]  # intp: fast gathers
    out = np.empty(n, dtype=np.int32)
    steps = (n + lanes - 1) // lanes
    pos = 0
    nwords = words.size
    mask_m = np.uint32(_M - 1)
    pb = np.uint32(PROB_BITS)
    low16 = np.uint32(0xFFFF)
    for i in range(steps):
        a = i * lanes
        b = min(a + lanes, n)
        xs = x[: b - a]
        j = cbase[a:b] + (xs & mask_m)
        out[a:b] = sym_tab[j]
        fb = fb_tab[j]
        xs >>= pb
        xs *= fb >> np.uint32(16)
        xs += fb & low16
        m = xs < _RANS_L
        low = xs[m]
        if low.size:
            cnt = low.size
            if pos + cnt > nwords:
                raise CodecError("entropy-coded section is truncated or corrupted (ran out of words)")
            xs[m] = (low << np.uint32(16)) | words[pos : pos + cnt]
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
    if np.any(freq.sum(axis=1) != _M) or np.any(freq >= _M):
        raise CodecError("frequency tables are corrupted (a context does not sum to 2^PROB_BITS)")
    return freq, lanes


def _choose_contexts(sym: np.ndarray, n: int, k: int, A: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Pick 1 or the full set of position contexts, whichever gives the smaller estimated output.
    Returns (C, freq [C, A], flat table index ctx * A + sym per entry)."""
    full = min(_MAX_CTX, _bitlen_int(max(k - 1, 0)) + 1)
    ctx_full = np.tile(_pos_contexts(k, full).astype(np.int32) * np.int32(A), n)
    counts_full = np.bincount(ctx_full + sym, minlength=full * A).reshape(full, A)
    best = None
    for C, counts in ((1, counts_full.sum(axis=0, keepdims=True)), (full, counts_full)):
        freq = _normalize_freqs(counts)
        est = _entropy_bits(counts) / 8 + len(zlib.compress(freq.astype("<u2").tobytes(), 9))
        if best is None or est < best[0]:
            best = (est, C, freq)
        if full == 1:
            break
    assert best is not None
    C, freq = best[1], best[2]
    return C, freq, (ctx_full + sym if C == full else sym)


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

    if lossless:
        logmass = _row_logmass(lp)
    else:
        # descending order by log-probability (stable); the common case is already sorted
        if k > 1 and not np.all(lp[:, 1:] <= lp[:, :-1]):
            order = np.argsort(-lp, axis=1, kind="stable")
            lp = np.take_along_axis(lp, order, axis=1)
            ids = np.take_along_axis(ids, order, axis=1)
        # s = sqrt(p / p_max); sum(s^2) gives the row's top-k mass relative to its max
        s = lp - lp[:, :1]
        s *= np.float32(0.5)
        np.exp(s, out=s)
        logmass = lp[:, 0].astype(np.float64) + np.log(np.einsum("ij,ij->i", s, s, dtype=np.float64))
    if np.any(logmass > np.log1p(SUM_TOL)):
        row = int(np.argmax(logmass))
        raise ValueError(
            f"row {row}: probabilities sum to {np.exp(logmass[row]):.4g} > 1; logprobs must be log-probabilities "
            "(log_softmax over the full vocabulary), not logits"
        )
    if not lossless:
        t = np.maximum(-logmass, 0.0)
        if np.any(t > 65504.0):
            raise ValueError("a row's top-k mass is below exp(-65504); not representable")
        t16 = t.astype(np.float16)
        s *= np.float32((1 << bits) - 1)
        np.rint(s, out=s)
    flat_ids = ids.ravel()

    # --- ids: payload-frequency ranks, or raw ids, whichever is estimated smaller
    counts = np.bincount(flat_ids, minlength=V)
    order = np.argsort(-counts, kind="stable")
    n_dict = int(np.count_nonzero(counts))
    sorted_counts = counts[order[:n_dict]].astype(np.float64)
    ranks_b = _bitlen(np.arange(n_dict))
    raw_b = _bitlen(np.arange(V))

    def _cost(cnts: np.ndarray, b: np.ndarray) -> float:
        hist = np.bincount(b, weights=cnts)
        p = hist[hist > 0] / hist.sum()
        return float(-(hist[hist > 0] * np.log2(p)).sum() + (cnts * np.maximum(b - 1, 0)).sum())

    use_dict = _cost(sorted_counts, ranks_b) + 8 * _dict_nbytes(n_dict, V) < _cost(counts.astype(np.float64), raw_b)
    if use_dict:
        # Ranks by descending frequency decide each id's rank class; within a class, ranks follow ascending id (the
        # mantissa is coded uniformly, so this costs nothing) and the class's ids travel as one Elias-Fano list.
        parts, blocks = [], []
        for a, b in _class_ranges(n_dict):
            part = np.sort(order[a:b])
            parts.append(part)
            blocks.append(_ef_encode(part, V))
        dict_ids = np.concatenate(parts)
        dict_sec = b"".join(blocks)
        rank_of = np.zeros(V, dtype=np.int64)
        rank_of[dict_ids] = np.arange(n_dict, dtype=np.int64)
        rb_max = _bitlen_int(n_dict - 1)
    else:
        rank_of = np.arange(V, dtype=np.int64)
        dict_sec = b""
        n_dict = 0
        rb_max = _bitlen_int(V - 1)
    rc_of_id, rm_of_id = _class_of(rank_of)
    packed = ((rm_of_id << 5) | rc_of_id).astype(np.uint32)[flat_ids]  # one gather: mantissa << 5 | class
    rcls = (packed & np.uint32(31)).astype(np.int32)
    rmant = packed >> np.uint32(5)

    # --- log-probabilities
    if lossless:
        lay = _Layout(False, 0, rb_max)
        sym = rcls
        vals = lp.astype("<f4").tobytes() + _lossless_missing(lp).astype("<f4").tobytes()
        gap_sec = b""
    else:
        L = (1 << bits) - 1
        lay = _Layout(True, L, rb_max)
        q = s.astype(np.int32).reshape(n, k)  # s: rint(L * sqrt(p / p_max)), computed above
        gaps = np.empty_like(q)
        gaps[:, 0] = 0
        np.subtract(q[:, :-1], q[:, 1:], out=gaps[:, 1:])
        gaps = gaps.ravel()
        g_all = np.arange(L + 1, dtype=np.int64)
        gc_of_gap = np.where(g_all < _GDIRECT, g_all, _bitlen(g_all) + (_GDIRECT - _bitlen_int(_GDIRECT)))
        sym = gc_of_gap.astype(np.int32)[gaps] * np.int32(lay.RB) + rcls
        big = np.flatnonzero(gaps >= _GDIRECT)
        gap_sec = _pack_bits(gaps[big] - lay.gbase[gc_of_gap[gaps[big]]], lay.sym_gw[sym[big]])
        vals = t16.astype("<f2").tobytes()

    C, freq, tab_idx = _choose_contexts(sym, n, k, lay.A)
    rans, lanes = _rans_encode(tab_idx, freq)
    tables = _tables_bytes(freq, lanes)
    mant_sec = _pack_bits(rmant, lay.sym_rw[sym]) + gap_sec
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
    if flags & FLAG_DICT:
        if not 1 <= n_dict <= min(V, nk):
            raise CodecError(f"dictionary size {n_dict} out of range [1, {min(V, nk)}]")
        if l_dict != _dict_nbytes(n_dict, V):
            raise CodecError(f"dictionary section is {l_dict} bytes, expected {_dict_nbytes(n_dict, V)}")
        parts, off = [], 0
        for a, b in _class_ranges(n_dict):
            nbytes = sum(_ef_params(b - a, V)[2:])
            parts.append(_ef_decode(s_dict[off : off + nbytes], b - a, V))
            off += nbytes
        dict_ids = np.concatenate(parts)
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
    if codec == CODEC_QUANTIZED:
        L = (1 << bits) - 1
        lay = _Layout(True, L, rb_max)
        if l_vals != 2 * n:
            raise CodecError(f"missing-mass section is {l_vals} bytes, expected {2 * n}")
    else:
        lay = _Layout(False, 0, rb_max)
        if l_vals != 4 * nk + 4 * n:
            raise CodecError(f"value section is {l_vals} bytes, expected {4 * nk + 4 * n}")

    freq, lanes = _parse_tables(s_tab, lay.A, nk)
    sym = _rans_decode(s_rans, lanes, _pos_contexts(k, freq.shape[0]), nk, freq)

    rw = lay.sym_rw[sym]
    gw = lay.sym_gw[sym]
    nbits_r = int(rw.sum(dtype=np.int64))
    big = np.flatnonzero(gw)
    gw_big = gw[big]
    nbits_g = int(gw_big.sum(dtype=np.int64))
    len_r, len_g = (nbits_r + 7) // 8, (nbits_g + 7) // 8
    if l_mant != len_r + len_g:
        raise CodecError(f"mantissa section is {l_mant} bytes, the coded symbols need {len_r + len_g}")
    _check_zero_padding(s_mant[:len_r], nbits_r, "rank mantissa")
    _check_zero_padding(s_mant[len_r:], nbits_g, "gap mantissa")
    R = lay.sym_rbase[sym] + _unpack_bits(s_mant[:len_r], rw)
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
    gaps = lay.sym_gbase[sym]
    if big.size:
        gaps[big] += _unpack_bits(s_mant[len_r:], gw_big).astype(np.int32)
    gaps = gaps.reshape(n, k)
    if np.any(gaps[:, 0] != 0):
        raise CodecError("first level gap of a row is not zero")
    q = np.cumsum(gaps, axis=1, dtype=np.int32 if k * L < 2**31 else np.int64)
    if int(q[:, -1].max()) > L:
        raise CodecError("quantized levels underflow (corrupted gaps)")
    np.subtract(q.dtype.type(L), q, out=q)
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
