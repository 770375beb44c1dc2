"""FedBiOT on an SLM client: install the compressed model the LLM server ships, train its adapter.

LoadModelTask installs a CompressTask archive (cotune.algorithms.fedbiot.server) as the party's model, unpacked once
per archive under <workdir>/models/<sha256>, starting from the server's initial LoRA; an unset model goes back to the
configured one. The layer map of the installed model (cotune_layer_map.json beside its config.json) is attached to
the party as state "fedbiot.client" (`layers_of`); a client configured with a compressed model directory gets it at
startup (`attach_layer_map`). TrainAdapterTask then trains only the adapter's LoRA, with the party's own Trainer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cotune.errors import InvalidInput, Precondition
from cotune.rpc.operations import OpResult
from cotune.v1 import party_pb2
from cotune.algorithms.fedbiot.archive import archive_model, check_archive
from cotune.wire.blobs import Blob

log = logging.getLogger(__name__)

STATE = "fedbiot.client"


@dataclass(frozen=True)
class CompressedLayers:
    """The installed model's layer map: compressed index -> original index, and how many last layers are the adapter."""

    layer_map: dict[int, int]
    adapter_layers: int


def layers_of(party) -> CompressedLayers | None:
    """The layer map of the party's installed model; None when it is not a compressed model."""
    return party.state_for(STATE)


def read_layers(model_dir) -> CompressedLayers | None:
    """The layer map of a model directory, None when it has none; InvalidInput when it cannot be read."""
    from cotune.algorithms.fedbiot.compress import LAYER_MAP_FILE, load_layer_map

    if not (Path(model_dir).is_dir() and (Path(model_dir) / LAYER_MAP_FILE).is_file()):
        return None
    try:
        layer_map, adapter_layers = load_layer_map(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{model_dir}/{LAYER_MAP_FILE} cannot be read: {exc}") from exc
    return CompressedLayers(layer_map, adapter_layers)


def attach_layer_map(party) -> None:
    """Attach the layer map of the party's current model directory (the SLM client's setup)."""
    party.set_state(STATE, read_layers(party.model_path))




def load_model(party, task: party_pb2.LoadModelTask, ctx: party_pb2.RunContext):
    """Install a shipped model archive in place of the configured model (unset model: back to the configured one)."""
    if not task.HasField("model"):
        return _restore_work(party)
    blob = Blob.from_ref(task.model)
    if not party.store.has(blob.sha256):
        raise Precondition(f"model archive {blob.sha256} is not in party {party.cfg.party_id}'s store; "
                           "upload it with PutBlob first")
    check_archive(party.store.path(blob.sha256))
    sha = blob.sha256

    def work(op):
        if party.loaded_model != sha:
            op.progress(0, 1, "load")
            install_archive(party, sha)
            op.progress(1, 1, "load")
        return _loaded(party, sha, metrics={
            "model_params": sum(p.numel() for p in party.model.parameters()),
            "trainable_params": party.trainable_params(party.model)})
    return work




def install_archive(party, sha: str) -> None:
    """Install the shipped model archive `sha` as the party's model, with its initial adapter and a fresh optimizer
    (LoadModelTask; a run switch back to a run that had installed it)."""
    from cotune.lm.lora import LoraMismatchError, load_lora_state_dict, validate_lora_state_dict

    model_dir, lora, initial = archive_model(party, sha)
    layers = read_layers(model_dir)  # checked before anything is replaced
    party.install_model(model_dir, lora, archive=sha)
    party.set_state(STATE, layers)
    try:
        validate_lora_state_dict(party.model, initial)
    except LoraMismatchError as exc:
        raise InvalidInput(f"model archive {sha[:12]}…: its initial LoRA does not fit its model: {exc}") from exc
    load_lora_state_dict(party.model, initial)
    log.info("%s: installed shipped model %s (%d layers mapped)", party.cfg.party_id, sha[:12],
             len(layers.layer_map) if layers else 0)


def _loaded(party, sha: str, metrics: dict | None = None) -> OpResult:
    lora_hash, layout = party.lora_hash(), party.lora_layout_hash(party.model)
    return OpResult(metrics=metrics or {},
                    result=party_pb2.LoadModelResult(model=sha, lora_hash=lora_hash, lora_layout_hash=layout))


def _restore_work(party):
    def work(op):
        if party.loaded_model:
            op.progress(0, 1, "load")
            party.install_model(party.cfg.model.path, party.cfg.lora)
            attach_layer_map(party)
            op.progress(1, 1, "load")
        return _loaded(party, "")
    return work




def train_adapter(party, task: party_pb2.TrainAdapterTask, ctx: party_pb2.RunContext):
    """Train only the adapter LoRA of the installed compressed model: CE + (ε/2)·‖θ − θᵗ‖² on the live parameters,
    θᵗ = the adapter held when the task starts (the round's broadcast, set by SetLora before this task)."""
    if layers_of(party) is None:
        raise Precondition(
            f"party {party.cfg.party_id} was asked for FedBiOT adapter training but its model {party.model_path} is "
            "not a compressed model (no cotune_layer_map.json); install the server's with LoadModelTask first")
    if not party.private:
        raise Precondition(f"party {party.cfg.party_id} ({party.role_name}) has no private data to train on")
    party.weight(task.prox_eps, "prox_eps")
    epochs = party.epochs(task.epochs)
    lr, batch_size = party.lr(task), party.batch_size(task)
    examples = party.samples(party.private, task.max_samples)
    seed = party.cfg.training.seed * 1_000_003 + int(ctx.round)  # a different shuffle each round

    def work(op):
        from cotune.algorithms.fedbiot.losses import lora_part_state, train_adapter as run_train

        layers = layers_of(party)
        if layers is None:  # a LoadModelTask in between went back to an uncompressed model
            raise Precondition(f"party {party.cfg.party_id}'s model is no longer a compressed model")
        n = layers.adapter_layers
        anchor = lora_part_state(party.model, layers.layer_map, "adapter", adapter_layers=n)
        m = run_train(party.trainer, examples, layers.layer_map, anchor, eps=task.prox_eps, adapter_layers=n,
                      epochs=epochs, lr=lr, batch_size=batch_size, max_length=party.cfg.training.max_length,
                      seed=seed, should_stop=op.cancelled, progress=party.progress(op, "train"))
        metrics = {"train_loss_first": m["ce_first"], "train_loss_last": m["ce_last"],
                   "train_prox_last": m["prox_last"], "train_steps": m["steps"], "train_samples": m["samples"],
                   "train_tokens": m["tokens"]}
        if "skipped_steps" in m:
            metrics["train_skipped_steps"] = m["skipped_steps"]
        return OpResult(metrics=metrics,
                        result=party_pb2.TrainLocalResult(samples=int(m["samples"]), loss_first=m["ce_first"],
                                                          loss_last=m["ce_last"]))
    return work
