"""Evaluation: multiple choice by log-likelihood (lm-evaluation-harness 'acc' and a byte-normalised 'acc_norm'),
and response loss / perplexity / bits per byte."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from cotune.align.tokenizers import EncodedPair, encode_pair
from cotune.data.example import Example
from cotune.lm.batching import chunk_rows, model_device, next_token_scores, sorted_batches
from cotune.lm.train import Progress
from cotune.profile import phase

LN2 = math.log(2.0)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def _score(model, tokenizer, pairs: Sequence[EncodedPair], batch_size: int,
           progress: Progress | None = None) -> list[np.ndarray]:
    """Per pair, the log-probs of its response tokens (eval mode, no grad). `progress(done, total)`: pairs scored."""
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
                if progress is not None:
                    progress(sum(o is not None for o in out), len(pairs))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


MC_SCORINGS = ("shared_prompt", "per_choice")


def _check_mc_scoring(mc_scoring: str) -> None:
    if mc_scoring not in MC_SCORINGS:
        raise ValueError(f"mc_scoring must be one of {MC_SCORINGS}, got {mc_scoring!r}")


def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def _cache_kwarg(decoder) -> str:
    """The decoder's keyword for the KV cache: 'cache' (transformers >= 5.x) or 'past_key_values'."""
    import inspect

    try:
        params = inspect.signature(decoder.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _pair_logprob_sums(model, rows: list[torch.Tensor], req_row: list[int], req_tgt: list[int],
                       req_pair: list[int], n_pairs: int, vocab: int, device: torch.device) -> np.ndarray:
    """Sum per pair of log p(target | hidden row): the LM head runs once per row (chunked by chunk_rows); a row may
    serve several requests (a prefix position shared by the choices). Requests are summed in the order given."""
    from cotune.lm.batching import head_logits

    sums = np.zeros(n_pairs, dtype=np.float64)
    if not req_row:
        return sums
    h = torch.cat(rows, 0)
    row_t = torch.tensor(req_row, dtype=torch.long)
    tgt_t = torch.tensor(req_tgt, dtype=torch.long)
    scores = torch.empty(len(req_row), dtype=torch.float64)
    for sl in chunk_rows(h.shape[0], vocab):
        sel = ((row_t >= sl.start) & (row_t < sl.stop)).nonzero().squeeze(-1)
        if len(sel) == 0:
            continue
        logits = head_logits(model, h[sl])  # [n, V] fp32, soft-capped / scaled like the model's own logits
        lse = torch.logsumexp(logits, -1)
        local = (row_t[sel] - sl.start).to(device)
        lp = logits[local, tgt_t[sel].to(device)] - lse[local]
        scores[sel] = lp.double().cpu()
    per_pair: list[list[int]] = [[] for _ in range(n_pairs)]
    for k, j in enumerate(req_pair):
        per_pair[j].append(k)
    vals = scores.numpy()
    for j, ks in enumerate(per_pair):
        if ks:
            sums[j] = float(vals[ks].sum())
    return sums


def _shared_prompt_group(model, decoder, config, cache_kw: str, items: Sequence[Sequence[EncodedPair]],
                         prefix_lens: Sequence[int], pad: int, device: torch.device, batch_size: int,
                         vocab: int) -> list[np.ndarray]:
    """Summed target log-probs of every pair of up to batch_size items, each item's common prefix run once.

    The items' prefixes ids[:L] run as one LEFT-padded batch with a KV cache (padding only before the real tokens,
    so every prefix ends at the same cache slot and a sliding window still counts real distances); the hidden
    states at target positions inside a prefix come from that run. The pairs' remaining tokens ids[L:-1] (the last
    token is never a query) then run as right-padded batches of at most batch_size rows, continuing from the rows
    of the cache that belong to their items, with positions continuing from each item's L and an attention mask
    covering the prefix (padding masked) and the continuation. The LM head runs only at the needed positions."""
    import copy

    from transformers import DynamicCache

    n_items = len(items)
    width = max(prefix_lens)
    ids = torch.full((n_items, width), pad, dtype=torch.long)
    mask = torch.zeros((n_items, width), dtype=torch.long)
    positions = torch.zeros((n_items, width), dtype=torch.long)
    for i, (pairs, L) in enumerate(zip(items, prefix_lens)):
        ids[i, width - L :] = torch.tensor(pairs[0].ids[:L], dtype=torch.long)
        mask[i, width - L :] = 1
        positions[i, width - L :] = torch.arange(L, dtype=torch.long)
    cache = DynamicCache(config=config)
    with phase("forward"):
        out = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                      use_cache=True, **{cache_kw: cache})
    prefix_hid = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [n_items, width, H]
    del out

    # flat pair index: the pairs of all items, in order
    base = np.cumsum([0] + [len(p) for p in items])
    rows: list[torch.Tensor] = []
    req_row: list[int] = []
    req_tgt: list[int] = []
    req_pair: list[int] = []
    sel_r, sel_c = [], []
    for i, (pairs, L) in enumerate(zip(items, prefix_lens)):
        where: dict[int, int] = {}
        for j, p in enumerate(pairs):
            for t in p.target_positions:
                if t < L:
                    if t not in where:
                        where[t] = len(sel_r)
                        sel_r.append(i)
                        sel_c.append(width - L + t)
                    req_row.append(where[t])
                    req_tgt.append(p.ids[t + 1])
                    req_pair.append(int(base[i]) + j)
    if sel_r:
        rows.append(prefix_hid[torch.tensor(sel_r, device=device), torch.tensor(sel_c, device=device)])
    offset = len(sel_r)
    del prefix_hid

    cont = [(i, j) for i, (pairs, L) in enumerate(zip(items, prefix_lens))
            for j, p in enumerate(pairs) if len(p.ids) - 1 > L]
    for start in range(0, len(cont), batch_size):
        chunk = cont[start : start + batch_size]
        n = len(chunk)
        cw = max(len(items[i][j].ids) - 1 - prefix_lens[i] for i, j in chunk)
        c_ids = torch.full((n, cw), pad, dtype=torch.long)
        c_mask = torch.zeros((n, width + cw), dtype=torch.long)
        c_pos = torch.zeros((n, cw), dtype=torch.long)
        for r, (i, j) in enumerate(chunk):
            L = prefix_lens[i]
            seq = items[i][j].ids[L:-1]
            c_ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            c_mask[r, :width] = mask[i]
            c_mask[r, width : width + len(seq)] = 1
            c_pos[r] = torch.arange(cw, dtype=torch.long) + L
        chunk_cache = cache if start + batch_size >= len(cont) else copy.deepcopy(cache)
        # CPU indices: a model spread across GPUs holds each layer's cache on that layer's GPU
        chunk_cache.batch_select_indices(torch.tensor([i for i, _ in chunk], dtype=torch.long))
        with phase("forward"):
            out = decoder(input_ids=c_ids.to(device), attention_mask=c_mask.to(device), position_ids=c_pos.to(device),
                          use_cache=True, **{cache_kw: chunk_cache})
        hid = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        sel_r, sel_c = [], []
        for r, (i, j) in enumerate(chunk):
            p, L = items[i][j], prefix_lens[i]
            for t in p.target_positions:
                if t >= L:
                    req_row.append(offset + len(sel_r))
                    sel_r.append(r)
                    sel_c.append(t - L)
                    req_tgt.append(p.ids[t + 1])
                    req_pair.append(int(base[i]) + j)
        if sel_r:
            rows.append(hid[torch.tensor(sel_r, device=device), torch.tensor(sel_c, device=device)])
            offset += len(sel_r)
        del out, hid, chunk_cache

    # requests were appended prefix first, then continuation: per pair that is position order (the per-choice sum's)
    sums = _pair_logprob_sums(model, rows, req_row, req_tgt, req_pair, int(base[-1]), vocab, device)
    return [sums[base[i] : base[i + 1]] for i in range(n_items)]


