"""FedBiOT's tasks (DESIGN §4.4) on both sides.

LLM server: CompressTask builds emulator + adapter from its model and publishes it as a model archive; AlignEmulatorTask
takes the aggregated adapter, plugs it into the full model and aligns the emulator; EvaluateTask/GetLoraTask with
target "compressed" read the emulator + adapter it holds.
SLM client: LoadModelTask installs the shipped archive as its model (unpacked once per archive, under
<workdir>/models/<sha256>); TrainLocalTask with prox_eps > 0 then trains only the adapter's LoRA.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from cotune.config import LoraConfig
from cotune.party.media import MEDIA_MODEL_ARCHIVE
from cotune.errors import InvalidInput, Precondition
from cotune.rpc.operations import OpResult
from cotune.v1 import party_pb2
from cotune.wire.blobs import Blob

log = logging.getLogger(__name__)

LORA_CONFIG_FILE = "cotune_lora.json"  # the LoRA config the initial adapter was made with (r, alpha, dropout, seed)


@dataclass
class CompressedModel:
    """The LLM server's emulator + adapter (a peft model with LoRA) and its compressed → original layer map."""

    model: object
    layer_map: dict[int, int]
    adapter_layers: int
    archive: str  # sha256 of the published archive


def check_archive(path: Path) -> dict[str, int]:
    """Names and sizes of a shipped model archive's files; InvalidInput unless it is a tar of a compressed model."""
    from cotune.algorithms.fedbiot.compress import INITIAL_LORA_FILE, LAYER_MAP_FILE

    try:
        with tarfile.open(str(path), mode="r:") as tar:
            members = {m.name: m.size for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError) as exc:
        raise InvalidInput(f"model archive is not a readable tar: {exc}") from exc
    missing = [n for n in ("config.json", LAYER_MAP_FILE, INITIAL_LORA_FILE) if n not in members]
    if missing:
        raise InvalidInput(f"model archive is not a compressed model: it lacks {', '.join(missing)}")
    return members


