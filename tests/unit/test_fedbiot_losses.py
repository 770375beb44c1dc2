"""FedBiOT losses: live proximal term (gradient where the adapter moved), emulator alignment that training lowers."""

from __future__ import annotations

import pytest
import torch

from cotune.algorithms.fedbiot.compress import compress, plug_adapter_into_full
from cotune.algorithms.fedbiot.losses import (
    _encode,
    client_loss,
    emulator_alignment_loss,
    lora_part_state,
    normalized_l2,
    proximal_term,
    set_lora_trainable,
)
from cotune.demo.tiny import make_tiny_model
from cotune.lm.lora import _lora_params, attach_lora
from tests.unit.lm_fixtures import needs_tokenizer

pytestmark = needs_tokenizer


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("tiny8")
    return {a: make_tiny_model(tok, root / a, arch=a, hidden=32, heads=2, layers=8) for a in ("llama", "gpt2", "gemma3")}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _compressed(tiny_dirs, arch="llama", drop=0.5):
    small, layer_map = compress(_load(tiny_dirs[arch]), adapter_layers=2, drop=drop)
    return attach_lora(small, r=4, dropout=0.0, seed=0), layer_map


def test_proximal_term_is_zero_with_zero_grad_at_the_anchor_and_pulls_back_when_moved(tiny_dirs):
    model, layer_map = _compressed(tiny_dirs)
    set_lora_trainable(model, layer_map, "adapter", adapter_layers=2)
    anchor = lora_part_state(model, layer_map, "adapter", adapter_layers=2)
    assert anchor
    params = _lora_params(model)

    prox = proximal_term(model, anchor, eps=0.5)
    assert prox.requires_grad
    prox.backward()
    assert float(prox.detach()) == 0.0
    assert all(params[k].grad is not None and float(params[k].grad.abs().max()) == 0.0 for k in anchor)
    model.zero_grad(set_to_none=True)

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k in anchor:
            params[k].add_(torch.randn(params[k].shape, generator=g) * 0.1)
    prox = proximal_term(model, anchor, eps=0.5)
    assert float(prox.detach()) > 0
    prox.backward()
    for k in anchor:
        expected = 0.5 * (params[k].detach() - anchor[k])
        torch.testing.assert_close(params[k].grad, expected)
        assert float(params[k].grad.abs().max()) > 0
    # the emulator's LoRA is not in the term and not trainable
    emulator = lora_part_state(model, layer_map, "emulator", adapter_layers=2)
    assert emulator and not set(emulator) & set(anchor)
    assert all(not params[k].requires_grad and params[k].grad is None for k in emulator)

    with pytest.raises(ValueError, match="lacks"):
        proximal_term(model, {"nope.lora_A.weight": torch.zeros(1)}, eps=1.0)


