"""Evaluation: multiple choice by log-likelihood (lm-evaluation-harness 'acc' and a byte-normalised 'acc_norm'),
and response loss / perplexity / bits per byte."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from cotune.align.tokenizers import EncodedPair, encode_pair
from cotune.data.example import Example
from cotune.lm.batching import model_device, next_token_scores, sorted_batches
from cotune.profile import phase

LN2 = math.log(2.0)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def _score(model, tokenizer, pairs: Sequence[EncodedPair], batch_size: int) -> list[np.ndarray]:
    """Per pair, the log-probs of its response tokens (eval mode, no grad)."""
    device = model_device(model)
    pad = _pad_id(tokenizer)
    out: list[np.ndarray | None] = [None] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx in sorted_batches([len(p.ids) for p in pairs], batch_size):
                scores = next_token_scores(model, [pairs[i] for i in idx], pad, device)
                for i, s in zip(idx, scores):
                    out[i] = s
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def choice_loglikelihoods(
    model, tokenizer, examples: Sequence[Example], *, batch_size: int = 8, max_length: int = 512
) -> list[np.ndarray]:
    """For each example, the summed log-likelihood of every choice continuation given the prompt."""
    pairs, owner = [], []
    with phase("data"):
        for e, ex in enumerate(examples):
            for c in ex.choices:
                pairs.append(encode_pair(tokenizer, ex.prompt, c, max_length))
                owner.append(e)
    scores = _score(model, tokenizer, pairs, batch_size)
    out = [np.zeros(len(ex.choices)) for ex in examples]
    counters = [0] * len(examples)
    for e, s in zip(owner, scores):
        out[e][counters[e]] = float(s.sum())
        counters[e] += 1
    return out


def evaluate_mc(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 8, max_length: int = 512) -> dict:
    """accuracy: argmax of summed choice log-likelihood == label; accuracy_norm: argmax of log-likelihood divided by
    the choice's UTF-8 byte length. Examples without choices or with label < 0 are skipped; n = examples scored."""
    usable = [ex for ex in examples if ex.choices and 0 <= ex.label < len(ex.choices)]
    if not usable:
        return {"accuracy": float("nan"), "accuracy_norm": float("nan"), "n": 0}
    lls = choice_loglikelihoods(model, tokenizer, usable, batch_size=batch_size, max_length=max_length)
    correct = correct_norm = 0
    for ex, ll in zip(usable, lls):
        nbytes = np.array([max(1, len(c.encode("utf-8"))) for c in ex.choices], dtype=np.float64)
        correct += int(int(np.argmax(ll)) == ex.label)
        correct_norm += int(int(np.argmax(ll / nbytes)) == ex.label)
    n = len(usable)
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "n": n}


def evaluate_loss(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 8, max_length: int = 512) -> dict:
    """Response-token loss: 'loss' nats/token (token-weighted over all examples), 'perplexity' = exp(loss),
    'bpb' = total nats / ln 2 / total response bytes; plus 'tokens' and 'n'."""
    with phase("data"):
        pairs = [encode_pair(tokenizer, ex.prompt, ex.response, max_length) for ex in examples]
    scores = _score(model, tokenizer, pairs, batch_size)
    nats = -float(sum(s.sum() for s in scores))
    tokens = int(sum(len(s) for s in scores))
    nbytes = int(sum(p.response_bytes for p, s in zip(pairs, scores) if len(s)))
    if tokens == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "bpb": float("nan"), "tokens": 0, "n": len(pairs)}
    loss = nats / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bpb": nats / LN2 / nbytes if nbytes else float("nan"),
        "tokens": tokens,
        "n": len(pairs),
    }
