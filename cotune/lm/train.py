"""LoRA training: CE fine-tuning on private data and distillation (λ·CE + (1−λ)·sparse KD) on the public set.

The optimizer (AdamW over the trainable parameters) and the LR schedule are created once per Trainer and persist
across calls, i.e. across federated rounds; ``state_dict_bytes``/``load_state_bytes`` save and restore them as a
safetensors blob with JSON metadata (no pickle).
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from cotune.data.example import Example
from cotune.lm.batching import (
    collate,
    head_logits,
    hidden_states,
    model_device,
    shuffled_batches,
    sorted_batches,
    to_device,
    vocab_size,
)
from cotune.lm.losses import sparse_kd_loss
from cotune.align.tokenizers import EncodedPair, encode_pair

STATE_FORMAT = "cotune.trainer/1"

Progress = Callable[[int, int], None]
ShouldStop = Callable[[], bool]


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
    lam: float = 0.9  # weight of CE in distillation: lam*CE + (1-lam)*KD
    temperature: float = 1.0


@dataclass
class _Target:
    positions: torch.Tensor  # long [m]
    ids: torch.Tensor  # long [m, k]
    probs: torch.Tensor  # float32 [m, k]


class Trainer:
    def __init__(self, model, tokenizer, config: TrainConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or TrainConfig()
        self.device = model_device(model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither a pad nor an eos token")
        self.pad_id = int(pad)
        self.vocab = vocab_size(model)
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named_params:
            raise ValueError("model has no trainable parameters (attach_lora first)")
        self.optimizer = torch.optim.AdamW(
            [p for _, p in self.named_params], lr=self.config.lr, weight_decay=self.config.weight_decay
        )
        warmup = int(self.config.warmup_steps)

        def lr_lambda(step: int) -> float:
            return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

        self._lr_lambda = lr_lambda
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.global_step = 0
        self.epochs_done = 0

    def set_lr(self, lr: float) -> None:
        """Change the base learning rate (kept by the schedule; writing param_groups' lr directly would be
        overwritten by the scheduler at the next step). Setting config.lr has the same effect at the next call."""
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        self.config.lr = float(lr)
        self.scheduler.base_lrs = [float(lr) for _ in self.optimizer.param_groups]
        factor = self._lr_lambda(self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr) * factor
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    # ---------------------------------------------------------------------------------------------- encoding
    def encode(self, examples: Sequence[Example]) -> list[EncodedPair]:
        return [encode_pair(self.tokenizer, ex.prompt, ex.response, self.config.max_length) for ex in examples]

    def _prepare_targets(self, pairs: Sequence[EncodedPair], targets: Sequence[KDTarget | None]) -> list:
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
                    f"(max_length={self.config.max_length}); got range [{pos.min()}, {pos.max()}]"
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

    def _train_loop(self, pairs, targets, epochs, progress, should_stop) -> dict:
        cfg = self.config
        if any(abs(b - cfg.lr) > 1e-12 * max(1.0, cfg.lr) for b in self.scheduler.base_lrs):
            self.set_lr(cfg.lr)
        epochs = cfg.epochs if epochs is None else int(epochs)
        lengths = [len(p.ids) for p in pairs]
        n_batches = math.ceil(len(pairs) / cfg.batch_size) if pairs else 0
        total = n_batches * max(epochs, 0)
        epoch_losses: list[float] = []
        steps = 0
        stopped = False
        tokens = 0
        params = [p for _, p in self.named_params]
        t0 = time.perf_counter()
        self.model.train()
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(cfg.seed * 1_000_003 + self.global_step)
                for _ in range(max(epochs, 0)):
                    rng = np.random.default_rng([cfg.seed, self.epochs_done])
                    losses = []
                    for idx in shuffled_batches(lengths, cfg.batch_size, rng):
                        if should_stop is not None and should_stop():
                            stopped = True
                            break
                        bt = [targets[i] for i in idx] if targets is not None else None
                        ce_sum, ce_cnt, kd_sum, kd_cnt = self._batch_losses([pairs[i] for i in idx], bt)
                        if targets is None:  # plain CE: mean over the batch's response tokens
                            n = ce_cnt.sum()
                            loss = ce_sum.sum() / n if float(n) > 0 else None
                        else:  # per sample: lam*CE + (1-lam)*KD where it has a target, else lam*CE
                            ce_i = ce_sum / ce_cnt.clamp(min=1)
                            kd_i = kd_sum / kd_cnt.clamp(min=1)
                            per = cfg.lam * ce_i + (1.0 - cfg.lam) * kd_i * (kd_cnt > 0)
                            live = (ce_cnt > 0) | (kd_cnt > 0)
                            loss = per[live].mean() if bool(live.any()) else None
                        tokens += int(ce_cnt.sum())
                        steps += 1
                        if loss is not None:
                            self.optimizer.zero_grad(set_to_none=True)
                            loss.backward()
                            if cfg.grad_clip and cfg.grad_clip > 0:
                                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                            self.optimizer.step()
                            self.scheduler.step()
                            self.global_step += 1
                            losses.append(float(loss.detach()))
                        if progress is not None:
                            progress(steps, total)
                    if losses:
                        epoch_losses.append(float(np.mean(losses)))
                    if stopped:
                        break
                    self.epochs_done += 1
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.eval()
        return {
            "loss_first": epoch_losses[0] if epoch_losses else float("nan"),
            "loss_last": epoch_losses[-1] if epoch_losses else float("nan"),
            "steps": steps,
            "samples": len(pairs),
            "tokens": tokens,
            "stopped": stopped,
            "seconds": time.perf_counter() - t0,
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
        (len(examples), the FedAvg weight), tokens, stopped (should_stop fired), seconds, global_step."""
        return self._train_loop(self.encode(examples), None, epochs, progress, should_stop)

    def distill(
        self,
        examples: Sequence[Example],
        targets: Sequence[KDTarget | None],
        *,
        epochs: int | None = None,
        progress: Progress | None = None,
        should_stop: ShouldStop | None = None,
    ) -> dict:
        """λ·CE + (1−λ)·KD per sample (λ·CE alone where the target is None), KD = sparse_kd_loss at the target
        positions. kd_before/kd_after: mean KD per targeted position, and ce_before/ce_after: mean CE per response
        token, both measured without grad in eval mode (NaN when there is nothing to measure)."""
        pairs = self.encode(examples)
        prepared = self._prepare_targets(pairs, targets)
        ce_b, kd_b, _, kd_n = self._eval_pass(pairs, prepared)
        result = self._train_loop(pairs, prepared, epochs, progress, should_stop)
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
        """Optimizer + LR schedule + counters as safetensors (tensors) with JSON metadata. No pickle."""
        from safetensors.torch import save

        opt = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, object] = {}
        for idx, st in opt["state"].items():
            for key, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"state.{idx}.{key}"] = val.detach().to("cpu").contiguous()
                else:
                    scalars[f"{idx}.{key}"] = val
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        meta = {
            "format": STATE_FORMAT,
            "param_groups": groups,
            "scalars": scalars,
            "scheduler": sched,
            "global_step": self.global_step,
            "epochs_done": self.epochs_done,
            "params": [[n, list(p.shape)] for n, p in self.named_params],
            "config": asdict(self.config),
        }
        return save(tensors, metadata={"cotune": json.dumps(meta, sort_keys=True)})

    def load_state_bytes(self, data: bytes) -> None:
        """Restore what state_dict_bytes saved; raises ValueError (trainer unchanged) if it does not fit."""
        from safetensors.torch import load

        try:
            (header_len,) = struct.unpack("<Q", bytes(data[:8]))
            header = json.loads(bytes(data[8 : 8 + header_len]).decode("utf-8"))
            meta = json.loads(header["__metadata__"]["cotune"])
            tensors = load(bytes(data))
        except Exception as exc:
            raise ValueError(f"trainer state is not a valid cotune safetensors blob: {exc}") from exc
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"trainer state has format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
        mine = [[n, list(p.shape)] for n, p in self.named_params]
        if meta["params"] != mine:
            theirs = {n: s for n, s in meta["params"]}
            bad = [n for n, s in mine if theirs.get(n) != s][:3]
            raise ValueError(
                f"trainer state is for different parameters ({len(meta['params'])} saved, {len(mine)} here; "
                f"first mismatches: {bad})"
            )
        state: dict[int, dict] = {}
        for name, val in tensors.items():
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
        for name, val in meta["scalars"].items():
            idx, key = name.split(".", 1)
            state.setdefault(int(idx), {})[key] = val
        groups = []
        for g in meta["param_groups"]:
            g = dict(g)
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
            groups.append(g)
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        sched = dict(meta["scheduler"])
        sched["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
        self.scheduler.load_state_dict(sched)
        self.global_step = int(meta["global_step"])
        self.epochs_done = int(meta["epochs_done"])

    @property
    def optimizer_steps(self) -> int:
        return self.global_step
