"""FedMKT's tasks, served by both roles: a party's top-k logits on the public set, and selective
distillation from other parties' logits (DualMinCE targets, cotune.algorithms.fedmkt.selection).

Handlers `(party, task, ctx) -> work` over a cotune.party.base.ModelParty.
"""

from __future__ import annotations

import numpy as np

from cotune.errors import InvalidInput
from cotune.profile import phase
from cotune.rpc.operations import OpResult
from cotune.v1 import party_pb2
from cotune.wire.media import MEDIA_SHARD


def public_logits(party, task: party_pb2.PublicLogitsTask, ctx: party_pb2.RunContext):
    """The party's top-k next-token log-probabilities on the public set, as a logits shard."""
    party.top_k(task.top_k)
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


def _teacher(party, t: party_pb2.TeacherShard, index: int, n_examples: int, *, projection: str = "mined",
             skip_span_mismatch: bool = False):
    """One TeacherShard read and checked against this party's public set, tokenizer and vocabulary; across
    tokenizers, projected through the vocab map's `projection` table, at every aligned position or (with
    `skip_span_mismatch`) only where both next tokens cover the same text."""
    from cotune.algorithms.fedmkt.selection import TeacherView
    from cotune.algorithms.fedmkt.shards import check_public_set, read_shard
    from cotune.align.seqalign import SequenceAlignment
    from cotune.align.vocabmap import VocabMap

    where = f"shard from {t.sender_id or '?'}"
    if not t.HasField("shard"):
        raise InvalidInput(f"teacher {index} ({t.sender_id or '?'}) names no shard")
    if t.HasField("vocab_map") != t.HasField("sequence_alignment"):
        raise InvalidInput(f"{where}: vocab_map and sequence_alignment come together (both set across tokenizers, "
                           "neither within one)")
    vm = align = table = None
    if t.HasField("vocab_map"):
        vm = party.parse_blob(t.vocab_map, f"vocab map for {where}", VocabMap.from_bytes)
        if vm.dst_hash != party.tokenizer_hash:
            raise InvalidInput(f"vocab map for {where} targets tokenizer {vm.dst_hash[:16]}…, not this party's "
                               f"{party.tokenizer_hash[:16]}…")
    # across tokenizers the shard must be the map's sender's: its tokenizer, a vocabulary the map covers exactly
    samples, _, sender_vocab = read_shard(party.read_blob(t.shard, where), where=where, n_samples=n_examples,
                                          public_set_hash=party.public_hash,
                                          tokenizer_hash=vm.src_hash if vm else party.tokenizer_hash)
    if vm is not None:
        try:
            vm.check_sizes(sender_vocab, party.vocab_size)
        except ValueError as exc:
            raise InvalidInput(f"vocab map for {where}: {exc}") from exc
        what = f"sequence alignment for {where}"
        align = party.parse_blob(t.sequence_alignment, what, SequenceAlignment.from_bytes)
        check_public_set(what, align.public_set_hash, party.public_hash)
        if (align.src_hash, align.dst_hash) != (vm.src_hash, vm.dst_hash):
            raise InvalidInput(f"{what} aligns tokenizers {align.src_hash[:12]}… → {align.dst_hash[:12]}…, its vocab "
                               f"map {vm.src_hash[:12]}… → {vm.dst_hash[:12]}…")
        if align.num_samples < n_examples:
            raise InvalidInput(f"{what} covers {align.num_samples} samples, fewer than {n_examples}")
        if align.same_span is None:  # positions from before passage truncation (and the DTW fix): may not match ours
            raise InvalidInput(f"{what} was built by an older alignment service (it has no same-span flags, and its "
                               "positions predate the current encode_pair truncation); rebuild it")
        try:
            table = vm.table(projection)
        except ValueError as exc:
            raise InvalidInput(f"vocab map for {where}: {exc}") from exc
    else:
        for s in samples:
            if s.ids.size and int(s.ids.max()) >= party.vocab_size:
                raise InvalidInput(f"{where} has token id {int(s.ids.max())} beyond this model's vocabulary "
                                   f"({party.vocab_size})")
    return TeacherView(t.sender_id or f"teacher{index}", samples, table, align,
                       same_span_only=skip_span_mismatch)


def distill(party, task: party_pb2.DistillTask, ctx: party_pb2.RunContext):
    """λ·CE + (1 − λ)·KD on the public set, KD towards the teacher each sample's selection picks."""
    from cotune.algorithms.fedmkt.selection import SELECTIONS

    from cotune.align.vocabmap import PROJECTIONS

    if task.selection not in SELECTIONS:
        raise InvalidInput(f"selection must be one of {', '.join(SELECTIONS)}, got {task.selection!r:.40}")
    projection = task.projection or "mined"
    if projection not in PROJECTIONS:
        raise InvalidInput(f"projection must be one of {', '.join(PROJECTIONS)}, got {task.projection!r:.40}")
    if not task.teachers:
        raise InvalidInput("distill needs at least one teacher shard")
    party.weight(task.ce_weight, "ce_weight (0 = pure KD)", hi=1.0)
    epochs = party.epochs(task.epochs)
    lr, batch_size = party.lr(task), party.batch_size(task)
    examples = party.samples(party.public, task.max_samples)
    max_length = party.max_length(task)
    teachers = [_teacher(party, t, i, len(examples), projection=projection, skip_span_mismatch=task.skip_span_mismatch)
                for i, t in enumerate(task.teachers)]
    selection, ce_weight = task.selection, float(task.ce_weight)

    def work(op):
        from cotune.algorithms.fedmkt.selection import build_targets
        from cotune.lm.logits import public_topk_and_gold

        trainer = party.trainer
        op.progress(0, len(examples), "own-loss")
        k = max(s.ids.shape[1] for t in teachers for s in t.samples[:1]) if selection == "fate_self" else 1
        own, gold = public_topk_and_gold(party.model, party.tokenizer, examples, k=k, batch_size=batch_size,
                                         max_length=max_length, progress=party.progress(op, "own-loss"))
        targets, summary = build_targets(own, gold, teachers, vocab_size=party.vocab_size, selection=selection)
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
