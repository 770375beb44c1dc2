"""Trainer: CE fine-tuning, distillation, persistent optimizer state, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cotune.data.example import Example
from cotune.lm.evaluate import evaluate_loss
from cotune.lm.lora import attach_lora, load_lora_state_dict, lora_state_dict
from cotune.demo.tiny import make_tiny_model
from cotune.align.tokenizers import encode_pair
from cotune.lm.train import KDTarget, TrainConfig, Trainer
from tests.unit.lm_fixtures import TOKENIZER, load_cached, needs_tokenizer

pytestmark = needs_tokenizer

EXAMPLES = [
    Example("Q: What color is the sky?\nA:", " blue"),
    Example("Q: What do cows drink?\nA:", " water, mostly"),
    Example("Q: Capital of France?\nA:", " Paris"),
    Example("Q: Two plus two?\nA:", " four"),
    Example("Q: Opposite of hot?\nA:", " cold"),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from cotune.align.tokenizers import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    return make_tiny_model(tok, tmp_path_factory.mktemp("tiny") / "llama", arch="llama", hidden=32, heads=2)


def _trainer(tiny_dir, **cfg):
    model, tok = load_cached(tiny_dir)
    model = attach_lora(model, dropout=0.0, seed=0)
    base = dict(lr=2e-2, batch_size=2, epochs=1)
    base.update(cfg)
    return Trainer(model, tok, TrainConfig(**base))


def test_train_ce_lowers_loss_on_tiny_overfit_set(tiny_dir):
    tr = _trainer(tiny_dir)
    before = evaluate_loss(tr.model, tr.tokenizer, EXAMPLES)["loss"]
    seen = []
    out = tr.train_ce(EXAMPLES, epochs=12, progress=lambda d, t: seen.append((d, t)))
    after = evaluate_loss(tr.model, tr.tokenizer, EXAMPLES)["loss"]
    assert out["steps"] == 12 * 3 and out["samples"] == len(EXAMPLES)
    assert out["loss_last"] < out["loss_first"] - 0.15
    assert after < before - 0.15
    assert seen[-1] == (36, 36)
    assert not tr.model.training  # back in eval mode


def test_optimizer_state_persists_across_calls_and_round_trips(tiny_dir):
    tr = _trainer(tiny_dir)
    tr.train_ce(EXAMPLES[:4])
    steps1 = {int(s["step"]) for s in tr.optimizer.state.values()}
    tr.train_ce(EXAMPLES[:4])
    steps2 = {int(s["step"]) for s in tr.optimizer.state.values()}
    assert steps1 == {2} and steps2 == {4} and tr.global_step == 4
    blob = tr.state_dict_bytes()
    assert b"pickle" not in blob[:200]

    # A fresh trainer on an identical model, given the LoRA and the state, continues exactly like the original.
    other = _trainer(tiny_dir)
    load_lora_state_dict(other.model, lora_state_dict(tr.model))
    other.load_state_bytes(blob)
    assert other.global_step == 4 and other.scheduler.last_epoch == tr.scheduler.last_epoch
    for p_a, p_b in zip(tr.optimizer.param_groups[0]["params"], other.optimizer.param_groups[0]["params"]):
        sa, sb = tr.optimizer.state[p_a], other.optimizer.state[p_b]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    tr.train_ce(EXAMPLES[:4])
    other.train_ce(EXAMPLES[:4])
    a, b = lora_state_dict(tr.model), lora_state_dict(other.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_load_state_bytes_rejects_garbage_and_foreign_state(tiny_dir, tmp_path):
    tr = _trainer(tiny_dir)
    with pytest.raises(ValueError):
        tr.load_state_bytes(b"not a state")
    from cotune.align.tokenizers import load_tokenizer

    other_dir = make_tiny_model(load_tokenizer(TOKENIZER), tmp_path / "gpt2", arch="gpt2", hidden=32, heads=2)
    model, tok = load_cached(other_dir)
    foreign = Trainer(attach_lora(model), tok, TrainConfig())
    with pytest.raises(ValueError, match="different parameters"):
        tr.load_state_bytes(foreign.state_dict_bytes())


def test_training_is_deterministic(tiny_dir):
    a = _trainer(tiny_dir, batch_size=2)
    b = _trainer(tiny_dir, batch_size=2)
    a.model = a.model  # same seed, same data
    a.train_ce(EXAMPLES, epochs=2)
    b.train_ce(EXAMPLES, epochs=2)
    sa, sb = lora_state_dict(a.model), lora_state_dict(b.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _peaked_targets(tr, examples, token_id, k=4):
    """KD targets at every response position: most mass on token_id."""
    targets = []
    for i, ex in enumerate(examples):
        pair = encode_pair(tr.tokenizer, ex.prompt, ex.response, tr.config.max_length)
        pos = np.array(list(pair.target_positions), dtype=np.int64)
        ids = np.tile(np.array([token_id, 11, 12, -1], dtype=np.int64)[:k], (len(pos), 1))
        probs = np.tile(np.array([0.9, 0.05, 0.05, 0.0], dtype=np.float32)[:k], (len(pos), 1))
        targets.append(KDTarget(pos, ids, probs))
    return targets


def test_distill_lowers_kd_loss_and_counts_targets(tiny_dir):
    tr = _trainer(tiny_dir, lam=0.2)
    targets = _peaked_targets(tr, EXAMPLES, token_id=4242)
    targets[1] = None  # DualMinCE: no KD for this sample
    out = tr.distill(EXAMPLES, targets, epochs=8)
    assert out["kd_samples"] == 4
    assert out["kd_after"] < out["kd_before"] - 0.3
    assert np.isfinite(out["ce_before"]) and np.isfinite(out["ce_after"])
    assert tr.kd_eval(EXAMPLES, targets) == pytest.approx(out["kd_after"], rel=1e-5)


def test_distill_rejects_malformed_targets(tiny_dir):
    tr = _trainer(tiny_dir)
    good = _peaked_targets(tr, EXAMPLES[:1], token_id=7)[0]
    with pytest.raises(ValueError, match="KD targets for"):
        tr.distill(EXAMPLES[:2], [good])
    far = KDTarget(np.array([999]), good.ids[:1], good.probs[:1])
    with pytest.raises(ValueError, match="positions must lie"):
        tr.distill(EXAMPLES[:1], [far])
    big_id = KDTarget(good.positions, np.full_like(good.ids, 10**7), good.probs)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tr.distill(EXAMPLES[:1], [big_id])
    assert tr.global_step == 0


def test_should_stop_interrupts(tiny_dir):
    tr = _trainer(tiny_dir)
    calls = []
    out = tr.train_ce(EXAMPLES, epochs=3, should_stop=lambda: len(calls) >= 2, progress=lambda d, t: calls.append(d))
    assert out["stopped"] and out["steps"] == 2 and tr.global_step == 2


def test_set_lr_survives_the_scheduler(tiny_dir):
    tr = _trainer(tiny_dir, warmup_steps=0)
    tr.set_lr(1e-3)
    tr.train_ce(EXAMPLES[:2])
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    tr.config.lr = 5e-3  # changing the config takes effect at the next call
    tr.train_ce(EXAMPLES[:2])
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_warmup_schedule_persists_across_calls(tiny_dir):
    tr = _trainer(tiny_dir, warmup_steps=4, lr=1e-2, batch_size=5)
    lrs = []
    for _ in range(5):
        tr.train_ce(EXAMPLES)
        lrs.append(tr.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])
