"""Trainer: CE fine-tuning, distillation, persistent optimizer state, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cotune.align.tokenizers import encode_pair
from cotune.data.example import Example
from cotune.demo.tiny import make_tiny_model
from cotune.lm.evaluate import evaluate_loss
from cotune.lm.lora import attach_lora, load_lora_state_dict, lora_state_dict
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
    tr = _trainer(tiny_dir)
    targets = _peaked_targets(tr, EXAMPLES, token_id=4242)
    targets[1] = None  # DualMinCE: no KD for this sample
    out = tr.distill(EXAMPLES, targets, ce_weight=0.2, epochs=8)
    assert out["kd_samples"] == 4
    assert out["kd_after"] < out["kd_before"] - 0.3
    assert np.isfinite(out["ce_before"]) and np.isfinite(out["ce_after"])
    assert tr.kd_eval(EXAMPLES, targets) == pytest.approx(out["kd_after"], rel=1e-5)


def test_distill_rejects_malformed_targets(tiny_dir):
    tr = _trainer(tiny_dir)
    good = _peaked_targets(tr, EXAMPLES[:1], token_id=7)[0]
    with pytest.raises(ValueError, match="KD targets for"):
        tr.distill(EXAMPLES[:2], [good], ce_weight=0.9)
    far = KDTarget(np.array([999]), good.ids[:1], good.probs[:1])
    with pytest.raises(ValueError, match="positions must lie"):
        tr.distill(EXAMPLES[:1], [far], ce_weight=0.9)
    big_id = KDTarget(good.positions, np.full_like(good.ids, 10**7), good.probs)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tr.distill(EXAMPLES[:1], [big_id], ce_weight=0.9)
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


# --------------------------------------------------------------------------------------------- Trainer.fit


def _lora_groups(tr):
    """Two disjoint halves of the LoRA parameters as groups "a" and "b"."""
    from cotune.lm.train import ParamGroup

    params = [p for _, p in tr.named_params]
    half = len(params) // 2
    return ParamGroup("a", params[:half]), ParamGroup("b", params[half:])


def _pull(group, scale=1.0, target=0.5):
    """A loss over `group`'s parameters only: scale·Σ(p − target)²."""

    def loss_fn(_batch):
        loss = sum(((p - target) ** 2).sum() for p in group.params) * scale
        return loss, {"seen": 1.0}

    return loss_fn


def _snapshot(tr, name):
    g = tr.group(name)
    return ([p.detach().clone() for p in g.params],
            {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
             for p, st in g.optimizer.state.items()},
            g.scheduler.last_epoch, g.steps)


def test_fit_clips_gradients_at_grad_clip(tiny_dir):
    norms = {}
    for clip in (1.0, 0.0):
        tr = _trainer(tiny_dir, grad_clip=clip)
        a, _ = _lora_groups(tr)
        tr.group(a).optimizer.register_step_pre_hook(
            lambda opt, *_: norms.setdefault(clip, []).append(
                float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in a.params if p.grad is not None])))))
        res = tr.fit([0, 1], _pull(a, scale=1e3), a)
        assert res.optimizer_steps == 2 and res.skipped_steps == 0
    assert max(norms[1.0]) == pytest.approx(1.0, rel=1e-4)  # clipped to the configured norm
    assert min(norms[0.0]) > 10.0  # unclipped, the same loss has a far larger gradient


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fit_skips_a_non_finite_loss_without_touching_params_or_optimizer(tiny_dir, bad):
    tr = _trainer(tiny_dir)
    a, _ = _lora_groups(tr)
    tr.fit([0, 1], _pull(a), a)  # some optimizer state to protect
    before = _snapshot(tr, "a")
    calls = []

    def loss_fn(batch):
        loss, stats = _pull(a)(batch)
        calls.append(batch)
        return (loss * bad if batch == "bad" else loss), stats

    res = tr.fit(["bad", "bad"], loss_fn, a)
    assert res.steps == 2 and res.skipped_steps == 2 and res.optimizer_steps == 0 and res.stats == []
    after = _snapshot(tr, "a")
    assert all(torch.equal(x, y) for x, y in zip(before[0], after[0]))
    assert before[1].keys() == after[1].keys()
    for pid, st in before[1].items():
        assert all(torch.equal(v, after[1][pid][k]) if torch.is_tensor(v) else v == after[1][pid][k]
                   for k, v in st.items())
    assert before[2:] == after[2:]  # schedule and step counter unchanged
    assert all(p.grad is None for p in a.params)
    assert tr.group("a").skipped_steps == 2
    # a finite batch after a skipped one steps normally; its stats are kept, the skipped one's are not
    res = tr.fit(["bad", "ok"], loss_fn, a)
    assert (res.skipped_steps, res.optimizer_steps, len(res.stats)) == (1, 1, 1) and np.isfinite(res.mean("loss"))
    assert tr.group("a").steps == before[3] + 1


