"""Device and dtype selection shared by every party.

'auto' means: CUDA when present (bf16 there, fp16 on GPUs without bf16), otherwise CPU: bf16 when the CPU has
native bf16 matrix instructions (see :func:`cpu_has_native_bf16`), else fp32. Whatever the choice, only the frozen
base weights take that dtype: LoRA parameters (the trained master weights), their gradients, the optimizer state and
the logits that reach the losses stay fp32 (see cotune.lm.lora.attach_lora, cotune.lm.batching.head_logits and
cotune.lm.train.Trainer.step, which adds a loss scale for fp16). A model pinned to bf16 on a CPU without native bf16
runs its tasks under :class:`Bf16MatmulInFp32` (matrix products in fp32 from the bf16 operands), at about fp32's speed
instead of torch's 9-30 times slower emulation.

A model larger than one GPU (the LLM server on a multi-GPU node) is spread across GPUs with `model.device: auto-multi`
(every visible GPU) or `cuda:0,1,...` (those GPUs): see :func:`spread_gpus`; cotune.lm.model.load_causal_lm places its
layers with accelerate's device map. Where fewer than two GPUs are visible, `auto-multi` is plain `auto`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # torch's documented extension point for dispatch modes

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


MULTI_GPU = "auto-multi"  # model.device: spread the model across every visible GPU (plain `auto` with fewer than two)
# the share of each GPU's free memory a spread model's weights may plan on (accelerate's balanced map then fills the
# GPUs evenly, so most of the rest stays free for activations, logits and the LoRA optimizer state)
GPU_MEMORY_FRACTION = 0.9


def spread_gpus(pref: str | torch.device | None, count: int | None = None) -> list[int]:
    """The GPUs a model is spread across for device preference `pref`, or [] for a single device.

    'auto-multi': every visible GPU when there are at least two (`count`, default torch.cuda.device_count()), else []
    (the model goes where 'auto' puts it: the one GPU, or the CPU). 'cuda:0,1' / 'cuda:1,2,3': those GPUs (each must
    exist; one listed GPU is that GPU alone). Any other value: [] (see pick_device)."""
    if isinstance(pref, torch.device):
        return []
    pref = (pref or "auto").strip().lower()
    if count is None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if pref == MULTI_GPU:
        return list(range(count)) if count >= 2 else []
    if not (pref.startswith("cuda:") and "," in pref):
        return []
    try:
        gpus = list(dict.fromkeys(int(part) for part in pref[len("cuda:"):].split(",")))
    except ValueError:
        raise ValueError(f"device {pref!r}: expected cuda:N,M,... with GPU indices") from None
    missing = [i for i in gpus if not 0 <= i < count]
    if missing:
        raise ValueError(f"device {pref!r} names GPU(s) {', '.join(map(str, missing))} but this machine has "
                         f"{count} visible GPU(s)")
    return gpus if len(gpus) >= 2 else []


def gpu_budgets(gpus: list[int], *, fraction: float = GPU_MEMORY_FRACTION,
                free_bytes: dict[int, int] | None = None) -> dict[int, int]:
    """Bytes of weights each of `gpus` may take (accelerate's max_memory): `fraction` of its free memory now
    (`free_bytes`: the free memory by GPU, default torch.cuda.mem_get_info)."""
    if free_bytes is None:
        free_bytes = {i: torch.cuda.mem_get_info(i)[0] for i in gpus}
    return {i: int(free_bytes[i] * fraction) for i in gpus}


def pick_device(pref: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu', 'cuda', 'cuda:1', 'mps' are taken as given
    (a CUDA request on a machine without CUDA raises a clear error rather than failing later).
    For a model spread across GPUs ('auto-multi', 'cuda:0,1'; see spread_gpus) this is where its inputs go: the first
    of its GPUs ('auto-multi' with fewer than two GPUs: as 'auto')."""
    if isinstance(pref, torch.device):
        return pref
    pref = (pref or "auto").strip().lower()
    if pref in ("auto", MULTI_GPU):
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if pref.startswith("cuda:") and "," in pref:
        pref = pref.split(",", 1)[0]  # cuda:1,2 -> cuda:1 (spread_gpus checks the list)
    device = torch.device(pref)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {pref!r} requested but CUDA is not available on this machine")
    return device


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively, so a bf16 model runs faster than fp32 on it.

    The check (cached once per process, microseconds, no timing involved so every run decides the same way): torch's
    oneDNN backend is available and the CPU has AMX tiles (AMX-BF16: Sapphire Rapids and later) or the AVX512-BF16
    instructions (Cooper Lake, Zen 4 and later), as reported by torch's own cpuinfo (``torch.cpu._is_amx_tile_supported``
    also checks that the OS has enabled the AMX state). ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not used:
    it is also true on plain AVX512 CPUs, where oneDNN emulates bf16 and is slower than fp32. Other CPUs (older x86,
    ARM, or a torch without these probes) answer False, i.e. fp32.
    """
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        cpu = torch.cpu
        amx = bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())
        avx512_bf16 = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
        return amx or avx512_bf16
    except Exception:  # pragma: no cover - private torch probes missing or failing: be conservative
        return False


def pick_dtype(pref: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """'auto' -> on CUDA bf16 (fp16 where the GPU lacks bf16); on CPU bf16 where :func:`cpu_has_native_bf16`, else
    fp32; other devices fp32. Or explicitly 'fp32'/'bf16'/'fp16' (or a torch.dtype), taken as given."""
    if isinstance(pref, torch.dtype):
        return pref
    device = torch.device(device) if not isinstance(device, torch.device) else device
    pref = (pref or "auto").strip().lower()
    if pref == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[pref]
    except KeyError:
        raise ValueError(f"unknown dtype {pref!r}: expected one of auto, fp32, bf16, fp16") from None


# linear and matmul reach a dispatch mode whole under torch.inference_mode (elsewhere as mm/addmm/bmm)
_MATRIX_PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                    torch.ops.aten.baddbmm.default, torch.ops.aten.mv.default, torch.ops.aten.addmv.default,
                    torch.ops.aten.linear.default, torch.ops.aten.matmul.default)


class Bf16MatmulInFp32(TorchDispatchMode):
    """Computes bf16 matrix products in fp32 from the bf16 operands and rounds the result to bf16: what native bf16
    hardware (AMX, AVX512-BF16, GPU tensor cores) does, since a product of two bf16 numbers is exact in fp32 and those
    units accumulate in fp32. Only the order of the fp32 sums may differ from theirs.

    On a CPU without native bf16, torch's own bf16 kernels emulate it element by element. SmolLM2-135M with a LoRA
    adapter, eager attention, 4 x 128 tokens, 2 threads on a 2-core AMD EPYC (AVX2 only): forward 15.7 s and forward
    plus backward 161.7 s with torch's bf16; 3.0 s and 6.7 s under this mode; fp32 2.6 s and 5.7 s. So a bf16 model
    runs there at about fp32's speed, with bf16's numerics (docs/quality.md, "Dtype"). Other ops (norms, softmax,
    elementwise) keep torch's bf16 kernels, vectorised on such CPUs. A product whose operands are not all bf16 (the
    fp32 LoRA path) is left as it is."""

    def __init__(self):
        super().__init__()
        self.widened = 0  # products computed in fp32 so far

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATRIX_PRODUCTS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if tensors and all(t.dtype == torch.bfloat16 for t in tensors):
                self.widened += 1
                wide = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
                return func(*wide, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def emulates_bf16(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether a model of this dtype on this device would run bf16 matrix products without native support (a CPU
    without AMX or AVX512-BF16): then a party runs its tasks under :class:`Bf16MatmulInFp32` (dispatch modes are
    per thread: entered in the thread that runs the task; autograd's backward inherits it)."""
    return dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_has_native_bf16()


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def describe_compute(dtype: str = "auto") -> dict:
    """What a model with `model.device: auto` and this dtype runs on here: the device type, the dtype it resolves
    to, the processor's name, whether it multiplies bf16 natively, and torch's version (experiment cells record it)."""
    device = pick_device("auto")
    if device.type == "cuda":
        processor, native_bf16 = torch.cuda.get_device_name(device), torch.cuda.is_bf16_supported()
    else:
        processor, native_bf16 = _cpu_name(), cpu_has_native_bf16()
    dt = pick_dtype(dtype, device)
    bf16_matmul = ("fp32-accumulate" if emulates_bf16(dt, device) else "native") if dt == torch.bfloat16 else ""
    return {"device": device.type, "dtype": dtype_name(dt), "processor": processor, "native_bf16": native_bf16,
            "bf16_matmul": bf16_matmul, "torch": torch.__version__}


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what the platform module says; may be empty)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return name or platform.processor()


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


