"""Turning received top-k shards into per-sample distillation targets in the receiver's own tokenization.

This is the receiver's half of FedMKT: project each sender's logits into the receiver's
vocabulary along the precomputed sequence alignment, then choose per sample which sender (if any) teaches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cotune.lm.train import KDTarget
from cotune.wire.topk_types import SampleLogits

SELECTIONS = ("dualmince", "fate_self")


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


@dataclass
class TeacherView:
    """One sender's shard, ready to be read in the receiver's vocabulary and positions.

    vocab_map: int32 [sender vocab] -> receiver id, or None when both share a tokenizer.
    alignment: per sample (sender positions, receiver positions), or None when both share a tokenizer.
    """

    sender_id: str
    samples: Sequence[SampleLogits]
    vocab_map: np.ndarray | None = None
    alignment: object | None = None  # cotune.align.seqalign.SequenceAlignment

    @property
    def losses(self) -> np.ndarray:
        return np.array([s.loss_bpb for s in self.samples], dtype=np.float64)

    def target(self, i: int) -> KDTarget | None:
        """Sample i's KD target in the receiver's tokenization, or None when no position aligns."""
        from cotune.align.projection import project_topk

        sample = self.samples[i]
        probs = np.exp(sample.logprobs.astype(np.float32))
        if self.alignment is None:
            positions, ids = sample.positions, sample.ids.astype(np.int64)
            probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
        else:
            src_pos, dst_pos = self.alignment.pairs(i)
            rows = np.searchsorted(sample.positions, src_pos)
            rows = np.clip(rows, 0, max(len(sample.positions) - 1, 0))
            hit = (len(sample.positions) > 0) & (sample.positions[rows] == src_pos) if len(src_pos) else np.zeros(0, bool)
            rows, positions = rows[hit], np.asarray(dst_pos)[hit]
            if self.vocab_map is None:
                ids = sample.ids[rows].astype(np.int64)
                p = probs[rows]
                probs = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
            else:
                ids, probs, _ = project_topk(sample.ids[rows], probs[rows], self.vocab_map)
        if len(positions) == 0:
            return None
        return KDTarget(positions=np.asarray(positions, dtype=np.int64), ids=np.asarray(ids, dtype=np.int64),
                        probs=np.asarray(probs, dtype=np.float32))


def build_targets(own: Sequence[SampleLogits], teachers: Sequence[TeacherView], *, selection: str = "dualmince"):
    """KD targets for every public sample plus a summary of who taught what.

    `own` are the receiver's current top-k on the public set (their loss_bpb drives the selection; with
    fate_self their distributions are the self-distillation fallback)."""
    n = len(own)
    for t in teachers:
        if len(t.samples) != n:
            raise ValueError(f"sender {t.sender_id} sent {len(t.samples)} samples; the public set has {n}. "
                             "Parties must hold the same public set (compare public_set_hash).")
    own_loss = np.array([s.loss_bpb for s in own], dtype=np.float64)
    teacher_losses = np.stack([t.losses for t in teachers]) if teachers else np.zeros((0, n))
    choice = select_teachers(own_loss, teacher_losses, selection=selection)
    self_view = TeacherView("self", own)
    targets: list[KDTarget | None] = []
    for i, c in enumerate(choice):
        if c >= 0:
            targets.append(teachers[c].target(i))
        elif c == -2:
            targets.append(self_view.target(i))
        else:
            targets.append(None)
    summary = {f"kd_from_{t.sender_id}": float(np.sum(choice == j)) for j, t in enumerate(teachers)}
    summary["kd_none"] = float(np.sum(choice == -1))
    summary["kd_self"] = float(np.sum(choice == -2))
    summary["kd_targets"] = float(sum(t is not None for t in targets))
    return targets, summary