def _score_shared_prompt(model, tokenizer, groups: Sequence[Sequence[EncodedPair]], batch_size: int,
                         progress: Progress | None = None) -> list[np.ndarray]:
    """Per group (one item's choices), the summed log-likelihood of each pair, the group's longest common token
    prefix run once and continued from its KV cache (several items per forward, at most batch_size sequences).
    Groups with one pair or no common prefix are scored by the per-choice path. `progress(done, total)`: items."""
    from cotune.lm.batching import decoder_and_head, vocab_size

    device = model_device(model)
    pad = _pad_id(tokenizer)
    out: list[np.ndarray | None] = [None] * len(groups)
    fallback: list[tuple[int, int]] = []  # (group, pair) scored per choice
    decoder, _, _ = decoder_and_head(model)
    config = getattr(decoder, "config", None)
    cache_kw = _cache_kwarg(decoder)
    vocab = vocab_size(model)
    batch_size = max(1, int(batch_size))
    prefix_lens = [_common_prefix_length([p.ids for p in pairs]) if len(pairs) > 1 else 0 for pairs in groups]
    shared = []
    for g, pairs in enumerate(groups):
        if prefix_lens[g] == 0:
            out[g] = np.zeros(len(pairs))
            fallback.extend((g, j) for j in range(len(pairs)))
        else:
            shared.append(g)
    was_training = model.training
    model.eval()
    scored = 0
    try:
        with torch.inference_mode():
            for idx in sorted_batches([prefix_lens[g] for g in shared], batch_size):
                members = [shared[k] for k in idx]
                sums = _shared_prompt_group(model, decoder, config, cache_kw, [groups[g] for g in members],
                                            [prefix_lens[g] for g in members], pad, device, batch_size, vocab)
                for g, s in zip(members, sums):
                    out[g] = s
                scored += len(members)
                if progress is not None:
                    progress(scored, len(groups))  # the groups scored per choice follow, then the total
    finally:
        model.train(was_training)
    _score_per_choice(model, tokenizer, groups, batch_size, fallback, out)
    if progress is not None:
        progress(len(groups), len(groups))
    return out  # type: ignore[return-value]


