"""A logits shard (format CTLS v1): the top-k logits of many public samples, what one party sends per round.

    encode_shard(samples, *, vocab_size, metadata=None, bits=8, lossless=False) -> bytes
    decode_shard(data, *, expected_vocab_size=None, max_samples=None) -> (list[SampleLogits], dict[str, str])

Per sample it carries the target positions (int32, non-negative, strictly increasing), the top-k ids and
log-probabilities (one CTTK payload, see topk_codec, over all rows of the shard) and loss_bpb (finite float). The
missing mass of every row travels inside the CTTK payload and is filled in on decode. A JSON metadata dict
(str -> str, at most MAX_METADATA_BYTES) names the sender and what the logits were computed on (party_id,
tokenizer_hash, public_set_hash, run_id, round, ...). Byte layout: docs/wire.md.

Decode errors raise CodecError with a message starting "logits shard:".
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from cotune.wire.topk_codec import CodecError, decode_topk, encode_topk, peek_header
from cotune.wire.topk_types import SampleLogits

__all__ = ["encode_shard", "decode_shard", "shard_vocab_size", "CodecError", "SHARD_MAGIC", "SHARD_VERSION",
           "MAX_METADATA_BYTES"]

SHARD_MAGIC = b"CTLS"
SHARD_VERSION = 1
MAX_METADATA_BYTES = 64 * 1024
MAX_METADATA_KEYS = 256
MAX_POSITION = (1 << 31) - 1

_HEAD = struct.Struct("<4sBBHIIIIQQQ")  # magic, version, flags, reserved, n_samples, k, vocab, meta_len,
#                                         n_positions, positions_len, topk_len  -> 48 bytes
_SAMPLE = np.dtype([("n", "<u4"), ("loss_bpb", "<f8")])  # 12 bytes per sample
_TRAILER = 4


def _err(msg: str) -> CodecError:
    return CodecError(f"logits shard: {msg}")


def _check_metadata(metadata: Mapping[str, str] | None) -> bytes:
    metadata = dict(metadata or {})
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValueError(f"metadata has {len(metadata)} keys, at most {MAX_METADATA_KEYS} allowed")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata must map str to str; got {key!r}: {type(value).__name__} (convert numbers with str())")
    raw = json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(raw) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {len(raw)} bytes as JSON, at most {MAX_METADATA_BYTES} allowed")
    return raw


def encode_shard(
    samples: Sequence[SampleLogits],
    *,
    vocab_size: int,
    metadata: dict[str, str] | None = None,
    bits: int = 8,
    lossless: bool = False,
) -> bytes:
    """Encode samples' top-k logits into one shard. Raises ValueError on invalid samples or metadata.

    All samples share one k (samples without positions may have any k). The samples' missing_mass fields are not
    read: the codec carries 1 - sum(exp(logprobs)) per row.
    """
    meta = _check_metadata(metadata)
    n_samples = len(samples)
    ks = set()
    empty_k = None  # k of samples without positions: used only when no sample has positions
    counts = np.zeros(n_samples, dtype=np.int64)
    losses = np.zeros(n_samples, dtype=np.float64)
    pos_parts, id_parts, lp_parts = [], [], []
    for i, s in enumerate(samples):
        if not isinstance(s, SampleLogits):
            raise ValueError(f"sample {i} is a {type(s).__name__}, expected SampleLogits")
        pos = np.asarray(s.positions)
        ids = np.asarray(s.ids)
        lp = np.asarray(s.logprobs)
        if pos.ndim != 1 or (pos.size and (pos.dtype == np.bool_ or not np.issubdtype(pos.dtype, np.integer))):
            raise ValueError(f"sample {i}: positions must be a 1-D integer array, got {pos.dtype} {pos.shape}")
        n = pos.shape[0]
        if n == 0:
            if ids.size or lp.size:
                raise ValueError(f"sample {i}: no positions but {ids.size} ids / {lp.size} logprobs")
            if empty_k is None and ids.ndim == 2 and ids.shape[1] >= 1:
                empty_k = int(ids.shape[1])
        else:
            if ids.ndim != 2 or ids.shape[0] != n or lp.shape != ids.shape:
                raise ValueError(
                    f"sample {i}: ids {ids.shape} and logprobs {lp.shape} must both be [{n}, k] for {n} positions"
                )
            ks.add(ids.shape[1])
            if int(pos.min()) < 0 or int(pos.max()) > MAX_POSITION:
                raise ValueError(f"sample {i}: positions must lie in [0, {MAX_POSITION}]")
            if n > 1 and not np.all(np.diff(pos.astype(np.int64)) > 0):
                raise ValueError(f"sample {i}: positions must be strictly increasing")
            pos_parts.append(pos.astype(np.int64))
            id_parts.append(ids)
            lp_parts.append(lp)
        try:
            loss = float(s.loss_bpb)
        except (TypeError, ValueError):
            raise ValueError(f"sample {i}: loss_bpb must be a float, got {s.loss_bpb!r}") from None
        if not math.isfinite(loss):
            raise ValueError(f"sample {i}: loss_bpb must be finite, got {loss}")
        counts[i] = n
        losses[i] = loss
    if len(ks) > 1:
        raise ValueError(f"all samples in a shard must share one k, got {sorted(ks)}")
    k = ks.pop() if ks else (empty_k or 1)
    total = int(counts.sum())
    if total:
        all_ids = np.concatenate(id_parts)
        all_lp = np.concatenate(lp_parts)
    else:
        all_ids = np.zeros((0, k), np.int32)
        all_lp = np.zeros((0, k), np.float32)
    topk = encode_topk(all_ids, all_lp, vocab_size, bits=bits, lossless=lossless)

    # positions: per sample the first position, then gaps - 1 (0 for contiguous spans), as uint32, zlib'd
    if total:
        pos = np.concatenate(pos_parts)
        starts = np.zeros(total, dtype=bool)
        starts[np.cumsum(counts[counts > 0]) - counts[counts > 0]] = True
        deltas = np.empty(total, dtype=np.int64)
        deltas[0] = pos[0]
        deltas[1:] = pos[1:] - pos[:-1] - 1
        deltas[starts] = pos[starts]
        pos_sec = zlib.compress(deltas.astype("<u4").tobytes(), 6)
    else:
        pos_sec = b""
    table = np.empty(n_samples, dtype=_SAMPLE)
    table["n"] = counts
    table["loss_bpb"] = losses
    head = _HEAD.pack(
        SHARD_MAGIC, SHARD_VERSION, 0, 0, n_samples, k, int(vocab_size), len(meta), total, len(pos_sec), len(topk)
    )
    body = b"".join((head, meta, table.tobytes(), pos_sec, topk))
    return body + struct.pack("<I", zlib.crc32(body))


def shard_vocab_size(data: bytes) -> int:
    """The sender's vocabulary size a shard declares in its header (decode_shard validates the rest)."""
    mv = memoryview(data).cast("B")
    if len(mv) < _HEAD.size or bytes(mv[:4]) != SHARD_MAGIC:
        raise _err("not a Cotune logits shard")
    return int(_HEAD.unpack_from(mv, 0)[6])


