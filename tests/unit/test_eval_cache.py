"""Evaluations kept by content (cotune.lm.eval_cache): the model's fingerprint sees every weight, the key every
setting, and a bad entry is recomputed rather than trusted."""

from __future__ import annotations

import json
import math

import torch

from cotune.lm.eval_cache import EvalCache, model_fingerprint


def _model(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)).to(dtype)
    model.register_buffer("table", torch.arange(3.0))
    return model


def test_the_fingerprint_sees_every_weight_dtype_and_buffer():
    a, b = _model(), _model()
    assert model_fingerprint(a) == model_fingerprint(b)  # the same weights: the same model
    with torch.no_grad():
        b[0].weight[1, 2] += 1e-6  # one element
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(_model(dtype=torch.bfloat16))
    c = _model()
    c.table[0] = 7.0  # a buffer
    assert model_fingerprint(a) != model_fingerprint(c)
    # the bf16 bytes themselves, not a lossy conversion: two bf16 weights one ulp apart differ
    d, e = _model(dtype=torch.bfloat16), _model(dtype=torch.bfloat16)
    with torch.no_grad():
        e[0].weight.view(torch.int16)[0, 0] += 1
    assert model_fingerprint(d) != model_fingerprint(e)


def test_the_key_covers_each_part():
    parts = {"model": "m", "eval": "e", "public": "p", "batch_size": 8, "numerics": ["cpu", "torch.bfloat16", True]}
    key = EvalCache.key(**parts)
    assert key == EvalCache.key(**dict(parts))
    for name, other in (("model", "m2"), ("eval", "e2"), ("public", "p2"), ("batch_size", 4),
                        ("numerics", ["cpu", "torch.bfloat16", False])):
        assert EvalCache.key(**{**parts, name: other}) != key, name


def test_entries_round_trip_and_bad_ones_are_recomputed(tmp_path):
    cache = EvalCache(tmp_path / "c")
    key = EvalCache.key(model="m")
    assert cache.get(key) is None  # nothing kept yet (and no directory)
    cache.put(key, {"public_loss": 2.5, "eval_accuracy": float("nan")}, public_loss=2.5, eval_accuracy=float("nan"))
    entry = cache.get(key)
    assert entry["public_loss"] == 2.5 and math.isnan(entry["eval_accuracy"])
    assert entry["metrics"]["public_loss"] == 2.5 and math.isnan(entry["metrics"]["eval_accuracy"])
    assert [p.name for p in (tmp_path / "c").iterdir()] == [f"{key}.json"]  # no temporary file left
    path = tmp_path / "c" / f"{key}.json"
    path.write_text(path.read_text()[:20])  # truncated
    assert cache.get(key) is None
    path.write_text(json.dumps({"key": "another", "metrics": {}}))  # a file under the wrong name
    assert cache.get(key) is None
    cache.put(key, {"public_loss": 1.0}, public_loss=1.0, eval_accuracy=0.5)  # replaced by the next evaluation
    assert cache.get(key)["eval_accuracy"] == 0.5


def test_a_cache_that_cannot_be_written_does_not_fail_the_evaluation(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = EvalCache(blocker / "c")
    cache.put(EvalCache.key(model="m"), {}, public_loss=1.0, eval_accuracy=0.5)  # logged, not raised
    assert cache.get(EvalCache.key(model="m")) is None
