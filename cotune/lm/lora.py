"""LoRA adapters via peft: per-architecture target modules, canonical state dicts, validated loading, bytes.

Canonical keys are peft's own (``get_peft_model_state_dict`` form: the adapter name is stripped), e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; two models of the same architecture and
LoRA config have the same key set, so client adapters can be averaged key by key.
"""

from __future__ import annotations

import json
import warnings

import torch
from torch import nn

from cotune.tasks import MAX_ADAPTER_ABS
from cotune.wire.safetensors_io import LORA_FORMAT  # defined torch-free, next to adapter_bytes

_ATTN_PARENT_NAMES = {"attn", "attention", "self_attn", "self_attention", "selfattention"}


class LoraMismatchError(ValueError):
    """A LoRA state dict does not fit the model (keys, shapes, dtypes or non-finite values)."""


def _is_linear_like(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # transformers' Conv1D (GPT-2 family) is a linear layer with a transposed weight; peft supports it.
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def _is_attention(name: str, module: nn.Module) -> bool:
    cls = type(module).__name__.lower()
    leaf = name.rsplit(".", 1)[-1].lower()
    return "attention" in cls or leaf in _ATTN_PARENT_NAMES


def _unwrap(model):
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.get_base_model()
    return model


def lora_target_modules(model) -> list[str]:
    """The attention projections of this model (q/k/v/o or the fused equivalents), as peft target suffixes.

    Found from the model's actual modules: every linear layer whose parent is an attention block. A leaf name that
    also names a non-attention linear layer (GPT-2's ``c_proj`` exists in attn and mlp) is qualified with its parent
    (``attn.c_proj``) so the MLP is not caught by suffix matching.
    """
    base = _unwrap(model)
    modules = dict(base.named_modules())
    out_emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    attn_linears: list[tuple[str, str]] = []  # (parent leaf, leaf)
    other_leaves: set[str] = set()
    for name, module in modules.items():
        if not name or not _is_linear_like(module) or module is out_emb or "lora_" in name:
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = modules.get(parent_name)
        if parent is not None and parent_name and _is_attention(parent_name, parent):
            attn_linears.append((parent_name.rsplit(".", 1)[-1], leaf))
        else:
            other_leaves.add(leaf)
    if not attn_linears:
        linear_leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if n and _is_linear_like(m)})
        raise ValueError(
            f"cannot find attention projections in {type(base).__name__}: linear layers are {linear_leaves}; "
            "pass target_modules explicitly"
        )
    targets = set()
    for parent_leaf, leaf in attn_linears:
        targets.add(f"{parent_leaf}.{leaf}" if leaf in other_leaves else leaf)
    return sorted(targets)