class FedBiOTTasks:
    """Mixed into Party: `compressed` (server), `layer_map`/`adapter_layers`/`loaded_model` (client) live on the party."""

    # -- LLM server ---------------------------------------------------------------------------------------------
    def _prepare_compress(self, task: party_pb2.CompressTask):
        from cotune.algorithms.fedbiot.compress import num_decoder_layers, plan

        adapter_layers = task.adapter_layers or 2
        drop = task.drop or 0.2
        if adapter_layers < 1 or not 0 < drop < 1:
            raise InvalidInput(f"adapter_layers must be >= 1 and drop in (0, 1), got {adapter_layers}, {drop}")
        try:
            plan(num_decoder_layers(self.model), adapter_layers=adapter_layers, drop=drop)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc

        def work(ctx):
            import tempfile

            from cotune.algorithms.fedbiot.compress import INITIAL_LORA_FILE, compress, pack_dir, save_compressed
            from cotune.lm.lora import attach_lora, lora_state_dict, lora_to_bytes

            lc = self.cfg.lora
            ctx.progress(0, 2, "compress")
            small, layer_map = compress(self.model, adapter_layers=adapter_layers, drop=drop)  # base weights, no LoRA
            ctx.progress(1, 2, "pack")
            with tempfile.TemporaryDirectory(dir=self.cfg.workdir) as tmp:
                # saved before LoRA is attached: peft wraps the layers in place and would rename their weights
                out = save_compressed(small, layer_map, Path(tmp) / "compressed", tokenizer=self.tokenizer,
                                      adapter_layers=adapter_layers, drop=drop,
                                      original_num_layers=num_decoder_layers(self.model))
                small = attach_lora(small, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, seed=lc.seed)
                (out / INITIAL_LORA_FILE).write_bytes(lora_to_bytes(lora_state_dict(small)))
                (out / LORA_CONFIG_FILE).write_text(json.dumps(
                    {"r": lc.r, "alpha": lc.alpha, "dropout": lc.dropout, "seed": lc.seed}, sort_keys=True) + "\n")
                blob = self.store.put_bytes(pack_dir(out), MEDIA_MODEL_ARCHIVE)
            self.compressed = CompressedModel(small, layer_map, adapter_layers, blob.sha256)
            ctx.progress(2, 2, "pack")
            return OpResult(blobs={"model": blob},
                            info={"layer_map": json.dumps({str(k): v for k, v in sorted(layer_map.items())}),
                                  "lora_hash": hashlib.sha256(self.lora_bytes(small)).hexdigest()},
                            metrics={"compressed_layers": len(layer_map), "adapter_layers": adapter_layers,
                                     "original_layers": num_decoder_layers(self.model), "model_archive_bytes": blob.size,
                                     "compressed_params": sum(p.numel() for p in small.parameters())})
        return work

    def _prepare_align_emulator(self, task: party_pb2.AlignEmulatorTask):
        from cotune.lm.lora import LoraMismatchError, lora_from_bytes, validate_lora_state_dict

        comp = self._compressed()
        if task.steps < 0 or task.lr < 0 or task.batch_size < 0 or task.max_length < 0 or not task.beta >= 0:
            raise InvalidInput("steps, beta, lr, batch_size and max_length must be non-negative")
        state = None
        if task.HasField("adapter"):
            state = lora_from_bytes(self._read_blob(task.adapter, "adapter"))
            try:
                validate_lora_state_dict(comp.model, state)
            except LoraMismatchError as exc:
                raise InvalidInput(f"adapter does not fit the compressed model: {exc}") from exc
        examples = self._samples(self.public, task.max_samples)
        round_ = int(self._local.ctx.round)

        def work(ctx):
            import torch

            from cotune.algorithms.fedbiot.compress import plug_adapter_into_full
            from cotune.algorithms.fedbiot.losses import align_emulator, lora_part_state
            from cotune.lm.lora import _lora_params

            tc = self.cfg.training
            small, layer_map, n = comp.model, comp.layer_map, comp.adapter_layers
            if state is not None:  # only the adapter layers; the emulator LoRA stays the server's
                params = _lora_params(small)
                with torch.no_grad():
                    for key in lora_part_state(small, layer_map, "adapter", adapter_layers=n):
                        params[key].copy_(state[key].to(device=params[key].device, dtype=params[key].dtype))
            plug_adapter_into_full(self.model, small, layer_map, adapter_layers=n)
            m = {}
            if task.steps:
                m = align_emulator(small, self.model, self.tokenizer, examples, layer_map, steps=task.steps,
                                   beta=task.beta, adapter_layers=n, lr=task.lr or tc.lr,
                                   batch_size=task.batch_size or tc.batch_size,
                                   max_length=task.max_length or tc.max_length,
                                   seed=tc.seed * 1_000_003 + round_, should_stop=ctx.cancelled)
            return OpResult(metrics={k: float(v) for k, v in m.items()},
                            info={"lora_hash": hashlib.sha256(self.lora_bytes(small)).hexdigest(),
                                  "full_lora_hash": hashlib.sha256(self.lora_bytes()).hexdigest()})
        return work

    def _compressed(self) -> CompressedModel:
        if self.compressed is None:
            raise Precondition(f"party {self.cfg.party_id} holds no compressed model; run a CompressTask first")
        return self.compressed

    # -- SLM client ---------------------------------------------------------------------------------------------
    def _prepare_load_model(self, task: party_pb2.LoadModelTask):
        if self.role != "slm":
            raise Precondition(f"party {self.cfg.party_id} is an LLM server: it keeps its configured model "
                               "(LoadModelTask installs a shipped model on an SLM client)")
        if not task.HasField("model"):
            return self._restore_work()
        blob = Blob.from_ref(task.model)
        if not self.store.has(blob.sha256):
            raise Precondition(f"model archive {blob.sha256} is not in party {self.cfg.party_id}'s store; "
                               "upload it with PutBlob first")
        members = check_archive(self.store.path(blob.sha256))
        sha = blob.sha256

        def work(ctx):
            from cotune.algorithms.fedbiot.compress import INITIAL_LORA_FILE
            from cotune.lm.lora import load_lora_state_dict, lora_from_bytes

            if self.loaded_model != sha:
                ctx.progress(0, 2, "unpack")
                model_dir = self._unpacked(sha, members)
                lora = LoraConfig(**json.loads((model_dir / LORA_CONFIG_FILE).read_text())) \
                    if LORA_CONFIG_FILE in members else self.cfg.lora
                ctx.progress(1, 2, "load")
                self.install_model(model_dir, lora, archive=sha)
                load_lora_state_dict(self.model, lora_from_bytes((model_dir / INITIAL_LORA_FILE).read_bytes()))
                ctx.progress(2, 2, "load")
                log.info("%s: installed shipped model %s (%d layers mapped)", self.cfg.party_id, sha[:12],
                         len(self.layer_map or {}))
            return OpResult(info={"model": sha, "lora_hash": hashlib.sha256(self.lora_bytes()).hexdigest(),
                                  "lora_layout_hash": self.lora_layout_hash(self.model)},
                            metrics={"model_params": sum(p.numel() for p in self.model.parameters()),
                                     "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad)})
        return work

    def _unpacked(self, sha: str, members: dict[str, int]) -> Path:
        """<workdir>/models/<sha>, unpacked once: a directory is renamed into place only when complete."""
        from cotune.algorithms.fedbiot.compress import unpack_dir

        root = Path(self.cfg.workdir) / "models"
        final = root / sha
        if final.is_dir() and all((final / n).is_file() and (final / n).stat().st_size == s for n, s in members.items()):
            return final
        tmp = root / f".{sha}.{os.getpid()}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            unpack_dir(self.store.path(sha), tmp)
        except ValueError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InvalidInput(f"model archive {sha[:12]}…: {exc}") from exc
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def _restore_work(self):
        def work(ctx):
            if self.loaded_model:
                ctx.progress(0, 1, "load")
                self.install_model(self.cfg.model.path, self.cfg.lora)
                ctx.progress(1, 1, "load")
            return OpResult(info={"model": "", "lora_hash": hashlib.sha256(self.lora_bytes()).hexdigest()})
        return work

    def _fedbiot_train_work(self, task: party_pb2.TrainLocalTask, examples):
        """FedBiOT client step: only the adapter LoRA trains; the anchor θᵗ is the adapter held at task start
        (the round's broadcast, set by SetLora before this task)."""
        from cotune.algorithms.fedbiot.losses import lora_part_state, train_adapter

        round_ = int(self._local.ctx.round)  # a different shuffle each round

        def work(ctx):
            tc = self.cfg.training
            anchor = lora_part_state(self.model, self.layer_map, "adapter", adapter_layers=self.adapter_layers)
            m = train_adapter(self.model, self.tokenizer, examples, self.layer_map, anchor, eps=task.prox_eps,
                              adapter_layers=self.adapter_layers, epochs=task.epochs or 1, lr=task.lr or tc.lr,
                              batch_size=task.batch_size or tc.batch_size, max_length=tc.max_length,
                              seed=tc.seed * 1_000_003 + round_, should_stop=ctx.cancelled,
                              progress=self._progress(ctx, "train"))
            return OpResult(metrics={"train_loss_first": m["ce_first"], "train_loss_last": m["ce_last"],
                                     "train_prox_last": m["prox_last"], "train_steps": m["steps"],
                                     "train_samples": m["samples"]})
        return work
