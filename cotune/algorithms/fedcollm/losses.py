"""FedCoLLM's server-side mutual distillation between the LLM f (LoRA ω) and the SLM copy g (LoRA θ).

Both models sit on one host and share one tokenizer, so the KL is over the full vocabulary. Per batch of the public
set, the two updates alternate:

    θ ← step(L_g),  L_g = CE_g + λ·D(g; f)     with f's logits detached
    ω ← step(L_f),  L_f = CE_f + λ·D(f; g')    with g' = the updated g, detached

D(student; teacher) is the KD term in the run's `kl_direction` (`cotune.algorithms.fedcollm.config.KL_DIRECTIONS`):
"forward" (the default) = KL(teacher‖student), as the FedCoLLM authors' code and the cross-tokenizer path (where a
sparse top-k target admits no other); "reverse" = KL(student‖teacher), the paper's formula as written. KL(p‖q) =
Σ p·(log p − log q). One choice for both paths (`kd_term` here, `losses_cross.projected_kl` there). The KD term
carries gradient to the model being updated and none to the other (the FATE reference's KD term had no gradient at
all).
Losses are measured over the response tokens (the positions CE trains), at exactly the same positions for both
models since the tokenization is shared. Each model keeps its own optimizer and LR schedule across rounds (the two
`Trainer`s own them). Every update goes through `Trainer.step` (g's, inside f's loss function) or `Trainer.fit` (f's):
clipping, the non-finite loss guard and the schedule are the Trainer's.

The epoch/batch loop (`alternate`, `summarize`) is shared with `cotune.algorithms.fedcollm.losses_cross`, the same
alternation between models with different tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cotune.lm.batching import (
    collate,
    head_logits,
    hidden_states,
    shuffled_batches,
    sorted_batches,
    to_device,
)
from cotune.algorithms.fedcollm.config import KL_DIRECTIONS
from cotune.align.tokenizers import truncated_samples
from cotune.lm.losses import kl_full
from cotune.lm.train import Trainer, offset_progress


def check_direction(direction: str) -> str:
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"kl direction must be one of {', '.join(KL_DIRECTIONS)}, got {direction!r}")
    return direction


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, direction: str = "forward") -> torch.Tensor:
    """The student's KD term over the shared vocabulary, mean over positions: KL(teacher‖student) ("forward") or
    KL(student‖teacher) ("reverse"). The teacher is detached."""
    teacher = teacher_logits.detach()
    if check_direction(direction) == "forward":
        return kl_full(teacher, student_logits)
    return kl_full(student_logits, teacher)


def mutual_loss(own_logits: torch.Tensor, other_logits: torch.Tensor, labels: torch.Tensor, lam: float,
                direction: str = "forward"):
    """(L, CE, KL) for the model that produced `own_logits` [N, V]: CE(own, labels) + lam·kd_term(own, other).
    `other_logits` is detached, so no gradient reaches the other model."""
    ce = F.cross_entropy(own_logits.float(), labels)
    kl = kd_term(own_logits, other_logits, direction)
    return ce + lam * kl, ce, kl


def _common_vocab(f_trainer: Trainer, g_trainer: Trainer) -> int:
    # One tokenizer, but a model may pad its output embedding beyond it: compare over the tokens both models have.
    return min(f_trainer.vocab, g_trainer.vocab)


def _positions(pairs, device):
    rows, cols = [], []
    for r, p in enumerate(pairs):
        for t in p.target_positions:
            rows.append(r)
            cols.append(t)
    return (torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(cols, dtype=torch.long, device=device))


def _logits_at(model, batch, rows, cols, vocab: int) -> torch.Tensor:
    hid = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    return head_logits(model, hid[rows, cols])[:, :vocab]


@torch.no_grad()
def measure(f_trainer: Trainer, g_trainer: Trainer, pairs, batch_size: int, direction: str = "forward") -> dict:
    """Mean CE of each model and both KD terms over the response tokens of `pairs` (eval mode, no grad): llm_kl =
    the LLM f's (kd_term(f, g)), slm_kl = the SLM g's (kd_term(g, f)); truncated_samples: pairs cut to fit."""
    f, g = f_trainer.model, g_trainer.model
    vocab = _common_vocab(f_trainer, g_trainer)
    sums = {"llm_ce": 0.0, "slm_ce": 0.0, "llm_kl": 0.0, "slm_kl": 0.0}
    n = 0
    f.eval()
    g.eval()
    for idx in sorted_batches([len(p.ids) for p in pairs], batch_size):
        bp = [pairs[i] for i in idx]
        batch = to_device(collate(bp, f_trainer.pad_id), f_trainer.device)
        rows, cols = _positions(bp, f_trainer.device)
        if len(rows) == 0:
            continue
        labels = batch["input_ids"][rows, cols + 1]
        lf = _logits_at(f, batch, rows, cols, vocab)
        lg = _logits_at(g, batch, rows, cols, vocab)
        m = len(rows)
        sums["llm_ce"] += float(F.cross_entropy(lf, labels, reduction="sum"))
        sums["slm_ce"] += float(F.cross_entropy(lg, labels, reduction="sum"))
        sums["llm_kl"] += float(kd_term(lf, lg, direction)) * m  # f's KD term
        sums["slm_kl"] += float(kd_term(lg, lf, direction)) * m  # g's KD term
        n += m
    return {k: (v / n if n else float("nan")) for k, v in sums.items()} | {
        "positions": n, "truncated_samples": truncated_samples(pairs)}


def same_device(f_trainer: Trainer, g_trainer: Trainer) -> torch.device:
    if f_trainer.device != g_trainer.device:
        raise ValueError(f"the LLM ({f_trainer.device}) and its SLM copy ({g_trainer.device}) must be on one device")
    return f_trainer.device


BatchFn = Callable[[list[int]], "tuple[torch.Tensor | None, dict[str, float]]"]


def alternate(f_trainer: Trainer, g_trainer: Trainer, lengths: Sequence[int], batch_fn: BatchFn, *, epochs: int,
              batch_size: int, seed: int, progress: Callable[[int, int], None] | None,
              should_stop: Callable[[], bool] | None) -> tuple[list[dict], int, bool]:
    """The epoch/batch loop of the mutual distillation, shared by `co_distill` and `co_distill_cross`: one
    `f_trainer.fit` per epoch over the shuffled batches, whose loss function is `batch_fn`.

    `batch_fn(sample indices)` is f's loss function with g's half-step inside: it updates g (θ) with
    `g_trainer.step`, then returns (L_f or None, stats) for fit to update f (ω) with; stats carry "slm_loss" /
    "llm_loss" (the per-epoch means reported; a side whose update was skipped as non-finite leaves its value out).
    g is in train mode during the loop and in eval mode after, its gradients released. Returns (per-epoch mean
    losses, batches run, stopped)."""
    g = g_trainer.model
    n_batches = math.ceil(len(lengths) / batch_size) if len(lengths) else 0
    total = n_batches * max(epochs, 0)
    epoch_stats: list[dict] = []
    steps = 0
    stopped = False
    try:
        with f_trainer.seeded(seed * 1_000_003 + f_trainer.global_step):
            for _ in range(max(epochs, 0)):
                rng = np.random.default_rng([seed, f_trainer.epochs_done, 7])
                g.train()
                res = f_trainer.fit(shuffled_batches(lengths, batch_size, rng), batch_fn,
                                    progress=offset_progress(progress, steps, total), should_stop=should_stop,
                                    total=total)
                steps += res.steps
                epoch_stats.append({k: res.mean(k) for k in ("slm_loss", "llm_loss")})
                if res.stopped:
                    stopped = True
                    break
                f_trainer.epochs_done += 1
                g_trainer.epochs_done += 1
    finally:
        g_trainer.optimizer.zero_grad(set_to_none=True)
        f_trainer.model.eval()
        g.eval()
    return epoch_stats, steps, stopped


def summarize(before: dict, after: dict, epoch_stats: list[dict], *, steps: int, samples: int, stopped: bool) -> dict:
    """co_distill's result dict: measured metrics before/after, first/last-epoch training means, counters."""
    counts = ("positions", "truncated_samples")  # once, below
    out = {f"{k}_before": v for k, v in before.items() if not k.endswith(counts)}
    out.update({f"{k}_after": v for k, v in after.items() if not k.endswith(counts)})
    nan = float("nan")
    out.update(slm_loss_first=epoch_stats[0]["slm_loss"] if epoch_stats else nan,
               slm_loss_last=epoch_stats[-1]["slm_loss"] if epoch_stats else nan,
               llm_loss_first=epoch_stats[0]["llm_loss"] if epoch_stats else nan,
               llm_loss_last=epoch_stats[-1]["llm_loss"] if epoch_stats else nan,
               steps=steps, samples=samples, positions=before["positions"], stopped=float(stopped),
               truncated_samples=before["truncated_samples"])  # its time is the task's profile, not a metric
    return out


