"""The model-holding party: what the LLM server and every SLM client have in common.

A party loads its model with a LoRA adapter, holds the public set (and, for a client, its private data),
and runs steps on request as long-running operations: local training, public top-k logits, distillation
from other parties' logits, evaluation, adapter get/set, and (on an LLM server holding a companion copy of the
SLM) FedCoLLM's co-distillation. Every request is validated before any work starts; a rejected request changes
nothing.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import numpy as np

from cotune.config import PartyConfig
from cotune.data import canonical_jsonl_bytes, dataset_hash, read_jsonl
from cotune.rpc.errors import InvalidInput, Precondition, Unavailable, rpc_method
from cotune.rpc.operations import OperationContext, OperationManager, OpResult
from cotune.rpc.server import ServiceHost, tls_files
from cotune.v1 import party_pb2, party_pb2_grpc
from cotune.wire.blobs import Blob, BlobStore

log = logging.getLogger(__name__)

MEDIA_SHARD = "application/x-cotune-topk-shard"
MEDIA_ADAPTER = "application/safetensors+lora"
MEDIA_TOKENIZER = "application/x-cotune-tokenizer"
MEDIA_DATASET = "application/x-cotune-examples+jsonl"
MAX_TOP_K = 1024


class Party:
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
        self.companion = self.companion_trainer = None
        self.companion_tokenizer_hash = ""
        self.companion_vocab_size = 0
        # FedBiOT: set when the model directory is a compressed model (cotune_layer_map.json beside config.json),
        # or, on the LLM server, after a CompressTask (then self.compressed holds emulator + adapter with LoRA)
        self.layer_map: dict[int, int] | None = None
        self.adapter_layers = 0
        self.compressed = None
        self._local = threading.local()
        self._ready = threading.Event()
        self._load_error: str = ""

    # -- lifecycle --------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load model, tokenizer and adapter (slow); the service reports NOT_SERVING until this returns."""
        from cotune.lm.device import configure_threads
        from cotune.lm.lora import attach_lora
        from cotune.lm.model import load_causal_lm
        from cotune.lm.tokenizers import tokenizer_bundle_bytes
        from cotune.lm.train import TrainConfig, Trainer

        configure_threads()  # $COTUNE_TORCH_THREADS: the cluster launcher shares the cores among model processes
        mc = self.cfg.model
        cache = Path(mc.cache_dir) if mc.cache_dir else Path(self.cfg.workdir) / "model-cache"
        model, tokenizer = load_causal_lm(mc.path, cache_dir=cache, device=mc.device, dtype=mc.dtype)
        lc = self.cfg.lora
        self.model = attach_lora(model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, seed=lc.seed)
        self.tokenizer = tokenizer
        tc = self.cfg.training
        self.trainer = Trainer(self.model, tokenizer, TrainConfig(lr=tc.lr, batch_size=tc.batch_size,
                                                                  max_length=tc.max_length, seed=tc.seed))
        bundle = tokenizer_bundle_bytes(tokenizer)
        self.tokenizer_blob = self.store.put_bytes(bundle, MEDIA_TOKENIZER)
        self.tokenizer_hash = self.tokenizer_blob.sha256
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0]) if self.model.get_output_embeddings() is not None else len(tokenizer)
        self.device = str(next(self.model.parameters()).device)
        if mc.companion_slm_path:
            self._load_companion(cache)
        from cotune.lm.compress import LAYER_MAP_FILE, load_layer_map

        if Path(mc.path).is_dir() and (Path(mc.path) / LAYER_MAP_FILE).is_file():
            self.layer_map, self.adapter_layers = load_layer_map(mc.path)
        self._ready.set()
        log.info("%s ready: %s on %s, vocab %d, public set %s (%d samples)", self.cfg.party_id, mc.path, self.device,
                 self.vocab_size, self.public_hash[:12], len(self.public))

    def _load_companion(self, cache: Path) -> None:
        """The SLM copy for FedCoLLM's co-distillation: on the LLM's device and dtype, LoRA from `companion_lora`."""
        from cotune.lm.lora import attach_lora
        from cotune.lm.model import load_causal_lm
        from cotune.lm.tokenizers import tokenizer_bundle_bytes
        from cotune.lm.train import TrainConfig, Trainer

        mc, lc, tc = self.cfg.model, self.cfg.companion_lora, self.cfg.training
        model, tokenizer = load_causal_lm(mc.companion_slm_path, cache_dir=cache, device=self.device, dtype=mc.dtype)
        self.companion = attach_lora(model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, seed=lc.seed)
        self.companion_trainer = Trainer(self.companion, self.tokenizer,
                                         TrainConfig(lr=tc.lr, batch_size=tc.batch_size, max_length=tc.max_length, seed=tc.seed))
        self.companion_tokenizer_hash = hashlib.sha256(tokenizer_bundle_bytes(tokenizer)).hexdigest()
        self.companion_vocab_size = int(self.companion.get_output_embeddings().weight.shape[0])
        if self.companion_tokenizer_hash != self.tokenizer_hash:
            log.warning("%s: companion SLM %s uses another tokenizer than the LLM; FedCoLLM co-distillation will refuse "
                        "to run (across tokenizers is not supported yet)", self.cfg.party_id, mc.companion_slm_path)
        log.info("%s: companion SLM %s loaded (vocab %d)", self.cfg.party_id, mc.companion_slm_path, self.companion_vocab_size)

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
        info = party_pb2.PartyInfo(
            party_id=self.cfg.party_id, role=self.role, model_name=self.cfg.model.name or Path(self.cfg.model.path).name,
            public_set_hash=self.public_hash, public_set_size=len(self.public), private_set_size=len(self.private),
            eval_set_size=len(self.eval), public_set=self.public_blob.ref(), ready=self._ready.is_set(),
        )
        if self._ready.is_set():
            info.tokenizer_hash = self.tokenizer_hash
            info.vocab_size = self.vocab_size
            info.device = self.device
            info.trainable_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            info.tokenizer_bundle.CopyFrom(self.tokenizer_blob.ref())
            info.lora_hash = hashlib.sha256(self.lora_bytes()).hexdigest()
            info.lora_layout_hash = self.lora_layout_hash(self.model)
            if self.companion is not None:
                mc = self.cfg.model
                info.companion.CopyFrom(party_pb2.CompanionInfo(
                    model_name=mc.companion_slm_name or Path(mc.companion_slm_path).name,
                    tokenizer_hash=self.companion_tokenizer_hash, vocab_size=self.companion_vocab_size,
                    lora_hash=hashlib.sha256(self.lora_bytes(self.companion)).hexdigest(),
                    lora_layout_hash=self.lora_layout_hash(self.companion),
                    trainable_params=sum(p.numel() for p in self.companion.parameters() if p.requires_grad)))
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

    def _fedbiot_train_work(self, task: party_pb2.TrainLocalTask, examples):
        """FedBiOT client step: only the adapter LoRA trains; the anchor θᵗ is the adapter held at task start
        (the round's broadcast, set by SetLora before this task)."""
        from cotune.lm.fedbiot import lora_part_state, train_adapter

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
        from alignment.seqalign import SequenceAlignment
        from alignment.vocabmap import VocabMap
        from cotune.distill import SELECTIONS, TeacherView
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
            from cotune.distill import build_targets
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
        eval_set = self._samples(self.eval, task.max_samples)
        public = self._samples(self.public, task.max_samples)

        def work(ctx):
            from cotune.lm.evaluate import evaluate_loss, evaluate_mc

            bs, ml = self.trainer.config.batch_size, self.cfg.training.max_length
            metrics = {}
            ctx.progress(0, 2, "evaluate")
            loss = evaluate_loss(self.model, self.tokenizer, public, batch_size=bs, max_length=ml)
            metrics.update({"public_loss": loss["loss"], "public_ppl": loss["perplexity"], "public_bpb": loss["bpb"]})
            ctx.progress(1, 2, "evaluate")
            if eval_set and eval_set[0].choices:
                acc = evaluate_mc(self.model, self.tokenizer, eval_set, batch_size=bs, max_length=ml)
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
        model = self._target_model(task.target)
        tags = {}
        if task.tag:
            # the step this adapter answers travels inside it: an aggregator can tell another round's upload apart
            c = self._local.ctx
            tags = {"cotune.run_id": c.run_id, "cotune.round": str(c.round), "cotune.task_key": c.task_key,
                    "cotune.party_id": self.cfg.party_id, "cotune.target": task.target or "model"}

        def work(ctx):
            from cotune.lm.lora import LORA_FORMAT, lora_state_dict
            from cotune.wire.safetensors_io import dumps

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
            if self.compressed is None:
                raise Precondition(f"party {self.cfg.party_id} holds no compressed model; run a CompressTask first")
            return self.compressed
        if target == "companion":
            if self.companion is None:
                raise Precondition(f"party {self.cfg.party_id} holds no companion SLM; FedCoLLM needs one on the LLM server "
                                   "(set model.companion_slm_path in its config)")
            return self.companion
        raise InvalidInput(f"target must be '' (this party's model), 'companion' or 'compressed', got {target!r:.40}")

    def _prepare_compress(self, task: party_pb2.CompressTask):
        from cotune.lm.compress import num_decoder_layers, plan

        adapter_layers = task.adapter_layers or 2
        drop = task.drop or 0.2
        if adapter_layers < 1 or not 0 < drop < 1:
            raise InvalidInput(f"adapter_layers must be >= 1 and drop in (0, 1), got {adapter_layers}, {drop}")
        try:
            plan(num_decoder_layers(self.model), adapter_layers=adapter_layers, drop=drop)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc

        def work(ctx):
            import json
            import tempfile

            from cotune.lm.compress import INITIAL_LORA_FILE, compress, pack_dir, save_compressed
            from cotune.lm.lora import attach_lora, lora_state_dict, lora_to_bytes

            lc = self.cfg.lora
            small, layer_map = compress(self.model, adapter_layers=adapter_layers, drop=drop)  # base weights, no LoRA
            small = attach_lora(small, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, seed=lc.seed)
            with tempfile.TemporaryDirectory(dir=self.cfg.workdir) as tmp:
                out = save_compressed(small, layer_map, Path(tmp) / "compressed", tokenizer=self.tokenizer,
                                      adapter_layers=adapter_layers, drop=drop,
                                      original_num_layers=num_decoder_layers(self.model))
                (out / INITIAL_LORA_FILE).write_bytes(lora_to_bytes(lora_state_dict(small)))
                blob = self.store.put_bytes(pack_dir(out), "application/x-tar")
            self.compressed, self.layer_map, self.adapter_layers = small, layer_map, adapter_layers
            return OpResult(blobs={"model": blob},
                            info={"layer_map": json.dumps({str(k): v for k, v in sorted(layer_map.items())}),
                                  "lora_hash": hashlib.sha256(self.lora_bytes(small)).hexdigest()},
                            metrics={"compressed_layers": len(layer_map), "adapter_layers": adapter_layers})
        return work

    def _prepare_align_emulator(self, task: party_pb2.AlignEmulatorTask):
        from cotune.lm.lora import LoraMismatchError, lora_from_bytes, validate_lora_state_dict

        small = self._target_model("compressed")
        if task.steps < 0 or task.lr < 0 or task.batch_size < 0 or task.max_length < 0 or not task.beta >= 0:
            raise InvalidInput("steps, beta, lr, batch_size and max_length must be non-negative")
        state = None
        if task.HasField("adapter"):
            state = lora_from_bytes(self._read_blob(task.adapter, "adapter"))
            try:
                validate_lora_state_dict(small, state)
            except LoraMismatchError as exc:
                raise InvalidInput(f"adapter does not fit the compressed model: {exc}") from exc
        examples = self._samples(self.public, task.max_samples)

        def work(ctx):
            import torch

            from cotune.lm.compress import plug_adapter_into_full
            from cotune.lm.fedbiot import align_emulator, lora_part_state
            from cotune.lm.lora import _lora_params

            tc = self.cfg.training
            if state is not None:  # only the adapter layers; the emulator LoRA stays the server's
                adapter = lora_part_state(small, self.layer_map, "adapter", adapter_layers=self.adapter_layers)
                params = _lora_params(small)
                with torch.no_grad():
                    for key in adapter:
                        params[key].copy_(state[key].to(device=params[key].device, dtype=params[key].dtype))
            plug_adapter_into_full(self.model, small, self.layer_map, adapter_layers=self.adapter_layers)
            m = align_emulator(small, self.model, self.tokenizer, examples, self.layer_map, steps=task.steps,
                               beta=task.beta, adapter_layers=self.adapter_layers, lr=task.lr or tc.lr,
                               batch_size=task.batch_size or tc.batch_size, max_length=task.max_length or tc.max_length,
                               seed=tc.seed * 1_000_003 + int(ctx_round), should_stop=ctx.cancelled)
            return OpResult(metrics={k: float(v) for k, v in m.items()},
                            info={"lora_hash": hashlib.sha256(self.lora_bytes(small)).hexdigest()})
        ctx_round = self._local.ctx.round
        return work

    def _prepare_co_distill(self, task: party_pb2.CoDistillTask):
        import math

        from cotune.lm.lora import LoraMismatchError, lora_from_bytes, validate_lora_state_dict

        companion = self._target_model("companion")
        if self.companion_tokenizer_hash != self.tokenizer_hash:
            raise Precondition(f"party {self.cfg.party_id}: the companion SLM's tokenizer ({self.companion_tokenizer_hash[:12]}…) "
                               f"differs from the LLM's ({self.tokenizer_hash[:12]}…); full-vocabulary co-distillation needs "
                               "one tokenizer (FedCoLLM across tokenizers is not supported yet)")
        if not (math.isfinite(task.lam) and task.lam >= 0):
            raise InvalidInput(f"lam (the KL weight) must be finite and >= 0, got {task.lam}")
        if task.epochs < 0 or task.lr < 0 or task.slm_lr < 0 or task.batch_size < 0:
            raise InvalidInput("epochs, lr, slm_lr and batch_size must be non-negative")
        if not task.HasField("slm_adapter"):
            raise InvalidInput("co_distill needs slm_adapter (the aggregated SLM LoRA)")
        examples = self._samples(self.public, task.max_samples)
        max_length = self._public_max_length(task)
        try:
            state = lora_from_bytes(self._read_blob(task.slm_adapter, "slm_adapter"))
            validate_lora_state_dict(companion, state)
        except (ValueError, LoraMismatchError) as exc:
            raise InvalidInput(f"slm_adapter does not fit the companion SLM: {exc}") from exc

        def work(ctx):
            from cotune.lm.codistill import co_distill, encode_public
            from cotune.lm.lora import load_lora_state_dict, lora_state_dict, lora_to_bytes

            load_lora_state_dict(companion, state)
            received = hashlib.sha256(self.lora_bytes(companion)).hexdigest()
            batch_size = task.batch_size or self.cfg.training.batch_size
            self.trainer.set_lr(task.lr or self.cfg.training.lr)
            self.companion_trainer.set_lr(task.slm_lr or task.lr or self.cfg.training.lr)
            pairs = encode_public(self.trainer, examples, max_length)
            m = co_distill(self.trainer, self.companion_trainer, pairs, lam=task.lam if task.lam else 1.0,
                           epochs=task.epochs or 1, batch_size=batch_size, seed=self.cfg.training.seed,
                           progress=self._progress(ctx, "co-distill"), should_stop=ctx.cancelled)
            # float32 on the wire whatever the server's dtype, so a client's copy hashes like the server's
            out = lora_to_bytes({k: v.float() for k, v in lora_state_dict(companion).items()})
            blob = self.store.put_bytes(out, MEDIA_ADAPTER)
            metrics = {f"codistill_{k}": float(v) for k, v in m.items()}
            return OpResult(metrics=metrics, blobs={"slm_adapter": blob},
                            info={"lora_hash": blob.sha256, "received_lora_hash": received,
                                  "llm_lora_hash": hashlib.sha256(self.lora_bytes()).hexdigest()})
        return work


class PartyServicer:
    """Implements both LLMServer and SLMClient (identical RPCs)."""

    def __init__(self, party: Party):
        self.party = party

    @rpc_method
    def Describe(self, request, context):
        return self.party.describe()

    @rpc_method
    def StartTask(self, request, context):
        return self.party.start_task(request)


def serve_party(cfg: PartyConfig, role: str, port_file: str | None = None) -> None:
    """Run a party service until SIGTERM: listen at once (NOT_SERVING), load the model, then SERVING."""
    party = Party(cfg, role)
    host = ServiceHost(f"cotune.{role}", cfg.listen, tls=tls_files(cfg.tls), tokens=cfg.auth.tokens or None)
    add = party_pb2_grpc.add_LLMServerServicer_to_server if role == "llm" else party_pb2_grpc.add_SLMClientServicer_to_server
    host.add(add, PartyServicer(party), party_pb2, "LLMServer" if role == "llm" else "SLMClient")
    host.add_blobs_and_operations(party.store, party.ops)
    host.start(port_file)
    party.load()
    host.set_serving(True)
    host.wait_for_termination_signal()
    party.ops.shutdown()