def _score_per_choice(model, tokenizer, groups: Sequence[Sequence[EncodedPair]], batch_size: int,
                      which: Sequence[tuple[int, int]], out: list[np.ndarray], progress: Progress | None = None) -> None:
    """Score the pairs `which` ((group, pair) indices) each as its own sequence; their summed log-likelihoods go to
    out[group][pair]."""
    if not which:
        return
    scores = _score(model, tokenizer, [groups[g][j] for g, j in which], batch_size, progress)
    for (g, j), s in zip(which, scores):
        out[g][j] = float(s.sum())


def choice_loglikelihoods(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    mc_scoring: str = "shared_prompt",
    progress: Progress | None = None,
) -> list[np.ndarray]:
    """For each example, the summed log-likelihood of every choice continuation given the prompt.

    Every choice is encode_pair(tokenizer, prompt, choice, max_length). mc_scoring="per_choice" runs every such
    sequence through the model on its own (the reference); "shared_prompt" (the default) runs the longest common
    token prefix of an example's choices once and continues each choice from its KV cache: the same scores up to
    float rounding, the prompt computed once instead of once per choice."""
    _check_mc_scoring(mc_scoring)
    with phase("data"):
        groups = [[encode_pair(tokenizer, ex.prompt, c, max_length) for c in ex.choices] for ex in examples]
    if mc_scoring == "shared_prompt":
        return _score_shared_prompt(model, tokenizer, groups, batch_size, progress)
    out = [np.zeros(len(group)) for group in groups]
    which = [(g, j) for g, group in enumerate(groups) for j in range(len(group))]
    per_item = None if progress is None else (
        lambda done, _total: progress(sum(1 for g, j in which[:done] if j == len(groups[g]) - 1), len(groups)))
    _score_per_choice(model, tokenizer, groups, batch_size, which, out, per_item)
    return out


def evaluate_mc(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    mc_scoring: str = "shared_prompt",
    progress: Progress | None = None,
) -> dict:
    """accuracy: argmax of summed choice log-likelihood == label; accuracy_norm: argmax of log-likelihood divided by
    the choice's UTF-8 byte length. Examples without choices or with label < 0 are skipped; n = examples scored.
    mc_scoring: see choice_loglikelihoods."""
    _check_mc_scoring(mc_scoring)
    usable = [ex for ex in examples if ex.choices and 0 <= ex.label < len(ex.choices)]
    if not usable:
        return {"accuracy": float("nan"), "accuracy_norm": float("nan"), "n": 0}
    lls = choice_loglikelihoods(model, tokenizer, usable, batch_size=batch_size, max_length=max_length,
                                mc_scoring=mc_scoring, progress=progress)
    correct = correct_norm = 0
    for ex, ll in zip(usable, lls):
        nbytes = np.array([max(1, len(c.encode("utf-8"))) for c in ex.choices], dtype=np.float64)
        correct += int(int(np.argmax(ll)) == ex.label)
        correct_norm += int(int(np.argmax(ll / nbytes)) == ex.label)
    n = len(usable)
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "n": n}


def evaluate_loss(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 8, max_length: int = 512,
                  progress: Progress | None = None) -> dict:
    """Response-token loss: 'loss' nats/token (token-weighted over all examples), 'perplexity' = exp(loss),
    'bpb' = total nats / ln 2 / total response bytes; plus 'tokens' and 'n'. `progress(done, total)`: examples."""
    with phase("data"):
        pairs = [encode_pair(tokenizer, ex.prompt, ex.response, max_length) for ex in examples]
    scores = _score(model, tokenizer, pairs, batch_size, progress)
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