def test_client_loss_adds_the_proximal_term_and_its_gradient(tiny_dirs, tok):
    model, layer_map = _compressed(tiny_dirs)
    set_lora_trainable(model, layer_map, "adapter", adapter_layers=2)
    anchor = lora_part_state(model, layer_map, "adapter", adapter_layers=2)
    params = _lora_params(model)
    with torch.no_grad():
        for k in anchor:
            params[k].add_(0.05)
    ids = torch.randint(0, len(tok), (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    loss, ce, prox = client_loss(model, ids, mask, ids, anchor, eps=2.0)
    assert float(prox) > 0
    torch.testing.assert_close(loss.detach(), ce + prox)
    _loss0, ce0, prox0 = client_loss(model, ids, mask, ids, anchor, eps=0.0)
    assert float(prox0) == 0.0
    torch.testing.assert_close(ce0, ce)


def test_normalized_l2_is_scale_free_and_masked():
    t = torch.randn(2, 5, 8)
    assert float(normalized_l2(t, t)) == 0.0
    torch.testing.assert_close(normalized_l2(2 * t, t), torch.tensor(1.0))
    torch.testing.assert_close(normalized_l2(20 * t, 10 * t), torch.tensor(1.0))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 0] = True
    bad = t.clone()
    bad[1] += 100
    torch.testing.assert_close(normalized_l2(bad, t, mask), torch.tensor(0.0))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_emulator_alignment_training_lowers_the_loss(tiny_dirs, tok, arch):
    small, layer_map = _compressed(tiny_dirs, arch=arch, drop=0.5)
    trainable = set_lora_trainable(small, layer_map, "emulator", adapter_layers=2)
    assert trainable
    full = attach_lora(_load(tiny_dirs[arch]), r=4, dropout=0.0, seed=0)
    plug_adapter_into_full(full, small, layer_map, adapter_layers=2)
    for p in full.parameters():
        p.requires_grad_(False)

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, len(tok), (4, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    adapter_before = lora_part_state(small, layer_map, "adapter", adapter_layers=2)

    params = [p for p in small.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    with torch.no_grad():
        first, parts0 = emulator_alignment_loss(small, full, ids, mask, layer_map, beta=0.5, adapter_layers=2)
    assert parts0["l2"] > 0 and parts0["kl"] > 0
    for _ in range(15):
        opt.zero_grad()
        loss, _ = emulator_alignment_loss(small, full, ids, mask, layer_map, beta=0.5, adapter_layers=2)
        loss.backward()
        opt.step()
    with torch.no_grad():
        last, parts = emulator_alignment_loss(small, full, ids, mask, layer_map, beta=0.5, adapter_layers=2)
    assert float(last) < 0.9 * float(first), (float(first), float(last))
    assert parts["l2"] < parts0["l2"]
    # only the emulator moved
    for k, v in lora_part_state(small, layer_map, "adapter", adapter_layers=2).items():
        torch.testing.assert_close(v, adapter_before[k])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_alignment_loss_is_zero_when_nothing_was_dropped(tiny_dirs, tok, arch):
    # drop=0 keeps every layer: the emulator is the original middle block, so both terms vanish (hooks line up)
    small, layer_map = _compressed(tiny_dirs, arch=arch, drop=0.0)
    assert [layer_map[j] for j in sorted(layer_map)] == list(range(8))
    full = attach_lora(_load(tiny_dirs[arch]), r=4, dropout=0.0, seed=0)
    plug_adapter_into_full(full, small, layer_map, adapter_layers=2)
    ids = torch.randint(0, len(tok), (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _loss, parts = emulator_alignment_loss(small, full, ids, None, layer_map, beta=1.0, adapter_layers=2)
    assert parts["l2"] < 1e-10 and abs(parts["kl"]) < 1e-6, parts


def _examples(n=8):
    from cotune.data.example import Example

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return [Example(prompt=f"Q: name {i} is", response=f" {words[i % 8]} {words[(i + 3) % 8]}.") for i in range(n)]


def _trainer(model, tok):
    from cotune.lm.train import TrainConfig, Trainer

    return Trainer(model, tok, TrainConfig())


def test_train_adapter_moves_only_the_adapter_and_lowers_ce(tiny_dirs, tok):
    from cotune.algorithms.fedbiot.losses import train_adapter

    model, layer_map = _compressed(tiny_dirs)
    trainer = _trainer(model, tok)
    anchor = lora_part_state(model, layer_map, "adapter", adapter_layers=2)
    emulator_before = lora_part_state(model, layer_map, "emulator", adapter_layers=2)
    seen = []
    m = train_adapter(trainer, _examples(), layer_map, anchor, eps=0.1, epochs=6, lr=5e-3, batch_size=4,
                      max_length=32, progress=lambda d, t: seen.append((d, t)), adapter_layers=2)
    assert seen[-1] == (12, 12)
    assert all(p.requires_grad for p in _lora_params(model).values())  # trainability restored for other tasks
    assert m["steps"] == 12 and m["ce_last"] < m["ce_first"] and m["prox_last"] > 0
    assert m["skipped_steps"] == 0
    after = lora_part_state(model, layer_map, "adapter", adapter_layers=2)
    assert any(not torch.equal(after[k], anchor[k]) for k in anchor)
    for k, v in lora_part_state(model, layer_map, "emulator", adapter_layers=2).items():
        torch.testing.assert_close(v, emulator_before[k])
    with pytest.raises(ValueError, match="adapter"):
        train_adapter(trainer, _examples(), layer_map, {}, eps=0.1, adapter_layers=2)
    assert all(p.requires_grad for p in _lora_params(model).values())


def test_train_adapter_keeps_its_optimizer_across_rounds(tiny_dirs, tok):
    from cotune.algorithms.fedbiot.losses import train_adapter

    model, layer_map = _compressed(tiny_dirs)
    trainer = _trainer(model, tok)
    for rnd in (1, 2):
        anchor = lora_part_state(model, layer_map, "adapter", adapter_layers=2)
        m = train_adapter(trainer, _examples(), layer_map, anchor, eps=0.1, epochs=1, lr=5e-3, batch_size=4,
                          max_length=32, adapter_layers=2)
        assert m["steps"] == 2
        # tokens: the response tokens CE was taken over (the benchmark's tokens/s)
        pairs = _encode(tok, _examples(), 32)
        assert m["tokens"] == sum(len(p.ids) - max(p.response_start, 1) for p in pairs) > 0
        group = trainer.group("adapter")
        assert group.steps == 2 * rnd
        assert {int(s["step"]) for s in group.optimizer.state.values()} == {2 * rnd}  # AdamW state persisted
        assert set(group.optimizer.state) == {p for p in group.params}
        assert group.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)
    adapter = set(lora_part_state(model, layer_map, "adapter", adapter_layers=2))
    params = _lora_params(model)
    assert {id(p) for p in trainer.group("adapter").params} == {id(params[k]) for k in adapter}
    assert trainer.global_step == 0 and not trainer.optimizer.state  # the default group is untouched


def test_align_emulator_lowers_the_alignment_loss(tiny_dirs, tok):
    from cotune.algorithms.fedbiot.losses import align_emulator

    small, layer_map = _compressed(tiny_dirs, drop=0.5)
    trainer = _trainer(small, tok)
    full = attach_lora(_load(tiny_dirs["llama"]), r=4, dropout=0.0, seed=0)
    plug_adapter_into_full(full, small, layer_map, adapter_layers=2)
    adapter_before = lora_part_state(small, layer_map, "adapter", adapter_layers=2)
    m = align_emulator(trainer, full, _examples(), layer_map, steps=10, beta=0.5, lr=1e-2, batch_size=4,
                       max_length=32, adapter_layers=2)
    assert m["align_steps"] == 10 and not m["stopped"] and m["skipped_steps"] == 0
    # 10 batches of 4 from 8 examples: every example's every position is aligned 5 times
    assert m["align_tokens"] == 5 * sum(len(p.ids) for p in _encode(tok, _examples(), 32))
    assert m["align_loss_last"] < m["align_loss_first"]
    for k, v in lora_part_state(small, layer_map, "adapter", adapter_layers=2).items():
        torch.testing.assert_close(v, adapter_before[k])
    assert all(p.requires_grad for p in _lora_params(small).values())
    group = trainer.group("emulator")
    assert group.steps == 10 and {int(s["step"]) for s in group.optimizer.state.values()} == {10}
    m2 = align_emulator(trainer, full, _examples(), layer_map, steps=10, should_stop=lambda: True, adapter_layers=2, beta=1.0)
    assert m2["align_steps"] == 0 and m2["stopped"]
    assert trainer.group("emulator").steps == 10  # state kept; the next round continues from it
    m3 = align_emulator(trainer, full, _examples(), layer_map, steps=3, beta=0.5, lr=1e-2, batch_size=4,
                        max_length=32, adapter_layers=2)
    assert m3["align_steps"] == 3 and {int(s["step"]) for s in group.optimizer.state.values()} == {13}
