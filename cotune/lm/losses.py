"""Losses: sparse top-k KD (gather at the target ids, O(B·L·k) extra memory), its dense reference, CE, full KL.

All functions accept any leading shape: logits [..., V], per-position tensors [...]. Computation is in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _reduce(per_pos: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    per_pos = per_pos * mask.to(per_pos.dtype)
    if reduction == "none":
        return per_pos
    if reduction == "sum":
        return per_pos.sum()
    if reduction == "mean":
        count = mask.sum()
        return per_pos.sum() / count.clamp(min=1).to(per_pos.dtype)
    raise ValueError(f"unknown reduction {reduction!r}: expected 'mean', 'sum' or 'none'")


def sparse_kd_loss(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Soft-target cross-entropy against a sparse top-k teacher distribution.

    loss[pos] = -Σ_j p_j · log_softmax(student/T)[id_j], computed as -Σ_j p_j · (s[id_j]/T - logsumexp(s/T)):
    only the k gathered logits and one logsumexp per position are kept, never a dense [..., V] target.
    Entries with a negative id are padding (their probability is ignored). No T² factor is applied.
    'mean' averages over positions where mask is True (0 when none are).
    """
    if target_ids.shape != target_probs.shape or target_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"shape mismatch: student {tuple(student_logits.shape)}, ids {tuple(target_ids.shape)}, "
            f"probs {tuple(target_probs.shape)}"
        )
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} != {tuple(student_logits.shape[:-1])}")
    logits = student_logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [..., 1]
    valid = target_ids >= 0
    ids = target_ids.clamp(min=0).long()
    picked = torch.gather(logits, -1, ids)  # [..., k]
    probs = target_probs.float() * valid.to(torch.float32)
    per_pos = -(probs * (picked - lse)).sum(-1)
    return _reduce(per_pos, mask, reduction)


def dense_kd_loss(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference implementation of sparse_kd_loss: scatters the target into a dense [..., V] distribution
    (duplicate ids add up). For tests only: memory O(B·L·V)."""
    logits = student_logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    valid = target_ids >= 0
    dense = torch.zeros_like(logits)
    dense.scatter_add_(-1, target_ids.clamp(min=0).long(), target_probs.float() * valid.to(torch.float32))
    per_pos = -(dense * F.log_softmax(logits, dim=-1)).sum(-1)
    return _reduce(per_pos, mask, reduction)


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal LM cross-entropy, HF convention: labels align with input_ids (-100 = ignore) and are shifted here,
    so logits[:, t] predicts labels[:, t+1]. Mean over non-ignored tokens (0 when there are none)."""
    shift_logits = logits[..., :-1, :].float()
    shift_labels = labels[..., 1:]
    flat_labels = shift_labels.reshape(-1)
    n = (flat_labels != IGNORE_INDEX).sum()
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / n.clamp(min=1).to(total.dtype)


def kl_full(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Full-vocabulary KL(p || q) per position, mean over masked positions (FedCoLLM's mutual distillation).
    Both logits must share the vocabulary (same tokenizer)."""
    logp = F.log_softmax(p_logits.float(), dim=-1)
    logq = F.log_softmax(q_logits.float(), dim=-1)
    per_pos = (logp.exp() * (logp - logq)).sum(-1)
    if mask is None:
        mask = torch.ones(per_pos.shape, dtype=torch.bool, device=per_pos.device)
    return _reduce(per_pos, mask, "mean")
