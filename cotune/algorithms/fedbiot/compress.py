"""FedBiOT compression: split a causal LM into emulator + adapter and build a smaller HF model.

The adapter is the last N decoder layers of the original model; the emulator is a uniform selection of the remaining
n layers, keeping k = round(n·(1−drop)) of them with the first and the last kept (index int(i·stride),
stride = (n−1)/(k−1)). The compressed model is a normal HF model of the same family whose config has k + N layers,
each a copy of the selected original layer. ``layer_map`` maps every compressed layer index to its original index
EXPLICITLY; it is how the adapter (and its LoRA) is plugged back into the original model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cotune.algorithms.fedbiot.plan import plan
from cotune.lm.layers import _unwrap, decoder_layers_prefix, layer_of, num_decoder_layers, remap_layer_key, select_layers

LAYER_MAP_FILE = "cotune_layer_map.json"
LAYER_MAP_FORMAT = "cotune.fedbiot-layer-map/1"


def compress(model, *, adapter_layers: int, drop: float):
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


def save_compressed(model, layer_map: dict[int, int], out_dir, *, tokenizer=None, adapter_layers: int,
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


def adapter_lora_state(compressed_model, layer_map: dict[int, int], *, adapter_layers: int) -> dict:
    """The adapter's LoRA tensors of a compressed peft model (canonical keys, compressed numbering), CPU copies."""
    prefix = decoder_layers_prefix(compressed_model)
    adapter = set(adapter_indices(layer_map, adapter_layers))
    return {
        k: p.detach().to("cpu", copy=True).contiguous()
        for k, p in sorted(_lora_named(compressed_model).items())
        if layer_of(k, prefix) in adapter
    }


def plug_adapter_into_full(full_model, compressed_model, layer_map: dict[int, int], *, adapter_layers: int) -> list[str]:
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
LORA_CONFIG_FILE = "cotune_lora.json"  # in the archive: the LoRA config the initial adapter was made with


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
