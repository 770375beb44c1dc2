"""FedBiOT losses: the clients' proximal term and the server's emulator alignment.

Clients train only the adapter LoRA of the compressed model with CE + (ε/2)·‖θ − θᵗ‖², where θ are the LIVE LoRA
parameters (the reference implementation computes the term on detached copies, so it has no gradient and is a no-op)
and θᵗ the adapter broadcast at the start of the round.

The server aligns the emulator (trains its LoRA) on public data with

    L = normalized-L2(emulator output hidden state, original middle block output) + β·KL(full+adapter ‖ emulator+adapter)

where the emulator output is the hidden state entering the first adapter layer of the compressed model and the middle
block output is the hidden state entering the same (original) adapter layer of the full model, on the same input.

Both train through `cotune.lm.train.Trainer.fit` on a Trainer over the compressed model, as its parameter groups
"adapter" (train_adapter) and "emulator" (align_emulator): each keeps its AdamW state and LR schedule across rounds,
gradients are clipped at the Trainer's grad_clip and non-finite losses are skipped.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from cotune.algorithms.fedbiot.compress import adapter_indices
from cotune.lm.layers import decoder_layers_prefix, layer_of
from cotune.lm.lora import LoraMismatchError, _lora_params
from cotune.lm.losses import IGNORE_INDEX, ce_loss, kl_full


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


def set_lora_trainable(model, layer_map: dict[int, int], part: str, *, adapter_layers: int) -> list[str]:
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


def lora_part_state(model, layer_map: dict[int, int], part: str, *, adapter_layers: int) -> dict:
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
    adapter_layers: int,
    beta: float,
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


def _part_group(model, layer_map: dict[int, int], part: str, adapter_layers: int):
    """Make only `part`'s LoRA trainable; return (its ParamGroup named `part`, its canonical keys)."""
    from cotune.lm.train import ParamGroup

    keys = set_lora_trainable(model, layer_map, part, adapter_layers=adapter_layers)
    if not keys:
        raise LoraMismatchError(f"the model has no {part} LoRA parameters")
    lora = _lora_params(model)
    return ParamGroup(part, [lora[k] for k in keys]), keys


