"""Evaluations kept by the content of what they evaluated, so the same model scored on the same items is scored once.

An experiment grid evaluates every party before round 1 in every cell, and those models are the same in every
variant of a (task, seed): the base model with the seed's fresh adapter. A model that does not train in a round (the
LLM in `llm2slm`) is evaluated again unchanged. Each such evaluation took 1-3 minutes per party on a 2-core CPU.

The key is everything the result depends on: a digest of every parameter and buffer of the evaluated model (base
weights, adapters, the emulator's layers: bytes, dtypes, shapes, names), the LoRA settings (the scaling is not in
the weights), the public samples and eval items (their content hashes), the scoring settings, the numerics (device,
whether bf16 products run natively, thread count, torch's version) and the source of the scoring code. CPU
inference is deterministic for a fixed model, input and thread count (the grid's round-0 scores were bit-identical
in every cell of a task), so a hit returns what the evaluation would compute. Entries are small JSON files written atomically; an
unreadable one is recomputed and replaced. Off unless `evaluation.cache_dir` is set (the experiment harness sets it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# the modules whose code computes a score: a change to any of them is a new key
SCORING_MODULES = ("cotune.lm.evaluate", "cotune.lm.generate", "cotune.lm.batching", "cotune.party.tasks")


def model_fingerprint(model: torch.nn.Module) -> str:
    """blake2b of every parameter and buffer of `model` in name order (name, dtype, shape, bytes): equal for two
    models that compute the same thing, different if any weight differs. About a second for Gemma 3 270M on a CPU."""
    digest = hashlib.blake2b(digest_size=32)
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name in sorted(tensors):
        t = tensors[name].detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.reshape(-1).contiguous().cpu()
        digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def scoring_code_fingerprint() -> str:
    """blake2b of the source of SCORING_MODULES."""
    import importlib

    digest = hashlib.blake2b(digest_size=32)
    for name in SCORING_MODULES:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()


class EvalCache:
    """Evaluation results by key (see the module's docstring) under `directory`, one JSON file each."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    @staticmethod
    def key(**parts) -> str:
        parts["scoring_code"] = scoring_code_fingerprint()
        text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.blake2b(text.encode(), digest_size=32).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The entry under `key`, or None when there is none or it cannot be read (it is then recomputed)."""
        path = self._path(key)
        try:
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("evaluation cache entry %s is unreadable (%s): evaluating again", path, exc)
            return None
        if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("metrics"), dict):
            log.warning("evaluation cache entry %s is not an entry for its key: evaluating again", path)
            return None
        return entry

    def put(self, key: str, metrics: dict[str, float], public_loss: float, eval_accuracy: float) -> None:
        """Keep a result (atomically: a reader sees the whole entry or none). A failure to write is logged, not
        raised: the evaluation itself succeeded."""
        entry = {"key": key, "metrics": metrics, "public_loss": public_loss, "eval_accuracy": eval_accuracy}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(entry, f, sort_keys=True)  # NaN (an unscored accuracy) round-trips as NaN
                os.replace(tmp, self._path(key))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning("could not keep an evaluation in %s: %s", self.directory, exc)
