"""FedBiOT losses (DESIGN §4.4): the clients' proximal term and the server's emulator alignment.

Clients train only the adapter LoRA of the compressed model with CE + (ε/2)·‖θ − θᵗ‖², where θ are the LIVE LoRA
parameters (the reference implementation computes the term on detached copies, so it has no gradient and is a no-op)
and θᵗ the adapter broadcast at the start of the round.

The server aligns the emulator (trains its LoRA) on public data with

    L = normalized-L2(emulator output hidden state, original middle block output) + β·KL(full+adapter ‖ emulator+adapter)

where the emulator output is the hidden state entering the first adapter layer of the compressed model and the middle
block output is the hidden state entering the same (original) adapter layer of the full model, on the same input.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from cotune.algorithms.fedbiot.compress import adapter_indices
from cotune.lm.layers import decoder_layers_prefix, layer_of
from cotune.lm.lora import LoraMismatchError, _lora_params
from cotune.lm.losses import ce_loss, kl_full


def proximal_term(model, anchor_state: dict[str, torch.Tensor], eps: float) -> torch.Tensor:
    """(ε/2)·Σ‖θ − θᵗ‖² over the live LoRA parameters named in anchor_state (canonical keys); has a gradient.

    Only the keys of anchor_state enter the term (pass the adapter's LoRA to regularise the adapter only).
    """
    params = _lora_params(model)
    missing = sorted(set(anchor_state) - set(params))
    if missing:
        raise LoraMismatchError(f"anchor has {len(missing)} key(s) the model lacks, e.g. {missing[:3]}")
    if not anchor_state:
        raise ValueError("anchor_state is empty")
    total = None
    for key in sorted(anchor_state):
        p = params[key]
        anchor = anchor_state[key].to(device=p.device, dtype=torch.float32)
        sq = (p.float() - anchor).pow(2).sum()
        total = sq if total is None else total + sq
    return 0.5 * float(eps) * total


def client_loss(model, input_ids, attention_mask, labels, anchor_state, eps: float):
    """CE + (ε/2)·‖θ − θᵗ‖² for one batch; returns (loss, ce, prox) with loss differentiable."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    ce = ce_loss(logits, labels)
    prox = proximal_term(model, anchor_state, eps) if eps else ce.new_zeros(())
    return ce + prox, ce.detach(), prox.detach()


def set_lora_trainable(model, layer_map: dict[int, int], part: str, *, adapter_layers: int = 2) -> list[str]:
    """Make only the LoRA parameters of 'adapter' or 'emulator' layers of the compressed model trainable.

    Returns the canonical keys left trainable.
    """
    if part not in ("adapter", "emulator"):
        raise ValueError(f"part must be 'adapter' or 'emulator', got {part!r}")
    prefix = decoder_layers_prefix(model)
    adapter = set(adapter_indices(layer_map, adapter_layers))
    trainable = []
    for key, p in _lora_params(model).items():
        layer = layer_of(key, prefix)
        on = layer is not None and ((layer in adapter) == (part == "adapter"))
        p.requires_grad_(on)
        if on:
            trainable.append(key)
    return sorted(trainable)


def lora_part_state(model, layer_map: dict[int, int], part: str, *, adapter_layers: int = 2) -> dict:
    """CPU copies of the 'adapter' or 'emulator' LoRA of the compressed model (canonical keys)."""
    prefix = decoder_layers_prefix(model)
    adapter = set(adapter_indices(layer_map, adapter_layers))
    out = {}
    for key, p in sorted(_lora_params(model).items()):
        layer = layer_of(key, prefix)
        if layer is not None and ((layer in adapter) == (part == "adapter")):
            out[key] = p.detach().to("cpu", copy=True).contiguous()
    return out


@contextmanager
def _capture_layer_input(model, index: int):
    """Record the hidden state entering decoder layer `index` (positional or keyword hidden_states)."""
    from cotune.lm.layers import _unwrap

    prefix = decoder_layers_prefix(model)
    layers = _unwrap(model).get_submodule(prefix)
    box: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs):
        box["h"] = args[0] if args else kwargs["hidden_states"]

    handle = layers[index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


def normalized_l2(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per position ‖pred − target‖² / ‖target‖² (relative squared error), mean over masked positions."""
    pred = pred.float()
    target = target.float()
    per_pos = (pred - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp(min=1e-12)
    if mask is None:
        return per_pos.mean()
    m = mask.to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp(min=1)


def emulator_alignment_loss(
    compressed_model,
    full_model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer_map: dict[int, int],
    *,
    adapter_layers: int = 2,
    beta: float = 1.0,
):
    """normalized-L2(emulator output, original middle block output) + β·KL(full+adapter ‖ emulator+adapter).

    compressed_model: emulator + adapter (with LoRA; gradients flow into it). full_model: the original model with the
    adapter LoRA plugged in (plug_adapter_into_full); it is run without gradients. Both see the same input.
    Returns (loss, {"l2": float, "kl": float}).
    """
    first_adapter = adapter_indices(layer_map, adapter_layers)[0]
    original_first_adapter = int(layer_map[first_adapter])
    mask = attention_mask.bool() if attention_mask is not None else None
    with torch.no_grad(), _capture_layer_input(full_model, original_first_adapter) as ref_box:
        full_logits = full_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    with _capture_layer_input(compressed_model, first_adapter) as emu_box:
        emu_logits = compressed_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    l2 = normalized_l2(emu_box["h"], ref_box["h"].detach(), mask)
    kl = kl_full(full_logits.detach(), emu_logits, mask) if beta else l2.new_zeros(())
    loss = l2 + float(beta) * kl
    return loss, {"l2": float(l2.detach()), "kl": float(kl.detach())}


def _restore_flags(model, flags: dict[str, bool]) -> None:
    for key, p in _lora_params(model).items():
        p.requires_grad_(flags.get(key, p.requires_grad))


def _encode(tokenizer, examples, max_length: int):
    from cotune.align.tokenizers import encode_pair

    pairs = [encode_pair(tokenizer, ex.prompt, ex.response, max_length) for ex in examples]
    return [p for p in pairs if len(p.ids) > 1]


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    return int(pad)


def train_adapter(
    model,
    tokenizer,
    examples,
    layer_map: dict[int, int],
    anchor_state: dict[str, torch.Tensor],
    *,
    eps: float,
    adapter_layers: int = 2,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 4,
    max_length: int = 256,
    seed: int = 0,
    should_stop=None,
    progress=None,
) -> dict:
    """FedBiOT client step: train only the adapter LoRA with CE (response tokens) + (ε/2)·‖θ − θᵗ‖² (live params).

    anchor_state: the adapter LoRA broadcast this round (canonical keys). Returns first/last epoch mean losses.
    """
    import numpy as np

    from cotune.lm.batching import collate, model_device, shuffled_batches, to_device

    flags = {k: p.requires_grad for k, p in _lora_params(model).items()}
    keys = set_lora_trainable(model, layer_map, "adapter", adapter_layers=adapter_layers)
    if set(anchor_state) != set(keys):
        _restore_flags(model, flags)
        raise LoraMismatchError("anchor_state must hold exactly the adapter's LoRA keys")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pairs = _encode(tokenizer, examples, max_length)
    pad, dev = _pad_id(tokenizer), model_device(model)
    epoch_ce, epoch_prox, steps = [], [], 0
    total = max(int(epochs), 0) * ((len(pairs) + batch_size - 1) // batch_size)
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for epoch in range(max(int(epochs), 0)):
                rng = np.random.default_rng([seed, epoch])
                ces, proxes = [], []
                for idx in shuffled_batches([len(p.ids) for p in pairs], batch_size, rng):
                    if should_stop is not None and should_stop():
                        break
                    b = to_device(collate([pairs[i] for i in idx], pad), dev)
                    loss, ce, prox = client_loss(model, b["input_ids"], b["attention_mask"], b["labels"],
                                                 anchor_state, eps)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
                    ces.append(float(ce))
                    proxes.append(float(prox))
                    if progress is not None:
                        progress(steps, total)
                if ces:
                    epoch_ce.append(float(np.mean(ces)))
                    epoch_prox.append(float(np.mean(proxes)))
    finally:
        opt.zero_grad(set_to_none=True)
        model.eval()
        _restore_flags(model, flags)
    nan = float("nan")
    return {
        "ce_first": epoch_ce[0] if epoch_ce else nan,
        "ce_last": epoch_ce[-1] if epoch_ce else nan,
        "prox_last": epoch_prox[-1] if epoch_prox else nan,
        "steps": steps,
        "samples": len(pairs),
    }


def align_emulator(
    compressed_model,
    full_model,
    tokenizer,
    examples,
    layer_map: dict[int, int],
    *,
    steps: int,
    beta: float = 1.0,
    adapter_layers: int = 2,
    lr: float = 1e-4,
    batch_size: int = 4,
    max_length: int = 256,
    seed: int = 0,
    should_stop=None,
) -> dict:
    """FedBiOT server step: `steps` optimizer steps on the emulator LoRA only (public examples, cycled), minimizing
    emulator_alignment_loss. full_model must carry the current adapter LoRA (plug_adapter_into_full). Reports the
    loss over all examples before and after (align_*_before/after) besides the first and last training batch."""
    import numpy as np

    from cotune.lm.batching import collate, model_device, shuffled_batches, sorted_batches, to_device

    pairs = _encode(tokenizer, examples, max_length)
    if not pairs:
        raise ValueError("no public examples to align the emulator on")
    pad, dev = _pad_id(tokenizer), model_device(compressed_model)

    @torch.no_grad()
    def measure() -> dict:
        """The alignment loss over all of `examples` (eval mode): single training batches are too noisy to compare."""
        compressed_model.eval()
        total = {"loss": 0.0, "l2": 0.0, "kl": 0.0}
        for idx in sorted_batches([len(p.ids) for p in pairs], batch_size):
            b = to_device(collate([pairs[i] for i in idx], pad), dev)
            loss, parts = emulator_alignment_loss(compressed_model, full_model, b["input_ids"], b["attention_mask"],
                                                  layer_map, adapter_layers=adapter_layers, beta=beta)
            for key, value in (("loss", float(loss)), *parts.items()):
                total[key] += value * len(idx) / len(pairs)
        return total

    before = measure() if steps else None
    flags = {k: p.requires_grad for k, p in _lora_params(compressed_model).items()}
    set_lora_trainable(compressed_model, layer_map, "emulator", adapter_layers=adapter_layers)
    params = [p for p in compressed_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[dict] = []
    done = 0
    epoch = 0
    stopped = False
    compressed_model.train()
    try:
        while done < steps and not stopped:
            rng = np.random.default_rng([seed, epoch])
            for idx in shuffled_batches([len(p.ids) for p in pairs], batch_size, rng):
                if should_stop is not None and should_stop():
                    stopped = True
                if stopped or done >= steps:
                    break
                b = to_device(collate([pairs[i] for i in idx], pad), dev)
                loss, parts = emulator_alignment_loss(compressed_model, full_model, b["input_ids"],
                                                      b["attention_mask"], layer_map,
                                                      adapter_layers=adapter_layers, beta=beta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append({"loss": float(loss.detach()), **parts})
                done += 1
            epoch += 1
    finally:
        opt.zero_grad(set_to_none=True)
        compressed_model.eval()
        _restore_flags(compressed_model, flags)
    nan = {"loss": float("nan"), "l2": float("nan"), "kl": float("nan")}
    first, last = (losses[0], losses[-1]) if losses else (nan, nan)
    after = measure() if steps else None
    return {
        "align_loss_first": first["loss"],
        "align_loss_last": last["loss"],
        "align_l2_last": last["l2"],
        "align_kl_last": last["kl"],
        **{f"align_{k}_before": v for k, v in (before or nan).items()},
        **{f"align_{k}_after": v for k, v in (after or nan).items()},
        "align_steps": len(losses),
        "stopped": stopped,
    }