def test_fit_counts_batches_with_nothing_to_learn(tiny_dir):
    tr = _trainer(tiny_dir)
    a, _ = _lora_groups(tr)
    res = tr.fit([0, 1, 2], lambda b: (None, {"tokens": 0.0}) if b == 1 else _pull(a)(b), a)
    assert (res.steps, res.optimizer_steps, res.empty_steps, res.skipped_steps) == (3, 2, 1, 0)
    assert len(res.stats) == 3 and len(res.values("loss")) == 2 and res.sum("seen") == 2.0


def test_fit_optimizer_state_persists_per_group_and_groups_are_independent(tiny_dir):
    from cotune.lm.train import ParamGroup

    tr = _trainer(tiny_dir, lr=1e-3)
    a, b = _lora_groups(tr)
    tr.set_lr(5e-2, a)
    tr.set_lr(1e-3, b)
    tr.fit([0, 1], _pull(a), a)
    b_before = [p.detach().clone() for p in b.params]
    assert tr.group("a").steps == 2 and tr.group("b").steps == 0 and not tr.group("b").optimizer.state
    assert {int(s["step"]) for s in tr.group("a").optimizer.state.values()} == {2}
    assert all(torch.equal(p, q) for p, q in zip(b.params, b_before))  # b's parameters did not move
    tr.fit([0, 1, 2], _pull(a), "a")  # by name: the same optimizer continues
    assert {int(s["step"]) for s in tr.group("a").optimizer.state.values()} == {5}
    tr.fit([0], _pull(b), b)
    assert {int(s["step"]) for s in tr.group("b").optimizer.state.values()} == {1}
    assert tr.group("a").steps == 5 and tr.global_step == 0 and not tr.optimizer.state  # default group untouched
    assert tr.group("a").optimizer.param_groups[0]["lr"] == pytest.approx(5e-2)
    assert tr.group("b").optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert tr.config.lr == pytest.approx(1e-3)  # a group's lr is not the default group's
    with pytest.raises(ValueError, match="different parameters"):
        tr.fit([0], _pull(a), ParamGroup("a", b.params))
    with pytest.raises(KeyError):
        tr.fit([0], _pull(a), "nope")


def test_fit_should_stop_progress_steps_and_modes(tiny_dir):
    import itertools

    tr = _trainer(tiny_dir)
    a, _ = _lora_groups(tr)
    seen, modes = [], []

    def loss_fn(batch):
        modes.append(tr.model.training)
        return _pull(a)(batch)

    res = tr.fit(range(5), loss_fn, a, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, 5) for i in range(1, 6)] and res.steps == 5 and not res.stopped
    assert all(modes) and not tr.model.training  # train mode during, eval mode after

    seen.clear()
    res = tr.fit(range(5), loss_fn, a, progress=lambda d, t: seen.append((d, t)), should_stop=lambda: len(seen) >= 2)
    assert res.stopped and res.steps == 2 and res.optimizer_steps == 2 and seen[-1] == (2, 5)

    seen.clear()
    res = tr.fit(itertools.count(), loss_fn, a, steps=3, progress=lambda d, t: seen.append((d, t)))
    assert res.steps == 3 and res.optimizer_steps == 3 and seen[-1] == (3, 3) and not res.stopped

    def boom(batch):
        loss, _ = _pull(a)(batch)
        loss.backward()  # leaves gradients behind, then fails
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tr.fit([0], boom, a)
    assert all(p.grad is None for p in a.params) and not tr.model.training


def test_state_round_trips_every_group(tiny_dir):
    tr = _trainer(tiny_dir)
    a, _ = _lora_groups(tr)
    tr.train_ce(EXAMPLES[:4])
    tr.set_lr(3e-2, a)
    tr.fit([0, 1, 2], _pull(a), a)
    blob = tr.state_dict_bytes()
    assert b"pickle" not in blob

    other = _trainer(tiny_dir)
    load_lora_state_dict(other.model, lora_state_dict(tr.model))
    other.load_state_bytes(blob)  # creates group "a" over the parameters of the same names
    assert sorted(other.groups) == ["a", "default"] and other.global_step == 2 and other.group("a").steps == 3
    ga, oa = tr.group("a"), other.group("a")
    assert [n for n, _ in ga.named_params] == [n for n, _ in oa.named_params]
    assert oa.optimizer.param_groups[0]["lr"] == pytest.approx(3e-2)
    for p_a, p_b in zip(ga.params, oa.params):
        assert torch.equal(ga.optimizer.state[p_a]["exp_avg"], oa.optimizer.state[p_b]["exp_avg"])
    a2, _ = _lora_groups(other)
    tr.fit([0, 1], _pull(a), a)
    other.fit([0, 1], _pull(a2), a2)
    assert all(torch.equal(x, y) for x, y in zip(a.params, a2.params))

    # a trainer with a group the blob lacks drops it (restoring means becoming the saved trainer)
    third = _trainer(tiny_dir)
    third.group(_lora_groups(third)[1])
    assert sorted(third.groups) == ["b", "default"]
    third.load_state_bytes(_trainer(tiny_dir).state_dict_bytes())
    assert sorted(third.groups) == ["default"]
