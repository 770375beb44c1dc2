"""Exact MinED vocabulary maps, fast (DESIGN §4.1).

For every source token: the target token whose normalized form (raw bytes, see `alignment.normalize`) has the
minimum Levenshtein distance to the source's, counted over bytes. Ties break by the smallest distance, then
the lexicographically smallest target bytes, then the smallest target id. The result equals an exhaustive
search (`exhaustive_nearest`) exactly; only the amount of work differs:

1. **Dedupe.** Candidate targets are the non-control tokens with a non-empty form; equal forms keep their
   smallest id, and the unique forms are sorted, so "smallest index" *is* the tie-break. Equal source forms
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

import time
from collections.abc import Callable, Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from alignment.normalize import control_mask, normalized_forms, special_roles
from alignment.vocabmap import ALGORITHM_VERSION, VocabMap

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


def _s(form: bytes) -> str:
    return form.decode("latin-1")  # one char per byte: rapidfuzz then counts edits over bytes


def _workers(workers: int | None) -> int:
    return -1 if workers is None else int(workers)


# ---------------------------------------------------------------------------------------------------------------
# The reference


def exhaustive_nearest(
    src_form: bytes, dst_forms: Sequence[bytes], *, candidates: Sequence[bool] | np.ndarray | None = None
) -> tuple[int, int]:
    """(dst_id, distance): the reference search, no pruning. Compares `src_form` with every candidate target
    (default: every non-empty form; `candidates` is a bool mask to restrict further) and breaks ties by
    (distance, target bytes, target id)."""
    if candidates is None:
        ids = [i for i, f in enumerate(dst_forms) if f]
    else:
        ids = [i for i, f in enumerate(dst_forms) if candidates[i]]
    if not ids:
        raise ValueError("no candidate target tokens")
    dist = process.cdist([_s(src_form)], [_s(dst_forms[i]) for i in ids], scorer=Levenshtein.distance, workers=1)[0]
    best = int(dist.min())
    winner = min((dst_forms[ids[j]], ids[j]) for j in np.flatnonzero(dist == best))
    return int(winner[1]), best


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
    key = np.unique(a * n_b + b)
    return key // n_b, key % n_b


# ---------------------------------------------------------------------------------------------------------------
# The search


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
    best_u = np.full(n_s, -1, dtype=np.int64)
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

    s_str = [_s(f) for f in sources]
    t_str = [_s(f) for f in targets]

    # 2. distance <= 1 via deletion neighbourhoods
    rest_forms = [sources[i] for i in rest]
    src_h, src_o = _deletion_hashes(rest_forms, rest)
    dst_h, dst_o = _deletion_hashes(targets, np.arange(n_t))
    pa, pb = _join(src_h, src_o, dst_h, dst_o)
    del src_h, src_o, dst_h, dst_o
    if len(pa):
        d = process.cpdist(
            [s_str[i] for i in pa], [t_str[j] for j in pb], scorer=Levenshtein.distance, workers=w, dtype=np.int32
        ).astype(np.int64)
        # per source: smallest (distance, target index); pairs are sorted by (source, target)
        order = np.lexsort((pb, d, pa))
        pa_o, pb_o, d_o = pa[order], pb[order], d[order]
        first = np.ones(len(pa_o), dtype=bool)
        first[1:] = pa_o[1:] != pa_o[:-1]
        best_u[pa_o[first]] = pb_o[first]
        best_d[pa_o[first]] = d_o[first]
    resolved = best_d <= 1
    stats.update(neighbourhood_pairs=int(len(pa)), within_1=int(len(rest) - (~resolved[rest]).sum()))
    rest = rest[~resolved[rest]]
    done = n_s - len(rest)
    lap("neighbourhood")
    report()

    # 3. length-bounded scan
    t_len = np.fromiter((len(t) for t in targets), dtype=np.int64, count=n_t)
    by_len: dict[int, tuple[np.ndarray, list[str]]] = {}
    for length in np.unique(t_len):
        us = np.flatnonzero(t_len == length)  # ascending target index
        by_len[int(length)] = (us, [t_str[u] for u in us])
    max_t = int(t_len.max())
    s_len = np.fromiter((len(sources[i]) for i in rest), dtype=np.int64, count=len(rest))
    for length in np.unique(s_len):
        group = rest[s_len == length]
        length = int(length)
        widest = max((len(by_len[k][0]) for k in by_len), default=1)
        chunk = max(64, min(4096, (64 << 20) // max(widest, 1)))
        for start in range(0, len(group), chunk):
            idx = group[start : start + chunk]
            bd, bu = best_d[idx].copy(), best_u[idx].copy()
            delta = 0
            while True:
                active = np.flatnonzero(bd >= delta)
                if len(active) == 0 or (length - delta < 1 and length + delta > max_t):
                    break
                for t_l in sorted({length - delta, length + delta}):
                    if t_l not in by_len or len(active) == 0:
                        continue
                    us, strs = by_len[t_l]
                    cutoff = int(min(bd[active].max(), max(length, t_l)))
                    stats["scan_pairs"] = stats.get("scan_pairs", 0) + len(active) * len(strs)
                    mat = process.cdist(
                        [s_str[i] for i in idx[active]],
                        strs,
                        scorer=Levenshtein.distance,
                        score_cutoff=cutoff,
                        dtype=np.uint8 if cutoff < 255 else np.int32,
                        workers=w,
                    )
                    mins = mat.min(axis=1).astype(np.int64)
                    cand = us[(mat == mins[:, None].astype(mat.dtype)).argmax(axis=1)]
                    cur_d, cur_u = bd[active], bu[active]
                    better = (mins < cur_d) | ((mins == cur_d) & (cand < cur_u))
                    bd[active[better]] = mins[better]
                    bu[active[better]] = cand[better]
                    active = active[bd[active] >= delta]
                delta += 1
            best_d[idx], best_u[idx] = bd, bu
            done += len(idx)
            report()
    stats["scanned"] = int(len(rest))
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
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    stats: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The MinED map over normalized forms: (ids int32 [n_src], distance int32 [n_src])."""
    n_src, n_dst = len(src_forms), len(dst_forms)
    src_control = np.zeros(n_src, bool) if src_control is None else np.asarray(src_control, bool)
    dst_control = np.zeros(n_dst, bool) if dst_control is None else np.asarray(dst_control, bool)
    src_roles, dst_roles = dict(src_roles or {}), dict(dst_roles or {})

    first_id: dict[bytes, int] = {}
    for i, f in enumerate(dst_forms):
        if f and not dst_control[i] and f not in first_id:
            first_id[f] = i
    targets = sorted(first_id)
    target_ids = np.array([first_id[t] for t in targets], dtype=np.int64)

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
            raise ValueError("the target tokenizer has no text tokens to map onto")
        uniq: dict[bytes, int] = {}
        for i in text_src:
            uniq.setdefault(src_forms[i], len(uniq))
        u, d = nearest_unique(list(uniq), targets, workers=workers, progress=progress, stats=stats)
        slot = np.fromiter((uniq[src_forms[i]] for i in text_src), dtype=np.int64, count=len(text_src))
        rows = np.asarray(text_src, dtype=np.int64)
        ids[rows] = target_ids[u[slot]]
        dist[rows] = d[slot]
    return ids, dist


