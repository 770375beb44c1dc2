"""Precision per device: the 'auto' dtype rule, fp32 LoRA master weights and optimizer state on a half-precision
base, bf16 training and evaluation against fp32, and the fp16 loss-scaled step (GradScaler on CPU)."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from cotune.lm import device as device_mod
from cotune.lm.device import pick_dtype
from tests.unit.lm_fixtures import TOKENIZER, needs_tokenizer, toy_examples


# ---------------------------------------------------------------------------------------------- the 'auto' rule
@pytest.mark.parametrize("capable, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, capable, expected):
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: capable)
    assert pick_dtype("auto", "cpu") == expected
    assert pick_dtype(None, torch.device("cpu")) == expected
    # explicit choices are taken as given, whatever the CPU
    assert pick_dtype("fp32", "cpu") == torch.float32
    assert pick_dtype("bf16", "cpu") == torch.bfloat16
    assert pick_dtype("fp16", "cpu") == torch.float16
    assert pick_dtype(torch.float32, "cpu") == torch.float32


@pytest.mark.parametrize("bf16_gpu, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda_is_bf16_else_fp16(monkeypatch, bf16_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: not bf16_gpu)  # the CPU does not matter here
    assert pick_dtype("auto", torch.device("cuda")) == expected


@pytest.mark.parametrize(
    "mkldnn, amx, avx512_bf16, expected",
    [
        (True, True, True, True),
        (True, True, False, True),  # AMX-BF16 (Sapphire Rapids+)
        (True, False, True, True),  # AVX512-BF16 (Cooper Lake, Zen 4)
        (True, False, False, False),  # plain AVX512/AVX2: oneDNN would emulate bf16, slower than fp32
        (False, True, True, False),  # no oneDNN: no fast bf16 kernels
    ],
)
def test_native_bf16_probe(monkeypatch, mkldnn, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: mkldnn)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    device_mod.cpu_has_native_bf16.cache_clear()
    try:
        assert device_mod.cpu_has_native_bf16() is expected
        assert pick_dtype("auto", "cpu") == (torch.bfloat16 if expected else torch.float32)
    finally:
        device_mod.cpu_has_native_bf16.cache_clear()  # the real answer is probed again on next use


def test_native_bf16_probe_without_torch_probes(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    device_mod.cpu_has_native_bf16.cache_clear()
    try:
        assert device_mod.cpu_has_native_bf16() is False
    finally:
        device_mod.cpu_has_native_bf16.cache_clear()


# ---------------------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from cotune.align.tokenizers import load_tokenizer
    from cotune.demo.tiny import make_tiny_model

    if not TOKENIZER.exists():
        pytest.skip(f"shared tokenizer data not found at {TOKENIZER}")
    return make_tiny_model(load_tokenizer(TOKENIZER), tmp_path_factory.mktemp("prec") / "llama", hidden=64, heads=4)


def _load(tiny_dir, dtype, *, lora=True, seed=0):
    from cotune.lm.lora import attach_lora
    from cotune.lm.model import load_causal_lm

    model, tok = load_causal_lm(tiny_dir, device="cpu", dtype=dtype)
    if lora:
        model = attach_lora(model, seed=seed, dropout=0.0)
    return model, tok


def _lora(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@needs_tokenizer
@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_base_keeps_fp32_lora_and_optimizer_state(tiny_dir, dtype, torch_dtype):
    from cotune.lm.lora import lora_state_dict, lora_to_bytes
    from cotune.lm.train import Trainer, TrainConfig

    model, tok = _load(tiny_dir, dtype, seed=3)
    ref, _ = _load(tiny_dir, "fp32", seed=3)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch_dtype for p in frozen)  # base weights in half precision
    lora = _lora(model)
    assert lora and all("lora_" in n and p.dtype == torch.float32 for n, p in lora.items())
    # the initial adapter is the same fp32 draw as on an fp32 base (precision-independent, bit for bit)
    sd, sd_ref = lora_state_dict(model), lora_state_dict(ref)
    assert sd.keys() == sd_ref.keys() and all(torch.equal(sd[k], sd_ref[k]) for k in sd)
    assert lora_to_bytes(sd) == lora_to_bytes(sd_ref)

    before = {n: p.detach().clone() for n, p in lora.items()}
    trainer = Trainer(model, tok, TrainConfig(lr=1e-2, batch_size=4, epochs=1, seed=0))
    examples = toy_examples(8)
    ce_sum, ce_cnt, _, _ = trainer._batch_losses(trainer.encode(examples[:4]), None)
    assert ce_sum.dtype == torch.float32 and ce_cnt.dtype == torch.float32  # losses reach the loss in fp32
    res = trainer.train_ce(examples)
    assert res["steps"] == 2 and trainer.global_step == 2 and trainer.groups["default"].skipped_steps == 0
    assert all(p.dtype == torch.float32 for p in lora.values())
    assert any(not torch.equal(before[n], p.detach()) for n, p in lora.items())  # the step changed the adapters
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    assert state and all(v.dtype == torch.float32 for v in state)  # AdamW moments in fp32

    # canonical adapter bytes of a half-precision base hold fp32 tensors
    blob = lora_to_bytes(lora_state_dict(model))
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}


@needs_tokenizer
def test_half_precision_on_cpu_uses_eager_attention(tiny_dir):
    """bf16 sdpa backward is slow on CPU (see load_causal_lm); fp32 keeps transformers' default attention."""
    bf16, _ = _load(tiny_dir, "bf16", lora=False)
    fp32, _ = _load(tiny_dir, "fp32", lora=False)
    assert bf16.config._attn_implementation == "eager"
    assert fp32.config._attn_implementation != "eager"


