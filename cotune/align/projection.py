"""Projection of top-k distributions from a sender's vocabulary into a receiver's, fully
vectorized: no per-token Python loop.

Each row's ids go through the MinED vocabulary map; probabilities of ids that land on the same receiver id
are summed (the reference keeps only the first); the sender's missing mass 1 - sum(top-k p) is kept
separately; the projected row is renormalized to sum to 1.

How: the mapped id and the probability's float32 bits are packed into one int64 per entry and each row is
sorted with numpy's SIMD sort, which groups equal ids; `np.add.reduceat` sums each group into the group's
first slot. Rows are processed in chunks so the temporaries stay in cache.
"""

from __future__ import annotations

import numpy as np


def project_topk(ids: np.ndarray, probs: np.ndarray, vocab_map) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map each row's top-k ids through `vocab_map` (sender id -> receiver id; an int array, or a VocabMap).

    ids: int [n, k] sender ids; probs: float [n, k] probabilities (not log-probabilities).

    Returns (dst_ids int64 [n, k], dst_probs float32 [n, k], missing float32 [n]):
    * each row holds its distinct receiver ids in ascending order; the slots freed by merging duplicates, and
      those of dropped ids, are padding (id 0, probability 0), wherever they fall in the row;
    * dst_probs sums to 1 per row (a row whose ids are all dropped is all padding, sum 0);
    * missing = 1 - sum(input probs) per row, clipped to [0, 1]: the sender's mass outside its top-k.
    Ids < 0 or >= len(vocab_map) are dropped: their mass is lost (not moved to `missing`), never an error.
    """
    table = np.asarray(getattr(vocab_map, "ids", vocab_map))
    ids = np.asarray(ids)
    probs = np.asarray(probs, dtype=np.float32)
    if ids.ndim != 2 or ids.shape != probs.shape:
        raise ValueError(f"ids and probs must both be [n, k]; got {ids.shape} and {probs.shape}")
    if table.ndim != 1 or table.dtype.kind not in "iu":
        raise ValueError(f"vocab_map must be a 1-D integer array; got {table.dtype} {table.shape}")
    n, k = ids.shape
    missing = np.clip(1.0 - probs.sum(axis=1, dtype=np.float64), 0.0, 1.0).astype(np.float32)
    out_ids = np.zeros((n, k), dtype=np.int64)
    out_p = np.zeros((n, k), dtype=np.float32)
    if n == 0 or k == 0 or table.size == 0:
        return out_ids, out_p, missing

    if int(table.min()) < 0:
        raise ValueError("vocab_map holds negative ids")
    sentinel = int(table.max()) + 1
    if sentinel >= 2**31:
        raise ValueError("vocab_map ids must be < 2**31")
    table = table.astype(np.int32, copy=False)  # 4-byte entries: the random gather stays in cache
    step = max(1, (1 << 19) // k)  # rows per chunk: temporaries stay small and hot in cache
    for a in range(0, n, step):
        b = min(a + step, n)
        _project_rows(ids[a:b], probs[a:b], table, sentinel, out_ids[a:b], out_p[a:b])
    return out_ids, out_p, missing


def _project_rows(ids, probs, table, sentinel, out_ids, out_p) -> None:
    valid = (ids >= 0) & (ids < table.size)
    mapped = table[np.where(valid, ids, 0)].astype(np.int64)
    mapped[~valid] = sentinel
    # one int64 per entry: receiver id in the high half, the probability's float32 bits in the low half (p >= 0,
    # so the bits sort like the values). Sorting each row groups equal receiver ids, invalid ones last.
    p = np.maximum(probs, np.float32(0))
    key = (mapped << 32) | p.view(np.uint32).astype(np.int64)
    key.sort(axis=1)
    sorted_ids = key >> 32
    sorted_p = (key & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    start = np.empty(key.shape, dtype=bool)
    start[:, 0] = True
    np.not_equal(sorted_ids[:, 1:], sorted_ids[:, :-1], out=start[:, 1:])
    start &= sorted_ids != sentinel
    flat_start = np.flatnonzero(start)
    # sum each group; the (zero-mass) invalid tail of a row must not leak into its last group
    sorted_p[sorted_ids == sentinel] = 0
    sums = np.add.reduceat(sorted_p.ravel(), flat_start) if len(flat_start) else np.zeros(0, np.float32)
    flat_ids = out_ids.reshape(-1)
    flat_p = out_p.reshape(-1)
    flat_ids[flat_start] = sorted_ids.ravel()[flat_start]
    flat_p[flat_start] = sums
    total = out_p.sum(axis=1, dtype=np.float64)
    scale = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0).astype(np.float32)
    out_p *= scale[:, None]
