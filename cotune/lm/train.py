"""LoRA training: CE fine-tuning on private data and distillation (λ·CE + (1−λ)·sparse KD) on the public set.

Every optimizer loop of the project runs through ONE method, :meth:`Trainer.fit`: the caller builds the batches and
contributes a loss function and a named parameter selection (:class:`ParamGroup`); ``fit`` does zero_grad, backward,
gradient clipping at ``config.grad_clip``, the non-finite loss guard, the optimizer step and the LR schedule step
(:meth:`Trainer.step`, the only place where that happens), reports progress and honours ``should_stop``.

The Trainer keeps one AdamW (and its LR schedule) PER GROUP NAME, created on first use and persisted across calls,
i.e. across federated rounds. The group ``"default"`` holds the parameters that were trainable when the Trainer was
built and is what ``train_ce``/``distill``/``optimizer``/``scheduler``/``set_lr`` use unless told otherwise.
``state_dict_bytes``/``load_state_bytes`` save and restore every group as a safetensors blob with JSON metadata (no
pickle).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from cotune.data.example import Example
from cotune.lm.batching import (
    collate,
    cuda_indices,
    head_logits,
    hidden_states,
    model_device,
    shuffled_batches,
    sorted_batches,
    to_device,
    vocab_size,
)
from cotune.align.tokenizers import EncodedPair, encode_pair, truncated_samples
from cotune.lm.losses import sparse_kd_loss
from cotune.profile import phase

STATE_FORMAT = "cotune.trainer/2"
_STATE_FORMAT_V1 = "cotune.trainer/1"  # one optimizer (the default group); still loadable
DEFAULT_GROUP = "default"

Progress = Callable[[int, int], None]
ShouldStop = Callable[[], bool]
LossFn = Callable[[Any], "tuple[torch.Tensor | None, dict[str, float]]"]

_GROUP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ParamGroup:
    """A named selection of parameters to train. The Trainer keeps one optimizer (and LR schedule) per name; later
    calls with the same name must select the same parameters."""

    name: str
    params: tuple[torch.nn.Parameter, ...]

    def __post_init__(self):
        if not isinstance(self.name, str) or not _GROUP_NAME.match(self.name):
            raise ValueError(f"a parameter group name must match {_GROUP_NAME.pattern}, got {self.name!r}")
        params = tuple(self.params)
        if not params:
            raise ValueError(f"parameter group {self.name!r} selects no parameters")
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"parameter group {self.name!r} lists a parameter twice")
        object.__setattr__(self, "params", params)


@dataclass
class FitResult:
    """What one :meth:`Trainer.fit` call did.

    steps: batches consumed (loss_fn called); optimizer_steps: updates made; skipped_steps: batches whose loss (or
    gradient norm) was NaN/Inf, so no update was made; empty_steps: batches with nothing to learn (loss None);
    stopped: should_stop fired; seconds: wall time. stats: one dict per batch that was not skipped, loss_fn's stats
    plus ``loss`` (the float loss) for those that made an update."""

    steps: int = 0
    optimizer_steps: int = 0
    skipped_steps: int = 0
    empty_steps: int = 0
    stopped: bool = False
    seconds: float = 0.0
    stats: list[dict[str, float]] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [s[key] for s in self.stats if key in s]

    def mean(self, key: str) -> float:
        """np.mean of the recorded values of `key` (NaN when there are none)."""
        v = self.values(key)
        return float(np.mean(v)) if v else float("nan")

    def sum(self, key: str) -> float:
        return float(sum(self.values(key)))

    def first(self, key: str) -> float:
        v = self.values(key)
        return float(v[0]) if v else float("nan")

    def last(self, key: str) -> float:
        v = self.values(key)
        return float(v[-1]) if v else float("nan")


@dataclass
class KDTarget:
    """Teacher distribution for one sample, already projected into THIS party's vocabulary.

    positions: int [m]        positions t in this party's encode_pair tokenization whose next-token distribution
                              gets the target (0 <= t < len(ids); unique)
    ids:       int64 [m, k]   token ids (negative = padding, ignored)
    probs:     float32 [m, k] probabilities (rows sum to 1 over the non-padding entries)
    """

    positions: np.ndarray
    ids: np.ndarray
    probs: np.ndarray


@dataclass
class TrainConfig:
    lr: float = 2e-4
    batch_size: int = 8
    epochs: int = 1
    max_length: int = 512
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    temperature: float = 1.0


@dataclass
class _Target:
    positions: torch.Tensor  # long [m]
    ids: torch.Tensor  # long [m, k]
    probs: torch.Tensor  # float32 [m, k]


class GroupState:
    """One parameter group's persistent optimizer state (`Trainer.group(name)`): AdamW, its LambdaLR schedule, the
    group's (name, parameter) list and counters: steps (optimizer steps made), skipped_steps (non-finite ones)."""

    def __init__(self, name: str, named_params: list[tuple[str, torch.nn.Parameter]], lr: float,
                 weight_decay: float, lr_lambda: Callable[[int], float]):
        self.name = name
        self.named_params = named_params
        self.params = [p for _, p in named_params]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.steps = 0  # optimizer steps made
        self.skipped_steps = 0  # non-finite losses / gradient norms skipped

    def signature(self) -> list:
        return [[n, list(p.shape)] for n, p in self.named_params]


