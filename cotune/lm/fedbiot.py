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

from cotune.lm.compress import adapter_indices, decoder_layers_prefix, layer_of
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
    from cotune.lm.compress import _unwrap

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
