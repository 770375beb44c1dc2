"""The model-holding party: what the LLM server and every SLM client have in common.

A party loads its model with a LoRA adapter, holds the public set (and, for a client, its private data),
and runs steps on request as long-running operations: local training, public top-k logits, distillation
from other parties' logits, evaluation and adapter get/set here; FedCoLLM's companion SLM and co-distillation in
cotune/party/fedcollm.py; FedBiOT's compression, emulator alignment and shipped models in cotune/party/fedbiot.py.
Every request is validated before any work starts; a rejected request changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import numpy as np

from cotune.config import PartyConfig
from cotune.data import canonical_jsonl_bytes, dataset_hash, read_jsonl
from cotune.algorithms.fedbiot.tasks import CompressedModel, FedBiOTTasks
from cotune.algorithms.fedcollm.server import FedCoLLMTasks
from cotune.party.media import MEDIA_ADAPTER, MEDIA_DATASET, MEDIA_SHARD, MEDIA_TOKENIZER
from cotune.errors import InvalidInput, Precondition, Unavailable
from cotune.rpc.operations import OperationContext, OperationManager, OpResult
from cotune.v1 import party_pb2
from cotune.wire.blobs import Blob, BlobStore

log = logging.getLogger(__name__)

MAX_TOP_K = 1024


class Party(FedCoLLMTasks, FedBiOTTasks):
    def __init__(self, cfg: PartyConfig, role: str):
        cfg.validate(role)
        self.cfg = cfg
        self.role = role
        workdir = Path(cfg.workdir)
        self.store = BlobStore(workdir / "blobs")
        self.ops = OperationManager(workers=1)
        self.public = read_jsonl(cfg.data.public)
        self.private = read_jsonl(cfg.data.private) if cfg.data.private else []
        self.eval = read_jsonl(cfg.data.eval) if cfg.data.eval else []
        self.public_hash = dataset_hash(self.public)
        self.public_blob = self.store.put_bytes(canonical_jsonl_bytes(self.public), MEDIA_DATASET)
        self.model = self.tokenizer = self.trainer = None
        self.tokenizer_blob: Blob | None = None
        self.tokenizer_hash = ""
        self.vocab_size = 0
        self.device = ""
        # FedCoLLM: the LLM server's copy of the SLM (model.companion_slm_path), with its own LoRA and optimizer
        self.companion = self.companion_trainer = self.companion_tokenizer = None
        self.companion_tokenizer_hash = ""
        self.companion_vocab_size = 0
        # FedBiOT: set when this party's model is a compressed one (cotune_layer_map.json beside config.json)
        self.layer_map: dict[int, int] | None = None
        self.adapter_layers = 0
        self.model_path = cfg.model.path
        self.loaded_model = ""  # sha256 of the shipped archive the model came from (LoadModelTask); "" = configured
        # FedBiOT, LLM server: emulator + adapter after a CompressTask
        self.compressed: CompressedModel | None = None
        self._model_lock = threading.RLock()  # install_model swaps the model while Describe may read it
        self._local = threading.local()
        self._ready = threading.Event()
        self._load_error: str = ""

    # -- lifecycle --------------------------------------------------------------------------------------------
    @property
    def model_cache(self) -> Path:
        mc = self.cfg.model
        return Path(mc.cache_dir) if mc.cache_dir else Path(self.cfg.workdir) / "model-cache"

    def load(self) -> None:
        """Load model, tokenizer and adapter (slow); the service reports NOT_SERVING until this returns."""
        from cotune.lm.device import configure_threads

        configure_threads()  # $COTUNE_TORCH_THREADS: the cluster launcher shares the cores among model processes
        mc = self.cfg.model
        self.install_model(mc.path, self.cfg.lora)
        if mc.companion_slm_path:
            self.load_companion()
        self._ready.set()
        log.info("%s ready: %s on %s, vocab %d, public set %s (%d samples)", self.cfg.party_id, mc.path, self.device,
                 self.vocab_size, self.public_hash[:12], len(self.public))

    def install_model(self, path, lora, *, archive: str = "") -> None:
        """Load the model at `path` with a fresh LoRA (`lora`: a LoraConfig) and make it this party's model, replacing
        the previous one only once the new one has loaded. `archive`: the sha256 of the shipped model archive it came
        from (LoadModelTask), empty for the configured model."""
        from cotune.algorithms.fedbiot.compress import LAYER_MAP_FILE, load_layer_map
        from cotune.lm.lora import attach_lora
        from cotune.lm.model import load_causal_lm
        from cotune.align.tokenizers import tokenizer_bundle_bytes
        from cotune.lm.train import TrainConfig, Trainer

        mc, tc = self.cfg.model, self.cfg.training
        model, tokenizer = load_causal_lm(path, cache_dir=self.model_cache, device=mc.device, dtype=mc.dtype)
        model = attach_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, seed=lora.seed)
        trainer = Trainer(model, tokenizer, TrainConfig(lr=tc.lr, batch_size=tc.batch_size, max_length=tc.max_length,
                                                        seed=tc.seed))
        tokenizer_blob = self.store.put_bytes(tokenizer_bundle_bytes(tokenizer), MEDIA_TOKENIZER)
        head = model.get_output_embeddings()
        compressed = Path(path).is_dir() and (Path(path) / LAYER_MAP_FILE).is_file()
        layer_map, adapter_layers = load_layer_map(path) if compressed else (None, 0)
        with self._model_lock:
            self.model, self.tokenizer, self.trainer = model, tokenizer, trainer
            self.tokenizer_blob, self.tokenizer_hash = tokenizer_blob, tokenizer_blob.sha256
            self.vocab_size = int(head.weight.shape[0]) if head is not None else len(tokenizer)
            self.device = str(next(model.parameters()).device)
            self.layer_map, self.adapter_layers = layer_map, adapter_layers
            self.model_path, self.loaded_model = str(path), archive

    def require_ready(self) -> None:
        if not self._ready.is_set():
            raise Unavailable(f"party {self.cfg.party_id} is still loading its model; retry shortly")

    # -- describe ---------------------------------------------------------------------------------------------
    def lora_bytes(self, model=None) -> bytes:
        from cotune.lm.lora import lora_state_dict, lora_to_bytes

        return lora_to_bytes(lora_state_dict(self.model if model is None else model))

    @staticmethod
    def lora_layout_hash(model) -> str:
        """Identity of an adapter's layout (sorted keys and shapes; dtypes are cast on load): equal layouts average."""
        import json

        from cotune.lm.lora import lora_shapes

        layout = json.dumps(sorted([k, list(v)] for k, v in lora_shapes(model).items()), separators=(",", ":"))
        return hashlib.sha256(layout.encode()).hexdigest()

    def describe(self) -> party_pb2.PartyInfo:
        from cotune.algorithms.fedbiot.compress import num_decoder_layers

        name = self.cfg.model.name or Path(self.cfg.model.path).name
        info = party_pb2.PartyInfo(
            party_id=self.cfg.party_id, role=self.role, model_name=name,
            public_set_hash=self.public_hash, public_set_size=len(self.public), private_set_size=len(self.private),
            eval_set_size=len(self.eval), public_set=self.public_blob.ref(), ready=self._ready.is_set(),
        )
        if not self._ready.is_set():
            return info
        with self._model_lock:
            if self.loaded_model:
                info.model_name = f"shipped model {self.loaded_model[:12]} (in place of {name})"
                info.loaded_model = self.loaded_model
            info.tokenizer_hash = self.tokenizer_hash
            info.vocab_size = self.vocab_size
            info.device = self.device
            info.trainable_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            info.tokenizer_bundle.CopyFrom(self.tokenizer_blob.ref())
            info.lora_hash = hashlib.sha256(self.lora_bytes()).hexdigest()
            info.lora_layout_hash = self.lora_layout_hash(self.model)
            try:
                info.num_layers = num_decoder_layers(self.model)
            except ValueError:  # an architecture whose layer list we cannot find: FedBiOT refuses it at validation
                info.num_layers = 0
        if self.companion is not None:
            info.companion.CopyFrom(self.describe_companion())
        return info

    # -- tasks --------------------------------------------------------------------------------------------------
    def start_task(self, req: party_pb2.TaskRequest):
        self.require_ready()
        ctx = req.ctx
        if not ctx.run_id:
            raise InvalidInput("ctx.run_id is required")
        if ctx.round < 0:
            raise InvalidInput(f"ctx.round must be >= 0, got {ctx.round}")
        if ctx.public_set_hash and ctx.public_set_hash != self.public_hash:
            raise Precondition(
                f"party {self.cfg.party_id} holds public set {self.public_hash[:16]}…, but run {ctx.run_id} uses "
                f"{ctx.public_set_hash[:16]}…; samples are matched by position, so this party refuses the run")
        kind = req.WhichOneof("task")
        if kind is None:
            raise InvalidInput("TaskRequest names no task")
        self._local.ctx = ctx  # the request's context, for _prepare_* (this thread, synchronously)
        work = getattr(self, f"_prepare_{kind}")(getattr(req, kind))  # validates synchronously
        key = f"{ctx.run_id}/{ctx.round}/{ctx.task_key or kind}" if ctx.task_key else ""
        return self.ops.start(kind, work, key=key)

    def _samples(self, items, max_samples: int):
        if max_samples < 0:
            raise InvalidInput(f"max_samples must be >= 0, got {max_samples}")
        return list(items[:max_samples]) if max_samples else list(items)

    def _progress(self, ctx: OperationContext, stage: str):
        def report(done, total):
            ctx.check_cancelled()
            ctx.progress(done, total, stage)
        return report

    def _prepare_train_local(self, task: party_pb2.TrainLocalTask):
        if not self.private:
            raise Precondition(f"party {self.cfg.party_id} ({self.role}) has no private data to train on")
        if task.epochs < 0 or task.lr < 0 or task.batch_size < 0:
            raise InvalidInput("epochs, lr and batch_size must be non-negative")
        if not task.prox_eps >= 0:  # also rejects NaN
            raise InvalidInput(f"prox_eps must be >= 0, got {task.prox_eps}")
        if task.prox_eps > 0 and self.layer_map is None:
            raise Precondition(
                f"party {self.cfg.party_id} was asked for FedBiOT adapter training (prox_eps > 0) but its model "
                f"{self.cfg.model.path} is not a compressed model (no cotune_layer_map.json)")
        examples = self._samples(self.private, task.max_samples)
        if task.prox_eps > 0:
            return self._fedbiot_train_work(task, examples)

        def work(ctx):
            self._apply_overrides(task.lr, task.batch_size)
            m = self.trainer.train_ce(examples, epochs=task.epochs or 1, progress=self._progress(ctx, "train"),
                                      should_stop=ctx.cancelled)
            return OpResult(metrics={"train_loss_first": m["loss_first"], "train_loss_last": m["loss_last"],
                                     "train_steps": m["steps"], "train_samples": m["samples"]})
        return work

    def _apply_overrides(self, lr: float, batch_size: int) -> None:
        """A task's lr/batch size for this step; 0 means the party's configured default."""
        self.trainer.config.batch_size = batch_size or self.cfg.training.batch_size
        self.trainer.set_lr(lr or self.cfg.training.lr)

    def _prepare_public_logits(self, task: party_pb2.PublicLogitsTask):
        if not 1 <= task.top_k <= MAX_TOP_K:
            raise InvalidInput(f"top_k must be in 1..{MAX_TOP_K}, got {task.top_k}")
        if task.bits and not 2 <= task.bits <= 16:
            raise InvalidInput(f"bits must be 0 (lossless) or 2..16, got {task.bits}")
        examples = self._samples(self.public, task.max_samples)
        self._public_max_length(task)

        def work(ctx):
            from cotune.lm.logits import public_topk
            from cotune.wire.logits_shard import encode_shard

            samples = public_topk(self.model, self.tokenizer, examples, k=task.top_k, batch_size=self.trainer.config.batch_size,
                                  max_length=self._public_max_length(task), progress=self._progress(ctx, "logits"))
            meta = {"party_id": self.cfg.party_id, "tokenizer_hash": self.tokenizer_hash, "public_set_hash": self.public_hash}
            data = encode_shard(samples, vocab_size=self.vocab_size, metadata=meta, bits=task.bits or 8,
                                lossless=task.bits == 0)
            blob = self.store.put_bytes(data, MEDIA_SHARD)
            positions = sum(len(s.positions) for s in samples)
            return OpResult(metrics={"public_loss_bpb": float(np.mean([s.loss_bpb for s in samples])),
                                     "shard_bytes": len(data), "shard_positions": positions,
                                     "bytes_per_position": len(data) / max(positions, 1)},
                            blobs={"shard": blob})
        return work

    def _public_max_length(self, task) -> int:
        if task.max_length < 0 or task.max_length > 32768:
            raise InvalidInput(f"max_length must be in 0..32768, got {task.max_length}")
        return task.max_length or self.cfg.training.max_length

    def _read_blob(self, ref, what: str, max_bytes: int = 4 << 30) -> bytes:
        blob = Blob.from_ref(ref)
        if not self.store.has(blob.sha256):
            raise Precondition(f"{what} blob {blob.sha256} is not in party {self.cfg.party_id}'s store; upload it with PutBlob first")
        return self.store.read_bytes(blob.sha256, max_bytes=max_bytes)

    def _prepare_distill(self, task: party_pb2.DistillTask):
        from cotune.align.seqalign import SequenceAlignment
        from cotune.align.vocabmap import VocabMap
        from cotune.algorithms.fedmkt.selection import SELECTIONS, TeacherView
        from cotune.wire.logits_shard import decode_shard

        selection = task.selection or "dualmince"
        if selection not in SELECTIONS:
            raise InvalidInput(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        if not task.teachers:
            raise InvalidInput("distill needs at least one teacher shard")
        if not 0.0 <= task.lam <= 1.0:
            raise InvalidInput(f"lam must be in [0, 1], got {task.lam}")
        examples = self._samples(self.public, task.max_samples)
        self._public_max_length(task)
        teachers = []
        for t in task.teachers:
            where = f"shard from {t.sender_id or '?'}"
            samples, meta = decode_shard(self._read_blob(t.shard, where), max_samples=len(self.public))
            if len(samples) != len(examples):
                raise InvalidInput(f"{where} holds {len(samples)} samples, expected {len(examples)} (the public set used in this step)")
            if meta.get("public_set_hash", self.public_hash) != self.public_hash:
                raise Precondition(f"{where} was computed on public set {meta['public_set_hash'][:16]}…, this party holds {self.public_hash[:16]}…")
            vmap = align = None
            if t.HasField("vocab_map") != t.HasField("sequence_alignment"):
                raise InvalidInput(f"{where}: vocab_map and sequence_alignment come together (both set across tokenizers, neither within one)")
            if t.HasField("vocab_map"):
                vm = VocabMap.from_bytes(self._read_blob(t.vocab_map, f"vocab map for {where}"))
                if vm.dst_hash != self.tokenizer_hash:
                    raise InvalidInput(f"vocab map for {where} targets tokenizer {vm.dst_hash[:16]}…, not this party's {self.tokenizer_hash[:16]}…")
                if meta.get("tokenizer_hash") and vm.src_hash != meta["tokenizer_hash"]:
                    raise InvalidInput(f"vocab map for {where} starts from tokenizer {vm.src_hash[:16]}…, but the shard was made with {meta['tokenizer_hash'][:16]}…")
                if int(vm.ids.max(initial=0)) >= self.vocab_size:
                    raise InvalidInput(f"vocab map for {where} maps to id {int(vm.ids.max())}, beyond this model's vocabulary ({self.vocab_size})")
                align = SequenceAlignment.from_bytes(self._read_blob(t.sequence_alignment, f"sequence alignment for {where}"))
                if len(align.sample_offsets) - 1 < len(examples):
                    raise InvalidInput(f"sequence alignment for {where} covers {len(align.sample_offsets) - 1} samples, fewer than {len(examples)}")
                vmap = vm.ids
            else:
                if meta.get("tokenizer_hash") and meta["tokenizer_hash"] != self.tokenizer_hash:
                    raise InvalidInput(f"{where} uses another tokenizer ({meta['tokenizer_hash'][:16]}…); send vocab_map and sequence_alignment with it")
                for s in samples:
                    if s.ids.size and int(s.ids.max()) >= self.vocab_size:
                        raise InvalidInput(f"{where} has token id {int(s.ids.max())} beyond this model's vocabulary ({self.vocab_size})")
            teachers.append(TeacherView(t.sender_id or f"teacher{len(teachers)}", samples, vmap, align))

        def work(ctx):
            from cotune.algorithms.fedmkt.selection import build_targets
            from cotune.lm.logits import public_topk

            ctx.progress(0, len(examples), "own-loss")
            k = max(s.ids.shape[1] for t in teachers for s in t.samples[:1]) if selection == "fate_self" else 1
            max_length = self._public_max_length(task)
            own = public_topk(self.model, self.tokenizer, examples, k=k, batch_size=self.trainer.config.batch_size,
                              max_length=max_length, progress=self._progress(ctx, "own-loss"))
            targets, summary = build_targets(own, teachers, selection=selection)
            self.trainer.config.lam = task.lam if task.lam else 0.9
            self._apply_overrides(task.lr, task.batch_size)
            # KD positions come from alignments made at this length: distil at exactly the same length
            self.trainer.config.max_length = max_length
            try:
                m = self.trainer.distill(examples, targets, epochs=task.epochs or 1, progress=self._progress(ctx, "distill"),
                                         should_stop=ctx.cancelled)
            finally:
                self.trainer.config.max_length = self.cfg.training.max_length
            metrics = {f"distill_{k}": float(v) for k, v in m.items()}
            metrics.update(summary)
            metrics["own_loss_bpb"] = float(np.mean([s.loss_bpb for s in own]))
            return OpResult(metrics=metrics)
        return work

    def _prepare_evaluate(self, task: party_pb2.EvaluateTask):
        if task.target not in ("", "model", "compressed"):
            raise InvalidInput(f"evaluate target must be '' (this party's model) or 'compressed', got {task.target!r:.40}")
        eval_set = self._samples(self.eval, task.max_samples)
        public = self._samples(self.public, task.max_samples)
        self._target_model(task.target)  # a missing compressed model is refused now, not when the work runs

        def work(ctx):
            from cotune.lm.evaluate import evaluate_loss, evaluate_mc

            model = self._target_model(task.target)
            bs, ml = self.trainer.config.batch_size, self.cfg.training.max_length
            metrics = {}
            ctx.progress(0, 2, "evaluate")
            loss = evaluate_loss(model, self.tokenizer, public, batch_size=bs, max_length=ml)
            metrics.update({"public_loss": loss["loss"], "public_ppl": loss["perplexity"], "public_bpb": loss["bpb"]})
            ctx.progress(1, 2, "evaluate")
            if eval_set and eval_set[0].choices:
                acc = evaluate_mc(model, self.tokenizer, eval_set, batch_size=bs, max_length=ml)
                metrics.update({"eval_accuracy": acc["accuracy"], "eval_accuracy_norm": acc["accuracy_norm"], "eval_n": acc["n"]})
            ctx.progress(2, 2, "evaluate")
            return OpResult(metrics=metrics)
        return work

    def _prepare_set_lora(self, task: party_pb2.SetLoraTask):
        from cotune.lm.lora import load_lora_state_dict, lora_from_bytes, lora_shapes

        state = lora_from_bytes(self._read_blob(task.adapter, "adapter"))
        expected = lora_shapes(self.model)
        bad = sorted(set(state) ^ set(expected)) + [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k])]
        if bad:
            raise InvalidInput(f"adapter does not fit this model: {len(bad)} mismatching key(s), first: {bad[0]}")

        def work(ctx):
            load_lora_state_dict(self.model, state)
            return OpResult(info={"lora_hash": hashlib.sha256(self.lora_bytes()).hexdigest()})
        return work

    def _prepare_get_lora(self, task: party_pb2.GetLoraTask):
        self._target_model(task.target)
        tags = {}
        if task.tag:
            # the step this adapter answers travels inside it: an aggregator can tell another round's upload apart
            c = self._local.ctx
            tags = {"cotune.run_id": c.run_id, "cotune.round": str(c.round), "cotune.task_key": c.task_key,
                    "cotune.party_id": self.cfg.party_id, "cotune.target": task.target or "model"}

        def work(ctx):
            from cotune.lm.lora import LORA_FORMAT, lora_state_dict
            from cotune.wire.safetensors_io import dumps

            model = self._target_model(task.target)
            canonical = self.lora_bytes(model)
            if tags:
                sd = lora_state_dict(model)
                data = dumps(sd, {"format": LORA_FORMAT, "keys": str(len(sd)), **tags})
            else:
                data = canonical
            blob = self.store.put_bytes(data, MEDIA_ADAPTER)
            return OpResult(blobs={"adapter": blob}, info={"lora_hash": hashlib.sha256(canonical).hexdigest(),
                                                           "blob_sha256": blob.sha256})
        return work

    def _target_model(self, target: str):
        if target in ("", "model"):
            return self.model
        if target == "compressed":
            return self._compressed().model
        if target == "companion":
            if self.companion is None:
                raise Precondition(f"party {self.cfg.party_id} holds no companion SLM; FedCoLLM needs one on the LLM server "
                                   "(set model.companion_slm_path in its config)")
            return self.companion
        raise InvalidInput(f"target must be '' (this party's model), 'companion' or 'compressed', got {target!r:.40}")
