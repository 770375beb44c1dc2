"""FedAvg of LoRA adapters (cotune/algorithms/aggregate.py, numpy: the coordinator never imports torch): the math of
both modes, bad uploads rejected without touching the aggregate, and adapter bytes identical to the torch side's."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cotune.algorithms.aggregate import (
    UploadRejected,
    aggregate_uploads,
    fedavg,
    lora_pairs,
    parse_adapter,
    refactorize,
    validate_upload,
)
from cotune.wire.safetensors_io import LORA_FORMAT, adapter_bytes, dumps

PREFIX = "base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{f}.weight"
ROOT = Path(__file__).resolve().parents[2]


def _adapter(seed: int, *, rank: int = 4, d_in: int = 12, d_out: int = 10, layers: int = 2) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    out = {}
    for i in range(layers):
        for m in ("q", "v"):
            out[PREFIX.format(i=i, m=m, f="A")] = g.standard_normal((rank, d_in), dtype=np.float32)
            out[PREFIX.format(i=i, m=m, f="B")] = g.standard_normal((d_out, rank), dtype=np.float32)
    return out


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _tagged(state, *, run="run1", rnd=2, party="c1") -> bytes:
    tags = {"cotune.run_id": run, "cotune.round": str(rnd), "cotune.party_id": party, "cotune.task_key": f"r{rnd}/get_lora/{party}"}
    return dumps(state, {"format": LORA_FORMAT, "keys": str(len(state)), **tags})


def _expect(party, *, run="run1", rnd=2):
    return {"cotune.run_id": run, "cotune.round": str(rnd), "cotune.party_id": party, "cotune.task_key": f"r{rnd}/get_lora/{party}"}


# -- math ----------------------------------------------------------------------------------------------------------
def test_factors_mode_is_the_sample_weighted_mean_of_each_tensor():
    states = [_adapter(s) for s in (1, 2, 3)]
    weights = [10, 30, 60]
    out = fedavg(states, weights, mode="factors")
    for key in states[0]:
        expected = sum(w / 100 * _f64(s[key]) for w, s in zip(weights, states))
        assert isinstance(out[key], np.ndarray) and out[key].dtype == np.float32
        assert out[key].shape == expected.shape
        np.testing.assert_allclose(_f64(out[key]), expected, rtol=0, atol=1e-6)
    # A and B averaged separately: the product of the means is NOT the mean of the products
    a, b = lora_pairs(states[0])[0][0]
    mean_prod = sum(w / 100 * (_f64(s[b]) @ _f64(s[a])) for w, s in zip(weights, states))
    assert not np.allclose(_f64(out[b]) @ _f64(out[a]), mean_prod, rtol=1e-5, atol=1e-3)


def test_equal_weights_and_a_single_client():
    s1, s2 = _adapter(1), _adapter(2)
    out = fedavg([s1, s2], [5, 5])
    for k in s1:  # torch.testing.assert_close's float32 tolerances
        assert out[k].dtype == np.float32 and out[k].shape == s1[k].shape
        np.testing.assert_allclose(out[k], (s1[k] + s2[k]) / 2, rtol=1.3e-6, atol=1e-5)
    only = fedavg([s1], [7])
    assert all(only[k].dtype == s1[k].dtype and np.array_equal(only[k], s1[k]) for k in s1)


def test_product_mode_recovers_the_exact_mean_of_products_when_it_fits_the_rank():
    # two clients of rank 2 each, adapter rank 4: the mean of products has rank <= 4, so it is exact
    rank = 4
    clients = []
    for seed in (5, 6):
        s = _adapter(seed, rank=rank)
        for k in s:  # make each client's update rank 2: zero half of A's rows
            if ".lora_A." in k:
                s[k][2:] = 0
        clients.append(s)
    weights = [1, 3]
    out = fedavg(clients, weights, mode="product")
    for a, b in lora_pairs(out)[0]:
        want = sum(w / 4 * (_f64(s[b]) @ _f64(s[a])) for w, s in zip(weights, clients))
        got = _f64(out[b]) @ _f64(out[a])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
        assert out[a].shape == clients[0][a].shape and out[b].shape == clients[0][b].shape
        assert out[a].dtype == np.float32 and out[b].dtype == np.float32


def test_product_mode_beyond_the_rank_is_the_best_rank_r_approximation():
    clients = [_adapter(s, rank=4) for s in (7, 8, 9)]
    out = fedavg(clients, [1, 1, 1], mode="product")
    a, b = lora_pairs(out)[0][0]
    mean = sum((_f64(s[b]) @ _f64(s[a])) / 3 for s in clients)
    u, sv, vh = np.linalg.svd(mean)
    best = (u[:, :4] * sv[:4]) @ vh[:4]
    np.testing.assert_allclose(_f64(out[b]) @ _f64(out[a]), best, rtol=0, atol=1e-4)


def test_refactorize_is_deterministic_and_pads_small_matrices():
    delta = np.random.default_rng(0).standard_normal((3, 5))
    a1, b1 = refactorize(delta, 8)
    a2, b2 = refactorize(delta.copy(), 8)
    assert np.array_equal(a1, a2) and np.array_equal(b1, b2)
    assert a1.shape == (8, 5) and b1.shape == (3, 8)
    assert a1.dtype == np.float64 and b1.dtype == np.float64
    np.testing.assert_allclose(b1 @ a1, delta, rtol=1e-7, atol=1e-7)  # torch.testing.assert_close's float64 default
    za, zb = refactorize(np.zeros((4, 6)), 2)
    assert not np.abs(za).sum() and not np.abs(zb).sum()


def test_weights_must_be_positive_in_total():
    with pytest.raises(ValueError, match="sum to zero"):
        fedavg([_adapter(1)], [0])
    with pytest.raises(ValueError, match="aggregation must be"):
        fedavg([_adapter(1)], [1], mode="median")


# -- validation ----------------------------------------------------------------------------------------------------
def _uploads(bad_party: str, bad_state=None, bad_bytes: bytes | None = None, **tag_overrides):
    ref = _adapter(0)
    good = {"c1": _adapter(1), "c2": _adapter(2)}
    uploads = {p: _tagged(s, party=p) for p, s in good.items()}
    if bad_bytes is not None:
        uploads[bad_party] = bad_bytes
    else:
        uploads[bad_party] = _tagged(bad_state, party=tag_overrides.pop("party", bad_party), **tag_overrides)
    expect = {p: _expect(p) for p in uploads}
    return ref, good, uploads, expect


def _assert_rejected_without_corruption(bad_party, reason_part, **kw):
    ref, good, uploads, expect = _uploads(bad_party, **kw)
    weights = {"c1": 10, "c2": 30, bad_party: 60}
    res = aggregate_uploads(uploads, weights, ref, expect=expect)
    assert set(res.rejected) == {bad_party}, res.rejected
    assert reason_part in res.rejected[bad_party], res.rejected[bad_party]
    assert res.accepted == {"c1": 10.0, "c2": 30.0}
    clean = fedavg([good["c1"], good["c2"]], [10, 30])
    assert set(res.state) == set(clean)
    assert all(res.state[k].dtype == clean[k].dtype and np.array_equal(res.state[k], clean[k]) for k in clean)


def test_upload_with_missing_or_extra_keys_is_rejected():
    state = _adapter(3)
    state.pop(sorted(state)[0])
    _assert_rejected_without_corruption("c3", "missing 1 key", bad_state=state)
    state = _adapter(3)
    state["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 12), dtype=np.float32)
    _assert_rejected_without_corruption("c3", "unexpected 1 key", bad_state=state)


def test_upload_with_wrong_shape_is_rejected():
    state = _adapter(3, rank=8)
    _assert_rejected_without_corruption("c3", "shape (8, 12), expected (4, 12)", bad_state=state)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_upload_with_non_finite_values_is_rejected(value):
    state = _adapter(3)
    key = sorted(state)[1]
    state[key][0, 0] = value
    _assert_rejected_without_corruption("c3", "NaN or Inf", bad_state=state)


def test_upload_with_integer_tensor_is_rejected():
    state = _adapter(3)
    key = sorted(state)[0]
    state[key] = state[key].astype(np.int32)
    _assert_rejected_without_corruption("c3", "floating-point", bad_state=state)


def test_upload_from_another_round_run_or_party_is_rejected():
    _assert_rejected_without_corruption("c3", "round='1', expected '2'", bad_state=_adapter(3), rnd=1)
    _assert_rejected_without_corruption("c3", "run_id='old-run'", bad_state=_adapter(3), run="old-run")
    _assert_rejected_without_corruption("c3", "party_id='c1'", bad_state=_adapter(3), party="c1")


def test_untagged_upload_is_rejected_when_tags_are_expected():
    _assert_rejected_without_corruption("c3", "carries no", bad_bytes=adapter_bytes(_adapter(3)))


def test_garbage_upload_is_rejected():
    _assert_rejected_without_corruption("c3", "not a valid safetensors", bad_bytes=b"\x00" * 64)


def test_missing_weight_is_rejected_and_too_few_valid_uploads_fail():
    ref, good, uploads, expect = _uploads("c3", bad_state=_adapter(3))
    res = aggregate_uploads(uploads, {"c1": 1, "c2": 1}, ref, expect=expect)
    assert "sample count" in res.rejected["c3"]
    bad = {"c1": b"junk", "c2": b"junk"}
    with pytest.raises(ValueError, match="only 0 valid upload"):
        aggregate_uploads(bad, {"c1": 1, "c2": 1}, ref)
    with pytest.raises(ValueError, match="2 needed"):
        aggregate_uploads({**bad, "c1": uploads["c1"]}, {"c1": 1, "c2": 1}, ref, expect=expect, min_accepted=2)


def test_parse_adapter_returns_tags_and_validate_accepts_a_good_upload():
    state = _adapter(4)
    parsed, meta = parse_adapter(_tagged(state, party="c9", rnd=5))
    assert meta["cotune.round"] == "5" and meta["cotune.party_id"] == "c9"
    validate_upload(parsed, _adapter(0), meta=meta, expect=_expect("c9", rnd=5))
    with pytest.raises(UploadRejected):
        validate_upload(parsed, _adapter(0), meta=meta, expect=_expect("c9", rnd=6))


def test_parse_adapter_returns_writable_float_arrays_and_widens_bf16_exactly():
    import torch

    from cotune.lm.lora import lora_to_bytes

    state = _adapter(5)
    parsed, meta = parse_adapter(adapter_bytes(state))
    assert meta == {"format": LORA_FORMAT, "keys": str(len(state))}
    assert set(parsed) == set(state)
    for k in state:
        assert parsed[k].dtype == np.float32 and np.array_equal(parsed[k], state[k]) and parsed[k].flags.writeable
    bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state.items()}
    parsed, _ = parse_adapter(lora_to_bytes(bf16))
    for k, v in bf16.items():
        assert parsed[k].dtype == np.float32 and np.array_equal(parsed[k], v.float().numpy())


# -- bytes and imports ---------------------------------------------------------------------------------------------
def test_adapter_bytes_equal_lora_to_bytes_byte_for_byte():
    import torch

    from cotune.lm.lora import lora_from_bytes, lora_to_bytes

    state = _adapter(11, rank=8, d_in=24, d_out=16, layers=3)
    state["base_model.model.score.weight"] = np.random.default_rng(1).standard_normal((7,), dtype=np.float32)
    ours = adapter_bytes(state)
    theirs = lora_to_bytes({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    assert ours == theirs
    assert hashlib.sha256(ours).hexdigest() == hashlib.sha256(theirs).hexdigest()
    # an aggregate written here is what the torch side reads back
    agg = fedavg([_adapter(1), _adapter(2)], [1, 3], mode="product")
    back = lora_from_bytes(adapter_bytes(agg))
    assert set(back) == set(agg)
    assert all(back[k].dtype == torch.float32 and np.array_equal(back[k].numpy(), agg[k]) for k in agg)
    assert adapter_bytes(agg) == lora_to_bytes({k: torch.from_numpy(v) for k, v in agg.items()})


def test_product_mode_matches_a_torch_svd_reference():
    """The numpy refactorization is the torch one it replaced: same factors (signs fixed the same way)."""
    import torch

    def reference(delta: torch.Tensor, rank: int):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, s.shape[0])
        u, s, vh = u[:, :k], s[:k], vh[:k]
        sign = torch.sign(u[u.abs().argmax(dim=0), torch.arange(k)])
        sign[sign == 0] = 1
        u, vh = u * sign, vh * sign[:, None]
        return s.sqrt()[:, None] * vh, u * s.sqrt()

    clients = [_adapter(s, rank=4) for s in (21, 22, 23)]
    weights = [2, 3, 5]
    out = fedavg(clients, weights, mode="product")
    for a, b in lora_pairs(out)[0]:
        delta = sum(w / 10 * (torch.from_numpy(s[b]).double() @ torch.from_numpy(s[a]).double()) for w, s in zip(weights, clients))
        ra, rb = reference(delta, 4)
        np.testing.assert_allclose(out[a], ra.float().numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(out[b], rb.float().numpy(), rtol=0, atol=1e-5)


def test_importing_the_aggregation_does_not_import_torch():
    code = "import cotune.algorithms.aggregate, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
