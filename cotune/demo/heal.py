"""A layer-reduced copy of an LLM, healed by a short full fine-tune and cached: an SLM that shares the LLM's tokenizer.

``reduce_layers`` keeps a list of decoder layers (the layer-keeping core FedBiOT's compression uses,
:func:`cotune.algorithms.fedbiot.compress.select_layers`); ``heal`` fine-tunes every decoder-layer and final-norm weight of the
result with CE on response tokens (the project's Trainer); ``layer_reduced_copy`` does both from a model path and
caches the result as an HF directory whose ``cotune_reduced.json`` records what it was built from, so that the same
inputs return it at once and any change rebuilds it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from cotune.algorithms.fedbiot.plan import uniform_layer_indices
from cotune.data import Example, dataset_hash
from cotune.lm.layers import _num_layers_attr, _text_config, select_layers

log = logging.getLogger(__name__)

REDUCED_FORMAT = "cotune.reduced-model/1"
MARKER_FILE = "cotune_reduced.json"

# Defaults chosen on Gemma 3 270M cut to 6 of its 18 layers, healed on ARC-Easy train (2 CPU cores, one torch
# thread): 200 steps at lr 1e-4 build in about 3.5 minutes (about 1 s a step) and bring the held-out response CE from
# 24.7 (unhealed) to 6.2 nats/token (full model: 2.9); lr 3e-4 and 1e-3 were worse at 100 steps, and 300 steps
# only reached 5.6 on ARC-Easy validation. Multiple choice on 60 ARC-Easy validation items: 40% healed, 22% unhealed,
# 62% full model.
DEFAULT_LR = 1e-4
DEFAULT_BATCH_SIZE = 4
DEFAULT_MAX_LENGTH = 128
DEFAULT_HOLDOUT = 32

Progress = Callable[[int, int], None]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json", ".lock")
_MODEL_FILES = ("config.json", "generation_config.json")


def reduce_layers(model, keep: Sequence[int]):
    """A new model of the same class and config, except that it holds only the decoder layers ``keep`` (original
    indices, renumbered 0..len−1); embeddings, final norm and LM head are copied. Per-layer config lists (Gemma 3's
    ``layer_types``, i.e. its sliding/full attention and RoPE pattern) are cut to the kept layers. The input model is
    not modified. Raises ValueError for an empty list, an index out of range or a repeated index."""
    return select_layers(model, keep)


def _frozen_embeddings(model) -> set[int]:
    """ids of the token embedding and LM head parameters (one tensor when they are tied)."""
    ids = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def heal(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    max_length: int,
    seed: int,
    holdout: int = DEFAULT_HOLDOUT,
    warmup_steps: int | None = None,
    progress: Progress | None = None,
) -> dict:
    """Heal a layer-reduced model in place: ``steps`` AdamW steps of CE on the response tokens of ``examples``.

    Trained: every parameter except the token embeddings and the LM head (all decoder layers, the final norm, and
    whatever else the architecture has, e.g. GPT-2's position embeddings). The embeddings / (tied) LM head stay
    frozen: with large vocabularies (Gemma 3: 262k × 640 = 168M of its 268M weights) they are most of the model, and
    training them would cost most of the time and the optimizer memory for little gain in a short heal.

    A seeded ``holdout`` examples (at most a fifth of them) are set aside and scored before and after
    (:func:`cotune.lm.evaluate.evaluate_loss`); the rest are cycled in seeded random order to fill
    ``steps × batch_size`` samples. The learning rate warms up linearly over ``warmup_steps`` (default: a tenth of
    the steps, at most 20) and then stays constant; gradients are clipped at norm 1. Each parameter's
    ``requires_grad`` is restored afterwards and the model is left in eval mode.

    Returns: steps, train_examples, holdout, loss_first / loss_last (mean training CE of the first / last tenth of
    the steps), loss_curve (that mean for each tenth), eval_loss_before / eval_loss_after (mean CE per response token
    on the holdout; NaN without one), trainable_params, frozen_params, tokens (response tokens trained on), seconds.
    """
    from cotune.lm.evaluate import evaluate_loss
    from cotune.lm.train import TrainConfig, Trainer

    examples = list(examples)
    _check_heal_args(len(examples), steps, lr, batch_size, max_length, holdout)
    rng = np.random.default_rng([int(seed), 0x4EA1])
    order = rng.permutation(len(examples)).tolist()
    n_hold = min(int(holdout), len(examples) // 5)
    held = [examples[i] for i in order[:n_hold]]
    pool = [examples[i] for i in order[n_hold:]]
    need = steps * batch_size
    stream: list[Example] = []
    while len(stream) < need:
        stream.extend(pool[i] for i in rng.permutation(len(pool)).tolist())
    stream = stream[:need]
    warmup = min(20, steps // 10) if warmup_steps is None else int(warmup_steps)

    frozen = _frozen_embeddings(model)
    saved = [(p, p.requires_grad) for p in model.parameters()]
    t0 = time.perf_counter()
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) not in frozen)
        params = {id(p): p for p in model.parameters()}.values()  # tied tensors once
        trainable = sum(p.numel() for p in params if p.requires_grad)
        frozen_n = sum(p.numel() for p in params if not p.requires_grad)

        def eval_loss() -> float:
            if not held:
                return float("nan")
            return evaluate_loss(model, tokenizer, held, batch_size=batch_size, max_length=max_length)["loss"]

        before = eval_loss()
        trainer = Trainer(
            model,
            tokenizer,
            TrainConfig(lr=lr, batch_size=batch_size, epochs=1, max_length=max_length, warmup_steps=warmup,
                        grad_clip=1.0, weight_decay=0.0, seed=int(seed)),
        )
        # Ten calls of one "epoch" each over consecutive slices of the stream: each slice is exactly its batches
        # (len = batches × batch_size), and each call's mean loss is one point of the loss curve.
        n_chunks = min(10, steps)
        bounds = [round(i * steps / n_chunks) for i in range(n_chunks + 1)]
        curve: list[float] = []
        tokens = 0
        for a, b in itertools.pairwise(bounds):
            report = None
            if progress is not None:
                def report(done: int, _total: int, _a: int = a) -> None:
                    progress(_a + done, steps)
            out = trainer.train_ce(stream[a * batch_size : b * batch_size], progress=report)
            curve.append(out["loss_first"])
            tokens += out["tokens"]
        after = eval_loss()
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.eval()
    return {
        "steps": int(steps),
        "train_examples": len(pool),
        "holdout": len(held),
        "loss_first": curve[0],
        "loss_last": curve[-1],
        "loss_curve": curve,
        "eval_loss_before": before,
        "eval_loss_after": after,
        "trainable_params": int(trainable),
        "frozen_params": int(frozen_n),
        "tokens": int(tokens),
        "seconds": time.perf_counter() - t0,
    }


def _check_heal_args(n_examples: int, steps, lr, batch_size, max_length, holdout) -> None:
    if n_examples < 1:
        raise ValueError("healing needs at least one example")
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("max_length", max_length, 2),
                             ("holdout", holdout, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and np.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")


def source_fingerprint(model_dir: Path) -> str:
    """Cheap identity of an HF model directory: sha256 over config.json's bytes and the name, size and mtime of
    every other top-level file (weights, tokenizer); cotune marker files are left out."""
    model_dir = Path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.iterdir()):
        if not path.is_file() or path.name.startswith("cotune") or path.name == "config.json":
            continue
        st = path.stat()
        h.update(json.dumps([path.name, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


def _num_layers(model_dir: Path) -> int:
    from transformers import AutoConfig

    text = _text_config(AutoConfig.from_pretrained(str(model_dir)))
    return int(getattr(text, _num_layers_attr(text)))


def _read_marker(out_dir: Path) -> dict | None:
    try:
        meta = json.loads((out_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_cached(out_dir: Path, key: dict) -> bool:
    meta = _read_marker(out_dir)
    return meta is not None and meta.get("key") == key and (out_dir / "config.json").is_file()


def _copy_tokenizer_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy the source's tokenizer files byte for byte (every top-level file that is not config, weights or a
    cotune marker), so the reduced copy tokenizes exactly like its source."""
    copied = []
    for path in sorted(src_dir.iterdir()):
        name = path.name
        if (not path.is_file() or name in _MODEL_FILES or name.startswith(("cotune", "."))
                or name.endswith(_WEIGHT_SUFFIXES)):
            continue
        shutil.copy2(path, dst_dir / name)
        copied.append(name)
    return copied


def layer_reduced_copy(
    src,
    out_dir,
    *,
    keep_layers: int,
    examples: Sequence[Example],
    steps: int,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    seed: int = 0,
    holdout: int = DEFAULT_HOLDOUT,
    cache_dir=None,
    progress: Progress | None = None,
) -> Path:
    """The HF directory ``out_dir`` holding ``src`` cut to ``keep_layers`` decoder layers and healed; built once.

    src: an HF model directory or a .gguf file (converted once into ``cache_dir``, see
    :func:`cotune.lm.model.ensure_hf_dir`). The kept layers are spread uniformly with the first and the last kept
    (:func:`cotune.algorithms.fedbiot.compress.uniform_layer_indices`, FedBiOT's emulator selection). The model is loaded in float32
    on the CPU, reduced (:func:`reduce_layers`), healed (:func:`heal`, ``steps`` steps) and written as safetensors
    with the source's tokenizer files and ``cotune_reduced.json`` (format, source fingerprint, kept indices, the
    heal settings, the examples' content hash and the heal metrics).

    The directory is built in a temp directory beside ``out_dir`` and renamed into place when complete, under an
    inter-process lock, so a crashed or concurrent build never leaves a half-written cache. If ``out_dir`` already
    holds a copy built from the same inputs (source fingerprint, kept layers, examples, steps, lr, batch size,
    max length, seed, holdout) it is returned without loading anything; otherwise it is rebuilt and replaced.
    Raises ValueError for keep_layers outside [2, number of layers] and for bad heal settings.
    """
    from cotune.lm.model import _file_lock, ensure_hf_dir, load_causal_lm

    out_dir = Path(out_dir)
    examples = list(examples)
    if isinstance(keep_layers, bool) or not isinstance(keep_layers, int) or keep_layers < 2:
        raise ValueError(f"keep_layers must be an integer >= 2 (the first and the last layer are kept), got {keep_layers!r}")
    _check_heal_args(len(examples), steps, lr, batch_size, max_length, holdout)
    src_dir = ensure_hf_dir(src, cache_dir)
    n = _num_layers(src_dir)
    if keep_layers > n:
        raise ValueError(f"keep_layers ({keep_layers}) exceeds the {n} decoder layers of {src}")
    kept = uniform_layer_indices(n, keep_layers)
    key = {
        "format": REDUCED_FORMAT,
        "source_fingerprint": source_fingerprint(src_dir),
        "kept_layers": kept,
        "steps": int(steps),
        "lr": float(lr),
        "batch_size": int(batch_size),
        "max_length": int(max_length),
        "seed": int(seed),
        "holdout": int(holdout),
        "examples_digest": dataset_hash(examples),
    }
    if _is_cached(out_dir, key):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if _is_cached(out_dir, key):  # another process built it while we waited
            return out_dir
        # Under the lock no other build is running: leftovers of crashed builds go.
        for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        t0 = time.perf_counter()
        try:
            model, tok = load_causal_lm(src_dir, device="cpu", dtype=torch.float32)
            small = reduce_layers(model, kept)
            total_params = {id(p): p.numel() for p in model.parameters()}
            del model
            log.info("healing %s cut to layers %s for %d steps", src_dir, kept, steps)
            metrics = heal(small, tok, examples, steps=steps, lr=lr, batch_size=batch_size, max_length=max_length,
                           seed=seed, holdout=holdout, progress=progress)
            small.save_pretrained(str(tmp), safe_serialization=True)
            _copy_tokenizer_files(src_dir, tmp)
            meta = {
                "key": key,
                "format": REDUCED_FORMAT,
                "source": str(src),
                "source_dir": str(src_dir),
                "source_num_layers": n,
                "source_params": int(sum(total_params.values())),
                "params": int(sum({id(p): p.numel() for p in small.parameters()}.values())),
                "kept_layers": kept,
                "examples": len(examples),
                "metrics": metrics,
                "build_seconds": time.perf_counter() - t0,
            }
            del small
            (tmp / MARKER_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")  # written last
            old = None
            if out_dir.exists():
                old = out_dir.parent / f".{out_dir.name}.tmp-old-{uuid.uuid4().hex[:8]}"
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("built %s in %.1fs", out_dir, meta["build_seconds"])
    return out_dir
