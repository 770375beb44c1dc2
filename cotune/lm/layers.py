"""Decoder-layer surgery on HF causal LMs: find the decoder layer list, count layers, and build a smaller model of the
same family from a chosen subset of layers (used by FedBiOT's compression and by the demo's layer-reduced SLM)."""

from __future__ import annotations

import copy
import re

import torch


def _num_layers_attr(config) -> str:
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(config, name):
            return name
    raise ValueError(f"cannot find the layer count in {type(config).__name__}")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _unwrap(model):
    try:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            return model.get_base_model()
    except ImportError:  # pragma: no cover
        pass
    return model


def decoder_layers_prefix(model) -> str:
    """Dotted module path of the decoder layer list (``model.layers`` for llama/gemma3, ``transformer.h`` for gpt2)."""
    base = _unwrap(model)
    n = getattr(_text_config(base.config), _num_layers_attr(_text_config(base.config)))
    for path in ("model.layers", "transformer.h", "model.language_model.layers", "gpt_neox.layers", "model.decoder.layers"):
        obj = base
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList) and len(obj) == n:
            return path
    candidates = [
        name for name, m in base.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n and name
    ]
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(f"cannot find the decoder layer list of {type(base).__name__} (candidates: {candidates})")


def num_decoder_layers(model) -> int:
    cfg = _text_config(_unwrap(model).config)
    return int(getattr(cfg, _num_layers_attr(cfg)))


def _compressed_config(config, layer_map: dict[int, int]):
    cfg = copy.deepcopy(config)
    text = _text_config(cfg)
    kept = [layer_map[j] for j in sorted(layer_map)]
    setattr(text, _num_layers_attr(text), len(kept))
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        text.layer_types = [layer_types[i] for i in kept]
    return cfg


def remap_layer_key(key: str, prefix: str, mapping: dict[int, int]) -> str | None:
    """Rewrite ``<...>{prefix}.{j}.<rest>`` to ``{prefix}.{mapping[j]}``; None if j is not mapped; key unchanged
    when it is not a layer key."""
    m = re.search(rf"(^|\.){re.escape(prefix)}\.(\d+)\.", key)
    if m is None:
        return key
    j = int(m.group(2))
    if j not in mapping:
        return None
    start, end = m.span(2)
    return key[:start] + str(mapping[j]) + key[end:]


def select_layers(model, kept):
    """A fresh HF model of the same class holding copies of the decoder layers ``kept`` (original indices, in that
    order, renumbered 0..len−1) and of every non-layer weight (embeddings, final norm, LM head).

    The config is the original's with the layer count (and per-layer lists such as Gemma 3's ``layer_types``)
    cut to the kept layers. The input model is not modified; a peft-wrapped model is read from its base weights
    (LoRA is not copied). The copy is in eval mode on the original's device.
    """
    base = _unwrap(model)
    n = num_decoder_layers(base)
    kept = [int(i) for i in kept]
    if not kept:
        raise ValueError("select_layers needs at least one layer to keep")
    bad = [i for i in kept if not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a model of {n} decoder layers")
    if len(set(kept)) != len(kept):
        raise ValueError(f"layer indices must be unique, got {kept}")
    layer_map = dict(enumerate(kept))
    prefix = decoder_layers_prefix(base)
    cfg = _compressed_config(base.config, layer_map)
    param = next(base.parameters())
    with torch.device("meta"):
        small = type(base)(cfg)
    src = base.state_dict()
    new_sd = {}
    for key in small.state_dict():
        src_key = remap_layer_key(key, prefix, layer_map)
        if src_key not in src:  # a peft-wrapped model: the base weight sits under <module>.base_layer.<name>
            head, _, leaf = src_key.rpartition(".")
            src_key = f"{head}.base_layer.{leaf}" if head else src_key
        if src_key not in src:
            raise KeyError(f"compressed key {key} has no source {src_key} in the original model")
        new_sd[key] = src[src_key].detach().clone()
    small.load_state_dict(new_sd, assign=True, strict=True)
    if getattr(small.config, "tie_word_embeddings", False) and hasattr(small, "tie_weights"):
        small.tie_weights()
    # Non-persistent buffers (e.g. rotary inv_freq) stay on meta after load: rebuild them from the original.
    src_buffers = dict(base.named_buffers())
    for name, buf in list(small.named_buffers()):
        if buf.is_meta:
            src_name = remap_layer_key(name, prefix, layer_map)
            if src_name not in src_buffers:
                raise KeyError(f"cannot initialise buffer {name} of the compressed model")
            module_name, _, leaf = name.rpartition(".")
            owner = small.get_submodule(module_name) if module_name else small
            owner._buffers[leaf] = src_buffers[src_name].detach().clone()
    small.to(device=param.device)
    small.eval()
    small.generation_config = copy.deepcopy(getattr(base, "generation_config", None))
    return small


def layer_of(key: str, prefix: str) -> int | None:
    """Decoder layer index a parameter key belongs to, or None for non-layer keys."""
    m = re.search(rf"(^|\.){re.escape(prefix)}\.(\d+)\.", key)
    return int(m.group(2)) if m else None