def offset_progress(progress: Progress | None, offset: int, total: int) -> Progress | None:
    """progress(offset + done, total) for a fit call that covers part (one epoch) of a longer run."""
    if progress is None:
        return None
    return lambda done, _total: progress(offset + done, total)


class Trainer:
    def __init__(self, model, tokenizer, config: TrainConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or TrainConfig()
        self.device = model_device(model)
        self.cuda_devices = cuda_indices(model)  # every GPU of a model spread across several (fork_rng)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither a pad nor an eos token")
        self.pad_id = int(pad)
        self.vocab = vocab_size(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters (attach_lora first)")
        warmup = int(self.config.warmup_steps)

        def lr_lambda(step: int) -> float:
            return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

        self._lr_lambda = lr_lambda
        self.groups: dict[str, GroupState] = {}
        self._new_group(DEFAULT_GROUP, named)
        self.epochs_done = 0

    # ---------------------------------------------------------------------------------------------- groups
    def _new_group(self, name: str, named_params, lr: float | None = None) -> GroupState:
        group = GroupState(name, list(named_params), float(self.config.lr if lr is None else lr),
                       self.config.weight_decay, self._lr_lambda)
        self.groups[name] = group
        return group

    def _param_names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.model.named_parameters()}

    def group(self, params: ParamGroup | str | None = None) -> GroupState:
        """The persistent optimizer state of a parameter selection: None = the default group, a name = an existing
        group, a ParamGroup = that group, created (with config.lr) on first use. A ParamGroup whose name exists must
        select the same parameters, in the same order."""
        if params is None:
            params = DEFAULT_GROUP
        if isinstance(params, str):
            if params not in self.groups:
                raise KeyError(f"no parameter group {params!r} (have {sorted(self.groups)}); pass a ParamGroup")
            return self.groups[params]
        if not isinstance(params, ParamGroup):
            raise TypeError(f"params must be a ParamGroup, a group name or None, got {type(params).__name__}")
        group = self.groups.get(params.name)
        if group is not None:
            if [id(p) for p in group.params] != [id(p) for p in params.params]:
                raise ValueError(f"parameter group {params.name!r} was created over different parameters "
                                 f"({len(group.params)} then, {len(params.params)} now)")
            return group
        names = self._param_names()
        missing = [i for i, p in enumerate(params.params) if id(p) not in names]
        if missing:
            raise ValueError(f"parameter group {params.name!r}: {len(missing)} parameter(s) are not this trainer's "
                             "model's")
        return self._new_group(params.name, [(names[id(p)], p) for p in params.params])

    @property
    def named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return self.groups[DEFAULT_GROUP].named_params

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.groups[DEFAULT_GROUP].optimizer

    @property
    def scheduler(self):
        return self.groups[DEFAULT_GROUP].scheduler

    @property
    def global_step(self) -> int:
        """Optimizer steps of the default group."""
        return self.groups[DEFAULT_GROUP].steps

    @global_step.setter
    def global_step(self, value: int) -> None:
        self.groups[DEFAULT_GROUP].steps = int(value)

    @property
    def optimizer_steps(self) -> int:
        return self.global_step

    def set_lr(self, lr: float, params: ParamGroup | str | None = None) -> None:
        """Change a group's base learning rate (default group unless named; a new ParamGroup is created). Kept by the
        schedule: writing param_groups' lr directly would be overwritten by the scheduler at the next step. For the
        default group, setting config.lr has the same effect at the next train_ce/distill call."""
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        group = self.group(params)
        if group.name == DEFAULT_GROUP:
            self.config.lr = float(lr)
        sched, opt = group.scheduler, group.optimizer
        sched.base_lrs = [float(lr) for _ in opt.param_groups]
        factor = self._lr_lambda(sched.last_epoch)
        for g in opt.param_groups:
            g["lr"] = float(lr) * factor
        sched._last_lr = [g["lr"] for g in opt.param_groups]

    @contextlib.contextmanager
    def seeded(self, seed: int):
        """Fork the torch RNG (CPU and every CUDA device of the model) and seed it: dropout draws inside are
        reproducible and leave the global RNG untouched."""
        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.manual_seed(int(seed))
            yield

    # ---------------------------------------------------------------------------------------------- the loop
    def step(self, loss: torch.Tensor, params: ParamGroup | str | None = None) -> bool:
        """One update of a group on `loss`: zero_grad, backward, gradient clipping at config.grad_clip over the
        group's parameters, optimizer step, schedule step. A non-finite loss (or, with clipping on, a non-finite
        gradient norm) makes no update:
        parameters and optimizer state stay as they were, the group's skipped_steps counts it, and False is
        returned. The only place in the project where an optimizer steps.

        On an fp16 model (base weights in float16: GPUs without bf16) the backward runs through a per-group
        ``torch.amp.GradScaler`` (created on the group's first step): the loss is scaled before backward, the
        gradients unscaled before clipping, and a step whose unscaled gradients are non-finite (an fp16 overflow) is
        skipped and counted like any other, while the scaler lowers its scale; the scale grows again after 2000 clean
        steps. It is not part of state_dict_bytes (a restored trainer starts from the initial scale). fp32 and bf16
        models (bf16 has fp32's exponent range) take the plain path."""
        group = self.group(params)
        if not math.isfinite(float(loss.detach())):
            group.skipped_steps += 1
            return False
        scaler = getattr(group, "grad_scaler", False)
        if scaler is False:  # decided once per group: a GradScaler iff the model holds fp16 weights
            fp16 = any(p.dtype == torch.float16 for p in self.model.parameters())
            scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
            group.grad_scaler = scaler
        group.optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            with phase("backward"):
                loss.backward()
            with phase("optimizer"):
                clip = self.config.grad_clip
                if clip and clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(group.params, clip)
                    if not math.isfinite(float(norm)):
                        group.optimizer.zero_grad(set_to_none=True)
                        group.skipped_steps += 1
                        return False
                group.optimizer.step()
                group.scheduler.step()
            group.steps += 1
            return True
        with phase("backward"):
            scaler.scale(loss).backward()
        with phase("optimizer"):
            scaler.unscale_(group.optimizer)  # gradients in true units (fp32 master grads) before clipping
            clip = self.config.grad_clip
            if clip and clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(group.params, clip)
                finite = math.isfinite(float(norm))
            else:
                finite = all(bool(torch.isfinite(p.grad).all()) for p in group.params if p.grad is not None)
            if finite:
                scaler.step(group.optimizer)  # the scaler found no inf either (same gradients): it steps
            scaler.update()  # lowers the scale after an overflow, grows it after a run of clean steps
            if not finite:
                group.optimizer.zero_grad(set_to_none=True)
                group.skipped_steps += 1
                return False
            group.scheduler.step()
        group.steps += 1
        return True

    def fit(
        self,
        batches: Iterable,
        loss_fn: LossFn,
        params: ParamGroup | str | None = None,
        steps: int | None = None,
        *,
        progress: Progress | None = None,
        should_stop: ShouldStop | None = None,
        total: int | None = None,
    ) -> FitResult:
        """Train a parameter group on `batches`, the one optimizer loop of the project.

        For each batch (should_stop() is asked first): ``loss, stats = loss_fn(batch)``; a None loss (or one without
        gradient) means nothing to learn (counted in empty_steps, no update), else :meth:`step` updates the group
        (a NaN/Inf loss is skipped: skipped_steps). progress(batches done, total) after each batch; total defaults
        to `steps`, else len(batches) when it has one, else 0. steps: stop after this many update attempts
        (optimizer + skipped steps, so a run of non-finite losses cannot loop forever on a cycling iterable); None
        exhausts the iterable. The model is in train mode during the call and in eval mode after; the group's
        gradients are released (zero_grad(set_to_none=True)) however the call ends. The torch RNG is not seeded
        here: wrap the call(s) in :meth:`seeded`."""
        group = self.group(params)
        if steps is not None and (isinstance(steps, bool) or int(steps) < 0):
            raise ValueError(f"steps must be a non-negative integer or None, got {steps!r}")
        if total is None:
            total = int(steps) if steps is not None else (len(batches) if hasattr(batches, "__len__") else 0)
        res = FitResult()
        t0 = time.perf_counter()
        self.model.train()
        try:
            it = iter(batches)
            while steps is None or res.optimizer_steps + res.skipped_steps < steps:
                if should_stop is not None and should_stop():
                    res.stopped = True
                    break
                try:
                    batch = next(it)
                except StopIteration:
                    break
                with phase("forward"):
                    loss, stats = loss_fn(batch)
                stats = dict(stats or {})
                res.steps += 1
                if loss is None or not loss.requires_grad:
                    res.empty_steps += 1
                    res.stats.append(stats)
                else:
                    value = float(loss.detach())
                    if self.step(loss, group.name):
                        res.optimizer_steps += 1
                        res.stats.append({"loss": value, **stats})
                    else:
                        res.skipped_steps += 1
                del loss
                if progress is not None:
                    progress(res.steps, total)
        finally:
            group.optimizer.zero_grad(set_to_none=True)
            self.model.eval()
            res.seconds = time.perf_counter() - t0
        return res

    # ---------------------------------------------------------------------------------------------- encoding
    def encode(self, examples: Sequence[Example], max_length: int | None = None) -> list[EncodedPair]:
        """encode_pair of every example at `max_length` tokens (default: the config's)."""
        length = self.config.max_length if max_length is None else int(max_length)
        with phase("data"):
            return [encode_pair(self.tokenizer, ex.prompt, ex.response, length) for ex in examples]

    def _prepare_targets(self, pairs: Sequence[EncodedPair], targets: Sequence[KDTarget | None],
                         max_length: int | None = None) -> list:
        if len(targets) != len(pairs):
            raise ValueError(f"got {len(targets)} KD targets for {len(pairs)} examples")
        out: list[_Target | None] = []
        for i, (pair, t) in enumerate(zip(pairs, targets)):
            if t is None:
                out.append(None)
                continue
            pos = np.asarray(t.positions).astype(np.int64).reshape(-1)
            ids = np.asarray(t.ids)
            probs = np.asarray(t.probs)
            if pos.size == 0:
                out.append(None)
                continue
            if ids.ndim != 2 or ids.shape != probs.shape or ids.shape[0] != pos.size:
                raise ValueError(
                    f"KD target {i}: positions [{pos.size}], ids {list(ids.shape)}, probs {list(probs.shape)} "
                    "must be [m], [m, k], [m, k]"
                )
            if not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"KD target {i}: ids must be integers, got {ids.dtype}")
            if pos.min() < 0 or pos.max() >= len(pair.ids):
                raise ValueError(
                    f"KD target {i}: positions must lie in [0, {len(pair.ids)}) of this party's tokenization "
                    f"(max_length={self.config.max_length if max_length is None else max_length}); got range [{pos.min()}, {pos.max()}]"
                )
            if len(np.unique(pos)) != pos.size:
                raise ValueError(f"KD target {i}: duplicate positions")
            if ids.size and ids.max() >= self.vocab:
                raise ValueError(f"KD target {i}: token id {int(ids.max())} outside the vocabulary ({self.vocab})")
            probs = probs.astype(np.float32)
            if not np.isfinite(probs).all() or (probs < 0).any():
                raise ValueError(f"KD target {i}: probabilities must be finite and non-negative")
            out.append(
                _Target(
                    torch.from_numpy(pos),
                    torch.from_numpy(ids.astype(np.int64)),
                    torch.from_numpy(probs),
                )
            )
        return out

    # ---------------------------------------------------------------------------------------------- core pass
    def _batch_losses(self, pairs: Sequence[EncodedPair], targets: Sequence[_Target | None] | None):
        """Per-row sums and counts of CE (over response tokens) and KD (over target positions) for one batch."""
        batch = to_device(collate(pairs, self.pad_id), self.device)
        rows: list[int] = []
        cols: list[int] = []
        ce_slot, ce_label, ce_row = [], [], []
        kd_slot, kd_row, kd_ids, kd_probs = [], [], [], []
        for r, pair in enumerate(pairs):
            index: dict[int, int] = {}

            def slot(t: int) -> int:
                s = index.get(t)
                if s is None:
                    s = index[t] = len(rows)
                    rows.append(r)
                    cols.append(t)
                return s

            for t in pair.target_positions:
                ce_slot.append(slot(t))
                ce_label.append(pair.ids[t + 1])
                ce_row.append(r)
            tgt = targets[r] if targets is not None else None
            if tgt is not None:
                for t in tgt.positions.tolist():
                    kd_slot.append(slot(t))
                    kd_row.append(r)
                kd_ids.append(tgt.ids)
                kd_probs.append(tgt.probs)
        n_rows = len(pairs)
        dev = self.device
        zeros = torch.zeros(n_rows, dtype=torch.float32, device=dev)
        if not rows:
            return zeros, zeros.clone(), zeros.clone(), zeros.clone()
        hid = hidden_states(self.model, batch["input_ids"], batch["attention_mask"])
        rows_t = torch.tensor(rows, dtype=torch.long, device=dev)
        cols_t = torch.tensor(cols, dtype=torch.long, device=dev)
        logits = head_logits(self.model, hid[rows_t, cols_t])  # [N, V] fp32
        ce_sum, ce_cnt, kd_sum, kd_cnt = zeros, zeros.clone(), zeros.clone(), zeros.clone()
        if ce_slot:
            s = torch.tensor(ce_slot, dtype=torch.long, device=dev)
            lab = torch.tensor(ce_label, dtype=torch.long, device=dev)
            rr = torch.tensor(ce_row, dtype=torch.long, device=dev)
            sel = logits[s]
            ce_tok = torch.logsumexp(sel, -1) - sel.gather(-1, lab[:, None]).squeeze(-1)
            ce_sum = zeros.index_add(0, rr, ce_tok)
            ce_cnt = zeros.index_add(0, rr, torch.ones_like(ce_tok))
        if kd_slot:
            s = torch.tensor(kd_slot, dtype=torch.long, device=dev)
            rr = torch.tensor(kd_row, dtype=torch.long, device=dev)
            k = max(t.shape[1] for t in kd_ids)
            ids = torch.cat([torch.nn.functional.pad(t, (0, k - t.shape[1]), value=-1) for t in kd_ids]).to(dev)
            probs = torch.cat([torch.nn.functional.pad(t, (0, k - t.shape[1])) for t in kd_probs]).to(dev)
            mask = torch.ones(len(kd_slot), dtype=torch.bool, device=dev)
            kd_pos = sparse_kd_loss(logits[s], ids, probs, mask, self.config.temperature, reduction="none")
            kd_sum = zeros.index_add(0, rr, kd_pos)
            kd_cnt = zeros.index_add(0, rr, torch.ones_like(kd_pos))
        return ce_sum, ce_cnt, kd_sum, kd_cnt

    @torch.no_grad()
    def _eval_pass(self, pairs, targets) -> tuple[float, float, int, int]:
        """(mean CE per response token, mean KD per target position, tokens, kd positions), eval mode."""
        was_training = self.model.training
        self.model.eval()
        ce_s = kd_s = 0.0
        ce_n = kd_n = 0
        try:
            for idx in sorted_batches([len(p.ids) for p in pairs], self.config.batch_size):
                bt = [targets[i] for i in idx] if targets is not None else None
                a, b, c, d = self._batch_losses([pairs[i] for i in idx], bt)
                ce_s += float(a.sum())
                ce_n += int(b.sum())
                kd_s += float(c.sum())
                kd_n += int(d.sum())
        finally:
            self.model.train(was_training)
        ce = ce_s / ce_n if ce_n else float("nan")
        kd = kd_s / kd_n if kd_n else float("nan")
        return ce, kd, ce_n, kd_n

    def _train_loop(self, pairs, targets, epochs, progress, should_stop, ce_weight: float = 1.0) -> dict:
        """train_ce / distill on the default group: one fit call per epoch (epoch-seeded shuffle), the torch RNG
        seeded once per call."""
        cfg = self.config
        if any(abs(b - cfg.lr) > 1e-12 * max(1.0, cfg.lr) for b in self.scheduler.base_lrs):
            self.set_lr(cfg.lr)
        epochs = cfg.epochs if epochs is None else int(epochs)
        lengths = [len(p.ids) for p in pairs]
        n_batches = math.ceil(len(pairs) / cfg.batch_size) if pairs else 0
        total = n_batches * max(epochs, 0)

        def loss_fn(idx):
            bt = [targets[i] for i in idx] if targets is not None else None
            ce_sum, ce_cnt, kd_sum, kd_cnt = self._batch_losses([pairs[i] for i in idx], bt)
            if targets is None:  # plain CE: mean over the batch's response tokens
                n = ce_cnt.sum()
                loss = ce_sum.sum() / n if float(n) > 0 else None
            else:  # per sample: λ·CE + (1−λ)·KD where it has a target, else λ·CE (λ = ce_weight)
                ce_i = ce_sum / ce_cnt.clamp(min=1)
                kd_i = kd_sum / kd_cnt.clamp(min=1)
                per = ce_weight * ce_i + (1.0 - ce_weight) * kd_i * (kd_cnt > 0)
                live = (ce_cnt > 0) | (kd_cnt > 0)
                loss = per[live].mean() if bool(live.any()) else None
            return loss, {"tokens": int(ce_cnt.sum())}

        epoch_losses: list[float] = []
        steps = tokens = skipped = 0
        stopped = False
        try:
            with self.seeded(cfg.seed * 1_000_003 + self.global_step):
                for _ in range(max(epochs, 0)):
                    rng = np.random.default_rng([cfg.seed, self.epochs_done])
                    res = self.fit(shuffled_batches(lengths, cfg.batch_size, rng), loss_fn,
                                   progress=offset_progress(progress, steps, total), should_stop=should_stop,
                                   total=total)
                    steps += res.steps
                    tokens += int(res.sum("tokens"))
                    skipped += res.skipped_steps
                    if res.values("loss"):
                        epoch_losses.append(res.mean("loss"))
                    if res.stopped:
                        stopped = True
                        break
                    self.epochs_done += 1
        finally:
            self.model.eval()
        return {
            "loss_first": epoch_losses[0] if epoch_losses else float("nan"),
            "loss_last": epoch_losses[-1] if epoch_losses else float("nan"),
            "steps": steps,
            "samples": len(pairs),
            "truncated_samples": truncated_samples(pairs),  # cut to max_length (encode_pair)
            "tokens": tokens,
            "stopped": stopped,
            "global_step": self.global_step,
        }

    # ---------------------------------------------------------------------------------------------- public API
    def train_ce(
        self,
        examples: Sequence[Example],
        *,
        epochs: int | None = None,
        progress: Progress | None = None,
        should_stop: ShouldStop | None = None,
    ) -> dict:
        """Fine-tune on (prompt, response) pairs with CE on the response tokens.

        Returns loss_first/loss_last (mean training CE of the first/last epoch), steps (batches run), samples
        (len(examples), the FedAvg weight), truncated_samples (examples cut to max_length), tokens, stopped
        (should_stop fired), global_step. Its time is the task's profile (cotune.profile), not a metric: metrics
        are what a rerun reproduces."""
        return self._train_loop(self.encode(examples), None, epochs, progress, should_stop)

    def distill(
        self,
        examples: Sequence[Example],
        targets: Sequence[KDTarget | None],
        *,
        ce_weight: float,
        epochs: int | None = None,
        max_length: int | None = None,
        progress: Progress | None = None,
        should_stop: ShouldStop | None = None,
    ) -> dict:
        """λ·CE + (1−λ)·KD per sample, λ = ce_weight in [0, 1] (λ·CE alone where the target is None), KD =
        sparse_kd_loss at the target positions, the examples encoded at `max_length` tokens (default: the config's;
        the targets' positions must come from the same length). kd_before/kd_after: mean KD per targeted position,
        and ce_before/ce_after: mean CE per response token, both measured without grad in eval mode (NaN when there
        is nothing to measure)."""
        if not 0.0 <= ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
        pairs = self.encode(examples, max_length)
        prepared = self._prepare_targets(pairs, targets, max_length)
        ce_b, kd_b, _, kd_n = self._eval_pass(pairs, prepared)
        result = self._train_loop(pairs, prepared, epochs, progress, should_stop, ce_weight)
        ce_a, kd_a, _, _ = self._eval_pass(pairs, prepared)
        result.update(
            kd_before=kd_b,
            kd_after=kd_a,
            ce_before=ce_b,
            ce_after=ce_a,
            kd_samples=sum(t is not None for t in prepared),
            kd_positions=kd_n,
        )
        return result

    def kd_eval(self, examples: Sequence[Example], targets: Sequence[KDTarget | None]) -> float:
        """Mean KD loss per targeted position (eval mode, no grad); NaN when no sample has a target."""
        pairs = self.encode(examples)
        return self._eval_pass(pairs, self._prepare_targets(pairs, targets))[1]

    def ce_eval(self, examples: Sequence[Example]) -> float:
        return self._eval_pass(self.encode(examples), None)[0]

    # ---------------------------------------------------------------------------------------------- state
    def state_dict_bytes(self) -> bytes:
        """Every group's optimizer + LR schedule + counters, and epochs_done, as safetensors (tensors) with JSON
        metadata. No pickle. Tensors are named ``<group>/state.<param index>.<key>``."""
        from safetensors.torch import save

        tensors: dict[str, torch.Tensor] = {}
        groups_meta: dict[str, dict] = {}
        for name, group in self.groups.items():
            opt = group.optimizer.state_dict()
            scalars: dict[str, object] = {}
            for idx, st in opt["state"].items():
                for key, val in st.items():
                    if torch.is_tensor(val):
                        tensors[f"{name}/state.{idx}.{key}"] = val.detach().to("cpu").contiguous()
                    else:
                        scalars[f"{idx}.{key}"] = val
            groups_meta[name] = {
                "param_groups": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                                 for g in opt["param_groups"]],
                "scalars": scalars,
                "scheduler": {k: v for k, v in group.scheduler.state_dict().items() if k != "lr_lambdas"},
                "steps": group.steps,
                "skipped_steps": group.skipped_steps,
                "params": group.signature(),
            }
        meta = {
            "format": STATE_FORMAT,
            "groups": groups_meta,
            "global_step": self.global_step,
            "epochs_done": self.epochs_done,
            "config": asdict(self.config),
        }
        return save(tensors, metadata={"cotune": json.dumps(meta, sort_keys=True)})

    def load_state_bytes(self, data: bytes) -> None:
        """Restore what state_dict_bytes saved (also the single-optimizer cotune.trainer/1 format); groups the blob
        lacks are dropped, groups this trainer lacks are created over the model's parameters of those names. Raises
        ValueError (trainer unchanged) if it does not fit."""
        from safetensors.torch import load

        try:
            (header_len,) = struct.unpack("<Q", bytes(data[:8]))
            header = json.loads(bytes(data[8 : 8 + header_len]).decode("utf-8"))
            meta = json.loads(header["__metadata__"]["cotune"])
            tensors = load(bytes(data))
        except Exception as exc:
            raise ValueError(f"trainer state is not a valid cotune safetensors blob: {exc}") from exc
        fmt = meta.get("format")
        if fmt == _STATE_FORMAT_V1:
            groups_meta = {DEFAULT_GROUP: {"param_groups": meta["param_groups"], "scalars": meta["scalars"],
                                           "scheduler": meta["scheduler"], "steps": meta["global_step"],
                                           "skipped_steps": 0, "params": meta["params"]}}
            tensors = {f"{DEFAULT_GROUP}/{k}": v for k, v in tensors.items()}
        elif fmt == STATE_FORMAT:
            groups_meta = meta["groups"]
        else:
            raise ValueError(f"trainer state has format {fmt!r}, expected {STATE_FORMAT!r}")
        if DEFAULT_GROUP not in groups_meta:
            raise ValueError("trainer state has no default parameter group")
        # Check everything before changing anything.
        by_name = dict(self.model.named_parameters())
        plan: dict[str, list | None] = {}
        for name, gm in groups_meta.items():
            if not isinstance(name, str) or not _GROUP_NAME.match(name):
                raise ValueError(f"trainer state holds a bad parameter group name {name!r}")
            theirs = [[n, list(s)] for n, s in gm["params"]]
            if name in self.groups:
                mine = self.groups[name].signature()
                plan[name] = None
            else:
                mine = [[n, list(by_name[n].shape)] if n in by_name else [n, None] for n, _ in theirs]
                plan[name] = [(n, by_name[n]) for n, _ in theirs if n in by_name]
            if theirs != mine:
                known = {n: s for n, s in theirs}
                bad = [n for n, s in mine if known.get(n) != s][:3]
                raise ValueError(
                    f"trainer state is for different parameters (group {name!r}: {len(theirs)} saved, {len(mine)} "
                    f"here; first mismatches: {bad})"
                )
        states: dict[str, dict[int, dict]] = {name: {} for name in groups_meta}
        for tname, val in tensors.items():
            gname, rest = tname.split("/", 1)
            _, idx, key = rest.split(".", 2)
            states[gname].setdefault(int(idx), {})[key] = val
        for gname, gm in groups_meta.items():
            for sname, val in gm["scalars"].items():
                idx, key = sname.split(".", 1)
                states[gname].setdefault(int(idx), {})[key] = val
        for name, named in plan.items():
            if named is not None:
                self._new_group(name, named)
        for name in [n for n in self.groups if n not in groups_meta]:
            del self.groups[name]
        for name, gm in groups_meta.items():
            group = self.groups[name]
            pgs = []
            for g in gm["param_groups"]:
                g = dict(g)
                if "betas" in g:
                    g["betas"] = tuple(g["betas"])
                pgs.append(g)
            group.optimizer.load_state_dict({"state": states[name], "param_groups": pgs})
            sched = dict(gm["scheduler"])
            sched["lr_lambdas"] = [None] * len(group.optimizer.param_groups)
            group.scheduler.load_state_dict(sched)
            group.steps = int(gm["steps"])
            group.skipped_steps = int(gm.get("skipped_steps", 0))
        self.epochs_done = int(meta["epochs_done"])
