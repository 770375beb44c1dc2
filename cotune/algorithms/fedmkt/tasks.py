"""FedMKT's tasks, served by both roles: a party's top-k logits on the public set, and selective
distillation from other parties' logits (DualMinCE targets, cotune.algorithms.fedmkt.selection).

Handlers `(party, task, ctx) -> work` over a cotune.party.base.ModelParty.
"""

from __future__ import annotations

import math

import numpy as np

from cotune.errors import InvalidInput, Precondition
from cotune.rpc.operations import OpResult
from cotune.profile import phase
from cotune.tasks import MAX_TOP_K
from cotune.v1 import party_pb2
from cotune.wire.media import MEDIA_SHARD



def public_logits(party, task: party_pb2.PublicLogitsTask, ctx: party_pb2.RunContext):
    """The party's top-k next-token log-probabilities on the public set, as a logits shard."""
    if not 1 <= task.top_k <= MAX_TOP_K:
        raise InvalidInput(f"top_k must be in 1..{MAX_TOP_K}, got {task.top_k}")
    if task.bits and not 2 <= task.bits <= 16:
        raise InvalidInput(f"bits must be 0 (lossless) or 2..16, got {task.bits}")
    examples = party.samples(party.public, task.max_samples)
    max_length = party.max_length(task)

    def work(op):
        from cotune.lm.logits import public_topk
        from cotune.wire.logits_shard import encode_shard

        samples = public_topk(party.model, party.tokenizer, examples, k=task.top_k,
                              batch_size=party.trainer.config.batch_size, max_length=max_length,
                              progress=party.progress(op, "logits"))
        meta = {"party_id": party.cfg.party_id, "tokenizer_hash": party.tokenizer_hash,
                "public_set_hash": party.public_hash}
        with phase("codec"):
            data = encode_shard(samples, vocab_size=party.vocab_size, metadata=meta, bits=task.bits or 8,
                                lossless=task.bits == 0)
        blob = party.store.put_bytes(data, MEDIA_SHARD)
        positions = sum(len(s.positions) for s in samples)
        loss_bpb = float(np.mean([s.loss_bpb for s in samples]))
        return OpResult(metrics={"public_loss_bpb": loss_bpb, "shard_bytes": len(data), "shard_positions": positions,
                                 "bytes_per_position": len(data) / max(positions, 1)},
                        result=party_pb2.PublicLogitsResult(shard=blob.ref(), public_loss_bpb=loss_bpb))
    return work