def decode_shard(
    data: bytes, *, expected_vocab_size: int | None = None, max_samples: int | None = None
) -> tuple[list[SampleLogits], dict[str, str]]:
    """Decode and validate a shard. Raises CodecError (message starts with "logits shard:") on any problem."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _err(f"payload must be bytes, got {type(data).__name__}")
    mv = memoryview(data).cast("B")
    if len(mv) < _HEAD.size + _TRAILER:
        raise _err(f"truncated: {len(mv)} bytes, the header alone needs {_HEAD.size + _TRAILER}")
    magic, version, flags, reserved, n_samples, k, vocab, meta_len, total, pos_len, topk_len = _HEAD.unpack_from(mv, 0)
    if magic != SHARD_MAGIC:
        raise _err(f"not a Cotune logits shard (magic {bytes(magic)!r}, expected {SHARD_MAGIC!r})")
    if version != SHARD_VERSION:
        raise _err(f"version {version} is not supported (this build reads version {SHARD_VERSION})")
    if max_samples is not None and n_samples > max_samples:
        raise _err(f"holds {n_samples} samples, more than the allowed {max_samples}")
    size = _HEAD.size + meta_len + _SAMPLE.itemsize * n_samples + pos_len + topk_len + _TRAILER
    if size != len(mv):
        what = "truncated" if len(mv) < size else "has trailing bytes"
        raise _err(f"{what}: header describes {size} bytes, got {len(mv)}")
    if zlib.crc32(mv[: len(mv) - _TRAILER]) != struct.unpack_from("<I", mv, len(mv) - _TRAILER)[0]:
        raise _err("checksum mismatch: the bytes were corrupted in transit or storage")
    if flags or reserved:
        raise _err("reserved header fields are set; written by an incompatible encoder")
    if expected_vocab_size is not None and vocab != expected_vocab_size:
        raise _err(f"vocab_size {vocab} does not match the expected {expected_vocab_size}")
    if meta_len > MAX_METADATA_BYTES:
        raise _err(f"metadata is {meta_len} bytes, at most {MAX_METADATA_BYTES} allowed")

    off = _HEAD.size
    try:
        meta = json.loads(bytes(mv[off : off + meta_len]).decode("utf-8")) if meta_len else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _err(f"metadata is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(meta, dict) or not all(isinstance(a, str) and isinstance(b, str) for a, b in meta.items()):
        raise _err("metadata must be a JSON object of string keys and string values")
    if len(meta) > MAX_METADATA_KEYS:
        raise _err(f"metadata has {len(meta)} keys, at most {MAX_METADATA_KEYS} allowed")
    off += meta_len

    table = np.frombuffer(mv, dtype=_SAMPLE, count=n_samples, offset=off)
    off += _SAMPLE.itemsize * n_samples
    counts = table["n"].astype(np.int64)
    losses = table["loss_bpb"].astype(np.float64)
    if int(counts.sum()) != total:
        raise _err(f"per-sample position counts sum to {int(counts.sum())}, header says {total}")
    if not np.isfinite(losses).all():
        raise _err("a sample's loss_bpb is NaN or Inf")

    pos_sec = mv[off : off + pos_len]
    off += pos_len
    topk_sec = mv[off : off + topk_len]
    try:
        inner_vocab = peek_header(topk_sec)["vocab_size"]
        ids, lp, mm = decode_topk(topk_sec, max_rows=total)
    except CodecError as exc:
        raise _err(f"top-k section: {exc}") from None
    if inner_vocab != vocab:
        raise _err(f"top-k section has vocab_size {inner_vocab}, the shard header says {vocab}")
    if ids.shape[0] != total:
        raise _err(f"top-k section holds {ids.shape[0]} rows, the samples need {total}")
    if total and ids.shape[1] != k:
        raise _err(f"top-k section has k={ids.shape[1]}, header says {k}")

    if total:
        d = zlib.decompressobj()
        want = 4 * total
        try:
            raw = d.decompress(bytes(pos_sec), want + 1)
        except zlib.error as exc:
            raise _err(f"positions section is corrupted: {exc}") from None
        if len(raw) != want or not d.eof or d.unused_data or d.unconsumed_tail:
            raise _err("positions section has the wrong size")
        deltas = np.frombuffer(raw, dtype="<u4").astype(np.int64)
        nz = counts[counts > 0]
        starts_idx = np.cumsum(nz) - nz
        starts = np.zeros(total, dtype=bool)
        starts[starts_idx] = True
        steps = np.where(starts, 0, deltas + 1)
        # positions = start value + cumulative steps within the sample
        cum = np.cumsum(steps)
        seg_offset = np.repeat(cum[starts_idx], nz)
        positions = np.repeat(deltas[starts_idx], nz) + cum - seg_offset
        if int(positions.max()) > MAX_POSITION:
            raise _err(f"a position exceeds {MAX_POSITION}")
        positions = positions.astype(np.int32)
    elif pos_len:
        raise _err("positions section present but no positions")
    else:
        positions = np.zeros(0, dtype=np.int32)

    out: list[SampleLogits] = []
    bounds = np.concatenate(([0], np.cumsum(counts)))
    for i in range(n_samples):
        a, b = int(bounds[i]), int(bounds[i + 1])
        out.append(
            SampleLogits(
                positions=positions[a:b],
                ids=ids[a:b] if total else np.zeros((0, k), np.int32),
                logprobs=lp[a:b] if total else np.zeros((0, k), np.float32),
                loss_bpb=float(losses[i]),
                missing_mass=mm[a:b] if total else np.zeros(0, np.float32),
            )
        )
    return out, meta
