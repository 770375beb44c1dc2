"""Turning received top-k shards into per-sample distillation targets in the receiver's own tokenization.

This is the receiver's half of FedMKT: project each sender's logits into the receiver's vocabulary along the
precomputed sequence alignment, then choose per sample which sender (if any) teaches.

Selection believes nothing a sender says about itself. DualMinCE compares losses, and every teacher's loss is
recomputed here from the distribution it sent, at the receiver's own gold targets (`GoldTargets`: the public
sample's response tokens in the receiver's tokenization, with the receiver's own loss at each), see `teacher_loss`.
The loss_bpb a shard reports (even -1e300) selects nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cotune.lm.logits import GoldTargets, bits_per_byte
from cotune.lm.train import KDTarget
from cotune.wire.topk_types import SampleLogits

SELECTIONS = ("dualmince", "fate_self")
# The smallest probability a teacher is credited with at a position: one that gave the gold token nothing is charged
# -ln(1e-30) ≈ 69 nats there (far above any real model's loss), not an infinity that would swamp every other position.
P_FLOOR = 1e-30


def select_teachers(own_loss: np.ndarray, teacher_losses: np.ndarray, *, selection: str = "dualmince") -> np.ndarray:
    """Per sample, the index of the teaching sender, or -1 for no KD (or -2: self-distil, fate_self only).

    dualmince (paper Alg. 2): the sender with the smallest loss teaches sample i only if its loss is smaller
    than the receiver's own; otherwise sample i gets no KD term.
    fate_self (FATE-LLM): same choice, but when no sender beats the receiver it distils from itself.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
    own_loss = np.asarray(own_loss, dtype=np.float64)
    teacher_losses = np.asarray(teacher_losses, dtype=np.float64).reshape(-1, own_loss.shape[0])
    if teacher_losses.shape[0] == 0:
        return np.full(own_loss.shape[0], -1 if selection == "dualmince" else -2, dtype=np.int64)
    best = np.argmin(teacher_losses, axis=0)
    best_loss = teacher_losses[best, np.arange(own_loss.shape[0])]
    fallback = -1 if selection == "dualmince" else -2
    return np.where(best_loss < own_loss, best, fallback).astype(np.int64)


def credited_nll(ids: np.ndarray, probs: np.ndarray, missing: np.ndarray, gold: np.ndarray,
                 vocab_size: int) -> np.ndarray:
    """Per row, -ln of the probability a teacher's row credits the gold token with (nats, float64 [m]).

    ids int [m, k]: receiver ids; probs float [m, k]: the teacher's full-softmax probabilities of those ids as sent
    (not renormalised over the top-k; 0 = padding); missing [m]: the mass it did not send (1 − Σ top-k);
    gold int [m].

    Gold among the row's ids: its probability. Gold outside: all the row says is that gold shares the missing mass
    with the V − k ids it did not send, so it is credited min(missing / (V − k), smallest probability sent). The
    smallest sent probability is an upper bound on any unsent id's (the top-k property), so the credit never exceeds
    what the teacher could possibly have given gold; the uniform share tightens it so that withholding information
    never pays: a row that leaves gold out earns at best what a model knowing nothing earns (≈ ln V nats), and
    confidently wrong rows (little missing mass) earn far less. A teacher therefore scores well only by putting mass
    on the gold tokens inside the top-k it sent, which is exactly what the receiver distils. V is the receiver's
    vocabulary size (its own, never a sender's claim). Credits are floored at P_FLOOR.
    """
    ids = np.asarray(ids)
    probs = np.asarray(probs, dtype=np.float64)
    gold = np.asarray(gold).reshape(-1, 1)
    sent = probs > 0
    hit = sent & (ids == gold)
    k = sent.sum(axis=1)
    smallest = np.where(sent, probs, np.inf).min(axis=1) if probs.shape[1] else np.full(len(probs), np.inf)
    bound = np.minimum(smallest, np.asarray(missing, dtype=np.float64) / np.maximum(vocab_size - k, 1))
    credit = np.where(hit.any(axis=1), np.where(hit, probs, 0.0).sum(axis=1), bound)
    return -np.log(np.maximum(credit, P_FLOOR))


