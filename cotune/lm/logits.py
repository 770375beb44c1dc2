"""Public-set top-k logits and per-sample loss (bits per byte), the payload FedMKT parties exchange."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cotune.data.example import Example
from cotune.lm.batching import (
    chunk_rows,
    collate,
    head_logits,
    hidden_states,
    model_device,
    sorted_batches,
    to_device,
    vocab_size,
)
from cotune.align.tokenizers import encode_pair
from cotune.profile import phase
from cotune.wire.topk_types import SampleLogits

LN2 = math.log(2.0)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


@dataclass(frozen=True)
class GoldTargets:
    """One public sample as the receiver of other parties' logits knows it, in its own tokenization: what a teacher's
    loss is recomputed against (cotune.algorithms.fedmkt.selection). Never sent anywhere.

    positions:      int32 [n]    the target positions t (EncodedPair.target_positions)
    ids:            int64 [n]    the gold next token at each (the response token at t + 1)
    nll:            float64 [n]  this model's own -ln p(gold) there, nats
    response_bytes: the response's UTF-8 length, the bits-per-byte denominator
    """

    positions: np.ndarray
    ids: np.ndarray
    nll: np.ndarray
    response_bytes: int


def bits_per_byte(nll_nats: float, response_bytes: int, positions: int) -> float:
    """Σ CE (nats) / ln 2 / response bytes; inf for an empty response (or no target position)."""
    return float(nll_nats / LN2 / response_bytes) if response_bytes > 0 and positions > 0 else float("inf")


def public_topk(model, tokenizer, examples: Sequence[Example], **kwargs) -> list[SampleLogits]:
    """For every example (in order): top-k log-probs (full-vocabulary log_softmax) at EncodedPair.target_positions
    only, and loss_bpb = Σ response-token CE (nats) / ln 2 / response UTF-8 bytes (inf for an empty response).
    Keyword arguments as public_topk_and_gold (k, batch_size, max_length, progress)."""
    return public_topk_and_gold(model, tokenizer, examples, **kwargs)[0]


def public_topk_and_gold(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    k: int,
    batch_size: int = 8,
    max_length: int = 512,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[SampleLogits], list[GoldTargets]]:
    """public_topk, and per example its GoldTargets (the same forward pass)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = model_device(model)
    pad = _pad_id(tokenizer)
    vocab = vocab_size(model)
    k_eff = min(k, vocab)
    with phase("data"):
        pairs = [encode_pair(tokenizer, ex.prompt, ex.response, max_length) for ex in examples]
    results: list[SampleLogits | None] = [None] * len(pairs)
    golds: list[GoldTargets | None] = [None] * len(pairs)
    batches = sorted_batches([len(p.ids) for p in pairs], batch_size)
    was_training = model.training
    model.eval()
    done = 0
    try:
        with torch.inference_mode():
            for idx in batches:
                bp = [pairs[i] for i in idx]
                positions = [np.asarray(list(p.target_positions), dtype=np.int32) for p in bp]
                n_pos = sum(len(x) for x in positions)
                top_ids = np.zeros((n_pos, k_eff), dtype=np.int32)
                top_lp = np.zeros((n_pos, k_eff), dtype=np.float32)
                nll = np.zeros(n_pos, dtype=np.float64)
                gold = np.zeros(n_pos, dtype=np.int64)
                if n_pos:
                    batch = to_device(collate(bp, pad), device)
                    hid = hidden_states(model, batch["input_ids"], batch["attention_mask"])
                    rows = torch.tensor(
                        np.repeat(np.arange(len(bp)), [len(x) for x in positions]), dtype=torch.long, device=device
                    )
                    cols = torch.from_numpy(np.concatenate(positions).astype(np.int64)).to(device)
                    h = hid[rows, cols]
                    nxt = batch["input_ids"][rows, cols + 1]
                    gold[:] = nxt.cpu().numpy()
                    for sl in chunk_rows(n_pos, vocab):
                        logp = torch.log_softmax(head_logits(model, h[sl]), dim=-1)
                        vals, ids = torch.topk(logp, k_eff, dim=-1)
                        top_ids[sl] = ids.to(torch.int32).cpu().numpy()
                        top_lp[sl] = vals.cpu().numpy()
                        nll[sl] = (-logp.gather(-1, nxt[sl, None]).squeeze(-1)).double().cpu().numpy()
                off = 0
                for j, i in enumerate(idx):
                    m = len(positions[j])
                    sl = slice(off, off + m)
                    off += m
                    rb = bp[j].response_bytes
                    results[i] = SampleLogits(
                        positions=positions[j],
                        ids=top_ids[sl].copy(),
                        logprobs=top_lp[sl].copy(),
                        loss_bpb=bits_per_byte(nll[sl].sum(), rb, m),
                    )
                    golds[i] = GoldTargets(positions=positions[j], ids=gold[sl].copy(), nll=nll[sl].copy(),
                                           response_bytes=rb)
                done += len(idx)
                if progress is not None:
                    progress(done, len(pairs))
    finally:
        model.train(was_training)
    return results, golds  # type: ignore[return-value]