def co_distill(f_trainer: Trainer, g_trainer: Trainer, pairs, *, lam: float, epochs: int, batch_size: int, seed: int = 0,
               direction: str = "forward", progress: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> dict:
    """Run the alternating mutual distillation over `pairs` (EncodedPairs of the shared tokenizer) for `epochs`, the
    KD terms in `direction` (KL_DIRECTIONS).

    Returns the losses before and after (measured without grad in eval mode: llm_kl / slm_kl are the LLM's / the
    SLM's KD terms) and the mean training losses of the first and last epoch for both sides."""
    f, g = f_trainer.model, g_trainer.model
    check_direction(direction)
    device = same_device(f_trainer, g_trainer)
    vocab = _common_vocab(f_trainer, g_trainer)
    before = measure(f_trainer, g_trainer, pairs, batch_size, direction)

    def batch_fn(idx):
        bp = [pairs[i] for i in idx]
        rows, cols = _positions(bp, device)
        if not len(rows):
            return None, {}
        batch = to_device(collate(bp, f_trainer.pad_id), device)
        labels = batch["input_ids"][rows, cols + 1]
        lf = _logits_at(f, batch, rows, cols, vocab)            # with grad: reused for ω's step
        lg = _logits_at(g, batch, rows, cols, vocab)
        loss_g, _, _ = mutual_loss(lg, lf, labels, lam, direction)  # θ step: f detached
        stats = {"slm_loss": float(loss_g.detach())} if g_trainer.step(loss_g) else {}
        with torch.no_grad():
            lg_new = _logits_at(g, batch, rows, cols, vocab)
        loss_f, _, _ = mutual_loss(lf, lg_new, labels, lam, direction)  # ω step (by fit): against the updated g
        stats["llm_loss"] = float(loss_f.detach())
        return loss_f, stats

    epoch_stats, steps, stopped = alternate(f_trainer, g_trainer, [len(p.ids) for p in pairs], batch_fn,
                                            epochs=epochs, batch_size=batch_size, seed=seed, progress=progress,
                                            should_stop=should_stop)
    after = measure(f_trainer, g_trainer, pairs, batch_size, direction)
    return summarize(before, after, epoch_stats, steps=steps, samples=len(pairs), stopped=stopped)


def encode_public(trainer: Trainer, examples: Sequence, max_length: int):
    saved = trainer.config.max_length
    trainer.config.max_length = max_length
    try:
        return trainer.encode(examples)
    finally:
        trainer.config.max_length = saved
