"""The in-memory form of one sample's top-k logits, shared by the model runtime and the wire codec."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SampleLogits:
    """Top-k next-token log-probabilities of one public sample, at its target positions only.

    positions:    int32 [n]      token positions t (in the sender's tokenization) whose next token is a response token
    ids:          int32 [n, k]   top-k token ids at each position
    logprobs:     float32 [n, k] natural-log probabilities of the full-vocabulary softmax
    loss_bpb:     the sample's response cross-entropy in bits per byte (comparable across tokenizers)
    missing_mass: float32 [n]    1 - sum(exp(logprobs)); filled by the codec on decode, computed if None
    """

    positions: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    loss_bpb: float
    missing_mass: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.missing_mass is None:
            mass = np.exp(self.logprobs.astype(np.float64)).sum(axis=-1) if self.logprobs.size else np.zeros(0)
            self.missing_mass = np.clip(1.0 - mass, 0.0, 1.0).astype(np.float32)
