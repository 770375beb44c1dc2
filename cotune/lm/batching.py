"""Batching of EncodedPairs and the forward pass used by training, top-k extraction and evaluation.

Logits are only ever computed at the positions that are needed (response targets, KD positions): the decoder runs
on the padded batch, its hidden states are gathered at those (row, position) pairs, and only then the LM head is
applied. A 262,144-token vocabulary (Gemma 3) therefore costs [N, V] for N needed positions instead of [B, L, V].
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from cotune.align.tokenizers import EncodedPair
from cotune.profile import phase
from cotune.lm.losses import IGNORE_INDEX


def collate(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (HF convention: labels[t] = ids[t] for response tokens
    t >= response_start, -100 elsewhere, so logits at t-1 predict labels[t]). CPU tensors."""
    if not pairs:
        raise ValueError("collate needs at least one pair")
    width = max(1, max(len(p.ids) for p in pairs))
    n = len(pairs)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, p in enumerate(pairs):
        length = len(p.ids)
        if length == 0:
            continue
        ids = torch.tensor(p.ids, dtype=torch.long)
        input_ids[i, :length] = ids
        attention_mask[i, :length] = 1
        start = max(p.response_start, 1)  # token 0 has no prediction
        if start < length:
            labels[i, start:length] = ids[start:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Inference batching: indices sorted by length (longest first, stable), cut into batches."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def shuffled_batches(lengths: Sequence[int], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Training batching: shuffle, sort by length within windows of 16 batches (little padding, still random),
    cut into batches and shuffle the batch order."""
    n = len(lengths)
    perm = rng.permutation(n).tolist()
    window = batch_size * 16
    batches: list[list[int]] = []
    for w in range(0, n, window):
        chunk = sorted(perm[w : w + window], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches)).tolist()
    return [batches[i] for i in order]


def model_device(model) -> torch.device:
    """Where the model's inputs go: its first parameter's device (a model spread across GPUs: its first layers')."""
    return next(model.parameters()).device


def cuda_indices(model) -> list[int]:
    """The CUDA devices holding the model's parameters (several for a model spread across GPUs), for fork_rng."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _base_causal_lm(model):
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def decoder_and_head(model):
    """(decoder producing final hidden states, LM head module, config) of a causal LM or a PeftModel around one."""
    base = _base_causal_lm(model)
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (not a causal LM?)")
    decoder = None
    with_prefix = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if isinstance(with_prefix, torch.nn.Module) and with_prefix is not base:
        decoder = with_prefix
    elif hasattr(base, "get_decoder"):
        decoder = base.get_decoder()
    if decoder is None or decoder is base:
        raise ValueError(f"cannot find the decoder of {type(base).__name__}")
    return decoder, head, base.config


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, L, H] (after the final norm) of the decoder."""
    decoder, _, _ = decoder_and_head(model)
    with phase("forward"):
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """LM head on hidden states [..., H] -> fp32 logits [..., V], with the model's final soft-capping / scaling; on
    `hidden`'s device (a model spread across GPUs may hold its head on another one)."""
    _, head, config = decoder_and_head(model)
    with phase("forward"):
        logits = head(hidden).float()
    if logits.device != hidden.device:
        logits = logits.to(hidden.device)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(config, "logits_scaling", None)  # Granite divides logits by this
    if scale and scale != 1.0:
        logits = logits / scale
    return logits


def vocab_size(model) -> int:
    _, head, _ = decoder_and_head(model)
    return int(head.weight.shape[0])


def chunk_rows(n: int, vocab: int, budget_bytes: int = 1 << 28) -> Iterator[slice]:
    """Row slices of an [n, vocab] fp32 logits matrix that fit a memory budget (256 MiB by default)."""
    step = max(1, budget_bytes // max(1, vocab * 4 * 3))
    for i in range(0, n, step):
        yield slice(i, min(n, i + step))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def gather_positions(pairs: Sequence[EncodedPair], positions: Sequence[Sequence[int]]):
    """Flatten per-row positions: returns (row index LongTensor [N], position LongTensor [N])."""
    rows, cols = [], []
    for r, pos in enumerate(positions):
        rows.extend([r] * len(pos))
        cols.extend(int(p) for p in pos)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def next_token_scores(model, pairs: Sequence[EncodedPair], pad_id: int, device: torch.device):
    """No-grad helper for scoring: for every pair, the log-prob of each response token given its prefix.

    Returns (list of float64 numpy arrays of per-target log-probs, one per pair in order; the batch hidden states
    are discarded). Positions are EncodedPair.target_positions.
    """
    batch = to_device(collate(pairs, pad_id), device)
    hid = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    positions = [list(p.target_positions) for p in pairs]
    rows, cols = gather_positions(pairs, positions)
    out: list[np.ndarray] = []
    if len(rows) == 0:
        return [np.zeros(0) for _ in pairs]
    rows_d, cols_d = rows.to(device), cols.to(device)
    h = hid[rows_d, cols_d]
    targets = batch["input_ids"][rows_d, cols_d + 1]
    vocab = vocab_size(model)
    scores = torch.empty(len(rows), dtype=torch.float64)
    for sl in chunk_rows(len(rows), vocab):
        logits = head_logits(model, h[sl])
        lp = logits.gather(-1, targets[sl, None]).squeeze(-1) - torch.logsumexp(logits, -1)
        scores[sl] = lp.double().cpu()
    offset = 0
    for pos in positions:
        out.append(scores[offset : offset + len(pos)].numpy())
        offset += len(pos)
    return out
