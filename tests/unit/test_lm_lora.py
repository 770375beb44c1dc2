"""LoRA: per-architecture target modules, deterministic attach, state dict round trip, validated loading."""

from __future__ import annotations

import pytest
import torch

from cotune.lm.lora import (
    LoraMismatchError,
    attach_lora,
    load_lora_state_dict,
    lora_from_bytes,
    lora_shapes,
    lora_state_dict,
    lora_target_modules,
    lora_to_bytes,
)
from cotune.demo.tiny import make_tiny_model
from tests.unit.lm_fixtures import load_cached, needs_tokenizer

pytestmark = needs_tokenizer


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("tiny")
    return {a: make_tiny_model(tok, root / a, arch=a, hidden=32, heads=2) for a in ("llama", "gpt2", "gemma3")}


def _load(tiny_dirs, arch="llama", seed=0):
    model, tok = load_cached(tiny_dirs[arch])
    return attach_lora(model, seed=seed), tok


def test_target_modules_follow_the_architecture(tiny_dirs):
    llama, _ = load_cached(tiny_dirs["llama"])
    gpt2, _ = load_cached(tiny_dirs["gpt2"])
    gemma, _ = load_cached(tiny_dirs["gemma3"])
    assert lora_target_modules(llama) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert lora_target_modules(gemma) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    # GPT-2: fused qkv c_attn plus the attention output projection; mlp.c_proj must not be caught.
    assert lora_target_modules(gpt2) == ["attn.c_proj", "c_attn"]
    peft_gpt2 = attach_lora(gpt2)
    keys = list(lora_state_dict(peft_gpt2))
    assert any(".attn.c_attn.lora_A" in k for k in keys)
    assert any(".attn.c_proj.lora_A" in k for k in keys)
    assert not any(".mlp." in k for k in keys)
    # gpt2 output still works (Conv1D layout handled)
    out = peft_gpt2(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.shape[-1] == gpt2.config.vocab_size


def test_only_lora_is_trainable_and_attach_is_deterministic(tiny_dirs):
    a, _ = _load(tiny_dirs, seed=3)
    b, _ = _load(tiny_dirs, seed=3)
    c, _ = _load(tiny_dirs, seed=4)
    trainable = [n for n, p in a.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    sa, sb, sc = lora_state_dict(a), lora_state_dict(b), lora_state_dict(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if "lora_A" in k)
    assert all(v.device.type == "cpu" and v.is_contiguous() for v in sa.values())
    assert not any(".default." in k for k in sa)  # adapter name stripped
    assert lora_shapes(a) == {k: tuple(v.shape) for k, v in sa.items()}


def test_state_dict_bytes_round_trip_and_load(tiny_dirs):
    a, _ = _load(tiny_dirs, seed=0)
    b, _ = _load(tiny_dirs, seed=1)
    with torch.no_grad():
        for n, p in a.named_parameters():
            if "lora_B" in n:
                p.normal_()
    sd = lora_state_dict(a)
    blob = lora_to_bytes(sd)
    back = lora_from_bytes(blob)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    load_lora_state_dict(b, back)
    assert all(torch.equal(lora_state_dict(b)[k], sd[k]) for k in sd)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=x).logits, b(input_ids=x).logits)


@pytest.mark.parametrize("bad", ["shape", "missing", "extra", "nan", "int"])
def test_load_rejects_bad_state_and_leaves_model_unchanged(tiny_dirs, bad):
    model, _ = _load(tiny_dirs)
    before = lora_state_dict(model)
    sd = {k: v.clone() + 1.0 for k, v in before.items()}
    key = sorted(sd)[0]
    last = sorted(sd)[-1]
    if bad == "shape":
        sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    elif bad == "missing":
        del sd[key]
    elif bad == "extra":
        sd["base_model.model.bogus.lora_A.weight"] = torch.zeros(2, 2)
    elif bad == "nan":
        sd[last][0, 0] = float("nan")
    elif bad == "int":
        sd[key] = sd[key].to(torch.int64)
    with pytest.raises(LoraMismatchError) as err:
        load_lora_state_dict(model, sd)
    msg = str(err.value)
    if bad == "shape":
        assert key in msg and "expected shape" in msg and "got" in msg
    elif bad == "missing":
        assert key in msg and "missing" in msg
    elif bad == "extra":
        assert "bogus" in msg
    elif bad == "nan":
        assert last in msg and "NaN" in msg
    else:
        assert key in msg and "floating" in msg
    after = lora_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(err.value, ValueError)


def test_from_bytes_rejects_garbage():
    for data in (b"", b"garbage!" * 10, b"\xff" * 64):
        with pytest.raises(ValueError):
            lora_from_bytes(data)
