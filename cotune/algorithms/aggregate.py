"""FedAvg of LoRA adapters, with every upload validated before it can touch the aggregate.

Two modes (RunSpec.aggregation):

- ``factors`` (default, as the FedCoLLM paper): every tensor, A and B alike, is the sample-weighted mean of the
  clients' tensors: A = Σ w_k A_k, B = Σ w_k B_k. Cheap, but B·A ≠ Σ w_k B_k A_k in general.
- ``product``: the exact weighted mean of the low-rank updates, ΔW = Σ w_k B_k A_k (the common α/r scale
  factors out), re-factorized to the adapter's rank r by truncated SVD: ΔW ≈ U_r S_r V_rᵀ, B = U_r·√S_r,
  A = √S_r·V_rᵀ. The mean of K rank-r products can have rank up to K·r, so the result is exact when the
  mean has rank ≤ r and otherwise the best rank-r approximation in Frobenius norm (Eckart–Young). An option,
  not the paper's method; it also changes the factors' basis (B is no longer zero-initialised), which affects
  how the next round's local training moves them.

A bad upload (wrong key set, shapes, a non-float or non-finite tensor, a value beyond the magnitude bound, or tags
naming another run, round or party) is rejected with a reason; the caller drops that client from the round and the
aggregate is computed from the remaining ones only. The bound (`max_abs`, default cotune.tasks.MAX_ADAPTER_ABS = 1e4
on every entry) stops one client from swamping or overflowing the mean; it does not make FedAvg robust to a client
that stays within it (that would take a robust aggregate, e.g. a coordinate-wise median or norm clipping).

Torch-free (numpy and safetensors.numpy): the coordinator aggregates without importing torch. Tensors are numpy
arrays; `adapter_bytes` (cotune.wire.safetensors_io) turns an aggregate into the canonical adapter bytes, identical
to what `cotune.lm.lora.lora_to_bytes` writes for the same tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from cotune.tasks import MAX_ADAPTER_ABS
from cotune.wire.safetensors_io import adapter_bytes, load_arrays, read_metadata

__all__ = ["MODES", "TAG_PREFIX", "AggregateResult", "UploadRejected", "adapter_bytes", "aggregate_uploads", "fedavg",
           "lora_pairs", "parse_adapter", "refactorize", "validate_upload"]

MODES = ("factors", "product")
TAG_PREFIX = "cotune."


class UploadRejected(ValueError):
    """An adapter upload that must not enter the aggregate; the message says why."""


def parse_adapter(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, safetensors metadata) of adapter bytes; UploadRejected when they are not valid safetensors.
    Arrays keep their stored dtype, except BF16, which numpy lacks: it is widened (exactly) to float32."""
    try:
        meta = read_metadata(bytes(data), "upload")
        tensors = load_arrays(bytes(data), "upload")
    except Exception as exc:  # noqa: BLE001 - any parse failure is a rejection
        raise UploadRejected(f"not a valid safetensors adapter: {exc}") from exc
    return tensors, meta


