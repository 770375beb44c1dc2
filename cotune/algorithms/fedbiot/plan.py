"""FedBiOT's compression plan (no torch, so the coordinator can check a plan at StartRun): which original layers the
emulator keeps and which form the adapter. The adapter is the last N decoder layers; the emulator is a uniform selection
of the remaining n, keeping k = round(n·(1−drop)) with the first and the last kept (index int(i·stride),
stride = (n−1)/(k−1)).
"""

from __future__ import annotations


def emulator_layer_indices(n: int, drop: float) -> list[int]:
    """Indices (of the n non-adapter layers) kept by the emulator: k = round(n·(1−drop)), int(i·(n−1)/(k−1)).

    k is at least 2 when n >= 2 (the first and the last layer are always kept).
    """
    if n < 1:
        raise ValueError(f"the emulator needs at least one layer to select from, got n={n}")
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    k = round(n * (1.0 - drop))
    # first and last are always kept, so at least two layers once there are two to choose from
    return uniform_layer_indices(n, max(min(n, 2), min(n, k)))


def uniform_layer_indices(n: int, k: int) -> list[int]:
    """k of n layer indices, spread uniformly with the first and the last kept: int(i·(n−1)/(k−1)), i < k.

    The emulator's selection (:func:`emulator_layer_indices`) for a given count; k = 1 keeps layer 0.
    """
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} layers: need 1 <= k <= n")
    if k == 1:
        return [0]
    stride = (n - 1) / (k - 1)
    out = [int(i * stride) for i in range(k)]
    out[-1] = n - 1  # int((k-1)·stride) is n-1 up to float rounding; keep the last explicitly
    return out


def plan(num_layers: int, *, adapter_layers: int, drop: float) -> dict[int, int]:
    """compressed index -> original index: emulator layers (uniform selection) then the last adapter_layers."""
    if adapter_layers < 1:
        raise ValueError(f"adapter_layers must be >= 1, got {adapter_layers}")
    if adapter_layers >= num_layers:
        raise ValueError(
            f"adapter_layers ({adapter_layers}) must be smaller than the model's {num_layers} decoder layers"
        )
    n = num_layers - adapter_layers
    kept = emulator_layer_indices(n, drop) + list(range(n, num_layers))
    return {j: orig for j, orig in enumerate(kept)}
