"""FedCoLLM on the LLM server: the companion copy of the clients' SLM and the co-distillation task.

The companion is loaded from `model.companion_slm_path` beside the LLM, on its device and dtype, with the LoRA config
`companion_lora` (which must match the clients' `lora`, so the broadcast adapter fits both), and keeps its own
Trainer (optimizer state persists across rounds). It is attached to the party as state "fedcollm" and addressed by
tasks as target "companion". With one tokenizer the co-distillation is `cotune.algorithms.fedcollm.losses.co_distill`
(full-vocabulary KL); when the companion's tokenizer differs it is
`cotune.algorithms.fedcollm.losses_cross.co_distill_cross`, fed the two MinED maps the CoDistillTask carries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cotune.algorithms.fedcollm.config import KL_DIRECTIONS
from cotune.errors import InvalidInput, Precondition
from cotune.party.base import Target
from cotune.rpc.operations import OpResult
from cotune.v1 import party_pb2
from cotune.wire.media import MEDIA_ADAPTER

log = logging.getLogger(__name__)

STATE = "fedcollm"


@dataclass
class Companion:
    """The LLM server's copy g of the clients' SLM (with LoRA θ) and its own Trainer."""

    model: object
    tokenizer: object
    trainer: object  # cotune.lm.train.Trainer over `model`
    tokenizer_hash: str
    vocab_size: int
    name: str
    initial_lora: dict  # its fresh adapter: where every run starts


# -- per run (cotune.party.runstate): the companion stays loaded; its adapter and optimizer are the run's ------------
def save_companion(companion: Companion, directory: Path) -> None:
    from cotune.lm.lora import lora_state_dict, lora_to_bytes

    (directory / "lora.safetensors").write_bytes(lora_to_bytes(lora_state_dict(companion.model)))
    (directory / "trainer.safetensors").write_bytes(companion.trainer.state_dict_bytes())


def restore_companion(party, directory: Path) -> Companion | None:
    from cotune.lm.lora import load_lora_state_dict, lora_from_bytes

    companion = reset_companion(party)
    if companion is None:
        raise Precondition(f"party {party.cfg.party_id}: a saved run holds a FedCoLLM companion SLM, but this server "
                           "has none configured (model.companion_slm_path)")
    load_lora_state_dict(companion.model, lora_from_bytes((directory / "lora.safetensors").read_bytes()))
    companion.trainer.load_state_bytes((directory / "trainer.safetensors").read_bytes())
    return companion


def reset_companion(party) -> Companion | None:
    """The companion with its fresh adapter and a fresh optimizer (None when this server has none)."""
    from cotune.lm.lora import load_lora_state_dict

    companion = companion_of(party)
    if companion is None:
        return None
    load_lora_state_dict(companion.model, companion.initial_lora)
    companion.trainer = party.new_trainer(companion.model, companion.tokenizer)
    return companion


def companion_of(party) -> Companion | None:
    return party.state_for(STATE)


def load_companion(party) -> Companion:
    """Load `model.companion_slm_path` beside the party's model and attach it (the LLM server's setup, when
    configured)."""
    import hashlib

    from cotune.align.tokenizers import tokenizer_bundle_bytes
    from cotune.lm.lora import attach_lora, lora_state_dict
    from cotune.lm.model import load_causal_lm

    mc, lc = party.cfg.model, party.cfg.companion_lora
    model, tokenizer = load_causal_lm(mc.companion_slm_path, cache_dir=party.model_cache, device=party.device,
                                      dtype=mc.dtype)
    model = attach_lora(model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, seed=lc.seed)
    trainer = party.new_trainer(model, tokenizer)
    companion = Companion(model=model, tokenizer=tokenizer, trainer=trainer,
                          tokenizer_hash=hashlib.sha256(tokenizer_bundle_bytes(tokenizer)).hexdigest(),
                          vocab_size=int(model.get_output_embeddings().weight.shape[0]),
                          name=mc.companion_slm_name or Path(mc.companion_slm_path).name,
                          initial_lora=lora_state_dict(model))
    party.set_state(STATE, companion)
    if companion.tokenizer_hash != party.tokenizer_hash:
        log.info("%s: companion SLM %s uses another tokenizer than the LLM; co-distillation needs MinED maps "
                 "(run spec align_tokenizers)", party.cfg.party_id, mc.companion_slm_path)
    log.info("%s: companion SLM %s loaded (vocab %d)", party.cfg.party_id, mc.companion_slm_path, companion.vocab_size)
    return companion


def describe_companion(party) -> party_pb2.CompanionInfo | None:
    comp = companion_of(party)
    if comp is None:
        return None
    return party_pb2.CompanionInfo(
        model_name=comp.name, tokenizer_hash=comp.tokenizer_hash, vocab_size=comp.vocab_size,
        lora_hash=party.lora_hash(comp.model), lora_layout_hash=party.lora_layout_hash(comp.model),
        trainable_params=party.trainable_params(comp.model))


def _require(party) -> Companion:
    comp = companion_of(party)
    if comp is None:
        raise Precondition(f"party {party.cfg.party_id} holds no companion SLM; FedCoLLM needs one on the LLM server "
                           "(set model.companion_slm_path in its config)")
    return comp


def companion_target(party) -> Target:
    """Target "companion"."""
    comp = _require(party)
    return Target(comp.model, comp.tokenizer)


def co_distill(party, task: party_pb2.CoDistillTask, ctx: party_pb2.RunContext):
    """Load the aggregated SLM adapter into the companion, then alternate θ and ω updates on the public set."""
    from cotune.lm.lora import LoraMismatchError, lora_from_bytes, validate_lora_state_dict

    comp = _require(party)
    party.weight(task.kl_weight, "kl_weight (λ; 0 = CE only)")
    epochs = party.epochs(task.epochs)
    lr = party.lr(task)
    slm_lr = party.lr(task, "slm_lr", default=lr)
    batch_size = party.batch_size(task)
    max_length = party.max_length(task)
    maps = _cross_tokenizer_maps(party, comp, task)
    if not task.HasField("slm_adapter"):
        raise InvalidInput("co_distill needs slm_adapter (the aggregated SLM LoRA)")
    examples = party.samples(party.public, task.max_samples)
    state = party.parse_blob(task.slm_adapter, "slm_adapter", lora_from_bytes)
    try:
        validate_lora_state_dict(comp.model, state)
    except LoraMismatchError as exc:
        raise InvalidInput(f"slm_adapter does not fit the companion SLM: {exc}") from exc
    lam = float(task.kl_weight)
    direction = task.kl_direction or "forward"
    if direction not in KL_DIRECTIONS:
        raise InvalidInput(f"kl_direction must be one of {', '.join(KL_DIRECTIONS)}, got {task.kl_direction!r:.40}")

    def work(op):
        from cotune.algorithms.fedcollm.losses import co_distill as run_co_distill
        from cotune.algorithms.fedcollm.losses import encode_public
        from cotune.lm.lora import load_lora_state_dict, lora_state_dict, lora_to_bytes

        load_lora_state_dict(comp.model, state)
        received = party.lora_hash(comp.model)
        party.trainer.set_lr(lr)
        comp.trainer.set_lr(slm_lr)
        pairs = encode_public(party.trainer, examples, max_length)
        common = dict(lam=lam, epochs=epochs, batch_size=batch_size, seed=party.cfg.training.seed,
                      direction=direction, progress=party.progress(op, "co-distill"), should_stop=op.cancelled)
        if maps is None:
            m = run_co_distill(party.trainer, comp.trainer, pairs, **common)
        else:
            from cotune.algorithms.fedcollm.losses_cross import co_distill_cross

            g_pairs = encode_public(comp.trainer, examples, max_length)
            m = co_distill_cross(party.trainer, comp.trainer, pairs, g_pairs, f2g=maps[0], g2f=maps[1],
                                 top_k=task.top_k, **common)
        # float32 on the wire whatever the server's dtype, so a client's copy hashes like the server's
        out = lora_to_bytes({k: v.float() for k, v in lora_state_dict(comp.model).items()})
        blob = party.store.put_bytes(out, MEDIA_ADAPTER)
        llm_hash = party.lora_hash()
        metrics = {f"codistill_{k}": float(v) for k, v in m.items()}
        return OpResult(metrics=metrics,
                        result=party_pb2.CoDistillResult(
                            slm_adapter=blob.ref(), received_lora_hash=received, llm_lora_hash=llm_hash,
                            llm_kl_before=m["llm_kl_before"], llm_kl_after=m["llm_kl_after"]))  # its KD term
    return work


def _cross_tokenizer_maps(party, comp: Companion, task: party_pb2.CoDistillTask):
    """None with one tokenizer; else the (LLM → SLM, SLM → LLM) VocabMaps the task carries, checked against both
    tokenizers."""
    from cotune.align.vocabmap import VocabMap

    if comp.tokenizer_hash == party.tokenizer_hash:
        return None
    if not (task.HasField("llm_to_slm_map") and task.HasField("slm_to_llm_map")):
        raise InvalidInput(f"party {party.cfg.party_id}: the companion SLM's tokenizer ({comp.tokenizer_hash[:12]}…) "
                           f"differs from the LLM's ({party.tokenizer_hash[:12]}…); co-distillation across tokenizers "
                           "needs llm_to_slm_map and slm_to_llm_map (run spec align_tokenizers)")
    party.top_k(task.top_k, "top_k (across tokenizers)")
    maps = []
    llm, slm = (party.tokenizer_hash, party.vocab_size), (comp.tokenizer_hash, comp.vocab_size)
    for field, (src, src_vocab), (dst, dst_vocab) in (("llm_to_slm_map", llm, slm), ("slm_to_llm_map", slm, llm)):
        vmap = party.parse_blob(getattr(task, field), field, VocabMap.from_bytes)
        if (vmap.src_hash, vmap.dst_hash) != (src, dst):
            raise InvalidInput(f"{field} maps {vmap.src_hash[:12]}… → {vmap.dst_hash[:12]}…, expected "
                               f"{src[:12]}… → {dst[:12]}…")
        try:
            vmap.check_sizes(src_vocab, dst_vocab)
        except ValueError as exc:
            raise InvalidInput(f"{field}: {exc}") from exc
        maps.append(vmap)
    return tuple(maps)