def train_adapter(
    trainer,
    examples,
    layer_map: dict[int, int],
    anchor_state: dict[str, torch.Tensor],
    *,
    eps: float,
    adapter_layers: int,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 4,
    max_length: int = 256,
    seed: int = 0,
    should_stop=None,
    progress=None,
) -> dict:
    """FedBiOT client step: train only the adapter LoRA with CE (response tokens) + (ε/2)·‖θ − θᵗ‖² (live params).

    trainer: a `cotune.lm.train.Trainer` over the compressed model; the adapter is its parameter group "adapter",
    so the AdamW state and LR schedule persist across rounds; gradients are clipped at trainer.config.grad_clip and
    non-finite losses are skipped (`Trainer.fit`). lr is set as the group's base learning rate. anchor_state: the
    adapter LoRA broadcast this round (canonical keys). The shuffle of epoch e is seeded with (seed, e).

    Returns ce_first / ce_last (mean CE of the first / last epoch), prox_last (mean proximal term of the last
    epoch), steps (batches run), samples, skipped_steps (non-finite losses skipped).
    """
    import numpy as np

    from cotune.lm.batching import collate, shuffled_batches, to_device
    from cotune.lm.train import offset_progress

    model, tokenizer = trainer.model, trainer.tokenizer
    flags = {k: p.requires_grad for k, p in _lora_params(model).items()}
    try:
        group, keys = _part_group(model, layer_map, "adapter", adapter_layers)
        if set(anchor_state) != set(keys):
            raise LoraMismatchError("anchor_state must hold exactly the adapter's LoRA keys")
        trainer.set_lr(lr, group)
        pairs = _encode(tokenizer, examples, max_length)
        dev = trainer.device

        def loss_fn(idx):
            b = to_device(collate([pairs[i] for i in idx], trainer.pad_id), dev)
            loss, ce, prox = client_loss(model, b["input_ids"], b["attention_mask"], b["labels"], anchor_state, eps)
            tokens = int((b["labels"][..., 1:] != IGNORE_INDEX).sum())  # the response tokens CE is taken over
            return loss, {"ce": float(ce), "prox": float(prox), "tokens": tokens}

        epoch_ce, epoch_prox = [], []
        steps = skipped = tokens = 0
        total = max(int(epochs), 0) * ((len(pairs) + batch_size - 1) // batch_size)
        with trainer.seeded(seed * 1_000_003 + trainer.group("adapter").steps):
            for epoch in range(max(int(epochs), 0)):
                rng = np.random.default_rng([seed, epoch])
                res = trainer.fit(shuffled_batches([len(p.ids) for p in pairs], batch_size, rng), loss_fn, group,
                                  progress=offset_progress(progress, steps, total), should_stop=should_stop,
                                  total=total)
                steps += res.steps
                skipped += res.skipped_steps
                tokens += int(res.sum("tokens"))
                if res.values("ce"):
                    epoch_ce.append(res.mean("ce"))
                    epoch_prox.append(res.mean("prox"))
                if res.stopped:
                    break
    finally:
        _restore_flags(model, flags)
    nan = float("nan")
    return {
        "ce_first": epoch_ce[0] if epoch_ce else nan,
        "ce_last": epoch_ce[-1] if epoch_ce else nan,
        "prox_last": epoch_prox[-1] if epoch_prox else nan,
        "steps": steps,
        "samples": len(pairs),
        "skipped_steps": skipped,
        "tokens": tokens,
    }


def align_emulator(
    trainer,
    full_model,
    examples,
    layer_map: dict[int, int],
    *,
    steps: int,
    beta: float,
    adapter_layers: int,
    lr: float = 1e-4,
    batch_size: int = 4,
    max_length: int = 256,
    seed: int = 0,
    should_stop=None,
) -> dict:
    """FedBiOT server step: `steps` optimizer steps on the emulator LoRA only (public examples, cycled in a shuffle
    seeded with (seed, pass)), minimizing emulator_alignment_loss.

    trainer: a `cotune.lm.train.Trainer` over the compressed model; the emulator is its parameter group "emulator"
    (AdamW state and LR schedule persist across rounds; gradients clipped at trainer.config.grad_clip; a non-finite
    loss is skipped and counts towards `steps`, see `Trainer.fit`). full_model must carry the current adapter LoRA
    (plug_adapter_into_full). Reports the loss over all examples before and after (align_*_before/after) besides
    the first and last training batch, align_steps (optimizer steps), stopped and skipped_steps."""
    import numpy as np

    from cotune.lm.batching import collate, shuffled_batches, sorted_batches, to_device

    compressed_model, tokenizer = trainer.model, trainer.tokenizer
    pairs = _encode(tokenizer, examples, max_length)
    if not pairs:
        raise ValueError("no public examples to align the emulator on")
    pad, dev = trainer.pad_id, trainer.device

    def loss_on(idx):
        b = to_device(collate([pairs[i] for i in idx], pad), dev)
        loss, parts = emulator_alignment_loss(compressed_model, full_model, b["input_ids"], b["attention_mask"],
                                              layer_map, adapter_layers=adapter_layers, beta=beta)
        return loss, {**parts, "tokens": int(b["attention_mask"].sum())}  # every position is aligned

    @torch.no_grad()
    def measure() -> dict:
        """The alignment loss over all of `examples` (eval mode): single training batches are too noisy to compare."""
        compressed_model.eval()
        total = {"loss": 0.0, "l2": 0.0, "kl": 0.0}
        for idx in sorted_batches([len(p.ids) for p in pairs], batch_size):
            loss, parts = loss_on(idx)
            for key, value in (("loss", float(loss)), ("l2", parts["l2"]), ("kl", parts["kl"])):
                total[key] += value * len(idx) / len(pairs)
        return total

    def cycled():
        epoch = 0
        while True:
            yield from shuffled_batches([len(p.ids) for p in pairs], batch_size, np.random.default_rng([seed, epoch]))
            epoch += 1

    before = measure() if steps else None
    flags = {k: p.requires_grad for k, p in _lora_params(compressed_model).items()}
    try:
        group, _ = _part_group(compressed_model, layer_map, "emulator", adapter_layers)
        trainer.set_lr(lr, group)
        with trainer.seeded(seed * 1_000_003 + trainer.group("emulator").steps):
            res = trainer.fit(cycled(), loss_on, group, steps=int(steps), should_stop=should_stop)
    finally:
        _restore_flags(compressed_model, flags)
    nan = {"loss": float("nan"), "l2": float("nan"), "kl": float("nan")}
    losses = [s for s in res.stats if "loss" in s]
    first, last = (losses[0], losses[-1]) if losses else (nan, nan)
    after = measure() if steps else None
    return {
        "align_loss_first": first["loss"],
        "align_loss_last": last["loss"],
        "align_l2_last": last["l2"],
        "align_kl_last": last["kl"],
        **{f"align_{k}_before": v for k, v in (before or nan).items()},
        **{f"align_{k}_after": v for k, v in (after or nan).items()},
        "align_steps": res.optimizer_steps,
        "align_tokens": int(res.sum("tokens")),
        "stopped": res.stopped,
        "skipped_steps": res.skipped_steps,
    }