def host_cores() -> int | None:
    """$COTUNE_HOST_CORES: the cores this process shares with the other model processes of its host (the local
    cluster sets it), or None when the process has its host to itself or it is 0 (no per-task budget: the thread
    count stays as configured)."""
    env = os.environ.get("COTUNE_HOST_CORES", "").strip()
    if not env:
        return None
    cores = int(env)
    if cores < 0:
        raise ValueError(f"COTUNE_HOST_CORES must be >= 0, got {cores}")
    return cores or None


def threads_for_task(parallel_tasks: int) -> int:
    """Set the thread count for a task the run's plan runs beside parallel_tasks - 1 others (RunContext.parallel_tasks)
    on a shared host: its cores / parallel_tasks, at least 1. A task the plan runs alone (the LLM server distilling
    while the clients wait) gets every core instead of its process's share. Unchanged when the host is not shared or
    the count is unknown (0). The count comes from the plan, so a spec's tasks get the same threads in every run.
    Returns the count in effect."""
    cores = host_cores()
    if cores is not None and parallel_tasks > 0:
        torch.set_num_threads(max(1, cores // parallel_tasks))
    return torch.get_num_threads()


@functools.cache
def _libc_malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Hand the memory a finished task freed back to the operating system; True where the C library could.

    A training step's activations are freed when it ends, but glibc keeps the freed heap (torch's CPU allocator is
    malloc) for the next allocation, so an idle party stays at its training peak: two BoolQ-length cpu-small
    clients held 8.0 and 5.8 GB resident while the LLM server co-distilled, and the 24 GB host ran out of memory.
    malloc_trim returns the free pages; on CUDA the allocator's cached blocks go back too. Parties call this after
    every task (cotune.party.base)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    trim = _libc_malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