@dataclass
class TeacherView:
    """One sender's shard, ready to be read in the receiver's vocabulary and positions.

    vocab_map: int32 [sender vocab] -> receiver id (a VocabMap's table for the run's projection), or None when both
        share a tokenizer.
    alignment: per sample (sender positions, receiver positions), or None when both share a tokenizer.
    same_span_only: read only the aligned pairs whose next tokens cover the same text (the skip_span_mismatch option).
    """

    sender_id: str
    samples: Sequence[SampleLogits]
    vocab_map: np.ndarray | None = None
    alignment: object | None = None  # cotune.align.seqalign.SequenceAlignment
    same_span_only: bool = False

    def rows(self, i: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Sample i's distributions at the receiver's target `positions` (sorted, unique): (index into `positions`
        [m], receiver ids int64 [m, k], probabilities float64 [m, k] as sent, missing mass float64 [m]). Rows at any
        other receiver position are left out (scored and distilled alike); where an alignment repeats a receiver
        position, its first pair counts."""
        from cotune.align.projection import project_topk

        sample = self.samples[i]
        have = np.asarray(sample.positions, dtype=np.int64)
        if self.alignment is None:
            src_rows, dst = np.arange(len(have)), have
        else:
            src_pos, dst_pos = (self.alignment.pairs(i, same_span_only=True) if self.same_span_only
                                else self.alignment.pairs(i))
            src_pos = np.asarray(src_pos, dtype=np.int64)
            rows = np.clip(np.searchsorted(have, src_pos), 0, max(len(have) - 1, 0))
            hit = have[rows] == src_pos if len(have) else np.zeros(len(src_pos), dtype=bool)
            src_rows, dst = rows[hit], np.asarray(dst_pos, dtype=np.int64)[hit]
        dst, first = np.unique(dst, return_index=True)
        _, at, keep = np.intersect1d(np.asarray(positions, dtype=np.int64), dst, assume_unique=True,
                                     return_indices=True)
        src_rows = src_rows[first[keep]]
        ids = sample.ids[src_rows]
        probs = np.exp(sample.logprobs[src_rows].astype(np.float64))
        missing = np.clip(1.0 - probs.sum(axis=1), 0.0, 1.0)
        if self.vocab_map is not None:
            ids, projected, _ = project_topk(ids, probs, self.vocab_map)  # merged ids, renormalised over the top-k
            probs = projected.astype(np.float64) * (1.0 - missing)[:, None]
        return at, np.asarray(ids, dtype=np.int64), probs, missing

    def loss(self, i: int, gold: GoldTargets, vocab_size: int) -> float:
        """This teacher's loss on sample i in bits per byte of the receiver's tokenization, recomputed from what it
        sent: at each of the receiver's target positions the teacher's credited NLL of the gold token
        (`credited_nll`); where it sent nothing (no aligned position), the receiver's own NLL, so silence neither
        helps nor hurts. It beats the receiver exactly when its sent positions predict the gold tokens better."""
        at, ids, probs, missing = self.rows(i, gold.positions)
        nll = np.array(gold.nll, dtype=np.float64)
        if len(at):
            nll[at] = credited_nll(ids, probs, missing, np.asarray(gold.ids)[at], vocab_size)
        return bits_per_byte(float(nll.sum()), gold.response_bytes, len(gold.positions))

    def target(self, i: int, positions: np.ndarray) -> KDTarget | None:
        """Sample i's KD target at the receiver's target `positions`, or None when none of them aligns."""
        at, ids, probs, _ = self.rows(i, positions)
        if len(at) == 0:
            return None
        probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
        return KDTarget(positions=np.asarray(positions, dtype=np.int64)[at], ids=ids, probs=probs.astype(np.float32))


def build_targets(own: Sequence[SampleLogits], gold: Sequence[GoldTargets], teachers: Sequence[TeacherView], *,
                  vocab_size: int, selection: str = "dualmince"):
    """KD targets for every public sample plus a summary of who taught what.

    `own` are the receiver's current top-k on the public set (with fate_self their distributions are the
    self-distillation fallback), `gold` its GoldTargets (same forward pass) and `vocab_size` its vocabulary: every
    loss compared, its own and each teacher's, is computed here from them."""
    n = len(own)
    if len(gold) != n:
        raise ValueError(f"{len(gold)} gold targets for {n} samples")
    for t in teachers:
        if len(t.samples) != n:
            raise ValueError(f"sender {t.sender_id} sent {len(t.samples)} samples; the public set has {n}. "
                             "Parties must hold the same public set (compare public_set_hash).")
    own_loss = np.array([bits_per_byte(float(np.sum(g.nll)), g.response_bytes, len(g.positions)) for g in gold])
    teacher_losses = (np.array([[t.loss(i, gold[i], vocab_size) for i in range(n)] for t in teachers])
                      if teachers else np.zeros((0, n)))
    choice = select_teachers(own_loss, teacher_losses, selection=selection)
    self_view = TeacherView("self", own)
    targets: list[KDTarget | None] = []
    for i, c in enumerate(choice):
        if c >= 0:
            targets.append(teachers[c].target(i, gold[i].positions))
        elif c == -2:
            targets.append(self_view.target(i, gold[i].positions))
        else:
            targets.append(None)
    summary = {f"kd_from_{t.sender_id}": float(np.sum(choice == j)) for j, t in enumerate(teachers)}
    for j, t in enumerate(teachers):  # the loss selection measured (not the one the shard claims), for the record
        finite = teacher_losses[j][np.isfinite(teacher_losses[j])]
        if finite.size:
            summary[f"teacher_bpb_{t.sender_id}"] = float(finite.mean())
    summary["kd_none"] = float(np.sum(choice == -1))
    summary["kd_self"] = float(np.sum(choice == -2))
    summary["kd_targets"] = float(sum(t is not None for t in targets))
    return targets, summary
