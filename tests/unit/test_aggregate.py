"""FedAvg of LoRA adapters (coordinator/aggregate.py): the math of both modes, and bad uploads rejected without
touching the aggregate."""

from __future__ import annotations

import math

import pytest
import torch

from cotune.algorithms.aggregate import (
    UploadRejected,
    aggregate_uploads,
    fedavg,
    lora_pairs,
    parse_adapter,
    refactorize,
    validate_upload,
)
from cotune.lm.lora import LORA_FORMAT, lora_to_bytes
from cotune.wire.safetensors_io import dumps

PREFIX = "base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{f}.weight"


def _adapter(seed: int, *, rank: int = 4, d_in: int = 12, d_out: int = 10, layers: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        for m in ("q", "v"):
            out[PREFIX.format(i=i, m=m, f="A")] = torch.randn(rank, d_in, generator=g)
            out[PREFIX.format(i=i, m=m, f="B")] = torch.randn(d_out, rank, generator=g)
    return out


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
        expected = sum(w / 100 * s[key].double() for w, s in zip(weights, states))
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key].double(), expected, rtol=0, atol=1e-6)
    # A and B averaged separately: the product of the means is NOT the mean of the products
    a, b = lora_pairs(states[0])[0][0]
    mean_prod = sum(w / 100 * (s[b].double() @ s[a].double()) for w, s in zip(weights, states))
    assert not torch.allclose(out[b].double() @ out[a].double(), mean_prod, atol=1e-3)


def test_equal_weights_and_a_single_client():
    s1, s2 = _adapter(1), _adapter(2)
    out = fedavg([s1, s2], [5, 5])
    for k in s1:
        torch.testing.assert_close(out[k], (s1[k] + s2[k]) / 2)
    only = fedavg([s1], [7])
    assert all(torch.equal(only[k], s1[k]) for k in s1)


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
        want = sum(w / 4 * (s[b].double() @ s[a].double()) for w, s in zip(weights, clients))
        got = out[b].double() @ out[a].double()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert out[a].shape == clients[0][a].shape and out[b].shape == clients[0][b].shape


def test_product_mode_beyond_the_rank_is_the_best_rank_r_approximation():
    clients = [_adapter(s, rank=4) for s in (7, 8, 9)]
    out = fedavg(clients, [1, 1, 1], mode="product")
    a, b = lora_pairs(out)[0][0]
    mean = sum((s[b].double() @ s[a].double()) / 3 for s in clients)
    u, sv, vh = torch.linalg.svd(mean)
    best = (u[:, :4] * sv[:4]) @ vh[:4]
    torch.testing.assert_close(out[b].double() @ out[a].double(), best, rtol=0, atol=1e-4)


def test_refactorize_is_deterministic_and_pads_small_matrices():
    delta = torch.randn(3, 5, dtype=torch.float64)
    a1, b1 = refactorize(delta, 8)
    a2, b2 = refactorize(delta.clone(), 8)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert a1.shape == (8, 5) and b1.shape == (3, 8)
    torch.testing.assert_close(b1 @ a1, delta)
    za, zb = refactorize(torch.zeros(4, 6, dtype=torch.float64), 2)
    assert not za.abs().sum() and not zb.abs().sum()


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
    assert all(torch.equal(res.state[k], clean[k]) for k in clean)


def test_upload_with_missing_or_extra_keys_is_rejected():
    state = _adapter(3)
    state.pop(sorted(state)[0])
    _assert_rejected_without_corruption("c3", "missing 1 key", bad_state=state)
    state = _adapter(3)
    state["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 12)
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
    state[key] = state[key].to(torch.int32)
    _assert_rejected_without_corruption("c3", "floating-point", bad_state=state)


def test_upload_from_another_round_run_or_party_is_rejected():
    _assert_rejected_without_corruption("c3", "round='1', expected '2'", bad_state=_adapter(3), rnd=1)
    _assert_rejected_without_corruption("c3", "run_id='old-run'", bad_state=_adapter(3), run="old-run")
    _assert_rejected_without_corruption("c3", "party_id='c1'", bad_state=_adapter(3), party="c1")


def test_untagged_upload_is_rejected_when_tags_are_expected():
    _assert_rejected_without_corruption("c3", "carries no", bad_bytes=lora_to_bytes(_adapter(3)))


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
