"""Sequence alignment of the public set between two tokenizations, computed once per (public set, pair).

The default, exact alignment pairs the positions where both tokenizations end a token at the same
character offset: the sender's next-token distribution after its token t describes the text starting at
ends[t], exactly what the receiver predicts after its token s when ends[s] == ends[t] (DESIGN §4.1).
Positions with no shared boundary get no target. The FedMKT paper's DTW over token strings is offered for
comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load as st_load

from cotune.lm.tokenizers import EncodedPair, encode_pair
from cotune.wire.safetensors_io import dumps, read_metadata

METHODS = ("offsets", "dtw")
FORMAT = "cotune.seqalign/1"


@dataclass
class SequenceAlignment:
    sample_offsets: np.ndarray  # int64 [N + 1]: pairs of sample i are [offsets[i], offsets[i+1])
    src_pos: np.ndarray         # int32 [M]
    dst_pos: np.ndarray         # int32 [M]
    src_hash: str = ""
    dst_hash: str = ""
    public_set_hash: str = ""
    method: str = "offsets"

    @property
    def num_samples(self) -> int:
        return len(self.sample_offsets) - 1

    def pairs(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} outside alignment of {self.num_samples} samples")
        a, b = int(self.sample_offsets[i]), int(self.sample_offsets[i + 1])
        return self.src_pos[a:b], self.dst_pos[a:b]

    def to_bytes(self) -> bytes:
        meta = {"format": FORMAT, "src_hash": self.src_hash, "dst_hash": self.dst_hash,
                "public_set_hash": self.public_set_hash, "method": self.method}
        return dumps({"sample_offsets": self.sample_offsets.astype(np.int64), "src_pos": self.src_pos.astype(np.int32),
                        "dst_pos": self.dst_pos.astype(np.int32)}, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> "SequenceAlignment":
        try:
            tensors = st_load(data)
            meta = read_metadata(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is bad input
            raise ValueError(f"not a sequence alignment (safetensors expected): {exc}") from exc
        if meta.get("format") != FORMAT:
            raise ValueError(f"sequence alignment has format {meta.get('format')!r}, expected {FORMAT!r}")
        try:
            offsets, src, dst = tensors["sample_offsets"], tensors["src_pos"], tensors["dst_pos"]
        except KeyError as exc:
            raise ValueError(f"sequence alignment lacks tensor {exc}") from exc
        if offsets.dtype != np.int64 or src.dtype != np.int32 or dst.dtype != np.int32:
            raise ValueError("sequence alignment tensors have wrong dtypes (int64 offsets, int32 positions expected)")
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != len(src):
            raise ValueError("sequence alignment offsets are not a monotone partition of its pairs")
        if src.shape != dst.shape or (len(src) and (src.min() < 0 or dst.min() < 0)):
            raise ValueError("sequence alignment positions must be non-negative and paired")
        return cls(offsets, src, dst, meta.get("src_hash", ""), meta.get("dst_hash", ""), meta.get("public_set_hash", ""),
                   meta.get("method", "offsets"))


def _last_target_per_end(pair: EncodedPair) -> tuple[np.ndarray, np.ndarray]:
    """(end offsets, positions) of target positions, keeping the last position for each end offset."""
    positions = np.arange(max(pair.response_start - 1, 0), len(pair.ids) - 1, dtype=np.int64)
    ends = np.asarray(pair.ends, dtype=np.int64)[positions]
    if len(ends) == 0:
        return ends, positions
    last = np.r_[ends[1:] != ends[:-1], True]
    return ends[last], positions[last]


def align_pair(src: EncodedPair, dst: EncodedPair, method: str = "offsets", *, text: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(src positions, dst positions) int32 of the aligned target positions of one sample."""
    if method == "offsets":
        src_ends, src_pos = _last_target_per_end(src)
        dst_ends, dst_pos = _last_target_per_end(dst)
        _, i, j = np.intersect1d(src_ends, dst_ends, assume_unique=True, return_indices=True)
        return src_pos[i].astype(np.int32), dst_pos[j].astype(np.int32)
    if method == "dtw":
        return _dtw_pairs(src, dst, text)
    raise ValueError(f"unknown alignment method {method!r}; choose one of {', '.join(METHODS)}")


def _spans(pair: EncodedPair, text: str) -> list[str]:
    starts = (0,) + pair.ends[:-1]
    return [text[a:b] for a, b in zip(starts, pair.ends)]


def _dtw_pairs(src: EncodedPair, dst: EncodedPair, text: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The FedMKT paper's alignment: DTW over token strings with edit-distance costs; each src target
    position takes the dst target position it is matched with (last one when several)."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    if text is None:
        raise ValueError("dtw alignment needs the sample text")
    a, b = _spans(src, text), _spans(dst, text)
    cost = cdist(a, b, scorer=Levenshtein.distance, dtype=np.int32).astype(np.float64)
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):  # O(n·m) with a vectorized inner recurrence per row
        row = cost[i - 1]
        diag_up = np.minimum(acc[i - 1, :-1], acc[i - 1, 1:]) + row
        cur = acc[i]
        for j in range(1, m + 1):
            cur[j] = min(diag_up[j - 1], cur[j - 1] + row[j - 1])
    i, j, match = n, m, {}
    while i > 0 and j > 0:
        match.setdefault(i - 1, j - 1)
        step = np.argmin((acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]))
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    src_targets = set(range(max(src.response_start - 1, 0), len(src.ids) - 1))
    dst_targets = set(range(max(dst.response_start - 1, 0), len(dst.ids) - 1))
    pairs = sorted((s, d) for s, d in match.items() if s in src_targets and d in dst_targets)
    return np.array([p[0] for p in pairs], np.int32), np.array([p[1] for p in pairs], np.int32)


def align_public_set(src_tok, dst_tok, samples: Sequence[tuple[str, str]], *, max_length: int = 512, method: str = "offsets",
                     public_set_hash: str = "", progress: Callable[[int, int], None] | None = None) -> SequenceAlignment:
    if method not in METHODS:
        raise ValueError(f"unknown alignment method {method!r}; choose one of {', '.join(METHODS)}")
    offsets = [0]
    src_all, dst_all = [], []
    total = len(samples)
    for n, (prompt, response) in enumerate(samples, 1):
        s = encode_pair(src_tok, prompt, response, max_length)
        d = encode_pair(dst_tok, prompt, response, max_length)
        sp, dp = align_pair(s, d, method, text=prompt + response)
        src_all.append(sp)
        dst_all.append(dp)
        offsets.append(offsets[-1] + len(sp))
        if progress and (n % 256 == 0 or n == total):
            progress(n, total)
    cat = lambda parts: np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)  # noqa: E731
    return SequenceAlignment(np.asarray(offsets, np.int64), cat(src_all), cat(dst_all), public_set_hash=public_set_hash, method=method)
