"""Sequence alignment of the public set between two tokenizations, computed once per
(public set, tokenizer pair) and served.

Default, method="offsets": exact alignment by character offsets. The sender's next-token distribution at
position t attaches to the receiver's position s whose token ends at the same character as t's
(`EncodedPair.ends`). Where several tokens end at the same character (the byte pieces of one character)
the last one is used: only it is followed by the next character. Pairs are kept only when both t and s are
target positions (their next token is a response token); positions with no shared boundary get nothing.

method="dtw": the FedMKT paper's dynamic time warping over the two token sequences, cost = Levenshtein
distance between the tokens' normalized byte forms, for comparison. A pair (t, s) is kept only where the warping
path leaves it diagonally (t + 1 and s + 1 start together): the end of a warped group on BOTH sides, so a token
warped onto several of the other side pairs with the last of them only, as the offsets method does. (Pairing every
receiver position with the last sender position warped onto it attached the positions inside a group, whose next
token is the rest of that group, to the distribution after the whole group: 18% of the pairs GPT-2 -> Llama-2 on
ARC.) DTW's own misalignments remain: its token correspondences come from string similarity, and about 12% of its
pairs GPT-2 <-> Llama-2 do not end at one character (the offsets method: none). Only between target positions.

`same_span` marks the pairs whose two NEXT tokens cover the same text (the sender's next token ends where the
receiver's does); `SequenceAlignment.pairs(i, same_span_only=True)` keeps only those, the option that skips
positions where the teacher's next token spans other text than the student's (GPT-2 ' lens' vs Llama-2 '▁l' 'ens').
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

FORMAT = "cotune.seqalign/1"
METHODS = ("offsets", "dtw")
# Bump when the pairs of an alignment change for the same inputs (encode_pair's truncation, a method's rule). 2: the
# passage is truncated from its end, DTW pairs group ends only, same_span. For the alignment service's cache key.
ALGORITHM_VERSION = "seqalign/2"


@dataclass(frozen=True, eq=False)
class SequenceAlignment:
    """Aligned position pairs for every sample of a public set, concatenated.

    Sample i's pairs are src_pos[sample_offsets[i]:sample_offsets[i+1]] (positions in the src tokenizer's
    `encode_pair` ids) and the same slice of dst_pos; same_span (uint8 [M], 1 = the two next tokens cover the same
    text) the same slice of it. Alignments from an older service carry no same_span (None)."""

    sample_offsets: np.ndarray  # int64 [N+1]
    src_pos: np.ndarray  # int32 [M]
    dst_pos: np.ndarray  # int32 [M]
    src_hash: str
    dst_hash: str
    public_set_hash: str
    method: str
    same_span: np.ndarray | None = None  # uint8 [M]

    def __post_init__(self):
        off = np.ascontiguousarray(self.sample_offsets)
        src = np.ascontiguousarray(self.src_pos)
        dst = np.ascontiguousarray(self.dst_pos)
        if self.same_span is not None:
            same = np.ascontiguousarray(self.same_span)
            if same.dtype != np.uint8 or same.shape != src.shape:
                raise ValueError(f"same_span must be uint8 with one entry per pair {src.shape}, got {same.dtype} "
                                 f"{same.shape}")
            object.__setattr__(self, "same_span", same)
        if off.dtype != np.int64 or off.ndim != 1 or off.size < 1:
            raise ValueError(f"sample_offsets must be a non-empty 1-D int64 array, got {off.dtype} {off.shape}")
        if src.dtype != np.int32 or dst.dtype != np.int32 or src.ndim != 1 or src.shape != dst.shape:
            raise ValueError(
                f"src_pos and dst_pos must be 1-D int32 of equal length, got {src.dtype}{src.shape} {dst.dtype}{dst.shape}"
            )
        if off[0] != 0 or off[-1] != src.size or np.any(np.diff(off) < 0):
            raise ValueError(
                f"sample_offsets must start at 0, never decrease and end at {src.size} (the pair count); "
                f"got first={int(off[0])} last={int(off[-1])}"
            )
        if src.size and (int(src.min()) < 0 or int(dst.min()) < 0):
            raise ValueError("aligned positions must be >= 0")
        if self.method not in METHODS:
            raise ValueError(f"unknown alignment method {self.method!r}; expected one of {METHODS}")
        for name in ("src_hash", "dst_hash", "public_set_hash"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string")
        object.__setattr__(self, "sample_offsets", off)
        object.__setattr__(self, "src_pos", src)
        object.__setattr__(self, "dst_pos", dst)

    @property
    def num_samples(self) -> int:
        return int(self.sample_offsets.shape[0] - 1)

    n_samples = num_samples

    def pairs(self, i: int, same_span_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Sample i's (src positions, dst positions); same_span_only: only the pairs whose next tokens cover the
        same text."""
        if not 0 <= i < self.n_samples:
            raise IndexError(f"sample {i} out of range (0..{self.n_samples - 1})")
        a, b = int(self.sample_offsets[i]), int(self.sample_offsets[i + 1])
        if not same_span_only:
            return self.src_pos[a:b], self.dst_pos[a:b]
        if self.same_span is None:
            raise ValueError("this sequence alignment has no same-span flags (built by an older alignment service); "
                             "rebuild it to skip positions whose next tokens differ")
        keep = self.same_span[a:b].astype(bool)
        return self.src_pos[a:b][keep], self.dst_pos[a:b][keep]

    def __eq__(self, other) -> bool:
        if not isinstance(other, SequenceAlignment):
            return NotImplemented
        return (
            (self.src_hash, self.dst_hash, self.public_set_hash, self.method)
            == (other.src_hash, other.dst_hash, other.public_set_hash, other.method)
            and np.array_equal(self.sample_offsets, other.sample_offsets)
            and np.array_equal(self.src_pos, other.src_pos)
            and np.array_equal(self.dst_pos, other.dst_pos)
            and (self.same_span is None) == (other.same_span is None)
            and (self.same_span is None or np.array_equal(self.same_span, other.same_span))
        )

    def to_bytes(self) -> bytes:
        from cotune.wire.safetensors_io import (
            dumps,  # deterministic bytes (safetensors' metadata order is not)
        )

        tensors = {"sample_offsets": self.sample_offsets, "src_pos": self.src_pos, "dst_pos": self.dst_pos}
        if self.same_span is not None:
            tensors["same_span"] = self.same_span
        return dumps(
            tensors,
            metadata={
                "format": FORMAT,
                "src_hash": self.src_hash,
                "dst_hash": self.dst_hash,
                "public_set_hash": self.public_set_hash,
                "method": self.method,
            },
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SequenceAlignment:
        """Parse and validate the wire form; it must name the public set it was computed on."""
        from cotune.align.vocabmap import _has_tensor
        from cotune.wire.safetensors_io import load_checked

        tensors = {"sample_offsets": "I64", "src_pos": "I32", "dst_pos": "I32"}
        if _has_tensor(data, "same_span"):  # absent from an older service's alignments
            tensors["same_span"] = "U8"
        arrays, meta = load_checked(data, what="sequence alignment", tensors=tensors,
                                    metadata=("src_hash", "dst_hash", "public_set_hash", "method"),
                                    expect={"format": FORMAT})
        if not meta["public_set_hash"]:  # positions are per public sample: one not naming its set cannot be matched
            raise ValueError("sequence alignment names no public set (empty public_set_hash); refusing it")
        return cls(
            sample_offsets=arrays["sample_offsets"],
            src_pos=arrays["src_pos"],
            dst_pos=arrays["dst_pos"],
            src_hash=meta["src_hash"],
            dst_hash=meta["dst_hash"],
            public_set_hash=meta["public_set_hash"],
            method=meta["method"],
            same_span=arrays.get("same_span"),
        )


# ---------------------------------------------------------------------------------------------------------------


def _last_per_end(ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(end values, last position with that end), sorted by end value."""
    pos = np.arange(len(ends), dtype=np.int64)
    order = np.lexsort((pos, ends))
    e = ends[order]
    last = np.ones(len(e), dtype=bool)
    last[:-1] = e[1:] != e[:-1]
    return e[last], order[last]


def _target_mask(enc, positions: np.ndarray) -> np.ndarray:
    tp = enc.target_positions
    return (positions >= tp.start) & (positions < tp.stop)


def _align_offsets(src, dst) -> tuple[np.ndarray, np.ndarray]:
    s_end, s_pos = _last_per_end(np.asarray(src.ends, dtype=np.int64))
    d_end, d_pos = _last_per_end(np.asarray(dst.ends, dtype=np.int64))
    _, si, di = np.intersect1d(s_end, d_end, assume_unique=True, return_indices=True)
    sp, dp = s_pos[si], d_pos[di]
    keep = _target_mask(src, sp) & _target_mask(dst, dp)
    return sp[keep].astype(np.int32), dp[keep].astype(np.int32)


def dtw_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classic DTW (steps (1,0), (0,1), (1,1)) over a cost matrix [n, m]; returns the warping path (i, j) from
    (0, 0) to (n-1, m-1). Rows are filled with numpy: x_j = min(a_j, x_{j-1} + c_j) is
    C_j + min_{k<=j}(a_k - C_k) with C the running sum of the row's costs."""
    n, m = cost.shape
    if n == 0 or m == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cost = cost.astype(np.float64)
    acc = np.empty((n, m), dtype=np.float64)
    acc[0] = np.cumsum(cost[0])
    for i in range(1, n):
        prev = acc[i - 1]
        a = cost[i] + np.minimum(prev, np.concatenate([[np.inf], prev[:-1]]))
        csum = np.cumsum(cost[i])
        acc[i] = csum + np.minimum.accumulate(a - csum)
    i, j = n - 1, m - 1
    path_i, path_j = [i], [j]
    while i > 0 or j > 0:
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            diag, up, left = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
            if diag <= up and diag <= left:
                i, j = i - 1, j - 1
            elif up <= left:
                i -= 1
            else:
                j -= 1
        path_i.append(i)
        path_j.append(j)
    return np.asarray(path_i[::-1], dtype=np.int64), np.asarray(path_j[::-1], dtype=np.int64)


def _spans(enc, text: str) -> list[str]:
    starts = (0,) + tuple(enc.ends[:-1])
    return [text[a:b] for a, b in zip(starts, enc.ends)]


def _align_dtw(src, dst, src_forms, dst_forms, text) -> tuple[np.ndarray, np.ndarray]:
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    if src_forms is not None and dst_forms is not None:  # token strings: each token's raw bytes
        s_tok = [src_forms[i].decode("latin-1") if 0 <= i < len(src_forms) else "" for i in src.ids]
        d_tok = [dst_forms[i].decode("latin-1") if 0 <= i < len(dst_forms) else "" for i in dst.ids]
    elif text is not None:  # token strings: the text each token covers
        s_tok, d_tok = _spans(src, text), _spans(dst, text)
    else:
        raise ValueError("method='dtw' needs src_forms and dst_forms (normalized_forms of both tokenizers) or text")
    if not s_tok or not d_tok:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    cost = process.cdist(s_tok, d_tok, scorer=Levenshtein.distance, workers=1)
    pi, pj = dtw_path(cost)
    # keep (t, s) where the path next steps diagonally: t + 1 and s + 1 start together, so both next tokens begin
    # at one boundary (the ends of a warped group on both sides; a position inside a group is followed by the rest
    # of its group, not by what follows the other side's token)
    last = np.ones(len(pj), dtype=bool)
    last[:-1] = (pi[1:] != pi[:-1]) & (pj[1:] != pj[:-1])
    sp, dp = pi[last], pj[last]
    keep = _target_mask(src, sp) & _target_mask(dst, dp)
    return sp[keep].astype(np.int32), dp[keep].astype(np.int32)


def align_pair(
    src,
    dst,
    method: str = "offsets",
    *,
    src_forms: Sequence[bytes] | None = None,
    dst_forms: Sequence[bytes] | None = None,
    text: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Aligned (src_pos, dst_pos) int32 pairs for one sample encoded by both tokenizers (`EncodedPair`s of
    the same prompt/response), sorted by position. method='dtw' also needs the token strings: both
    tokenizers' normalized forms (preferred), or the sample text (prompt + response)."""
    if method == "offsets":
        return _align_offsets(src, dst)
    if method == "dtw":
        return _align_dtw(src, dst, src_forms, dst_forms, text)
    raise ValueError(f"unknown alignment method {method!r}; expected one of {METHODS}")


def same_span(src, dst, src_pos: np.ndarray, dst_pos: np.ndarray) -> np.ndarray:
    """bool [M]: for aligned pairs (t, s) of one sample, whether the sender's next token t + 1 and the receiver's
    next token s + 1 cover the same text (t and s end at one character, and so do t + 1 and s + 1). Elsewhere the
    teacher's next-token distribution is about other text than the student's (GPT-2 ' lens' is Llama-2's '▁l'
    'ens')."""
    s_end = np.asarray(src.ends, dtype=np.int64)
    d_end = np.asarray(dst.ends, dtype=np.int64)
    t = np.asarray(src_pos, dtype=np.int64)
    s = np.asarray(dst_pos, dtype=np.int64)
    if not len(t):
        return np.zeros(0, dtype=bool)
    return (s_end[t] == d_end[s]) & (s_end[t + 1] == d_end[s + 1])


def public_set_digest(samples: Sequence[tuple[str, str]]) -> str:
    """A content hash of (prompt, response) samples, for callers without a better public-set hash."""
    h = hashlib.sha256()
    for prompt, response in samples:
        for part in (prompt, response):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def align_public_set(
    src_tok,
    dst_tok,
    samples: Sequence[tuple[str, str]],
    *,
    max_length: int = 512,
    method: str = "offsets",
    public_set_hash: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> SequenceAlignment:
    """Encode every (prompt, response) with both tokenizers (`encode_pair`, the encoding every party uses)
    and align them."""
    from cotune.align.normalize import normalized_forms_cached
    from cotune.align.tokenizers import encode_pairs, tokenizer_hash

    if method not in METHODS:
        raise ValueError(f"unknown alignment method {method!r}; expected one of {METHODS}")
    forms = {}
    if method == "dtw":
        forms = {"src_forms": normalized_forms_cached(src_tok), "dst_forms": normalized_forms_cached(dst_tok)}
    offsets = [0]
    src_parts, dst_parts, same_parts = [], [], []
    total = len(samples)
    block = 512
    for first in range(0, total, block):
        chunk = [(p, r) for p, r in samples[first : first + block]]
        for a, b in zip(encode_pairs(src_tok, chunk, max_length), encode_pairs(dst_tok, chunk, max_length)):
            sp, dp = align_pair(a, b, method, **forms)
            src_parts.append(sp)
            dst_parts.append(dp)
            same_parts.append(same_span(a, b, sp, dp))
            offsets.append(offsets[-1] + len(sp))
        if progress is not None:
            progress(min(first + block, total), total)
    return SequenceAlignment(
        sample_offsets=np.asarray(offsets, dtype=np.int64),
        src_pos=np.concatenate(src_parts).astype(np.int32) if src_parts else np.zeros(0, np.int32),
        dst_pos=np.concatenate(dst_parts).astype(np.int32) if dst_parts else np.zeros(0, np.int32),
        src_hash=tokenizer_hash(src_tok),
        dst_hash=tokenizer_hash(dst_tok),
        public_set_hash=public_set_hash,
        method=method,
        same_span=(np.concatenate(same_parts) if same_parts else np.zeros(0, bool)).astype(np.uint8),
    )