def attach_lora(model, *, r: int = 8, alpha: int = 16, dropout: float = 0.05, seed: int = 0, target_modules=None):
    """Wrap model in a peft LoRA PeftModel; only the LoRA parameters are trainable. Deterministic for a seed.

    The LoRA parameters are fp32 whatever the base model's dtype (a bf16/fp16 base keeps its frozen weights in that
    dtype; the adapters are the fp32 master weights the optimizer updates), and their initial values are the same
    for a seed whatever the base dtype: peft draws them in fp32, rounds them to the base dtype and casts back, so on a
    half-precision base the fp32 draw is restored (:func:`_restore_fp32_init`). An fp32 model takes exactly the
    plain peft path.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    from cotune.lm.batching import cuda_indices

    targets = list(target_modules) if target_modules else lora_target_modules(model)
    fan_in_fan_out = any(
        type(m).__name__ == "Conv1D" for n, m in model.named_modules() if n.endswith(tuple("." + t for t in targets))
    )
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
    )
    devices = cuda_indices(model)  # every GPU of a model spread across several
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        # autocast_adapter_dtype (peft's default, stated here because cotune relies on it): adapters of a bf16/fp16
        # base are kept in fp32.
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    params = _lora_params(peft_model)
    if any(p.dtype != torch.float32 for p in params.values()):
        with torch.no_grad():  # a peft that did not upcast: do it here (fp32 master weights)
            for p in params.values():
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in peft_model.parameters()):
        _restore_fp32_init(peft_model, seed, devices)
    peft_model.eval()
    return peft_model


def _restore_fp32_init(peft_model, seed: int, devices: list[int]) -> bool:
    """Replace the LoRA weights of a half-precision base (peft's fp32 draw, rounded to the base dtype) by the fp32
    draw itself, so a party's initial adapter does not depend on its precision.

    The draw is replayed in peft's order (per LoRA layer, in module order: ``nn.Linear(in, r)`` and
    ``nn.Linear(r, out)`` are built, then A gets kaiming_uniform(a=sqrt(5)) and B zeros) and used only if every
    replayed tensor rounds to exactly what peft produced; otherwise (a peft that draws differently) peft's values stay.
    Returns whether the fp32 draw was restored."""
    import math

    from peft.tuners.lora import LoraLayer

    adapter = _adapter_name(peft_model)
    if isinstance(adapter, (list, tuple)):
        adapter = adapter[0]
    layers = [m for _, m in peft_model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
    replay: list[tuple[torch.nn.Parameter, torch.Tensor, torch.dtype]] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for layer in layers:
            a, b = layer.lora_A[adapter], layer.lora_B[adapter]
            if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)) or b.bias is not None:
                return False
            base_dtype = layer.get_base_layer().weight.dtype
            new_a = nn.Linear(a.in_features, a.out_features, bias=False)
            nn.Linear(b.in_features, b.out_features, bias=False)  # consumes the RNG like peft's lora_B
            nn.init.kaiming_uniform_(new_a.weight, a=math.sqrt(5))
            replay.append((a.weight, new_a.weight.detach(), base_dtype))
            replay.append((b.weight, torch.zeros(b.weight.shape), base_dtype))
    for param, value, base_dtype in replay:
        if param.shape != value.shape or not torch.equal(value.to(base_dtype).float(), param.detach().float().cpu()):
            return False
    with torch.no_grad():
        for param, value, _ in replay:
            param.copy_(value.to(param.device))
    return True


def _adapter_name(model) -> str:
    return getattr(model, "active_adapter", None) or "default"


def _lora_params(model) -> dict[str, torch.nn.Parameter]:
    """Canonical key -> live parameter, for every LoRA parameter of the active adapter."""
    adapter = _adapter_name(model)
    if isinstance(adapter, (list, tuple)):
        adapter = adapter[0]
    tag = f".{adapter}"
    out = {}
    for name, param in model.named_parameters():
        if "lora_" not in name or tag not in name:
            continue
        out[name.replace(tag, "")] = param
    if not out:
        raise LoraMismatchError("model has no LoRA parameters (attach_lora first)")
    return out


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """LoRA weights under canonical keys, detached CPU contiguous fp32 copies (attach_lora keeps them fp32 on any
    base dtype; a half-precision adapter is upcast, so adapter bytes and hashes compare across parties)."""
    out = {}
    for k, p in sorted(_lora_params(model).items()):
        t = p.detach().to("cpu", copy=True).contiguous()
        out[k] = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    return out


def lora_shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(p.shape) for k, p in sorted(_lora_params(model).items())}


def _names(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def validate_lora_state_dict(model, sd) -> None:
    """Raise LoraMismatchError unless sd has exactly the model's LoRA keys, shapes, float dtypes, finite values within
    cotune.tasks.MAX_ADAPTER_ABS."""
    if not isinstance(sd, dict):
        raise LoraMismatchError(f"LoRA state must be a dict of tensors, got {type(sd).__name__}")
    params = _lora_params(model)
    missing = set(params) - set(sd)
    unexpected = set(sd) - set(params)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
    for key in sorted(set(params) & set(sd)):
        value = sd[key]
        expected = tuple(params[key].shape)
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key}: expected a tensor of shape {expected}, got {type(value).__name__}")
            continue
        if not value.is_floating_point():
            problems.append(f"{key}: expected a floating-point tensor, got dtype {value.dtype}")
            continue
        if tuple(value.shape) != expected:
            problems.append(f"{key}: expected shape {expected}, got {tuple(value.shape)}")
            continue
        if not bool(torch.isfinite(value).all()):
            problems.append(f"{key}: contains NaN or Inf values")
        elif value.numel() and float(value.abs().max()) > MAX_ADAPTER_ABS:
            problems.append(f"{key}: holds a value of magnitude {float(value.abs().max()):.3g}, beyond the bound "
                            f"{MAX_ADAPTER_ABS:g} on adapter values")
    if problems:
        raise LoraMismatchError("LoRA state does not fit the model: " + "; ".join(problems[:8]))


def load_lora_state_dict(model, sd: dict[str, torch.Tensor]) -> None:
    """Copy sd into the model's LoRA parameters in place (optimizer references stay valid).

    Everything is validated first; on any error the model is unchanged.
    """
    validate_lora_state_dict(model, sd)
    params = _lora_params(model)
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(sd[key].to(device=param.device, dtype=param.dtype))


def lora_to_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    from cotune.wire.safetensors_io import dumps  # deterministic bytes: the adapter's hash is its identity

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    return dumps(tensors, {"format": LORA_FORMAT, "keys": json.dumps(len(tensors))})


def lora_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 8:
        raise ValueError("LoRA blob is empty or not bytes")
    try:
        return dict(load(bytes(data)))
    except Exception as exc:
        raise ValueError(f"LoRA blob is not a valid safetensors file: {exc}") from exc
