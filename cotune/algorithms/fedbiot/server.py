"""FedBiOT on the LLM server: compress the model into emulator + adapter, and align the emulator.

CompressTask builds emulator + adapter from the party's model, attaches LoRA, keeps it (with its own Trainer, so the
emulator's optimizer state persists across rounds) as state "fedbiot.server", addressed by tasks as target
"compressed", and publishes it as a model archive: a tar of the HF directory (config, weights, tokenizer, layer map,
LoRA config, initial LoRA) that clients install with LoadModelTask (cotune.algorithms.fedbiot.client).
AlignEmulatorTask loads the aggregated adapter into it, plugs the adapter into the full model by the layer map and
aligns the emulator on the public set.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from cotune.errors import InvalidInput, Precondition
from cotune.party.base import Target
from cotune.rpc.operations import OpResult
from cotune.v1 import party_pb2
from cotune.wire.media import MEDIA_MODEL_ARCHIVE

STATE = "fedbiot.server"


@dataclass
class CompressedModel:
    """The LLM server's emulator + adapter (a peft model with LoRA), its Trainer and compressed → original layer map."""

    model: object
    trainer: object  # cotune.lm.train.Trainer over `model`
    layer_map: dict[int, int]
    adapter_layers: int
    original_layers: int
    archive: str  # sha256 of the published archive


# -- per run (cotune.party.runstate): the emulator comes back from its archive, its adapter and optimizer from disk --
def save_compressed(comp: CompressedModel, directory: Path) -> None:
    from cotune.lm.lora import lora_state_dict, lora_to_bytes

    meta = {"archive": comp.archive, "adapter_layers": comp.adapter_layers, "original_layers": comp.original_layers,
            "layer_map": {str(k): int(v) for k, v in comp.layer_map.items()}}
    (directory / "compressed.json").write_text(json.dumps(meta, sort_keys=True))
    (directory / "lora.safetensors").write_bytes(lora_to_bytes(lora_state_dict(comp.model)))
    (directory / "trainer.safetensors").write_bytes(comp.trainer.state_dict_bytes())


def restore_compressed(party, directory: Path) -> CompressedModel:
    from cotune.algorithms.fedbiot.archive import archive_model
    from cotune.lm.lora import attach_lora, load_lora_state_dict, lora_from_bytes
    from cotune.lm.model import load_causal_lm

    meta = json.loads((directory / "compressed.json").read_text())
    if not party.store.has(meta["archive"]):
        raise Precondition(f"party {party.cfg.party_id}: the compressed model {meta['archive'][:12]}… of a saved run "
                           "is no longer in its blob store")
    model_dir, lora, _ = archive_model(party, meta["archive"])
    mc = party.cfg.model
    small, _ = load_causal_lm(model_dir, cache_dir=party.model_cache, device=mc.device, dtype=mc.dtype)
    small = attach_lora(small, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, seed=lora.seed)
    load_lora_state_dict(small, lora_from_bytes((directory / "lora.safetensors").read_bytes()))
    trainer = party.new_trainer(small)
    trainer.load_state_bytes((directory / "trainer.safetensors").read_bytes())
    layer_map = {int(k): int(v) for k, v in meta["layer_map"].items()}
    return CompressedModel(small, trainer, layer_map, int(meta["adapter_layers"]), int(meta["original_layers"]),
                           meta["archive"])


def compressed_of(party) -> CompressedModel | None:
    return party.state_for(STATE)


def _require(party) -> CompressedModel:
    comp = compressed_of(party)
    if comp is None:
        raise Precondition(f"party {party.cfg.party_id} holds no compressed model; run a CompressTask first")
    return comp


def compressed_target(party) -> Target:
    """Target "compressed": the emulator + adapter (the party's tokenizer: compression keeps the vocabulary)."""
    return Target(_require(party).model, party.tokenizer)


