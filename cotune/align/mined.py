"""Exact MinED vocabulary maps, fast.

For every source token: the target token whose normalized form (raw bytes, see `cotune.align.normalize`) has the
minimum Levenshtein distance to the source's, counted over bytes. Ties break by the smallest distance, then
the lexicographically smallest target bytes, then, among target ids sharing those bytes, the preferred one
(`target_preference`: the token the target tokenizer itself produces for that text, never a `<0xNN>` byte-fallback
piece while a real piece has the same byte), then the smallest target id. The result equals an exhaustive
search (`exhaustive_nearest`) exactly; only the amount of work differs:

1. **Dedupe.** Candidate targets are the non-control tokens with a non-empty form; equal forms keep their
   preferred id, and the unique forms are sorted, so "smallest index" *is* the tie-break. Equal source forms
   are searched once.
2. **Exact matches** by dictionary lookup (distance 0).
3. **Distance 1 by deletion neighbourhoods.** If lev(s, t) <= 1, some string obtained from s by at most one
   deletion equals one obtained from t by at most one deletion. All such variants are hashed in numpy
   (polynomial hash with prefix sums; a collision only adds a candidate, never loses one), joined by
   sorting, and the candidate pairs are verified with rapidfuzz's `cpdist`. A source with a verified
   candidate at distance 1 is done: the neighbourhood contains *every* target within distance 1. For the
   others, the best verified candidate is an upper bound U on the answer.
4. **Length-bounded scan** for the rest: |len(s) - len(t)| <= lev(s, t), so the targets are scanned in rings
   of growing length difference delta = 0, 1, 2, ... with rapidfuzz's `cdist` (C++, all cores,
   `score_cutoff` = the current best, uint8 output); a source leaves the scan as soon as delta exceeds
   its best distance so far. Every target that could tie is inside the scanned rings, so the result is exact.

Special (control) tokens map by role (see `ROLE_FALLBACK`), else to a target control token with the same
spelling, else to the target's eos, else its unk, else by MinED over the text tokens.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from cotune.align.normalize import (
    byte_fallback_mask,
    control_mask,
    normalized_forms,
    normalized_forms_cached,
    special_roles,
)
from cotune.align.vocabmap import ALGORITHM_VERSION, VocabMap

INF = np.iinfo(np.int32).max

# When the target lacks a role, the roles tried in order. eos is the usual stand-in (GPT-2 style tokenizers use
# one '<|endoftext|>' for bos, eos and pad); unk falls back to pad before eos so unknown text is never taught as
# "end of text" when a neutral token exists.
ROLE_FALLBACK = {
    "bos": ("bos", "eos", "pad", "unk"),
    "eos": ("eos", "pad", "bos", "unk"),
    "pad": ("pad", "eos", "unk", "bos"),
    "unk": ("unk", "pad", "eos", "bos"),
}
# A source id holding several roles (GPT-2's '<|endoftext|>' is bos and eos) is mapped as the first of these.
ROLE_PRIORITY = ("eos", "bos", "pad", "unk")


class UnmappableTokenizer(ValueError):
    """A tokenizer pair no map can be built for (the caller's input, not a bug)."""


def _s(form: bytes) -> str:
    return form.decode("latin-1")  # one char per byte: rapidfuzz then counts edits over bytes


def _workers(workers: int | None) -> int:
    return -1 if workers is None else int(workers)


# ---------------------------------------------------------------------------------------------------------------
# The reference


def _rank_of(rank, n: int) -> np.ndarray:
    return np.zeros(n, np.int64) if rank is None else np.asarray(rank, dtype=np.int64)


def exhaustive_nearest(
    src_form: bytes, dst_forms: Sequence[bytes], *, candidates: Sequence[bool] | np.ndarray | None = None,
    rank: Sequence[int] | np.ndarray | None = None,
) -> tuple[int, int]:
    """(dst_id, distance): the reference search, no pruning. Compares `src_form` with every candidate target
    (default: every non-empty form; `candidates` is a bool mask to restrict further) and breaks ties by
    (distance, target bytes, rank[target id] (default 0), target id)."""
    if candidates is None:
        ids = [i for i, f in enumerate(dst_forms) if f]
    else:
        ids = [i for i, f in enumerate(dst_forms) if candidates[i]]
    if not ids:
        raise ValueError("no candidate target tokens")
    rank = _rank_of(rank, len(dst_forms))
    dist = process.cdist([_s(src_form)], [_s(dst_forms[i]) for i in ids], scorer=Levenshtein.distance, workers=1)[0]
    best = int(dist.min())
    winner = min((dst_forms[ids[j]], rank[ids[j]], ids[j]) for j in np.flatnonzero(dist == best))
    return int(winner[2]), best


# ---------------------------------------------------------------------------------------------------------------
# Deletion-neighbourhood hashing

_P = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible mod 2**64
_PINV = np.uint64(pow(int(_P), -1, 2**64))
_LENMIX = np.uint64(0xD6E8FEB86659FD93)


def _deletion_hashes(forms: Sequence[bytes], owners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every string obtained from forms[i] by deleting at most one byte, with owners[i] per hash."""
    lens = np.fromiter((len(f) for f in forms), dtype=np.int64, count=len(forms))
    out_h, out_o = [], []
    with np.errstate(over="ignore"):
        for length in np.unique(lens):
            length = int(length)
            sel = np.flatnonzero(lens == length)
            own = owners[sel]
            if length == 0:
                out_h.append(np.zeros(len(sel), dtype=np.uint64))
                out_o.append(own)
                continue
            mat = np.frombuffer(b"".join(forms[i] for i in sel), dtype=np.uint8).reshape(len(sel), length)
            powers = np.cumprod(np.concatenate([[np.uint64(1)], np.full(length - 1, _P, dtype=np.uint64)]))
            pre = np.zeros((len(sel), length + 1), dtype=np.uint64)
            np.cumsum((mat.astype(np.uint64) + np.uint64(1)) * powers, axis=1, out=pre[:, 1:])
            full = pre[:, length]
            out_h.append(full + np.uint64(length) * _LENMIX)
            out_o.append(own)
            tail_mix = np.uint64(length - 1) * _LENMIX
            for i in range(length):
                out_h.append(pre[:, i] + (full - pre[:, i + 1]) * _PINV + tail_mix)
                out_o.append(own)
    if not out_h:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    return np.concatenate(out_h), np.concatenate(out_o)


def _unique(x: np.ndarray, return_counts: bool = False):
    """Sorted unique values (sort-based; numpy's hash-based unique is much slower on these arrays)."""
    x = np.sort(x, kind="stable" if x.dtype.kind in "iu" else "quicksort")
    keep = np.ones(len(x), dtype=bool)
    keep[1:] = x[1:] != x[:-1]
    if not return_counts:
        return x[keep]
    starts = np.flatnonzero(keep)
    return x[keep], np.diff(np.append(starts, len(x)))


def _join(src_h, src_o, dst_h, dst_o) -> tuple[np.ndarray, np.ndarray]:
    """All (src owner, dst owner) pairs whose hashes are equal, deduplicated, sorted by (src, dst)."""
    order = np.argsort(dst_h, kind="stable")
    dst_h, dst_o = dst_h[order], dst_o[order]
    lo = np.searchsorted(dst_h, src_h, "left")
    hi = np.searchsorted(dst_h, src_h, "right")
    count = hi - lo
    keep = count > 0
    lo, count, src_o = lo[keep], count[keep], src_o[keep]
    total = int(count.sum())
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    offsets = np.repeat(lo - (np.cumsum(count) - count), count)
    pos = np.arange(total, dtype=np.int64) + offsets
    a = np.repeat(src_o, count).astype(np.int64)
    b = dst_o[pos].astype(np.int64)
    n_b = int(b.max()) + 1
    key = _unique(a * n_b + b)
    return key // n_b, key % n_b


# ---------------------------------------------------------------------------------------------------------------
# The search


class _TargetIndex:
    """Everything about the (sorted, unique) targets the search stages need, built once."""

    def __init__(self, targets: Sequence[bytes]):
        self.forms = targets
        self.n = n = len(targets)
        self.strs = [_s(f) for f in targets]
        self.lens = lens = np.fromiter((len(f) for f in targets), dtype=np.int64, count=n)
        self.max_len = int(lens.max())
        self.ring_size = np.bincount(lens, minlength=self.max_len + 1).astype(np.int64)
        self.ring_cum = np.concatenate([[0], np.cumsum(self.ring_size)])  # targets with len < l: ring_cum[l]
        self._rings: dict = {}
        self.high = np.fromiter((_high_count(f) for f in targets), dtype=np.int64, count=n)
        self._counts = None
        self._postings = None
        self._reversed = None

    def ring(self, length: int) -> tuple[np.ndarray, list[str]]:
        """Targets of one length: their indices (ascending) and strings."""
        if length not in self._rings:
            us = np.flatnonzero(self.lens == length)
            self._rings[length] = (us, [self.strs[u] for u in us])
        return self._rings[length]

    def ring_block(self, length: int, g_lo: int, g_hi: int) -> tuple[np.ndarray, list[str]]:
        """Targets of one length whose count of high bytes is within [g_lo, g_hi], ordered by (count, index)."""
        key = (length, "by_high")
        if key not in self._rings:
            us = np.flatnonzero(self.lens == length)
            high = self.high[us]
            order = np.lexsort((us, high))
            us, high = us[order], high[order]
            self._rings[key] = (us, [self.strs[u] for u in us], high)
        us, strs, high = self._rings[key]
        a = int(np.searchsorted(high, g_lo, "left"))
        b = int(np.searchsorted(high, g_hi, "right"))
        return us[a:b], strs[a:b]

    def window_size(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Number of targets with lo <= len <= hi (vectorized)."""
        lo = np.clip(lo, 0, self.max_len + 1)
        hi = np.clip(hi + 1, 0, self.max_len + 1)
        return np.maximum(self.ring_cum[hi] - self.ring_cum[lo], 0)

    @property
    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Byte histogram of every target (uint8 [n, 256]) and a flag for targets with a count above 255."""
        if self._counts is None:
            counts = np.zeros((self.n, 256), dtype=np.uint8)
            big = np.zeros(self.n, dtype=bool)
            step = 8192
            for a in range(0, self.n, step):
                b = min(a + step, self.n)
                flat = np.frombuffer(b"".join(self.forms[a:b]), dtype=np.uint8).astype(np.int64)
                owner = np.repeat(np.arange(b - a, dtype=np.int64), self.lens[a:b])
                c = np.bincount(owner * 256 + flat, minlength=(b - a) * 256).reshape(b - a, 256)
                big[a:b] = c.max(axis=1) > 255
                counts[a:b] = np.minimum(c, 255).astype(np.uint8)
            self._counts = (counts, big)
        return self._counts

    @property
    def postings(self) -> tuple[np.ndarray, np.ndarray]:
        """For each byte value, the targets containing it, ordered by (byte, length, index): returns the target
        indices and the sort keys byte * (max_len + 2) + length (for window look-ups by searchsorted)."""
        if self._postings is None:
            counts, _ = self.counts
            t, b = np.nonzero(counts)
            key = b.astype(np.int64) * (self.max_len + 2) + self.lens[t]
            order = np.lexsort((t, key))
            self._postings = (t[order].astype(np.int64), key[order])
        return self._postings

    @property
    def reversed_sorted(self) -> tuple[list[bytes], np.ndarray]:
        if self._reversed is None:
            rev = [f[::-1] for f in self.forms]
            order = sorted(range(self.n), key=rev.__getitem__)
            self._reversed = ([rev[u] for u in order], np.asarray(order, dtype=np.int64))
        return self._reversed


def _best_per_source(src: np.ndarray, tgt: np.ndarray, dist: np.ndarray, best_d: np.ndarray, best_u: np.ndarray):
    """Fold verified (source, target, distance) triples into best_d/best_u (smaller distance, then smaller target)."""
    if len(src) == 0:
        return
    order = np.lexsort((tgt, dist, src))
    src, tgt, dist = src[order], tgt[order], dist[order]
    first = np.ones(len(src), dtype=bool)
    first[1:] = src[1:] != src[:-1]
    s, t, d = src[first], tgt[first], dist[first]
    better = (d < best_d[s]) | ((d == best_d[s]) & (t < best_u[s]))
    best_d[s[better]] = d[better]
    best_u[s[better]] = t[better]


def _verify(s_str, t_str, src: np.ndarray, tgt: np.ndarray, workers: int) -> np.ndarray:
    if len(src) == 0:
        return np.zeros(0, np.int64)
    return process.cpdist(
        [s_str[i] for i in src], [t_str[j] for j in tgt], scorer=Levenshtein.distance, workers=workers, dtype=np.int32
    ).astype(np.int64)


def _source_byte_counts(forms: Sequence[bytes], rows: np.ndarray):
    """Distinct bytes of each source in `rows` with their counts, flattened: (row index, byte, count)."""
    lens = np.fromiter((len(forms[i]) for i in rows), dtype=np.int64, count=len(rows))
    flat = np.frombuffer(b"".join(forms[i] for i in rows), dtype=np.uint8).astype(np.int64)
    owner = np.repeat(np.arange(len(rows), dtype=np.int64), lens)
    key, cnt = _unique(owner * 256 + flat, return_counts=True)
    return key // 256, key % 256, cnt.astype(np.int64)


def _pigeonhole_plan(tix: _TargetIndex, forms, rows, bound):
    """For each source: the rarest distinct bytes whose occurrences in it reach bound + 1. A target containing
    none of them misses at least bound + 1 of the source's bytes, so its distance is > bound: only the targets
    in these bytes' posting lists (within the length window) can be within `bound`.

    Returns (feasible mask, cost per source, plan rows (source row, byte, lo, hi) into the postings)."""
    s_row, byte, occ = _source_byte_counts(forms, rows)
    lens = np.fromiter((len(forms[i]) for i in rows), dtype=np.int64, count=len(rows))
    post_key = tix.postings[1]
    width = tix.max_len + 2
    u = bound[s_row]
    lo_len = np.clip(lens[s_row] - u, 0, tix.max_len + 1)
    hi_len = np.clip(lens[s_row] + u, 0, tix.max_len + 1)
    lo = np.searchsorted(post_key, byte * width + lo_len, "left")
    hi = np.searchsorted(post_key, byte * width + hi_len, "right")
    size = hi - lo
    order = np.lexsort((byte, size, s_row))
    s_row, byte, occ, lo, hi, size = s_row[order], byte[order], occ[order], lo[order], hi[order], size[order]
    csum = np.cumsum(occ)
    group_start = np.ones(len(s_row), dtype=bool)
    group_start[1:] = s_row[1:] != s_row[:-1]
    base = np.maximum.accumulate(np.where(group_start, csum - occ, 0))
    before = csum - occ - base  # occurrences already covered by rarer bytes of the same source
    take = before < bound[s_row] + 1
    feasible = lens >= bound + 1
    cost = np.bincount(s_row[take], weights=size[take], minlength=len(rows)).astype(np.int64)
    keep = take & feasible[s_row]
    return feasible, cost, (s_row[keep], byte[keep], lo[keep], hi[keep])


def _pigeonhole_search(tix: _TargetIndex, forms, s_str, rows, bound, plan, best_d, best_u, workers, stats):
    """Exact search of `rows` (sources) inside their pigeonhole candidate sets, filtered by the byte-histogram
    (bag) distance lower bound before the exact Levenshtein check."""
    p_row, _, lo, hi = plan
    size = hi - lo
    total = int(size.sum())
    if total == 0:
        return
    offsets = np.repeat(lo - (np.cumsum(size) - size), size)
    tgt = tix.postings[0][np.arange(total, dtype=np.int64) + offsets]
    src = np.repeat(p_row, size)
    key = _unique(src * tix.n + tgt)
    src, tgt = key // tix.n, key % tix.n
    stats["pigeonhole_candidates"] = stats.get("pigeonhole_candidates", 0) + len(src)
    # bag distance: lev >= max(|s|, |t|) - sum_b min(count_s(b), count_t(b))
    s_row, s_byte, s_cnt = _source_byte_counts(forms, rows)
    first = np.searchsorted(s_row, np.arange(len(rows)), "left")
    ndist = np.bincount(s_row, minlength=len(rows))
    k = ndist[src]
    pair = np.repeat(np.arange(len(src), dtype=np.int64), k)
    pos = np.repeat(first[src] - (np.cumsum(k) - k), k) + np.arange(int(k.sum()), dtype=np.int64)
    counts, big = tix.counts
    common = np.bincount(
        pair, weights=np.minimum(s_cnt[pos], counts[tgt[pair], s_byte[pos]]), minlength=len(src)
    ).astype(np.int64)
    s_len = np.fromiter((len(forms[i]) for i in rows), dtype=np.int64, count=len(rows))
    lb = np.maximum(s_len[src], tix.lens[tgt]) - common
    lb[big[tgt]] = np.abs(s_len[src] - tix.lens[tgt])[big[tgt]]
    keep = lb <= bound[src]
    src, tgt = src[keep], tgt[keep]
    stats["pigeonhole_verified"] = stats.get("pigeonhole_verified", 0) + len(src)
    d = _verify(s_str, tix.strs, rows[src], tgt, workers)
    bd, bu = best_d[rows].copy(), best_u[rows].copy()
    _best_per_source(src, tgt, d, bd, bu)
    best_d[rows], best_u[rows] = bd, bu


def _high_count(form: bytes) -> int:
    return sum(1 for b in form if b >= 0x80)


def _ring_scan(tix: _TargetIndex, s_str, rows, length, high, best_d, best_u, workers, stats):
    """Exact search of sources of one length and one count of high bytes (>= 0x80) by scanning the targets in
    rings of growing length difference; a source leaves once the ring's length difference exceeds its best
    distance so far. Within a ring only the targets whose high-byte count is compatible are compared: an edit
    changes the count of high bytes and of low bytes by at most one each, so
    lev >= max((h-g)+ + (l-m)+, (g-h)+ + (m-l)+) for counts h, l (source) and g, m (target)."""
    widest = int(tix.ring_size.max())
    chunk = max(1, min(RING_CHUNK, (64 << 20) // max(widest, 1)))
    low = length - high
    for start in range(0, len(rows), chunk):
        idx = rows[start : start + chunk]
        bd, bu = best_d[idx].copy(), best_u[idx].copy()
        delta = 0
        while True:
            active = np.flatnonzero(bd >= delta)
            if len(active) == 0 or (length - delta < 1 and length + delta > tix.max_len):
                break
            for t_l in sorted({length - delta, length + delta}):
                if not 1 <= t_l <= tix.max_len or tix.ring_size[t_l] == 0 or len(active) == 0:
                    continue
                limit = int(bd[active].max())
                g = np.arange(t_l + 1)
                m = t_l - g
                lb = np.maximum(
                    np.maximum(high - g, 0) + np.maximum(low - m, 0), np.maximum(g - high, 0) + np.maximum(m - low, 0)
                )
                ok = np.flatnonzero(lb <= limit)
                if len(ok) == 0:
                    continue
                us, strs = tix.ring_block(t_l, int(ok[0]), int(ok[-1]))
                if len(us) == 0:
                    continue
                cutoff = int(min(limit, max(length, t_l)))
                stats["scan_pairs"] = stats.get("scan_pairs", 0) + len(active) * len(strs)
                mat = process.cdist(
                    [s_str[i] for i in idx[active]],
                    strs,
                    scorer=Levenshtein.distance,
                    score_cutoff=cutoff,
                    dtype=np.uint8 if cutoff < 255 else np.int32,
                    workers=workers,
                )
                mins = mat.min(axis=1)
                hit = np.flatnonzero(mins.astype(np.int64) <= bd[active])  # rows that can improve or tie
                if len(hit):
                    sub = mat if len(hit) == len(active) else mat[hit]
                    r, c = np.nonzero(sub == mins[hit, None])
                    cand = np.full(len(hit), tix.n, dtype=np.int64)
                    np.minimum.at(cand, r, us[c])  # smallest target index among the row's minima
                    who = active[hit]
                    d_new = mins[hit].astype(np.int64)
                    better = (d_new < bd[who]) | ((d_new == bd[who]) & (cand < bu[who]))
                    bd[who[better]] = d_new[better]
                    bu[who[better]] = cand[better]
                active = active[bd[active] >= delta]
            delta += 1
        best_d[idx], best_u[idx] = bd, bu


RING_CHUNK = 4096  # sources per cdist call in the ring scan (bounded by a 64 MiB distance matrix)

# Route a source to the pigeonhole path when its candidate list is this many times smaller than its rings
# (a candidate costs a few numpy gathers plus a list entry; a ring pair costs one SIMD Levenshtein in C++).
PIGEONHOLE_ADVANTAGE = 60
_PIGEONHOLE_BATCH = 3_000_000  # candidate pairs per batch (memory bound)


def nearest_unique(
    sources: Sequence[bytes],
    targets: Sequence[bytes],
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    stats: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For each source, (index into `targets`, distance) of the nearest target, ties to the smallest index.

    `targets` must be unique, non-empty and sorted (so the smallest index is the lexicographically smallest).
    `stats`, when given, receives counts and seconds per stage (for benchmarks).
    """
    stats = {} if stats is None else stats
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        stats[name + "_s"] = stats.get(name + "_s", 0.0) + now - clock
        clock = now

    n_s, n_t = len(sources), len(targets)
    if n_t == 0:
        raise ValueError("no candidate target tokens")
    w = _workers(workers)
    best_u = np.full(n_s, n_t, dtype=np.int64)
    best_d = np.full(n_s, INF, dtype=np.int64)
    done = 0

    def report():
        if progress is not None:
            progress(done, n_s)

    # 1. exact
    index = {t: u for u, t in enumerate(targets)}
    for i, f in enumerate(sources):
        u = index.get(f)
        if u is not None:
            best_u[i], best_d[i] = u, 0
    rest = np.flatnonzero(best_d != 0)
    done = n_s - len(rest)
    stats.update(sources=n_s, targets=n_t, exact=done)
    lap("exact")
    report()
    if len(rest) == 0:
        return best_u, best_d.astype(np.int32)

    tix = _TargetIndex(targets)
    s_str = [_s(f) for f in sources]

    # 2. distance <= 1: deletion neighbourhoods (complete for distance <= 1; other candidates give bounds)
    src_h, src_o = _deletion_hashes([sources[i] for i in rest], rest)
    dst_h, dst_o = _deletion_hashes(targets, np.arange(n_t))
    pa, pb = _join(src_h, src_o, dst_h, dst_o)
    del src_h, src_o, dst_h, dst_o
    _best_per_source(pa, pb, _verify(s_str, tix.strs, pa, pb, w), best_d, best_u)
    resolved = best_d[rest] <= 1
    stats.update(neighbourhood_pairs=len(pa), within_1=int(resolved.sum()))
    rest = rest[~resolved]
    done = n_s - len(rest)
    lap("neighbourhood")
    report()
    if len(rest) == 0:
        return best_u, best_d.astype(np.int32)

    # 3. upper bounds from the lexicographic neighbours of each source and of its reverse (shared prefixes/suffixes)
    rev_forms, rev_order = tix.reversed_sorted
    cand_s, cand_t = [], []
    for i in rest:
        f = sources[i]
        p = bisect.bisect_left(targets, f)
        q = bisect.bisect_left(rev_forms, f[::-1])
        for u in range(max(p - 2, 0), min(p + 2, n_t)):
            cand_s.append(i)
            cand_t.append(u)
        for r in range(max(q - 2, 0), min(q + 2, n_t)):
            cand_s.append(i)
            cand_t.append(int(rev_order[r]))
    cs, ct = np.asarray(cand_s, dtype=np.int64), np.asarray(cand_t, dtype=np.int64)
    _best_per_source(cs, ct, _verify(s_str, tix.strs, cs, ct, w), best_d, best_u)
    lap("bounds")

    # 4. exact search below the bound: pigeonhole candidates where they are few, rings of lengths otherwise
    bound = best_d[rest].copy()
    feasible, pig_cost, plan = _pigeonhole_plan(tix, sources, rest, bound)
    s_len = np.fromiter((len(sources[i]) for i in rest), dtype=np.int64, count=len(rest))
    ring_cost = tix.window_size(s_len - bound, s_len + bound)
    use_pig = feasible & (pig_cost * PIGEONHOLE_ADVANTAGE < ring_cost)
    stats.update(pigeonhole_sources=int(use_pig.sum()), ring_sources=int((~use_pig).sum()))
    lap("plan")
    pig_rows = np.flatnonzero(use_pig)
    p_row, p_byte, p_lo, p_hi = plan
    start = 0
    cum = np.cumsum(pig_cost[pig_rows])
    while start < len(pig_rows):
        stop = int(np.searchsorted(cum, (cum[start - 1] if start else 0) + _PIGEONHOLE_BATCH, "right"))
        stop = max(stop, start + 1)
        batch = pig_rows[start:stop]
        local = np.full(len(rest), -1, dtype=np.int64)
        local[batch] = np.arange(len(batch))
        sel = local[p_row] >= 0
        sub_plan = (local[p_row[sel]], p_byte[sel], p_lo[sel], p_hi[sel])
        _pigeonhole_search(
            tix, sources, s_str, rest[batch], bound[batch], sub_plan, best_d, best_u, w, stats
        )
        done += len(batch)
        report()
        start = stop
    lap("pigeonhole")
    ring_rows = rest[~use_pig]
    ring_key = s_len[~use_pig] * 4096 + np.fromiter((_high_count(sources[i]) for i in ring_rows), np.int64, len(ring_rows))
    for key in np.unique(ring_key):
        group = ring_rows[ring_key == key]
        _ring_scan(tix, s_str, group, int(key // 4096), int(key % 4096), best_d, best_u, w, stats)
        done += len(group)
        report()
    lap("scan")
    return best_u, best_d.astype(np.int32)


def map_forms(
    src_forms: Sequence[bytes],
    dst_forms: Sequence[bytes],
    *,
    src_control: np.ndarray | None = None,
    dst_control: np.ndarray | None = None,
    src_roles: dict[str, int] | None = None,
    dst_roles: dict[str, int] | None = None,
    dst_rank: np.ndarray | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    stats: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The MinED map over normalized forms: (ids int32 [n_src], distance int32 [n_src]). Among target ids with
    one form, the lowest `dst_rank` wins (`target_preference`; default: all equal), then the smallest id."""
    n_src, n_dst = len(src_forms), len(dst_forms)
    src_control = np.zeros(n_src, bool) if src_control is None else np.asarray(src_control, bool)
    dst_control = np.zeros(n_dst, bool) if dst_control is None else np.asarray(dst_control, bool)
    src_roles, dst_roles = dict(src_roles or {}), dict(dst_roles or {})
    rank = _rank_of(dst_rank, n_dst)

    best_id: dict[bytes, int] = {}
    for i, f in enumerate(dst_forms):
        if f and not dst_control[i]:
            j = best_id.get(f)
            if j is None or rank[i] < rank[j]:
                best_id[f] = i
    targets = sorted(best_id)
    target_ids = np.array([best_id[t] for t in targets], dtype=np.int64)

    ids = np.zeros(n_src, dtype=np.int32)
    dist = np.zeros(n_src, dtype=np.int32)

    # control tokens: by role, else by spelling, else eos/unk, else MinED over text
    text_src = [i for i in range(n_src) if not src_control[i]]
    leftovers = []
    dst_control_by_form: dict[bytes, int] = {}
    for i in range(n_dst):
        if dst_control[i] and dst_forms[i] not in dst_control_by_form:
            dst_control_by_form[dst_forms[i]] = i
    role_of = {}
    for role in reversed(ROLE_PRIORITY):
        if role in src_roles:
            role_of[src_roles[role]] = role
    for i in range(n_src):
        if not src_control[i]:
            continue
        target = None
        if i in role_of:
            target = next((dst_roles[r] for r in ROLE_FALLBACK[role_of[i]] if r in dst_roles), None)
        if target is None:
            target = dst_control_by_form.get(src_forms[i])
        if target is None:
            target = dst_roles.get("eos", dst_roles.get("unk"))
        if target is None:
            leftovers.append(i)
            continue
        ids[i] = target
        dist[i] = Levenshtein.distance(_s(src_forms[i]), _s(dst_forms[target]))
    text_src += leftovers

    if text_src:
        if not targets:
            raise UnmappableTokenizer("the target tokenizer has no text tokens to map onto")
        uniq: dict[bytes, int] = {}
        for i in text_src:
            uniq.setdefault(src_forms[i], len(uniq))
        u, d = nearest_unique(list(uniq), targets, workers=workers, progress=progress, stats=stats)
        slot = np.fromiter((uniq[src_forms[i]] for i in text_src), dtype=np.int64, count=len(text_src))
        rows = np.asarray(text_src, dtype=np.int64)
        ids[rows] = target_ids[u[slot]]
        dist[rows] = d[slot]
    return ids, dist


def target_preference(tok) -> np.ndarray:
    """int8 [n]: how much a target id is wanted among the ids that share its byte form (lower wins): 0 = the token
    this tokenizer itself produces for that text (`encode_fragments`), 1 = another text token, 2 = a `<0xNN>`
    byte-fallback piece. On SentencePiece vocabularies '<0x2E>' and '.' are both the byte '.', and the smaller id
    is the byte piece, which the model never emits for '.': mapping GPT-2's '.', ',', 'A', '1', 'Ġ' there teaches
    a token the receiver never predicts. A byte piece stays a target where no other token has its byte ('<0x0A>'
    on Llama-2)."""
    from cotune.align.tokenizers import encode_fragments

    forms = normalized_forms_cached(tok)
    fallback = byte_fallback_mask(tok)
    rank = np.where(fallback[: len(forms)], 2, 1).astype(np.int8)
    control = control_mask(tok)
    groups: dict[bytes, list[int]] = {}
    for i, f in enumerate(forms):
        if f and not control[i]:
            groups.setdefault(f, []).append(i)
    shared = [(f, ids) for f, ids in groups.items() if len(ids) > 1]
    texts = []
    for f, _ in shared:
        try:
            texts.append(f.decode("utf-8"))
        except UnicodeDecodeError:  # a partial character: no text to encode, the byte piece rank decides
            texts.append("")
    for (_, ids), own in zip(shared, encode_fragments(tok, texts)):
        if len(own) == 1 and own[0] in ids:
            rank[own[0]] = 0
    return rank


def build_vocab_map(
    src_tok,
    dst_tok,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    stats: dict | None = None,
) -> VocabMap:
    """The MinED map src vocabulary -> dst vocabulary, keyed by both tokenizers' content hashes, with the
    first-token map beside it (`first_token_map`: the alternative projection)."""
    from cotune.align.tokenizers import tokenizer_hash

    ids, dist = map_forms(
        normalized_forms(src_tok),
        normalized_forms(dst_tok),
        src_control=control_mask(src_tok),
        dst_control=control_mask(dst_tok),
        src_roles=special_roles(src_tok),
        dst_roles=special_roles(dst_tok),
        dst_rank=target_preference(dst_tok),
        workers=workers,
        progress=progress,
        stats=stats,
    )
    return VocabMap(ids=ids, distance=dist, first_ids=first_token_map(src_tok, dst_tok, ids),
                    src_hash=tokenizer_hash(src_tok), dst_hash=tokenizer_hash(dst_tok))


def first_token_map(src_tok, dst_tok, fallback: np.ndarray) -> np.ndarray:
    """int32 [n_src]: each source token sent to the FIRST token of the target tokenizer's own encoding of the
    source token's text, as inside running text (`encode_fragments`). The projection option beside MinED: a
    teacher's next token GPT-2 ' lens' becomes Llama-2's '▁l' (its ' lens' is '▁l' 'ens'), the token a Llama-2
    student actually predicts there, where MinED gives the nearest whole piece. Control tokens, tokens with no text
    of their own (a partial UTF-8 character) and texts the target encodes as a control token (its unk) keep
    `fallback` (the MinED map)."""
    from cotune.align.tokenizers import encode_fragments

    out = np.asarray(fallback, dtype=np.int32).copy()
    control, dst_control = control_mask(src_tok), control_mask(dst_tok)
    rows, texts = [], []
    for i, f in enumerate(normalized_forms_cached(src_tok)):
        if not f or (i < len(control) and control[i]):
            continue
        try:
            texts.append(f.decode("utf-8"))
        except UnicodeDecodeError:
            continue
        rows.append(i)
    for i, ids in zip(rows, encode_fragments(dst_tok, texts)):
        if ids and not (ids[0] < len(dst_control) and dst_control[ids[0]]):
            out[i] = ids[0]
    return out


def exhaustive_nearest_many(
    src_forms: Sequence[bytes], dst_forms: Sequence[bytes], *, candidates: Sequence[bool] | np.ndarray | None = None,
    rank: Sequence[int] | np.ndarray | None = None,
) -> list[tuple[int, int]]:
    """`exhaustive_nearest` for many sources at once (one full distance matrix row per source, no pruning)."""
    if candidates is None:
        ids = [i for i, f in enumerate(dst_forms) if f]
    else:
        ids = [i for i, f in enumerate(dst_forms) if candidates[i]]
    if not ids:
        raise ValueError("no candidate target tokens")
    rank = _rank_of(rank, len(dst_forms))
    choices = [_s(dst_forms[i]) for i in ids]
    out = []
    for start in range(0, len(src_forms), 256):
        block = src_forms[start : start + 256]
        mat = process.cdist([_s(f) for f in block], choices, scorer=Levenshtein.distance, workers=-1)
        for row in mat:
            best = int(row.min())
            winner = min((dst_forms[ids[j]], rank[ids[j]], ids[j]) for j in np.flatnonzero(row == best))
            out.append((int(winner[2]), best))
    return out


def agreement_sample(
    src_forms: Sequence[bytes],
    dst_forms: Sequence[bytes],
    ids: np.ndarray,
    dist: np.ndarray,
    sample: Sequence[int],
    *,
    src_control: np.ndarray | None = None,
    dst_control: np.ndarray | None = None,
    dst_rank: np.ndarray | None = None,
) -> list[tuple[int, int, int, int, int]]:
    """Check `ids`/`dist` against the exhaustive search for the text tokens in `sample` (`dst_rank`: the
    `target_preference` the map was built with). Returns the disagreements as (src_id, got_id, got_dist, want_id,
    want_dist)."""
    n_dst = len(dst_forms)
    dst_control = np.zeros(n_dst, bool) if dst_control is None else np.asarray(dst_control, bool)
    cand = np.array([bool(f) and not dst_control[i] for i, f in enumerate(dst_forms)])
    sample = [int(i) for i in sample if src_control is None or not src_control[i]]
    want = exhaustive_nearest_many([src_forms[i] for i in sample], dst_forms, candidates=cand, rank=dst_rank)
    bad = []
    for i, (want_id, want_d) in zip(sample, want):
        if (int(ids[i]), int(dist[i])) != (want_id, want_d):
            bad.append((i, int(ids[i]), int(dist[i]), want_id, want_d))
    return bad


__all__ = [
    "ALGORITHM_VERSION",
    "ROLE_FALLBACK",
    "agreement_sample",
    "build_vocab_map",
    "exhaustive_nearest",
    "exhaustive_nearest_many",
    "first_token_map",
    "map_forms",
    "nearest_unique",
    "target_preference",
]
