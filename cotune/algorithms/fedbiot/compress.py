"""FedBiOT compression (DESIGN §4.4): split a causal LM into emulator + adapter and build a smaller HF model.

The adapter is the last N decoder layers of the original model; the emulator is a uniform selection of the remaining
n layers, keeping k = round(n·(1−drop)) of them with the first and the last kept (index int(i·stride),
stride = (n−1)/(k−1)). The compressed model is a normal HF model of the same family whose config has k + N layers,
each a copy of the selected original layer. ``layer_map`` maps every compressed layer index to its original index
EXPLICITLY; it is how the adapter (and its LoRA) is plugged back into the original model.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch

LAYER_MAP_FILE = "cotune_layer_map.json"
LAYER_MAP_FORMAT = "cotune.fedbiot-layer-map/1"


def emulator_layer_indices(n: int, drop: float) -> list[int]:
    """Indices (of the n non-adapter layers) kept by the emulator: k = round(n·(1−drop)), int(i·(n−1)/(k−1)).

    k is at least 2 when n >= 2 (the first and the last layer are always kept).
    """
    if n < 1:
        raise ValueError(f"the emulator needs at least one layer to select from, got n={n}")
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    k = round(n * (1.0 - drop))
    # first and last are always kept, so at least two layers once there are two to choose from
    return uniform_layer_indices(n, max(min(n, 2), min(n, k)))


def uniform_layer_indices(n: int, k: int) -> list[int]:
    """k of n layer indices, spread uniformly with the first and the last kept: int(i·(n−1)/(k−1)), i < k.

    The emulator's selection (:func:`emulator_layer_indices`) for a given count; k = 1 keeps layer 0.
    """
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} layers: need 1 <= k <= n")
    if k == 1:
        return [0]
    stride = (n - 1) / (k - 1)
    out = [int(i * stride) for i in range(k)]
    out[-1] = n - 1  # int((k-1)·stride) is n-1 up to float rounding; keep the last explicitly
    return out


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


def plan(num_layers: int, *, adapter_layers: int = 2, drop: float = 0.2) -> dict[int, int]:
    """compressed index -> original index: emulator layers (uniform selection) then the last adapter_layers."""
    if adapter_layers < 1:
        raise ValueError(f"adapter_layers must be >= 1, got {adapter_layers}")
    if adapter_layers >= num_layers:
        raise ValueError(
            f"adapter_layers ({adapter_layers}) must be smaller than the model's {num_layers} decoder layers"
        )
    n = num_layers - adapter_layers
    kept = emulator_layer_indices(n, drop) + list(range(n, num_layers))
    return {j: orig for j, orig in enumerate(kept)}


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


def compress(model, *, adapter_layers: int = 2, drop: float = 0.2):
    """Build the compressed model (fresh HF model of the same class, fewer layers, copied weights) and its layer map.

    Returns (compressed_model, layer_map) with layer_map[compressed index] = original index. The input model is not
    modified; a peft-wrapped model is compressed from its base weights (LoRA is not copied).
    """
    layer_map = plan(num_decoder_layers(model), adapter_layers=adapter_layers, drop=drop)
    return select_layers(model, [layer_map[j] for j in sorted(layer_map)]), layer_map


def adapter_indices(layer_map: dict[int, int], adapter_layers: int) -> list[int]:
    """Compressed indices of the adapter: the last adapter_layers entries of the map."""
    keys = sorted(layer_map)
    if not 1 <= adapter_layers <= len(keys):
        raise ValueError(f"adapter_layers ({adapter_layers}) out of range for a map of {len(keys)} layers")
    return keys[-adapter_layers:]


def save_compressed(model, layer_map: dict[int, int], out_dir, *, tokenizer=None, adapter_layers: int = 2,
                    drop: float | None = None, original_num_layers: int | None = None) -> Path:
    """Write an HF model directory (config.json, model.safetensors, tokenizer when given) plus cotune_layer_map.json.

    `model` must not carry LoRA: peft wraps the layers in place, so their weights would be saved under names a plain
    HF model does not load (it would silently initialise them at random)."""
    wrapped = [n for n, _ in _unwrap(model).named_parameters() if ".base_layer." in n or ".lora_" in n]
    if wrapped:
        raise ValueError(f"save_compressed needs the model without LoRA (e.g. {wrapped[0]}); save before attach_lora")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _unwrap(model).save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    meta = {
        "format": LAYER_MAP_FORMAT,
        "layer_map": {str(j): int(layer_map[j]) for j in sorted(layer_map)},
        "adapter_layers": int(adapter_layers),
        "adapter": [int(j) for j in adapter_indices(layer_map, adapter_layers)],
        "drop": drop,
        "original_num_layers": original_num_layers,
    }
    (out_dir / LAYER_MAP_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_layer_map(model_dir) -> tuple[dict[int, int], int]:
    """(layer_map, adapter_layers) from a compressed model directory."""
    meta = json.loads((Path(model_dir) / LAYER_MAP_FILE).read_text())
    if meta.get("format") != LAYER_MAP_FORMAT:
        raise ValueError(f"{model_dir}/{LAYER_MAP_FILE}: unknown format {meta.get('format')!r}")
    return {int(k): int(v) for k, v in meta["layer_map"].items()}, int(meta["adapter_layers"])


def _lora_named(model) -> dict[str, torch.nn.Parameter]:
    from cotune.lm.lora import _lora_params

    return _lora_params(model)


def layer_of(key: str, prefix: str) -> int | None:
    """Decoder layer index a parameter key belongs to, or None for non-layer keys."""
    m = re.search(rf"(^|\.){re.escape(prefix)}\.(\d+)\.", key)
    return int(m.group(2)) if m else None


def adapter_lora_state(compressed_model, layer_map: dict[int, int], *, adapter_layers: int = 2) -> dict:
    """The adapter's LoRA tensors of a compressed peft model (canonical keys, compressed numbering), CPU copies."""
    prefix = decoder_layers_prefix(compressed_model)
    adapter = set(adapter_indices(layer_map, adapter_layers))
    return {
        k: p.detach().to("cpu", copy=True).contiguous()
        for k, p in sorted(_lora_named(compressed_model).items())
        if layer_of(k, prefix) in adapter
    }


