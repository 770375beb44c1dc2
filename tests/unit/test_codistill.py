"""FedCoLLM's mutual distillation (cotune/algorithms/fedcollm/losses.py): the KD term carries gradient to the model being updated
and none to the other, and a short co-distillation on tiny same-tokenizer models lowers the KL."""

from __future__ import annotations

import pytest
import torch

from cotune.algorithms.fedcollm.losses import co_distill, measure, mutual_loss
from cotune.lm.losses import kl_full


def test_mutual_loss_grad_reaches_own_logits_only():
    torch.manual_seed(0)
    own = torch.randn(6, 11, requires_grad=True)
    other = torch.randn(6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (6,))
    loss, ce, kl = mutual_loss(own, other, labels, lam=0.5)
    loss.backward()
    assert other.grad is None
    assert own.grad is not None and own.grad.abs().sum() > 0
    # the KD term alone has a non-zero gradient (the FATE reference's had none)
    own2 = own.detach().clone().requires_grad_(True)
    kl_full(own2, other.detach()).backward()
    assert own2.grad.abs().sum() > 0
    torch.testing.assert_close(loss, ce + 0.5 * kl)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_direction_flag(direction):
    """forward (the default) = KL(teacher ‖ student) = KL(other ‖ own); reverse = KL(own ‖ other)."""
    own = torch.tensor([[2.0, 0.0, -1.0]])
    other = torch.tensor([[0.0, 1.0, 0.0]])
    _, _, kl = mutual_loss(own, other, torch.tensor([0]), lam=1.0, direction=direction)
    p, q = own.log_softmax(-1), other.log_softmax(-1)
    forward, reverse = (q.exp() * (q - p)).sum(), (p.exp() * (p - q)).sum()
    torch.testing.assert_close(kl, forward if direction == "forward" else reverse)
    assert abs(float(forward - reverse)) > 0.05  # the two directions are told apart here
    if direction == "forward":
        torch.testing.assert_close(mutual_loss(own, other, torch.tensor([0]), lam=1.0)[2], kl)  # the default
    with pytest.raises(ValueError, match="forward, reverse"):
        mutual_loss(own, other, torch.tensor([0]), lam=1.0, direction="backward")


@pytest.fixture(scope="module")
def pair(shared_data):
    from cotune.align.tokenizers import load_tokenizer
    from cotune.demo.tiny import make_tiny_model
    from cotune.lm.lora import attach_lora
    from cotune.lm.train import TrainConfig, Trainer

    tok = load_tokenizer(shared_data / "tokenizers" / "gpt2" / "gpt2.vocab")
    from transformers import AutoModelForCausalLM

    def build(tmp, hidden, layers, seed):
        import tempfile
        from pathlib import Path

        out = Path(tempfile.mkdtemp()) / tmp
        make_tiny_model(tok, out, arch="llama", hidden=hidden, layers=layers, seed=seed)
        model = attach_lora(AutoModelForCausalLM.from_pretrained(str(out)), r=4, alpha=8, dropout=0.0)
        return Trainer(model, tok, TrainConfig(lr=1e-2, batch_size=4, max_length=32))

    return build("f", 64, 2, 1), build("g", 32, 1, 2)


def test_co_distill_moves_both_adapters_and_lowers_the_kl(pair):
    from cotune.data.example import Example

    f, g = pair
    examples = [Example(prompt=f"Question {i}: what is {i} plus {i}?", response=f" {2 * i}") for i in range(8)]
    pairs = f.encode(examples)
    before_f = {k: v.clone() for k, v in f.model.named_parameters() if v.requires_grad}
    before_g = {k: v.clone() for k, v in g.model.named_parameters() if v.requires_grad}
    m = co_distill(f, g, pairs, lam=20.0, epochs=3, batch_size=4)
    assert m["steps"] == 6 and m["samples"] == 8
    assert any(not torch.equal(v, before_f[k]) for k, v in f.model.named_parameters() if v.requires_grad)
    assert any(not torch.equal(v, before_g[k]) for k, v in g.model.named_parameters() if v.requires_grad)
    assert m["slm_kl_after"] < m["slm_kl_before"], m
    assert m["llm_kl_after"] < m["llm_kl_before"], m
    again = measure(f, g, pairs, 4)
    assert again["slm_kl"] == pytest.approx(m["slm_kl_after"], rel=1e-5)
    assert m["truncated_samples"] == again["truncated_samples"] == 0
    long = f.encode([Example(prompt="A passage. " * 20 + "\nQuestion: why?\nAnswer:", response=" so")])
    assert len(long[0].ids) == 32 and measure(f, g, pairs + long, 4)["truncated_samples"] == 1
