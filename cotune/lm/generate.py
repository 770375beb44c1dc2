"""Greedy generation with a KV cache, and evaluation of generative tasks (generate, then score).

Prompts are encoded as every party encodes a sample (:func:`cotune.align.tokenizers.encode_pair` with an empty
response): bos where the tokenizer's model expects it, an over-long prompt cut from its passage's end (then its
start) to ``max_length`` tokens. A batch is left-padded, so every prompt ends at the same cache slot; the decoder
runs once over the prompts and then one token per step from its cache (positions and attention mask covering only
real tokens), the LM head only at the last position. Decoding is greedy (argmax, ties to the lowest id) and so
deterministic; a row ends at an end-of-sequence token, when its text holds a stop sequence, or after
``max_new_tokens`` tokens; its text is cut at the first stop sequence. Works on a causal LM or a PeftModel around
one, in any dtype, on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cotune.align.tokenizers import encode_pair
from cotune.data.example import Example
from cotune.lm.batching import decoder_and_head, head_logits, model_device, sorted_batches
from cotune.lm.train import Progress
from cotune.profile import phase

__all__ = ["Generation", "generate", "cut_at_stop", "prompt_budget", "evaluate_generation"]


@dataclass(frozen=True)
class Generation:
    """text: the continuation, cut before its first stop sequence; ids: the tokens generated (an end-of-sequence
    token not included; the token that completed a stop sequence is); finish: "stop" (a stop sequence), "eos" or
    "length" (max_new_tokens)."""

    text: str
    ids: tuple[int, ...]
    finish: str

    @property
    def tokens(self) -> int:
        return len(self.ids)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest occurrence of any stop sequence, and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def prompt_budget(model, max_length: int, max_new_tokens: int) -> int:
    """Tokens a prompt may keep: `max_length` (the budget of a training sample), less where the model's positions
    (config.max_position_embeddings) could not also hold max_new_tokens generated tokens."""
    _, _, config = decoder_and_head(model)
    budget = int(max_length)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0:
        budget = min(budget, limit - int(max_new_tokens))
    if budget < 1:
        raise ValueError(f"no room for a prompt: max_new_tokens {max_new_tokens} leaves {budget} of the model's "
                         f"{limit} positions")
    return budget


def _eos_ids(tokenizer, config) -> set[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _continuation(tokenizer, prompt_ids: Sequence[int], gen: Sequence[int]) -> str:
    """The generated text as it reads after the prompt: decode(prompt + gen) minus decode(prompt), so a leading
    space (which a SentencePiece decoder strips at the start of a text) is kept; decode(gen) if the prompt's text is
    not a prefix."""
    head = _decode(tokenizer, prompt_ids)
    full = _decode(tokenizer, list(prompt_ids) + list(gen))
    return full[len(head):] if full.startswith(head) else _decode(tokenizer, gen)


def _batch(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str],
           eos: set[int], pad: int, vocab_limit: int) -> list[Generation]:
    """Greedy decoding of one left-padded batch of encoded prompts."""
    from transformers import DynamicCache

    from cotune.lm.evaluate import _cache_kwarg

    device = model_device(model)
    decoder, _, config = decoder_and_head(model)
    cache_kw = _cache_kwarg(decoder)
    n = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
        positions[i, width - len(p):] = torch.arange(len(p), dtype=torch.long)
    cache = DynamicCache(config=config)
    gen: list[list[int]] = [[] for _ in range(n)]
    finish = ["length"] * n
    rows = list(range(n))  # the batch rows still generating, in cache order
    mask = mask.to(device)
    next_pos = positions[:, -1].clone() + 1
    step_ids, step_pos = ids, positions
    for step in range(max_new_tokens):
        with phase("forward"):
            out = decoder(input_ids=step_ids.to(device), attention_mask=mask, position_ids=step_pos.to(device),
                          use_cache=True, **{cache_kw: cache})
        hid = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        logits = head_logits(model, hid[:, -1])
        del out, hid
        if logits.shape[-1] > vocab_limit:  # rows the embedding is padded with are no tokens
            logits[:, vocab_limit:] = float("-inf")
        chosen = logits.argmax(-1).tolist()
        keep = []
        with phase("data"):
            for k, (i, tok) in enumerate(zip(rows, chosen)):
                if tok in eos:
                    finish[i] = "eos"
                    continue
                gen[i].append(tok)
                if stop and cut_at_stop(_decode(tokenizer, gen[i]), stop)[1]:
                    finish[i] = "stop"
                    continue
                keep.append(k)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):
            sel = torch.tensor(keep, dtype=torch.long)
            cache.batch_select_indices(sel)  # CPU indices, as evaluate's shared-prompt path
            mask = mask[sel.to(mask.device)]
            next_pos = next_pos[sel]
            rows = [rows[k] for k in keep]
        step_ids = torch.tensor([[gen[i][-1]] for i in rows], dtype=torch.long)
        step_pos = next_pos[:, None].clone()
        next_pos += 1
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=mask.device)], 1)
    with phase("data"):
        return [Generation(cut_at_stop(_continuation(tokenizer, prompts[i], gen[i]), stop)[0], tuple(gen[i]), finish[i])
                for i in range(n)]


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
             max_length: int = 512, batch_size: int = 8, progress: Progress | None = None) -> list[Generation]:
    """Greedy continuation of every prompt (in order), batch_size prompts at a time (longest first).

    max_length: the prompt's token budget (:func:`prompt_budget`); the generated tokens come on top of it.
    `progress(done, total)`: prompts done."""
    from cotune.lm.evaluate import _pad_id

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    budget = prompt_budget(model, max_length, max_new_tokens)
    with phase("data"):
        encoded = [encode_pair(tokenizer, p, "", budget).ids for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("an empty prompt encodes to no tokens: nothing to condition on")
    _, _, config = decoder_and_head(model)
    eos, pad, vocab_limit = _eos_ids(tokenizer, config), _pad_id(tokenizer), len(tokenizer)
    out: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    done = 0
    try:
        with torch.inference_mode():
            for idx in sorted_batches([len(e) for e in encoded], max(1, int(batch_size))):
                results = _batch(model, tokenizer, [encoded[i] for i in idx], int(max_new_tokens), tuple(stop), eos,
                                 pad, vocab_limit)
                for i, g in zip(idx, results):
                    out[i] = g
                done += len(idx)
                if progress is not None:
                    progress(done, len(prompts))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def evaluate_generation(model, tokenizer, examples: Sequence[Example], *, metric: str, max_new_tokens: int,
                        stop: Sequence[str] = (), batch_size: int = 8, max_length: int = 512,
                        progress: Progress | None = None) -> dict:
    """Generate a continuation of every example's prompt and score it against its response with `metric`
    (:func:`cotune.lm.scoring.score_generations`: "exact_match" | "rouge_l"). Returns score (the mean, NaN for no
    examples), n, generated_tokens (total over the examples) and stopped (how many ended at a stop sequence or
    end-of-sequence token rather than at max_new_tokens)."""
    from cotune.lm.scoring import METRICS, score_generations

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not examples:
        return {"score": float("nan"), "n": 0, "generated_tokens": 0, "stopped": 0}
    gens = generate(model, tokenizer, [ex.prompt for ex in examples], max_new_tokens=max_new_tokens, stop=stop,
                    max_length=max_length, batch_size=batch_size, progress=progress)
    scores = score_generations(metric, [g.text for g in gens], [ex.response for ex in examples])
    return {"score": sum(scores) / len(scores), "n": len(scores), "generated_tokens": sum(g.tokens for g in gens),
            "stopped": sum(g.finish != "length" for g in gens)}