def plug_adapter_into_full(full_model, compressed_model, layer_map: dict[int, int], *, adapter_layers: int = 2) -> list[str]:
    """Copy the adapter layers' LoRA weights of compressed_model into full_model's layers layer_map[j].

    Both models must carry LoRA of the same config (attach_lora). Only the adapter entries of the map are used, and
    each must point at one of the full model's last adapter_layers layers. Returns the full-model keys written.
    """
    prefix_c = decoder_layers_prefix(compressed_model)
    prefix_f = decoder_layers_prefix(full_model)
    n_full = num_decoder_layers(full_model)
    adapter = adapter_indices(layer_map, adapter_layers)
    mapping = {j: int(layer_map[j]) for j in adapter}
    targets = sorted(mapping.values())
    if targets != list(range(n_full - adapter_layers, n_full)):
        raise ValueError(
            f"adapter entries of the layer map point at original layers {targets}, expected the last "
            f"{adapter_layers} of {n_full}: {list(range(n_full - adapter_layers, n_full))}"
        )
    src = _lora_named(compressed_model)
    dst = _lora_named(full_model)
    written = []
    with torch.no_grad():
        for key, param in src.items():
            if layer_of(key, prefix_c) is None:
                continue
            target = remap_layer_key(key, prefix_c, mapping)
            if target is None:
                continue  # an emulator layer
            if prefix_f != prefix_c:
                target = target.replace(f"{prefix_c}.", f"{prefix_f}.", 1)
            if target not in dst:
                raise KeyError(f"full model has no LoRA parameter {target} (for {key}); attach the same LoRA config")
            if dst[target].shape != param.shape:
                raise ValueError(f"{target}: shape {tuple(dst[target].shape)} != {tuple(param.shape)}")
            dst[target].copy_(param.to(device=dst[target].device, dtype=dst[target].dtype))
            written.append(target)
    if not written:
        raise ValueError("compressed model has no adapter LoRA parameters to plug in")
    return sorted(written)


INITIAL_LORA_FILE = "cotune_initial_lora.safetensors"


def pack_dir(model_dir) -> bytes:
    """Deterministic tar of a directory's regular files (sorted names, zero mtimes and owners): equal contents give
    equal bytes, so the blob's sha256 identifies the compressed model."""
    import io
    import tarfile

    root = Path(model_dir)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            info = tarfile.TarInfo(path.relative_to(root).as_posix())
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def unpack_dir(data, out_dir) -> Path:
    """Extract a pack_dir tar (bytes, or the path of a file holding it) into out_dir (regular files only, no paths
    outside out_dir)."""
    import io
    import shutil
    import tarfile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = {"fileobj": io.BytesIO(data)} if isinstance(data, (bytes, bytearray, memoryview)) else {"name": str(data)}
    with tarfile.open(mode="r:", **source) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                raise ValueError(f"compressed model archive holds a non-file entry {member.name!r}")
            target = (out / member.name).resolve()
            if out.resolve() not in target.parents:
                raise ValueError(f"compressed model archive entry {member.name!r} escapes the directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return out