def build_vocab_map(
    src_tok,
    dst_tok,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    stats: dict | None = None,
) -> VocabMap:
    """The MinED map src vocabulary -> dst vocabulary, keyed by both tokenizers' content hashes."""
    from cotune.lm.tokenizers import tokenizer_hash

    ids, dist = map_forms(
        normalized_forms(src_tok),
        normalized_forms(dst_tok),
        src_control=control_mask(src_tok),
        dst_control=control_mask(dst_tok),
        src_roles=special_roles(src_tok),
        dst_roles=special_roles(dst_tok),
        workers=workers,
        progress=progress,
        stats=stats,
    )
    return VocabMap(ids=ids, distance=dist, src_hash=tokenizer_hash(src_tok), dst_hash=tokenizer_hash(dst_tok))


def exhaustive_nearest_many(
    src_forms: Sequence[bytes], dst_forms: Sequence[bytes], *, candidates: Sequence[bool] | np.ndarray | None = None
) -> list[tuple[int, int]]:
    """`exhaustive_nearest` for many sources at once (one full distance matrix row per source, no pruning)."""
    if candidates is None:
        ids = [i for i, f in enumerate(dst_forms) if f]
    else:
        ids = [i for i, f in enumerate(dst_forms) if candidates[i]]
    if not ids:
        raise ValueError("no candidate target tokens")
    choices = [_s(dst_forms[i]) for i in ids]
    out = []
    for start in range(0, len(src_forms), 256):
        block = src_forms[start : start + 256]
        mat = process.cdist([_s(f) for f in block], choices, scorer=Levenshtein.distance, workers=-1)
        for row in mat:
            best = int(row.min())
            winner = min((dst_forms[ids[j]], ids[j]) for j in np.flatnonzero(row == best))
            out.append((int(winner[1]), best))
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
) -> list[tuple[int, int, int, int, int]]:
    """Check `ids`/`dist` against the exhaustive search for the text tokens in `sample`.
    Returns the disagreements as (src_id, got_id, got_dist, want_id, want_dist)."""
    n_dst = len(dst_forms)
    dst_control = np.zeros(n_dst, bool) if dst_control is None else np.asarray(dst_control, bool)
    cand = np.array([bool(f) and not dst_control[i] for i, f in enumerate(dst_forms)])
    sample = [int(i) for i in sample if src_control is None or not src_control[i]]
    want = exhaustive_nearest_many([src_forms[i] for i in sample], dst_forms, candidates=cand)
    bad = []
    for i, (want_id, want_d) in zip(sample, want):
        if (int(ids[i]), int(dist[i])) != (want_id, want_d):
            bad.append((i, int(ids[i]), int(dist[i]), want_id, want_d))
    return bad


__all__ = [
    "ALGORITHM_VERSION",
    "ROLE_FALLBACK",
    "build_vocab_map",
    "exhaustive_nearest",
    "exhaustive_nearest_many",
    "map_forms",
    "nearest_unique",
    "agreement_sample",
]