def compress(party, task: party_pb2.CompressTask, ctx: party_pb2.RunContext):
    from cotune.algorithms.fedbiot.plan import plan
    from cotune.lm.layers import num_decoder_layers

    adapter_layers, drop = int(task.adapter_layers), float(task.drop)
    if adapter_layers < 1 or not (math.isfinite(drop) and 0 < drop < 1):
        raise InvalidInput(f"adapter_layers must be >= 1 and drop in (0, 1), got {adapter_layers}, {drop}")
    try:
        original_layers = num_decoder_layers(party.model)
    except ValueError as exc:
        raise Precondition(f"party {party.cfg.party_id}'s model cannot be compressed: {exc}") from exc
    try:
        plan(original_layers, adapter_layers=adapter_layers, drop=drop)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc

    def work(op):
        import tempfile

        from cotune.algorithms.fedbiot.compress import (INITIAL_LORA_FILE, LORA_CONFIG_FILE, compress as build, pack_dir,
                                                        save_compressed)
        from cotune.lm.lora import attach_lora, lora_state_dict, lora_to_bytes

        lc = party.cfg.lora
        op.progress(0, 2, "compress")
        small, layer_map = build(party.model, adapter_layers=adapter_layers, drop=drop)  # base weights, no LoRA
        op.progress(1, 2, "pack")
        with tempfile.TemporaryDirectory(dir=party.cfg.workdir) as tmp:
            # saved before LoRA is attached: peft wraps the layers in place and would rename their weights
            out = save_compressed(small, layer_map, Path(tmp) / "compressed", tokenizer=party.tokenizer,
                                  adapter_layers=adapter_layers, drop=drop, original_num_layers=original_layers)
            small = attach_lora(small, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, seed=lc.seed)
            (out / INITIAL_LORA_FILE).write_bytes(lora_to_bytes(lora_state_dict(small)))
            (out / LORA_CONFIG_FILE).write_text(json.dumps(
                {"r": lc.r, "alpha": lc.alpha, "dropout": lc.dropout, "seed": lc.seed}, sort_keys=True) + "\n")
            blob = party.store.put_bytes(pack_dir(out), MEDIA_MODEL_ARCHIVE)
        trainer = party.new_trainer(small)
        party.set_state(STATE, CompressedModel(small, trainer, layer_map, adapter_layers, original_layers, blob.sha256))
        op.progress(2, 2, "pack")
        order = [int(layer_map[j]) for j in sorted(layer_map)]
        return OpResult(metrics={"compressed_layers": len(layer_map), "adapter_layers": adapter_layers,
                                 "original_layers": original_layers, "model_archive_bytes": blob.size,
                                 "compressed_params": sum(p.numel() for p in small.parameters())},
                        result=party_pb2.CompressResult(model=blob.ref(), layer_map=order,
                                                        original_layers=original_layers,
                                                        adapter_layers=adapter_layers))
    return work


def align_emulator(party, task: party_pb2.AlignEmulatorTask, ctx: party_pb2.RunContext):
    from cotune.lm.lora import LoraMismatchError, lora_from_bytes, validate_lora_state_dict

    comp = _require(party)
    party.steps(task.steps, "steps (0 = plug only)")
    party.weight(task.kl_weight, "kl_weight (β)")
    lr, batch_size = party.lr(task), party.batch_size(task)
    max_length = party.max_length(task)
    state = None
    if task.HasField("adapter"):
        state = party.parse_blob(task.adapter, "adapter", lora_from_bytes)
        try:
            validate_lora_state_dict(comp.model, state)
        except LoraMismatchError as exc:
            raise InvalidInput(f"adapter does not fit the compressed model: {exc}") from exc
    examples = party.samples(party.public, task.max_samples)
    seed = party.cfg.training.seed * 1_000_003 + int(ctx.round)

    def work(op):
        import torch

        from cotune.algorithms.fedbiot.compress import plug_adapter_into_full
        from cotune.algorithms.fedbiot.losses import align_emulator as run_align, lora_part_state
        from cotune.lm.lora import _lora_params

        small, layer_map, n = comp.model, comp.layer_map, comp.adapter_layers
        if state is not None:  # only the adapter layers; the emulator LoRA stays the server's
            params = _lora_params(small)
            with torch.no_grad():
                for key in lora_part_state(small, layer_map, "adapter", adapter_layers=n):
                    params[key].copy_(state[key].to(device=params[key].device, dtype=params[key].dtype))
        plug_adapter_into_full(party.model, small, layer_map, adapter_layers=n)
        m = {}
        if task.steps:
            m = run_align(comp.trainer, party.model, examples, layer_map, steps=task.steps, beta=task.kl_weight,
                          adapter_layers=n, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed,
                          should_stop=op.cancelled)
        lora_hash, full_hash = party.lora_hash(small), party.lora_hash()
        return OpResult(metrics={k: float(v) for k, v in m.items()},
                        result=party_pb2.AlignEmulatorResult(lora_hash=lora_hash, full_lora_hash=full_hash))
    return work
