"""FedCoLLM's server-side mutual distillation ACROSS TOKENIZERS: the LLM f (LoRA ω) and the SLM copy g (LoRA θ) use
different tokenizers, so the KL of `cotune.algorithms.fedcollm.losses` (full vocabulary, identical positions) becomes FedMKT's
aligned, projected top-k KL.

Every public sample is encoded by both tokenizers (f_pairs[i], g_pairs[i]); `cotune.align.seqalign.align_pair` pairs the
positions whose tokens end at the same character (both are response-target positions, so both predict the text after
that boundary). At each aligned pair, the teacher's next-token distribution (softmax over its vocabulary, detached)
keeps its top-k, goes through the MinED vocabulary map into the student's vocabulary (ids that land on one student
id are merged, out-of-range ids dropped, the row renormalized: `cotune.align.projection.project_topk` semantics, here in
torch on the device), and the student is trained towards it. Per batch, as in `co_distill`:

    θ ← step(L_g),  L_g = CE_g + λ·D(g; f̃)      f̃  = f's top-k mapped through f2g, f detached
    ω ← step(L_f),  L_f = CE_f + λ·D(f; g̃')     g̃' = the UPDATED g's top-k mapped through g2f, detached

CE_x is each model's own CE over all of its own response tokens (its own tokenization). D is the KD term in the run's
`kl_direction`, the same choice as `co_distill`'s (`projected_kl`). For the projected teacher t (support S = the
mapped top-k ids) and the student's full softmax q:

    forward (default):  KL(t ‖ q) = Σ_{j∈S} t_j·(log t_j − log q_j)  =  sparse soft-target CE  −  H(t)
    reverse:            KL(q̂ ‖ t) = Σ_{j∈S} q̂_j·(log q̂_j − log t_j),  q̂ = q restricted to S, renormalized

The forward gradient is the sparse soft CE's (`sparse_kd_loss`); subtracting the constant H(t) makes the value a true
KL (≥ 0, 0 iff q = t) whose size does not move with the teacher's entropy, so numbers compare across rounds. KL(q ‖ t)
itself is infinite wherever q puts mass outside S, hence q̂ for the reverse direction; with S = the whole vocabulary
both are co_distill's full-vocabulary terms.

Metric names are `co_distill`'s: llm_kl = the LLM f's KD term D(f; g̃), slm_kl = the SLM g's D(g; f̃), averaged over
aligned positions; llm_ce / slm_ce are each model's CE over its own response tokens. With one tokenizer, identity
maps and top_k = vocabulary, f̃ = f and g̃ = g, so these equal co_distill's numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cotune.lm.batching import collate, sorted_batches, to_device
from cotune.algorithms.fedcollm.losses import (
    _logits_at,
    _positions,
    alternate,
    check_direction,
    same_device,
    summarize,
)
from cotune.align.tokenizers import truncated_samples
from cotune.lm.train import Trainer

_SENTINEL = torch.iinfo(torch.long).max


def lookup_table(vocab_map, device) -> torch.Tensor:
    """A VocabMap (or a 1-D integer array src id -> dst id) as a LongTensor lookup table on `device`."""
    table = np.asarray(getattr(vocab_map, "ids", vocab_map))
    if table.ndim != 1 or table.dtype.kind not in "iu":
        raise ValueError(f"a vocab map must be a 1-D integer array (or a VocabMap); got {table.dtype} {table.shape}")
    if table.size and int(table.min()) < 0:
        raise ValueError("vocab map holds negative ids")
    return torch.as_tensor(table.astype(np.int64), device=device)


def project_topk_torch(ids: torch.Tensor, probs: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`cotune.align.projection.project_topk` in torch, vectorized on the device: map each row's sender ids [n, k]
    through `table` (LongTensor [n_src]) and merge the probabilities of ids that land on one receiver id.

    Ids < 0 or >= n_src and entries with probability <= 0 are dropped. Returns (dst ids long [n, k], probs float32
    [n, k]): each row's distinct receiver ids in ascending order, then padding (id -1, probability 0, which
    `sparse_kd_loss` ignores); each row sums to 1 (a row whose entries were all dropped is all padding)."""
    if ids.shape != probs.shape or ids.ndim != 2:
        raise ValueError(f"ids and probs must both be [n, k]; got {tuple(ids.shape)} and {tuple(probs.shape)}")
    n_src = table.numel()
    ids = ids.long()
    p = probs.float()
    valid = (ids >= 0) & (ids < n_src) & (p > 0)
    mapped = torch.where(valid, table[ids.clamp(0, max(n_src - 1, 0))] if n_src else ids, _SENTINEL)
    p = torch.where(valid, p, 0.0)
    sorted_ids, order = torch.sort(mapped, dim=-1)  # equal receiver ids adjacent, dropped ones (sentinel) last
    sorted_p = p.gather(-1, order)
    start = torch.ones_like(sorted_ids, dtype=torch.bool)
    start[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    group = start.long().cumsum(-1) - 1  # slot of each entry's group: 0, 1, ... in ascending id order
    out_p = torch.zeros_like(p).scatter_add_(-1, group, sorted_p)
    out_ids = torch.full_like(sorted_ids, -1).scatter_(-1, group, sorted_ids)  # one id per group: any writer wins
    pad = (out_ids == _SENTINEL) | (out_ids < 0)
    out_ids = out_ids.masked_fill(pad, -1)
    out_p = out_p.masked_fill(pad, 0.0)
    total = out_p.sum(-1, keepdim=True)
    out_p = torch.where(total > 0, out_p / total.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    return out_ids, out_p


def teacher_target(teacher_logits: torch.Tensor, table: torch.Tensor, top_k: int):
    """The teacher's detached next-token distribution (softmax over its logits [M, V]), top-k kept, mapped into
    the student's vocabulary: (ids long [M, k], probs float32 [M, k])."""
    with torch.no_grad():
        probs = torch.softmax(teacher_logits.detach().float(), dim=-1)
        p, i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        return project_topk_torch(i, p, table)


def sparse_kl(student_logits: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Per-position KL(t ‖ softmax(student)) [M] of a sparse target t (padding: id < 0): Σ_j t_j·(log t_j − log q_j),
    i.e. `sparse_kd_loss` (the soft-target CE) minus the target's entropy, summed term by term (no cancellation
    between two large sums). The entropy is a constant: the gradient is the soft CE's."""
    logits = student_logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    valid = (target_ids >= 0) & (target_probs > 0)
    log_q = torch.gather(logits, -1, target_ids.clamp(min=0).long()) - lse
    t = torch.where(valid, target_probs.float(), 0.0)
    log_t = torch.log(torch.where(valid, t, 1.0))
    return (t * (log_t - log_q)).sum(-1)


def reverse_sparse_kl(student_logits: torch.Tensor, target_ids: torch.Tensor,
                      target_probs: torch.Tensor) -> torch.Tensor:
    """Per-position KL(q̂ ‖ t) [M]: q̂ = the student's softmax restricted to the sparse target's support (padding:
    id < 0 or probability 0) and renormalized there. 0 for a row with no support."""
    logits = student_logits.float()
    valid = (target_ids >= 0) & (target_probs > 0)
    picked = torch.gather(logits, -1, target_ids.clamp(min=0).long()).masked_fill(~valid, -1e30)  # finite: no NaN grads
    log_q = picked - torch.logsumexp(picked, dim=-1, keepdim=True)
    log_t = torch.log(torch.where(valid, target_probs.float(), 1.0))
    return torch.where(valid, log_q.exp() * (log_q - log_t), 0.0).sum(-1)


def projected_kl(student_logits: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor,
                 direction: str = "forward") -> torch.Tensor:
    """The student's per-position KD term [M] against a projected sparse target, in `direction` (KL_DIRECTIONS):
    `sparse_kl` (forward) or `reverse_sparse_kl`."""
    if check_direction(direction) == "forward":
        return sparse_kl(student_logits, target_ids, target_probs)
    return reverse_sparse_kl(student_logits, target_ids, target_probs)


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean() if x.numel() else x.new_zeros(())


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels) if labels.numel() else logits.new_zeros(())


class _Aligned:
    """Per sample: the aligned pairs as indices into each side's list of target positions (what `_positions` emits
    for that sample, in order)."""

    def __init__(self, f_pairs, g_pairs, method: str, f_tok, g_tok):
        from cotune.align.seqalign import align_pair

        forms = {}
        if method == "dtw":
            from cotune.align.normalize import normalized_forms_cached

            forms = {"src_forms": normalized_forms_cached(f_tok), "dst_forms": normalized_forms_cached(g_tok)}
        self.f_idx, self.g_idx = [], []
        for fp, gp in zip(f_pairs, g_pairs):
            a, b = align_pair(fp, gp, method, **forms)
            self.f_idx.append(a.astype(np.int64) - fp.target_positions.start)
            self.g_idx.append(b.astype(np.int64) - gp.target_positions.start)
        self.total = int(sum(len(a) for a in self.f_idx))

    def batch(self, idx, f_pairs, g_pairs, device):
        """(f rows, g rows) LongTensors [M]: the aligned pairs of samples `idx` as row indices into the batch's
        target-position logits of each side."""
        f_off = np.cumsum([0] + [len(f_pairs[i].target_positions) for i in idx])
        g_off = np.cumsum([0] + [len(g_pairs[i].target_positions) for i in idx])
        af = [self.f_idx[i] + f_off[r] for r, i in enumerate(idx)]
        ag = [self.g_idx[i] + g_off[r] for r, i in enumerate(idx)]
        af = np.concatenate(af) if af else np.zeros(0, np.int64)
        ag = np.concatenate(ag) if ag else np.zeros(0, np.int64)
        return torch.as_tensor(af, device=device), torch.as_tensor(ag, device=device)


class _Side:
    """One model's view of a batch: its padded batch, target positions and labels."""

    def __init__(self, trainer: Trainer, pairs, vocab: int, device):
        self.trainer, self.pairs, self.vocab = trainer, pairs, vocab
        self.batch = to_device(collate(pairs, trainer.pad_id), device)
        self.rows, self.cols = _positions(pairs, device)
        self.labels = self.batch["input_ids"][self.rows, self.cols + 1]

    def logits(self, sel: torch.Tensor | None = None) -> torch.Tensor:
        rows, cols = (self.rows, self.cols) if sel is None else (self.rows[sel], self.cols[sel])
        if not len(rows):
            return torch.zeros((0, self.vocab), device=rows.device)
        return _logits_at(self.trainer.model, self.batch, rows, cols, self.vocab)


def _check_inputs(f_trainer, g_trainer, f_pairs, g_pairs, f2g, g2f, top_k, batch_size, lam, method,
                  direction) -> tuple[int, int]:
    from cotune.align.seqalign import METHODS

    check_direction(direction)

    if len(f_pairs) != len(g_pairs):
        raise ValueError(f"f_pairs has {len(f_pairs)} samples but g_pairs {len(g_pairs)}: they must be the same public "
                         "samples, in the same order, encoded by each model's tokenizer")
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (np.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam (the KL weight) must be finite and >= 0, got {lam}")
    if method not in METHODS:
        raise ValueError(f"unknown alignment method {method!r}; expected one of {METHODS}")
    sizes = {}
    for name, vmap, trainer, pairs, side in (("f2g", f2g, f_trainer, f_pairs, "f (the LLM)"),
                                             ("g2f", g2f, g_trainer, g_pairs, "g (the SLM)")):
        table = np.asarray(getattr(vmap, "ids", vmap))
        if table.ndim != 1 or table.dtype.kind not in "iu":
            raise ValueError(f"{name} must be a 1-D integer array (or a VocabMap); got {table.dtype} {table.shape}")
        n_tok = len(trainer.tokenizer)
        if not n_tok <= table.size <= trainer.vocab:
            raise ValueError(f"{name} maps {table.size} source ids, but {side} has a tokenizer of {n_tok} tokens and a "
                             f"model head of {trainer.vocab}: a map from its vocabulary needs {n_tok} <= entries <= "
                             f"{trainer.vocab} (is the map in the other direction?)")
        top = max((max(p.ids) for p in pairs if len(p.ids)), default=-1)
        if top >= table.size:
            raise ValueError(f"the pairs of {side} hold token id {top}, outside {name}'s {table.size} source ids "
                             "(were f_pairs and g_pairs swapped?)")
        sizes[name] = int(table.size)
    for name, vmap, dst in (("f2g", f2g, "g2f"), ("g2f", g2f, "f2g")):
        table = np.asarray(getattr(vmap, "ids", vmap))
        if table.size and (int(table.min()) < 0 or int(table.max()) >= sizes[dst]):
            raise ValueError(f"{name} points at ids in [{int(table.min())}, {int(table.max())}], outside the other "
                             f"model's vocabulary [0, {sizes[dst]})")
    return sizes["f2g"], sizes["g2f"]


@torch.no_grad()
def measure_cross(f_trainer: Trainer, g_trainer: Trainer, f_pairs, g_pairs, aligned: _Aligned, f2g: torch.Tensor,
                  g2f: torch.Tensor, *, top_k: int, batch_size: int, direction: str = "forward") -> dict:
    """Each model's mean CE over its own response tokens and both KD terms over the aligned positions (eval mode, no
    grad): llm_kl = D(f; g̃), slm_kl = D(g; f̃) in `direction`."""
    device = f_trainer.device
    vf, vg = f2g.numel(), g2f.numel()
    sums = {"llm_ce": 0.0, "slm_ce": 0.0, "llm_kl": 0.0, "slm_kl": 0.0}
    n_f = n_g = n_kl = 0
    f_trainer.model.eval()
    g_trainer.model.eval()
    lengths = [max(len(a.ids), len(b.ids)) for a, b in zip(f_pairs, g_pairs)]
    for idx in sorted_batches(lengths, batch_size):
        fs = _Side(f_trainer, [f_pairs[i] for i in idx], vf, device)
        gs = _Side(g_trainer, [g_pairs[i] for i in idx], vg, device)
        if not len(fs.rows) and not len(gs.rows):
            continue
        af, ag = aligned.batch(idx, f_pairs, g_pairs, device)
        lf, lg = fs.logits(), gs.logits()
        sums["llm_ce"] += float(F.cross_entropy(lf, fs.labels, reduction="sum"))
        sums["slm_ce"] += float(F.cross_entropy(lg, gs.labels, reduction="sum"))
        n_f += len(fs.rows)
        n_g += len(gs.rows)
        if len(af):
            sums["llm_kl"] += float(projected_kl(lf[af], *teacher_target(lg[ag], g2f, top_k), direction).sum())
            sums["slm_kl"] += float(projected_kl(lg[ag], *teacher_target(lf[af], f2g, top_k), direction).sum())
            n_kl += len(af)
    nan = float("nan")
    return {"llm_ce": sums["llm_ce"] / n_f if n_f else nan, "slm_ce": sums["slm_ce"] / n_g if n_g else nan,
            "llm_kl": sums["llm_kl"] / n_kl if n_kl else nan, "slm_kl": sums["slm_kl"] / n_kl if n_kl else nan,
            "positions": n_kl, "llm_positions": n_f, "slm_positions": n_g,
            "truncated_samples": truncated_samples(f_pairs) + truncated_samples(g_pairs)}


def co_distill_cross(f_trainer: Trainer, g_trainer: Trainer, f_pairs: Sequence, g_pairs: Sequence, *, f2g, g2f,
                     lam: float, epochs: int, batch_size: int, top_k: int = 32, seed: int = 0, method: str = "offsets",
                     direction: str = "forward", progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> dict:
    """`co_distill` for an LLM f and an SLM copy g with different tokenizers (see the module docstring).

    f_pairs[i] / g_pairs[i]: the same public sample encoded by f's / g's tokenizer (`Trainer.encode`, or
    `codistill.encode_public`). f2g: MinED map f's vocabulary -> g's (a `VocabMap` or an int array, one entry per
    f token id); g2f the reverse. Each model's vocabulary is taken as the length of its outgoing map (logits beyond
    it, a model head's padding, are ignored, as co_distill ignores those beyond the common vocabulary).
    method: `align_pair`'s alignment ("offsets" or "dtw"). direction: the KD terms' (KL_DIRECTIONS), as co_distill's.

    Returns co_distill's keys (llm/slm ce and kl before/after, llm/slm_loss_first/last, steps, samples, positions
    = aligned positions, stopped, truncated_samples (of both encodings)) plus llm_positions /
    slm_positions (each side's CE positions) and aligned_fraction (aligned positions / g's response positions).
    """
    device = same_device(f_trainer, g_trainer)
    vf, vg = _check_inputs(f_trainer, g_trainer, f_pairs, g_pairs, f2g, g2f, top_k, batch_size, lam, method,
                           direction)
    f2g_t, g2f_t = lookup_table(f2g, device), lookup_table(g2f, device)
    aligned = _Aligned(f_pairs, g_pairs, method, f_trainer.tokenizer, g_trainer.tokenizer)
    before = measure_cross(f_trainer, g_trainer, f_pairs, g_pairs, aligned, f2g_t, g2f_t, top_k=top_k,
                           batch_size=batch_size, direction=direction)

    def batch_fn(idx):
        fs = _Side(f_trainer, [f_pairs[i] for i in idx], vf, device)
        gs = _Side(g_trainer, [g_pairs[i] for i in idx], vg, device)
        if not len(fs.rows) and not len(gs.rows):
            return None, {}
        af, ag = aligned.batch(idx, f_pairs, g_pairs, device)
        lf = fs.logits()  # with grad: reused for ω's step
        lg = gs.logits()
        # θ step: g towards f's projected top-k (f detached inside teacher_target)
        loss_g = _ce(lg, gs.labels)
        if len(af):
            loss_g = loss_g + lam * _mean(projected_kl(lg[ag], *teacher_target(lf[af], f2g_t, top_k), direction))
        stats = {}
        if not loss_g.requires_grad or g_trainer.step(loss_g):  # no g position: nothing to learn, value kept
            stats["slm_loss"] = float(loss_g.detach())
        # ω step (by fit): f towards the UPDATED g's projected top-k
        loss_f = _ce(lf, fs.labels)
        if len(af):
            with torch.no_grad():
                lg_new = gs.logits(ag)
            loss_f = loss_f + lam * _mean(projected_kl(lf[af], *teacher_target(lg_new, g2f_t, top_k), direction))
        stats["llm_loss"] = float(loss_f.detach())
        return (loss_f if loss_f.requires_grad else None), stats

    lengths = [max(len(a.ids), len(b.ids)) for a, b in zip(f_pairs, g_pairs)]
    epoch_stats, steps, stopped = alternate(f_trainer, g_trainer, lengths, batch_fn, epochs=epochs,
                                            batch_size=batch_size, seed=seed, progress=progress,
                                            should_stop=should_stop)
    after = measure_cross(f_trainer, g_trainer, f_pairs, g_pairs, aligned, f2g_t, g2f_t, top_k=top_k,
                          batch_size=batch_size, direction=direction)
    out = summarize(before, after, epoch_stats, steps=steps, samples=len(f_pairs), stopped=stopped)
    out.update(llm_positions=before["llm_positions"], slm_positions=before["slm_positions"])
    out["aligned_fraction"] = aligned.total / before["slm_positions"] if before["slm_positions"] else float("nan")
    return out