@needs_tokenizer
def test_head_logits_are_fp32_on_bf16_base(tiny_dir):
    from cotune.lm.batching import head_logits, hidden_states

    model, tok = _load(tiny_dir, "bf16")
    ids = torch.tensor([tok("Q: name 1 is beta", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hid = hidden_states(model, ids, torch.ones_like(ids))
        assert hid.dtype == torch.bfloat16
        assert head_logits(model, hid[0]).dtype == torch.float32


@needs_tokenizer
def test_bf16_training_reduces_the_loss(tiny_dir):
    from cotune.lm.train import Trainer, TrainConfig

    model, tok = _load(tiny_dir, "bf16")
    examples = toy_examples(16)
    trainer = Trainer(model, tok, TrainConfig(lr=1e-2, batch_size=4, epochs=3, seed=0))
    before = trainer.ce_eval(examples)
    res = trainer.train_ce(examples)
    after = trainer.ce_eval(examples)
    assert res["steps"] == 12 and trainer.groups["default"].skipped_steps == 0
    assert res["loss_last"] < res["loss_first"]
    assert after < before - 0.1, (before, after)  # measured: 10.81 -> 10.43


@needs_tokenizer
def test_bf16_evaluation_matches_fp32(tiny_dir):
    """evaluate_loss of the same tiny model (weights saved in fp32) loaded in bf16 vs fp32: loss and bpb within
    0.1% relative. Measured on this model: 1.8e-5 relative (~50x margin); after 3 epochs of LoRA training from the
    same init in each dtype: 1.5e-5. On SmolLM2-135M and 32 ARC-Easy items the measured eval-loss difference was
    0.15% (bf16 with eager attention, what load_causal_lm picks on CPU)."""
    from cotune.lm.evaluate import evaluate_loss
    from cotune.lm.train import Trainer, TrainConfig

    examples = toy_examples(16)
    out = {}
    for dtype in ("fp32", "bf16"):
        model, tok = _load(tiny_dir, dtype, lora=False)
        out[dtype] = evaluate_loss(model, tok, examples)
    f, b = out["fp32"], out["bf16"]
    assert f["tokens"] == b["tokens"] > 0 and f["n"] == b["n"] == 16
    assert b["loss"] == pytest.approx(f["loss"], rel=1e-3)
    assert b["bpb"] == pytest.approx(f["bpb"], rel=1e-3)
    assert math.isfinite(b["perplexity"])

    trained = {}
    for dtype in ("fp32", "bf16"):
        model, tok = _load(tiny_dir, dtype)
        Trainer(model, tok, TrainConfig(lr=1e-2, batch_size=4, epochs=3, seed=0)).train_ce(examples)
        trained[dtype] = evaluate_loss(model, tok, examples)["loss"]
    assert trained["bf16"] == pytest.approx(trained["fp32"], rel=1e-3)


# ---------------------------------------------------------------------------------------------- bf16 without native bf16
def _bf16(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("op", ["mm", "addmm", "bmm", "baddbmm", "mv", "linear", "matmul"])
def test_bf16_products_run_in_fp32_and_round_once(op, inference):
    """Under the mode a bf16 product is the fp32 product of the bf16 operands, rounded to bf16 once (what native bf16
    units compute); the result stays bf16 and matches torch's own bf16 kernel to one bf16 rounding step. Under
    torch.inference_mode (how cotune evaluates) linear and matmul reach the mode whole: they are covered too."""
    from cotune.lm.device import Bf16MatmulInFp32

    a, b, bias = _bf16(3, 5, 67, seed=1), _bf16(3, 67, 11, seed=2), _bf16(11, seed=3)
    calls = {"mm": lambda x, y, c: torch.mm(x[0], y[0]),
             "addmm": lambda x, y, c: torch.addmm(c, x[0], y[0]),
             "bmm": lambda x, y, c: torch.bmm(x, y),
             "baddbmm": lambda x, y, c: torch.baddbmm(c, x, y, alpha=0.5),
             "mv": lambda x, y, c: torch.mv(x[0], y[0][:, 0]),
             "linear": lambda x, y, c: torch.nn.functional.linear(x, y[0].T, c),
             "matmul": lambda x, y, c: torch.matmul(x, y)}
    call = calls[op]
    mode = Bf16MatmulInFp32()
    with torch.inference_mode(inference), mode:
        got = call(a, b, bias)
    assert mode.widened == 1
    wide = call(a.float(), b.float(), bias.float()).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, wide)
    native = call(a, b, bias)
    assert torch.allclose(got.float(), native.float(), rtol=2 ** -7, atol=1e-2)


def test_the_mode_leaves_fp32_and_mixed_products_alone():
    from cotune.lm.device import Bf16MatmulInFp32

    a, b = torch.randn(4, 8), torch.randn(8, 3)
    mode = Bf16MatmulInFp32()
    with mode:
        assert torch.equal(a @ b, torch.mm(a, b)) and (a @ b).dtype == torch.float32
        with pytest.raises(RuntimeError):  # as without the mode: a bf16 x fp32 product is an error, not a silent cast
            torch.mm(a.bfloat16(), b)
    assert mode.widened == 0


def test_the_mode_covers_backward():
    """Gradients through a bf16 product come out of the same fp32-accumulated products (autograd inherits the mode)."""
    from cotune.lm.device import Bf16MatmulInFp32

    w = _bf16(16, 32, seed=4)
    x = _bf16(6, 32, seed=5).requires_grad_()
    mode = Bf16MatmulInFp32()
    with mode:
        (x @ w.T).float().square().sum().backward()
    assert mode.widened == 2  # the forward product and the input's gradient
    y = x.detach().float()
    expected = (2 * (y @ w.float().T).bfloat16().float()).bfloat16().float() @ w.float()
    assert x.grad.dtype == torch.bfloat16
    assert torch.allclose(x.grad.float(), expected, rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("native, dtype, device, expected", [
    (False, torch.bfloat16, "cpu", True), (True, torch.bfloat16, "cpu", False),
    (False, torch.float32, "cpu", False), (False, torch.float16, "cpu", False),
    (False, torch.bfloat16, "cuda", False)])
def test_which_models_run_under_the_mode(monkeypatch, native, dtype, device, expected):
    from cotune.lm.device import emulates_bf16

    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: native)
    assert emulates_bf16(dtype, device) is expected
    monkeypatch.setattr(device_mod, "pick_device", lambda pref="auto": torch.device("cpu"))
    compute = device_mod.describe_compute("bf16")
    assert compute["dtype"] == "bf16" and compute["bf16_matmul"] == ("native" if native else "fp32-accumulate")
    assert device_mod.describe_compute("fp32")["bf16_matmul"] == ""


@needs_tokenizer
def test_a_bf16_model_under_the_mode_trains_and_scores_like_native_bf16(tiny_dir):
    """The same tiny bf16 model and LoRA, trained and evaluated with torch's bf16 kernels and under the mode: the
    losses agree to bf16 rounding (both accumulate in fp32; only the order differs) and the mode's run is
    deterministic."""
    from cotune.lm.device import Bf16MatmulInFp32
    from cotune.lm.evaluate import evaluate_loss
    from cotune.lm.train import Trainer, TrainConfig

    examples = toy_examples(16)
    out = {}
    for name in ("native", "mode", "mode again"):
        model, tok = _load(tiny_dir, "bf16", seed=1)
        mode = Bf16MatmulInFp32() if name != "native" else None
        with mode or torch.autograd.set_grad_enabled(True):
            before = evaluate_loss(model, tok, examples)["loss"]
            res = Trainer(model, tok, TrainConfig(lr=1e-2, batch_size=4, epochs=2, seed=0)).train_ce(examples)
            out[name] = (before, res["loss_last"], evaluate_loss(model, tok, examples)["loss"])
        assert mode is None or mode.widened > 0
    assert out["mode"] == out["mode again"]
    assert out["mode"][2] < out["mode"][0] - 0.05  # it trains
    for got, ref in zip(out["mode"], out["native"]):
        assert got == pytest.approx(ref, rel=2e-3)


# ---------------------------------------------------------------------------------------------- fp16 loss scale
@needs_tokenizer
def test_fp16_training_uses_a_grad_scaler(tiny_dir):
    from cotune.lm.train import Trainer, TrainConfig

    model, tok = _load(tiny_dir, "fp16")
    examples = toy_examples(16)
    trainer = Trainer(model, tok, TrainConfig(lr=1e-2, batch_size=4, epochs=3, seed=0))
    res = trainer.train_ce(examples)
    scaler = trainer.groups["default"].grad_scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() > 1.0
    assert res["steps"] == 12 and trainer.global_step + trainer.groups["default"].skipped_steps == 12
    assert res["loss_last"] < res["loss_first"]
    assert all(p.dtype == torch.float32 for p in _lora(model).values())


@needs_tokenizer
def test_fp32_and_bf16_take_the_plain_step(tiny_dir):
    from cotune.lm.train import Trainer, TrainConfig

    for dtype in ("fp32", "bf16"):
        model, tok = _load(tiny_dir, dtype)
        trainer = Trainer(model, tok, TrainConfig(lr=1e-2, batch_size=4, epochs=1, seed=0))
        trainer.train_ce(toy_examples(4))
        assert trainer.groups["default"].grad_scaler is None


@needs_tokenizer
@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_fp16_overflow_is_skipped_counted_and_lowers_the_scale(tiny_dir, grad_clip):
    """A finite loss whose gradient is infinite (sqrt at 0: lora_B starts at zero), as an fp16 overflow gives: no
    update, skipped_steps counts it (in the group and in fit's result), the scaler halves its scale; the next
    normal step updates."""
    from cotune.lm.train import Trainer, TrainConfig

    model, tok = _load(tiny_dir, "fp16")
    trainer = Trainer(model, tok, TrainConfig(lr=1e-2, batch_size=4, epochs=1, seed=0, grad_clip=grad_clip))
    lora = _lora(model)
    b_params = [p for n, p in lora.items() if "lora_B" in n]
    assert b_params and all(float(p.detach().abs().max()) == 0.0 for p in b_params)
    before = {n: p.detach().clone() for n, p in lora.items()}
    pairs = trainer.encode(toy_examples(4))

    def overflow(_batch):
        loss = sum(torch.sqrt(p).sum() for p in b_params)  # == 0, d/dp = inf
        return loss, {}

    res = trainer.fit([0, 1], overflow)
    group = trainer.groups["default"]
    assert (res.steps, res.optimizer_steps, res.skipped_steps) == (2, 0, 2)
    assert group.skipped_steps == 2 and group.steps == 0
    assert group.grad_scaler.get_scale() == 2.0**16 / 4  # halved once per overflow
    assert all(torch.equal(before[n], p.detach()) for n, p in lora.items())
    assert not trainer.optimizer.state  # AdamW never stepped
    assert trainer.scheduler.last_epoch == 0

    # a non-finite LOSS is skipped before any backward, as on every dtype
    res = trainer.fit([0], lambda _b: (torch.tensor(float("nan"), requires_grad=True), {}))
    assert res.skipped_steps == 1 and group.skipped_steps == 3

    def ce(_batch):
        s, c, _, _ = trainer._batch_losses(pairs, None)
        return s.sum() / c.sum(), {}

    res = trainer.fit([0], ce)
    assert (res.optimizer_steps, res.skipped_steps) == (1, 0) and group.steps == 1
    assert any(not torch.equal(before[n], p.detach()) for n, p in lora.items())
    assert all(p.dtype == torch.float32 for p in lora.values())
