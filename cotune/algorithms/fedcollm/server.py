"""FedCoLLM's tasks on the LLM server (DESIGN §4.3): the companion copy of the clients' SLM and the co-distillation.

The companion is loaded from `model.companion_slm_path` beside the LLM, on its device and dtype, with the LoRA config
`companion_lora` (which must match the clients' `lora`, so the broadcast adapter fits both). With one tokenizer the
co-distillation is `cotune.algorithms.fedcollm.losses.co_distill` (full-vocabulary KL); when the companion's tokenizer differs it is
`cotune.algorithms.fedcollm.losses_cross.co_distill_cross`, fed the two MinED maps the CoDistillTask carries.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from cotune.party.media import MEDIA_ADAPTER
from cotune.errors import InvalidInput
from cotune.rpc.operations import OpResult
from cotune.v1 import party_pb2

log = logging.getLogger(__name__)


class FedCoLLMTasks:
    """Mixed into Party: state lives on the party (`companion`, `companion_trainer`, `companion_tokenizer_hash`, ...)."""

    def load_companion(self) -> None:
        from cotune.lm.lora import attach_lora
        from cotune.lm.model import load_causal_lm
        from cotune.align.tokenizers import tokenizer_bundle_bytes
        from cotune.lm.train import TrainConfig, Trainer

        mc, lc, tc = self.cfg.model, self.cfg.companion_lora, self.cfg.training
        model, tokenizer = load_causal_lm(mc.companion_slm_path, cache_dir=self.model_cache, device=self.device,
                                          dtype=mc.dtype)
        self.companion = attach_lora(model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, seed=lc.seed)
        self.companion_tokenizer = tokenizer
        self.companion_trainer = Trainer(self.companion, tokenizer,
                                         TrainConfig(lr=tc.lr, batch_size=tc.batch_size, max_length=tc.max_length, seed=tc.seed))
        self.companion_tokenizer_hash = hashlib.sha256(tokenizer_bundle_bytes(tokenizer)).hexdigest()
        self.companion_vocab_size = int(self.companion.get_output_embeddings().weight.shape[0])
        if self.companion_tokenizer_hash != self.tokenizer_hash:
            log.info("%s: companion SLM %s uses another tokenizer than the LLM; co-distillation needs MinED maps "
                     "(run spec align_tokenizers)", self.cfg.party_id, mc.companion_slm_path)
        log.info("%s: companion SLM %s loaded (vocab %d)", self.cfg.party_id, mc.companion_slm_path, self.companion_vocab_size)

    def describe_companion(self) -> party_pb2.CompanionInfo:
        mc = self.cfg.model
        return party_pb2.CompanionInfo(
            model_name=mc.companion_slm_name or Path(mc.companion_slm_path).name,
            tokenizer_hash=self.companion_tokenizer_hash, vocab_size=self.companion_vocab_size,
            lora_hash=hashlib.sha256(self.lora_bytes(self.companion)).hexdigest(),
            lora_layout_hash=self.lora_layout_hash(self.companion),
            trainable_params=sum(p.numel() for p in self.companion.parameters() if p.requires_grad))

    def _prepare_co_distill(self, task: party_pb2.CoDistillTask):
        import math

        from cotune.lm.lora import LoraMismatchError, lora_from_bytes, validate_lora_state_dict

        companion = self._target_model("companion")
        maps = self._cross_tokenizer_maps(task)
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
            from cotune.algorithms.fedcollm.losses import co_distill, encode_public
            from cotune.lm.lora import load_lora_state_dict, lora_state_dict, lora_to_bytes

            load_lora_state_dict(companion, state)
            received = hashlib.sha256(self.lora_bytes(companion)).hexdigest()
            batch_size = task.batch_size or self.cfg.training.batch_size
            self.trainer.set_lr(task.lr or self.cfg.training.lr)
            self.companion_trainer.set_lr(task.slm_lr or task.lr or self.cfg.training.lr)
            pairs = encode_public(self.trainer, examples, max_length)
            common = dict(lam=task.lam if task.lam else 1.0, epochs=task.epochs or 1, batch_size=batch_size,
                          seed=self.cfg.training.seed, progress=self._progress(ctx, "co-distill"),
                          should_stop=ctx.cancelled)
            if maps is None:
                m = co_distill(self.trainer, self.companion_trainer, pairs, **common)
            else:
                from cotune.algorithms.fedcollm.losses_cross import co_distill_cross

                g_pairs = encode_public(self.companion_trainer, examples, max_length)
                m = co_distill_cross(self.trainer, self.companion_trainer, pairs, g_pairs, f2g=maps[0], g2f=maps[1],
                                     top_k=task.top_k or 32, **common)
            # float32 on the wire whatever the server's dtype, so a client's copy hashes like the server's
            out = lora_to_bytes({k: v.float() for k, v in lora_state_dict(companion).items()})
            blob = self.store.put_bytes(out, MEDIA_ADAPTER)
            metrics = {f"codistill_{k}": float(v) for k, v in m.items()}
            return OpResult(metrics=metrics, blobs={"slm_adapter": blob},
                            info={"lora_hash": blob.sha256, "received_lora_hash": received,
                                  "llm_lora_hash": hashlib.sha256(self.lora_bytes()).hexdigest()})
        return work

    def _cross_tokenizer_maps(self, task: party_pb2.CoDistillTask):
        """None with one tokenizer; else the (LLM → SLM, SLM → LLM) VocabMaps the task carries, checked against both
        tokenizers."""
        from cotune.align.vocabmap import VocabMap

        if self.companion_tokenizer_hash == self.tokenizer_hash:
            return None
        if not (task.HasField("llm_to_slm_map") and task.HasField("slm_to_llm_map")):
            raise InvalidInput(f"party {self.cfg.party_id}: the companion SLM's tokenizer ({self.companion_tokenizer_hash[:12]}…) "
                               f"differs from the LLM's ({self.tokenizer_hash[:12]}…); co-distillation across tokenizers "
                               "needs llm_to_slm_map and slm_to_llm_map (run spec align_tokenizers)")
        if task.top_k < 0 or task.top_k > 1024:
            raise InvalidInput(f"top_k must be in 0..1024 (0 = 32), got {task.top_k}")
        maps = []
        for field, src, dst in (("llm_to_slm_map", self.tokenizer_hash, self.companion_tokenizer_hash),
                                ("slm_to_llm_map", self.companion_tokenizer_hash, self.tokenizer_hash)):
            try:
                vmap = VocabMap.from_bytes(self._read_blob(getattr(task, field), field))
            except ValueError as exc:
                raise InvalidInput(f"{field}: {exc}") from exc
            if (vmap.src_hash, vmap.dst_hash) != (src, dst):
                raise InvalidInput(f"{field} maps {vmap.src_hash[:12]}… → {vmap.dst_hash[:12]}…, expected "
                                   f"{src[:12]}… → {dst[:12]}…")
            maps.append(vmap)
        return tuple(maps)
