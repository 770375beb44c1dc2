"""What a FedMKT logits shard must be before anyone uses it, checked alike by the coordinator (as soon as a party
returns one, so a bad shard drops its sender instead of failing the receiver's distillation) and by every receiver
(which trusts no one). Torch-free: the coordinator imports it.

A shard names in its metadata the public set it was computed on (public_set_hash), the tokenizer (tokenizer_hash) and
its sender (party_id); its header declares the sender's vocabulary size. The self-reported per-sample losses are
informational only: receivers recompute every teacher's loss from the distribution it sent (fedmkt.selection); a
negative one is still refused here, since no cross-entropy is below zero.
"""

from __future__ import annotations

from cotune.errors import InvalidInput
from cotune.wire.logits_shard import CodecError, decode_shard, shard_vocab_size
from cotune.wire.topk_types import SampleLogits


def check_public_set(what: str, got: str, want: str) -> None:
    """InvalidInput unless `got` (the public-set hash a shard or an alignment carries) is `want`, the run's."""
    if not got:
        raise InvalidInput(f"{what} names no public set (empty or stripped public_set_hash); samples are matched by "
                           f"position, so it cannot be used for public set {want[:12]}…")
    if got != want:
        raise InvalidInput(f"{what} was computed on public set {got[:12]}…, but the run uses {want[:12]}…")


def read_shard(data: bytes, *, where: str, public_set_hash: str, n_samples: int, tokenizer_hash: str,
               vocab_size: int | None = None, party_id: str = "") -> tuple[list[SampleLogits], dict[str, str], int]:
    """(samples, metadata, sender vocabulary size) of shard bytes, refused with InvalidInput (message starting with
    `where`) unless it decodes (finite values, probabilities that sum to at most 1), was computed on `public_set_hash`
    with `tokenizer_hash` (and, when given, by `party_id` over a vocabulary of `vocab_size`), holds `n_samples`
    samples and reports no negative loss."""
    try:
        samples, meta = decode_shard(data, max_samples=n_samples)
        declared = shard_vocab_size(data)
    except CodecError as exc:
        raise InvalidInput(f"{where} cannot be read: {exc}") from exc
    check_public_set(where, meta.get("public_set_hash", ""), public_set_hash)
    got_tok = meta.get("tokenizer_hash", "")
    if got_tok != tokenizer_hash:
        raise InvalidInput(f"{where} was made with tokenizer {got_tok[:12] or '(none named)'}…, expected "
                           f"{tokenizer_hash[:12]}…")
    if party_id and meta.get("party_id", "") != party_id:
        raise InvalidInput(f"{where} names sender {meta.get('party_id', '')!r:.40}, expected {party_id!r}")
    if vocab_size is not None and declared != vocab_size:
        raise InvalidInput(f"{where} declares a vocabulary of {declared} ids, the sender describes {vocab_size}")
    if len(samples) != n_samples:
        raise InvalidInput(f"{where} holds {len(samples)} samples, expected {n_samples} (the public set used in this "
                           "step)")
    for i, s in enumerate(samples):
        if s.loss_bpb < 0:
            raise InvalidInput(f"{where}: sample {i} reports loss_bpb {s.loss_bpb:.6g}, not a loss (bits per byte "
                               "are >= 0)")
    return samples, meta, declared
