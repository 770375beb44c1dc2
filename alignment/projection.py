"""Projection of top-k distributions from a sender's vocabulary into a receiver's, fully vectorized."""

from __future__ import annotations

import numpy as np


def project_topk(ids: np.ndarray, probs: np.ndarray, vocab_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map each row's top-k ids through `vocab_map` (sender id -> receiver id).

    Probabilities of ids that land on the same receiver id are summed (the reference keeps only the first);
    slots freed by merging are padding (id 0, probability 0). Ids outside the map are dropped. Returns
    (receiver ids int64 [n, k], probabilities float32 [n, k] renormalized to sum to 1 per row where any mass
    survives, the sender's missing mass 1 - sum(probs) float32 [n]).
    """
    ids = np.asarray(ids)
    probs = np.asarray(probs, dtype=np.float32)
    if ids.shape != probs.shape or ids.ndim != 2:
        raise ValueError(f"ids and probs must both be [n, k]; got {ids.shape} and {probs.shape}")
    vocab_map = np.asarray(vocab_map)
    n, k = ids.shape
    missing = np.clip(1.0 - probs.sum(axis=1, dtype=np.float64), 0.0, 1.0).astype(np.float32)
    if n == 0 or k == 0:
        return np.zeros((n, k), np.int64), np.zeros((n, k), np.float32), missing
    ids64 = ids.astype(np.int64)
    valid = (ids64 >= 0) & (ids64 < len(vocab_map))
    mapped = np.where(valid, vocab_map[np.clip(ids64, 0, max(len(vocab_map) - 1, 0))].astype(np.int64), -1)
    p = np.where(valid, probs, 0.0).astype(np.float32)

    order = np.argsort(mapped, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(mapped, order, axis=1)
    sorted_p = np.take_along_axis(p, order, axis=1)
    first = np.ones_like(sorted_ids, dtype=bool)
    first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    segment = np.cumsum(first.ravel()) - 1
    totals = np.bincount(segment, weights=sorted_p.ravel().astype(np.float64))
    rows, cols = np.nonzero(first)
    out_col = np.cumsum(first, axis=1)[rows, cols] - 1
    seg_ids = sorted_ids[rows, cols]
    seg_p = totals.astype(np.float32)
    keep = seg_ids >= 0
    out_ids = np.zeros((n, k), np.int64)
    out_p = np.zeros((n, k), np.float32)
    out_ids[rows[keep], out_col[keep]] = seg_ids[keep]
    out_p[rows[keep], out_col[keep]] = seg_p[keep]
    mass = out_p.sum(axis=1, keepdims=True)
    out_p = np.divide(out_p, mass, out=np.zeros_like(out_p), where=mass > 0)
    return out_ids, out_p, missing