def _teacher(party, t: party_pb2.TeacherShard, index: int, n_examples: int):
    """One TeacherShard read and checked against this party's public set, tokenizer and vocabulary."""
    from cotune.algorithms.fedmkt.selection import TeacherView
    from cotune.align.seqalign import SequenceAlignment
    from cotune.align.vocabmap import VocabMap
    from cotune.wire.logits_shard import decode_shard

    where = f"shard from {t.sender_id or '?'}"
    if not t.HasField("shard"):
        raise InvalidInput(f"teacher {index} ({t.sender_id or '?'}) names no shard")
    samples, meta = party.parse_blob(t.shard, where, lambda b: decode_shard(b, max_samples=len(party.public)))
    if len(samples) != n_examples:
        raise InvalidInput(f"{where} holds {len(samples)} samples, expected {n_examples} (the public set used in this step)")
    if meta.get("public_set_hash", party.public_hash) != party.public_hash:
        raise Precondition(f"{where} was computed on public set {meta['public_set_hash'][:16]}…, this party holds "
                           f"{party.public_hash[:16]}…")
    if t.HasField("vocab_map") != t.HasField("sequence_alignment"):
        raise InvalidInput(f"{where}: vocab_map and sequence_alignment come together (both set across tokenizers, "
                           "neither within one)")
    vmap = align = None
    if t.HasField("vocab_map"):
        vm = party.parse_blob(t.vocab_map, f"vocab map for {where}", VocabMap.from_bytes)
        if vm.dst_hash != party.tokenizer_hash:
            raise InvalidInput(f"vocab map for {where} targets tokenizer {vm.dst_hash[:16]}…, not this party's "
                               f"{party.tokenizer_hash[:16]}…")
        if meta.get("tokenizer_hash") and vm.src_hash != meta["tokenizer_hash"]:
            raise InvalidInput(f"vocab map for {where} starts from tokenizer {vm.src_hash[:16]}…, but the shard was "
                               f"made with {meta['tokenizer_hash'][:16]}…")
        if int(vm.ids.max(initial=0)) >= party.vocab_size:
            raise InvalidInput(f"vocab map for {where} maps to id {int(vm.ids.max())}, beyond this model's vocabulary "
                               f"({party.vocab_size})")
        align = party.parse_blob(t.sequence_alignment, f"sequence alignment for {where}", SequenceAlignment.from_bytes)
        if len(align.sample_offsets) - 1 < n_examples:
            raise InvalidInput(f"sequence alignment for {where} covers {len(align.sample_offsets) - 1} samples, fewer "
                               f"than {n_examples}")
        vmap = vm.ids
    else:
        if meta.get("tokenizer_hash") and meta["tokenizer_hash"] != party.tokenizer_hash:
            raise InvalidInput(f"{where} uses another tokenizer ({meta['tokenizer_hash'][:16]}…); send vocab_map and "
                               "sequence_alignment with it")
        for s in samples:
            if s.ids.size and int(s.ids.max()) >= party.vocab_size:
                raise InvalidInput(f"{where} has token id {int(s.ids.max())} beyond this model's vocabulary "
                                   f"({party.vocab_size})")
    return TeacherView(t.sender_id or f"teacher{index}", samples, vmap, align)


def distill(party, task: party_pb2.DistillTask, ctx: party_pb2.RunContext):
    """λ·CE + (1 − λ)·KD on the public set, KD towards the teacher each sample's selection picks."""
    from cotune.algorithms.fedmkt.selection import SELECTIONS

    if task.selection not in SELECTIONS:
        raise InvalidInput(f"selection must be one of {', '.join(SELECTIONS)}, got {task.selection!r:.40}")
    if not task.teachers:
        raise InvalidInput("distill needs at least one teacher shard")
    if not (math.isfinite(task.ce_weight) and 0.0 <= task.ce_weight <= 1.0):
        raise InvalidInput(f"ce_weight must be in [0, 1] (0 = pure KD), got {task.ce_weight}")
    epochs = party.epochs(task.epochs)
    lr, batch_size = party.lr(task), party.batch_size(task)
    examples = party.samples(party.public, task.max_samples)
    max_length = party.max_length(task)
    teachers = [_teacher(party, t, i, len(examples)) for i, t in enumerate(task.teachers)]
    selection, ce_weight = task.selection, float(task.ce_weight)

    def work(op):
        from cotune.algorithms.fedmkt.selection import build_targets
        from cotune.lm.logits import public_topk

        trainer = party.trainer
        op.progress(0, len(examples), "own-loss")
        k = max(s.ids.shape[1] for t in teachers for s in t.samples[:1]) if selection == "fate_self" else 1
        own = public_topk(party.model, party.tokenizer, examples, k=k, batch_size=batch_size, max_length=max_length,
                          progress=party.progress(op, "own-loss"))
        targets, summary = build_targets(own, teachers, selection=selection)
        party.set_training(trainer, lr=lr, batch_size=batch_size)
        # KD positions come from alignments made at the run's length: distil at exactly that length
        m = trainer.distill(examples, targets, ce_weight=ce_weight, epochs=epochs, max_length=max_length,
                            progress=party.progress(op, "distill"), should_stop=op.cancelled)
        metrics = {f"distill_{k}": float(v) for k, v in m.items()}
        metrics.update(summary)
        metrics["own_loss_bpb"] = float(np.mean([s.loss_bpb for s in own]))
        return OpResult(metrics=metrics,
                        result=party_pb2.DistillResult(kd_before=m["kd_before"], kd_after=m["kd_after"]))
    return work