def validate_upload(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *,
                    meta: Mapping[str, str] | None = None, expect: Mapping[str, str] | None = None,
                    max_abs: float = MAX_ADAPTER_ABS) -> None:
    """Raise UploadRejected unless `state` has exactly the reference's keys and shapes, floating-point finite
    values no larger than `max_abs` in magnitude, and (when `expect` is given) metadata tags equal to `expect`
    (e.g. {"cotune.round": "3"})."""
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), first {missing[0]}")
        if extra:
            parts.append(f"unexpected {len(extra)} key(s), first {extra[0]}")
        raise UploadRejected("LoRA keys differ from the round's adapter: " + "; ".join(parts))
    for key in sorted(reference):
        value, ref = state[key], reference[key]
        if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
            raise UploadRejected(f"{key}: expected a floating-point tensor, got {getattr(value, 'dtype', type(value).__name__)}")
        if tuple(value.shape) != tuple(ref.shape):
            raise UploadRejected(f"{key}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        if not bool(np.isfinite(value).all()):
            raise UploadRejected(f"{key}: contains NaN or Inf")
        peak = float(np.abs(value).max(initial=0.0))
        if peak > max_abs:
            raise UploadRejected(f"{key}: holds a value of magnitude {peak:.3g}, beyond the bound {max_abs:g} on "
                                 "adapter values")
    if expect:
        meta = meta or {}
        for tag, want in expect.items():
            got = meta.get(tag)
            if got != want:
                what = tag.removeprefix(TAG_PREFIX)
                raise UploadRejected(f"adapter is tagged {what}={got!r}, expected {want!r} (an adapter from another "
                                     f"{'round' if what == 'round' else what}?)" if got is not None
                                     else f"adapter carries no {what} tag; expected {want!r}")


def _normalized(weights: list[float]) -> list[float]:
    if not weights or any(not (w >= 0) for w in weights):
        raise ValueError(f"weights must be non-negative numbers, got {weights}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights sum to zero: no client reported a training sample")
    return [float(w) / total for w in weights]


def lora_pairs(keys) -> tuple[list[tuple[str, str]], list[str]]:
    """([(A key, B key)] of each LoRA module, other keys). peft names them `...lora_A.weight` / `...lora_B.weight`."""
    keys = set(keys)
    pairs, used = [], set()
    for k in sorted(keys):
        if ".lora_A." in k:
            b = k.replace(".lora_A.", ".lora_B.")
            if b in keys:
                pairs.append((k, b))
                used.update((k, b))
    return pairs, sorted(keys - used)


def _f64(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def fedavg(states: list[Mapping[str, np.ndarray]], weights: list[float], *, mode: str = "factors") -> dict[str, np.ndarray]:
    """Sample-weighted FedAvg of validated LoRA states (same keys and shapes). Accumulates in float64 and returns
    contiguous arrays in the first state's dtypes. See the module docstring for the two modes."""
    if mode not in MODES:
        raise ValueError(f"aggregation must be one of {', '.join(MODES)}, got {mode!r}")
    if len(states) != len(weights) or not states:
        raise ValueError(f"need one weight per state and at least one state (got {len(states)} states, {len(weights)} weights)")
    w = _normalized(weights)
    ref = states[0]

    def mean(key: str) -> np.ndarray:
        acc = np.zeros(ref[key].shape, dtype=np.float64)
        for wk, s in zip(w, states):
            acc += wk * _f64(s[key])
        return acc

    def cast(value: np.ndarray, key: str) -> np.ndarray:
        return np.ascontiguousarray(value.astype(ref[key].dtype))

    out: dict[str, np.ndarray] = {}
    if mode == "factors":
        for key in sorted(ref):
            out[key] = cast(mean(key), key)
        return out
    pairs, others = lora_pairs(ref)
    for key in others:
        out[key] = cast(mean(key), key)
    for a_key, b_key in pairs:
        rank = ref[a_key].shape[0]  # A: [r, in], B: [out, r]
        delta = np.zeros((ref[b_key].shape[0], ref[a_key].shape[1]), dtype=np.float64)
        for wk, s in zip(w, states):
            delta += wk * (_f64(s[b_key]) @ _f64(s[a_key]))
        a, b = refactorize(delta, rank)
        out[a_key] = cast(a, a_key)
        out[b_key] = cast(b, b_key)
    return out


def refactorize(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A [r, in], B [out, r]) in float64 with B·A the best rank-r approximation of delta [out, in] (truncated SVD,
    the singular values split evenly between the factors). Zero delta gives zero factors. Deterministic: each
    singular vector pair's sign is fixed so that the largest-magnitude entry of its U column is positive."""
    u, s, vh = np.linalg.svd(_f64(delta), full_matrices=False)
    k = min(rank, s.shape[0])
    u, s, vh = u[:, :k], s[:k], vh[:k]
    idx = np.abs(u).argmax(axis=0)
    sign = np.sign(u[idx, np.arange(k)])
    sign[sign == 0] = 1
    u, vh = u * sign, vh * sign[:, None]
    root = np.sqrt(s)
    b = u * root
    a = root[:, None] * vh
    if k < rank:  # fewer singular values than the rank (a tiny matrix): pad with zero rows/columns
        a = np.concatenate([a, np.zeros((rank - k, a.shape[1]), dtype=a.dtype)])
        b = np.concatenate([b, np.zeros((b.shape[0], rank - k), dtype=b.dtype)], axis=1)
    return a, b


@dataclass
class AggregateResult:
    state: dict[str, np.ndarray]
    accepted: dict[str, float] = field(default_factory=dict)    # party -> weight (sample count)
    rejected: dict[str, str] = field(default_factory=dict)      # party -> reason


def aggregate_uploads(uploads: Mapping[str, bytes], weights: Mapping[str, float], reference: Mapping[str, np.ndarray], *,
                      expect: Mapping[str, Mapping[str, str]] | None = None, mode: str = "factors",
                      min_accepted: int = 1, max_abs: float = MAX_ADAPTER_ABS) -> AggregateResult:
    """Validate every upload against `reference` (its keys and shapes, finite values within `max_abs`, its expected
    tags), drop the bad ones with a reason, and FedAvg the rest weighted by `weights`. Raises ValueError when fewer
    than `min_accepted` uploads survive.
    `adapter_bytes(result.state)` is the aggregate's canonical adapter blob."""
    accepted_states, accepted = [], {}
    rejected: dict[str, str] = {}
    for pid in sorted(uploads):
        try:
            weight = float(weights.get(pid, float("nan")))
            if not weight >= 0:
                raise UploadRejected(f"no valid sample count (got {weights.get(pid)!r})")
            state, meta = parse_adapter(uploads[pid])
            validate_upload(state, reference, meta=meta, expect=(expect or {}).get(pid), max_abs=max_abs)
        except UploadRejected as exc:
            rejected[pid] = str(exc)
            continue
        accepted_states.append(state)
        accepted[pid] = weight
    if len(accepted) < max(1, min_accepted):
        raise ValueError(f"only {len(accepted)} valid upload(s), {max(1, min_accepted)} needed; rejected: "
                         + "; ".join(f"{p}: {r}" for p, r in rejected.items()))
    state = fedavg(accepted_states, [accepted[p] for p in sorted(accepted)], mode=mode)
    return AggregateResult(state=state, accepted=accepted, rejected=rejected)
