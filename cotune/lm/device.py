"""Device and dtype selection shared by every party.

'auto' means: CUDA when present (bf16 there, fp16 on GPUs without bf16), otherwise CPU in fp32.
"""

from __future__ import annotations

import os

import torch

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def pick_device(pref: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu', 'cuda', 'cuda:1', 'mps' are taken as given
    (a CUDA request on a machine without CUDA raises a clear error rather than failing later)."""
    if isinstance(pref, torch.device):
        return pref
    pref = (pref or "auto").strip().lower()
    if pref == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(pref)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {pref!r} requested but CUDA is not available on this machine")
    return device


def pick_dtype(pref: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """'auto' -> bf16 on CUDA (fp16 where the GPU lacks bf16), fp32 elsewhere; or 'fp32'/'bf16'/'fp16'."""
    if isinstance(pref, torch.dtype):
        return pref
    device = torch.device(device) if not isinstance(device, torch.device) else device
    pref = (pref or "auto").strip().lower()
    if pref == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[pref]
    except KeyError:
        raise ValueError(f"unknown dtype {pref!r}: expected one of auto, fp32, bf16, fp16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count to n, else to $COTUNE_TORCH_THREADS when set; returns the count in effect.

    Several model processes on one small machine (a local cluster on 2 cores) must not each use every core:
    oversubscribed spinning threads made a SmolLM2 training step 3-5x slower here. Give each process
    cores // processes threads (at least 1).
    """
    if n is None:
        env = os.environ.get("COTUNE_TORCH_THREADS", "").strip()
        n = int(env) if env else None
    if n is not None:
        if n < 1:
            raise ValueError(f"thread count must be >= 1, got {n}")
        torch.set_num_threads(int(n))
    return torch.get_num_threads()
