"""Cotune's multiple-choice scores against lm-evaluation-harness on the same items.

    python benchmarks/lm_eval_agreement.py [--models smollm2-135m,gemma3-270m] [--tasks arc_easy,boolq,sciq]
        [--limit N|full|task=N,...] [--dtypes fp32,auto] [--json out.json]

Needs lm-evaluation-harness, a benchmark-only dependency: `pip install -e .[bench]`.

For each real model (SmolLM2-135M-Instruct, Gemma 3 270M; GGUF converted once to an HF folder under
var/demo/model-cache, shared with `cotune demo`) and each task (validation split, first items: ARC-Easy 100, BoolQ
50, SciQ 50 by default; 500 / 300 / 300 with `--limit full`), the SAME Cotune Examples are scored twice:

* Cotune: cotune.lm.evaluate.evaluate_mc (shared-prompt scoring, KV cache) on the model as the parties load it
  (cotune.lm.model.load_causal_lm), in fp32 and in the default dtype "auto" (bf16 on a CPU with native bf16). The
  per-choice log-likelihoods are the very ones evaluate_mc ranks (its choice_loglikelihoods call is recorded).
* lm-evaluation-harness, through its own task machinery: a custom task per Cotune task (YAML in a temporary
  folder, loaded with TaskManager(include_path=...)) reads a JSONL written from the Examples (doc_to_text: prompt,
  doc_to_choice: choices, doc_to_target: label, target_delimiter "" since Cotune's choices carry their leading
  space), output_type multiple_choice, metrics acc / acc_norm / acc_bytes, run by simple_evaluate on
  HFLM(pretrained=<the same HF folder>, dtype float32, device cpu) with log_samples, so its own per-item
  log-likelihoods and its own acc code come back. Every request's (context, continuation) is checked to be exactly
  (prompt, choice), and HFLM._encode_pair's tokens are compared with cotune.align.tokenizers.encode_pair's.

Reported per model x task x Cotune dtype: n, Cotune acc / acc_norm, lm-eval acc / acc_norm, item-level agreement
of the argmax (acc and acc_norm), max and median |delta log-likelihood| per choice (always against lm-eval fp32),
token-sequence mismatches, and the items behind the largest differences and every disagreement (with the lm-eval
margin between its top two choices, which shows a flip is a near tie). lm-eval's acc_norm divides by the choice's
character length, Cotune's by its UTF-8 byte length (= lm-eval's acc_bytes); the count of items with a non-ASCII
choice (the only ones where the two can differ) is reported. Cotune scores with max_length 1024 (its default 512
would cut BoolQ / SciQ passages that lm-eval keeps whole); the items that 512 would truncate are counted.

Measured (default counts, one torch thread, nice 19 on the shared 2-core machine): 15-25 min wall, 630-690 s CPU;
lm-eval's HFLM is about 60% of it (it computes full-vocabulary logits at every position).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cotune.data.example import Example  # noqa: E402

DEFAULT_CACHE = REPO / "var" / "demo" / "model-cache"  # cotune demo's model cache: each GGUF is converted once
MODELS = ("smollm2-135m", "gemma3-270m")
# Items per task (validation split, first N). FULL_LIMITS is the whole comparison (about 1 CPU-hour on one core);
# the default fits ~25 minutes of wall time on a shared 2-core machine: `--limit full` runs the full one.
TASK_LIMITS = {"arc_easy": 100, "boolq": 50, "sciq": 50}
FULL_LIMITS = {"arc_easy": 500, "boolq": 300, "sciq": 300}
TASK_PREFIX = "cotune_agree_"
INSTALL_HINT = "lm-evaluation-harness is not installed: run `pip install -e .[bench]` (the benchmark-only extra)"


# --------------------------------------------------------------------------------------------------------------------
# the lm-eval task files (no lm_eval import needed: the unit test checks them without it)
# --------------------------------------------------------------------------------------------------------------------


def doc_records(examples: list[Example]) -> list[dict]:
    """The JSONL rows of the custom task: the Examples' exact strings, and their position."""
    return [{"idx": i, "prompt": ex.prompt, "choices": list(ex.choices), "label": int(ex.label)}
            for i, ex in enumerate(examples)]


def task_config(task_name: str, jsonl: Path) -> dict:
    """The lm-eval task config reading `jsonl`: context = prompt, continuations = "" + each choice."""
    return {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(jsonl)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",
        "num_fewshot": 0,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                        for m in ("acc", "acc_norm", "acc_bytes")],
    }


def write_task_files(folder: Path, task: str, examples: list[Example]) -> tuple[str, Path, Path]:
    """(task name, YAML path, JSONL path) of the custom lm-eval task for one Cotune task's Examples."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    name = TASK_PREFIX + task
    jsonl = folder / f"{name}.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for rec in doc_records(examples):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task_config(name, jsonl.resolve()), sort_keys=False, allow_unicode=True),
                    encoding="utf-8")
    return name, path, jsonl


def expected_requests(ex: Example) -> list[tuple[str, str]]:
    """The (context, continuation) pairs lm-eval must build for an Example: the same strings Cotune scores."""
    return [(ex.prompt, "" + c) for c in ex.choices]


# --------------------------------------------------------------------------------------------------------------------
# comparing per-choice log-likelihoods
# --------------------------------------------------------------------------------------------------------------------


def predictions(lls: list[np.ndarray], examples: list[Example]) -> dict[str, np.ndarray]:
    """Per item the argmax of: ll (acc), ll / character length (lm-eval acc_norm), ll / UTF-8 bytes (Cotune's
    accuracy_norm, lm-eval acc_bytes); lm-eval's np.argmax(lls / completion_len), ties to the first."""
    acc, chars, nbytes = [], [], []
    for ll, ex in zip(lls, examples):
        ll = np.asarray(ll, dtype=np.float64)
        acc.append(int(np.argmax(ll)))
        chars.append(int(np.argmax(ll / np.array([float(len(c)) for c in ex.choices]))))
        nbytes.append(int(np.argmax(ll / np.array([float(max(1, len(c.encode("utf-8")))) for c in ex.choices]))))
    return {"acc": np.array(acc), "acc_chars": np.array(chars), "acc_bytes": np.array(nbytes)}


def non_ascii_choice_items(examples: list[Example]) -> int:
    """Items with a choice whose character and byte lengths differ (where acc_norm by chars and by bytes can part)."""
    return sum(any(not c.isascii() for c in ex.choices) for ex in examples)


def compare(cotune_lls: list[np.ndarray], ref_lls: list[np.ndarray], examples: list[Example]) -> dict:
    """Item-level agreement of the two scorers' argmax and the per-choice |delta ll| statistics. Cotune's norm is by
    bytes, lm-eval's acc_norm by characters: agreement_norm compares exactly those two choices."""
    a, b = predictions(cotune_lls, examples), predictions(ref_lls, examples)
    deltas = np.concatenate([np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))
                             for x, y in zip(cotune_lls, ref_lls)]) if examples else np.zeros(0)
    return {
        "agreement_acc": float(np.mean(a["acc"] == b["acc"])) if examples else float("nan"),
        "agreement_acc_norm": float(np.mean(a["acc_bytes"] == b["acc_chars"])) if examples else float("nan"),
        "disagree_acc": [int(i) for i in np.nonzero(a["acc"] != b["acc"])[0]],
        "disagree_acc_norm": [int(i) for i in np.nonzero(a["acc_bytes"] != b["acc_chars"])[0]],
        "max_abs_dll": float(deltas.max()) if deltas.size else float("nan"),
        "median_abs_dll": float(np.median(deltas)) if deltas.size else float("nan"),
        "mean_abs_dll": float(deltas.mean()) if deltas.size else float("nan"),
    }


def accuracy(preds: np.ndarray, examples: list[Example]) -> float:
    return float(np.mean(preds == np.array([ex.label for ex in examples]))) if examples else float("nan")


def margin(ll: np.ndarray) -> float:
    """Gap between the best and the second-best score (how close to a tie the argmax is)."""
    s = np.sort(np.asarray(ll, np.float64))[::-1]
    return float(s[0] - s[1]) if len(s) > 1 else float("inf")


# --------------------------------------------------------------------------------------------------------------------
# Cotune
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def recording_choice_lls(record: list):
    """Make evaluate_mc's own choice_loglikelihoods call leave its result in `record` (so the scores compared are
    the ones evaluate_mc ranked, without scoring twice)."""
    import cotune.lm.evaluate as ev

    original = ev.choice_loglikelihoods

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        record.append(out)
        return out

    ev.choice_loglikelihoods = wrapper
    try:
        yield
    finally:
        ev.choice_loglikelihoods = original


def run_cotune(model_dir: Path, tasks: dict[str, list[Example]], dtype: str, batch_size: int, max_length: int,
               log) -> dict:
    """Per task: evaluate_mc's metrics, the per-choice lls it ranked, and seconds; plus the dtype loaded."""
    import torch

    from cotune.lm.device import dtype_name
    from cotune.lm.evaluate import evaluate_mc
    from cotune.lm.model import load_causal_lm

    model, tok = load_causal_lm(model_dir, device="cpu", dtype=dtype)
    loaded = dtype_name(next(model.parameters()).dtype)
    out = {"dtype": loaded, "attn": getattr(model.config, "_attn_implementation", None), "tasks": {}}
    for task, examples in tasks.items():
        record: list = []
        t0 = time.perf_counter()
        with recording_choice_lls(record), torch.inference_mode():
            metrics = evaluate_mc(model, tok, examples, batch_size=batch_size, max_length=max_length,
                                  mc_scoring="shared_prompt")
        seconds = time.perf_counter() - t0
        assert len(record) == 1 and len(record[0]) == len(examples), "evaluate_mc scored a different item set"
        out["tasks"][task] = {"metrics": metrics, "lls": [np.asarray(x, np.float64) for x in record[0]],
                              "seconds": seconds}
        log(f"  cotune {dtype}->{loaded} {task}: acc {metrics['accuracy']:.4f} acc_norm "
            f"{metrics['accuracy_norm']:.4f} n {metrics['n']} ({seconds:.0f} s)")
    del model
    gc.collect()
    return out


def cotune_encodings(tok, examples: list[Example], max_length: int):
    from cotune.align.tokenizers import encode_pair

    return [[encode_pair(tok, ex.prompt, c, max_length) for c in ex.choices] for ex in examples]


# --------------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness
# --------------------------------------------------------------------------------------------------------------------


def _request_args(sample: dict) -> list[tuple[str, str]]:
    """(context, continuation) of every request of a logged sample, whichever layout this lm-eval version logs."""
    out = []
    for arg in sample["arguments"]:
        if isinstance(arg, dict):  # {"gen_args_0": {"arg_0": ctx, "arg_1": cont}}-style
            arg = list(arg.values())
            if len(arg) == 1 and isinstance(arg[0], dict):
                arg = list(arg[0].values())
        out.append((arg[0], arg[1]))
    return out


def run_lm_eval(model_dir: Path, task_dir: Path, tasks: dict[str, list[Example]], names: dict[str, str],
                batch_size: int, max_length: int, log) -> dict:
    """lm-eval's simple_evaluate on the custom tasks with HFLM in fp32 on CPU: per task its metrics, its per-choice
    lls (by item position), the request-string check and the tokenization comparison with Cotune's encode_pair."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from cotune.lm.model import load_model_tokenizer

    t0, c0 = time.perf_counter(), time.process_time()
    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=batch_size)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    res = lm_eval.simple_evaluate(model=lm, tasks=[names[t] for t in tasks], task_manager=manager,
                                  log_samples=True, bootstrap_iters=0, num_fewshot=0)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    cotune_tok = load_model_tokenizer(model_dir)
    out = {"seconds": seconds, "cpu_seconds": cpu, "add_bos_token": lm.add_bos_token, "max_length": lm.max_length,
           "tasks": {}}
    for task, examples in tasks.items():
        name = names[task]
        samples = sorted(res["samples"][name], key=lambda s: s["doc"]["idx"])
        assert [s["doc"]["idx"] for s in samples] == list(range(len(examples))), f"{name}: lm-eval lost items"
        lls, string_mismatch, own_acc = [], [], {"acc": [], "acc_norm": [], "acc_bytes": []}
        for s, ex in zip(samples, examples):
            if _request_args(s) != expected_requests(ex):
                string_mismatch.append(s["doc"]["idx"])
            lls.append(np.array([float(r[0]) for r in s["filtered_resps"]], np.float64))
            for k in own_acc:
                own_acc[k].append(float(s[k]))
        # lm-eval's encoding of every request against Cotune's: the same token sequence, split at the same place?
        enc = cotune_encodings(cotune_tok, examples, max_length)
        token_mismatch, context_shift = [], []
        for i, (ex, pairs) in enumerate(zip(examples, enc)):
            for c, p in zip(ex.choices, pairs):
                ctx, cont = lm._encode_pair(ex.prompt, c)
                if list(p.ids) != ctx + cont:
                    token_mismatch.append(i)
                    break
                if len(ctx) != p.response_start:
                    context_shift.append(i)
                    break
        metrics = {k: v for k, v in res["results"][name].items() if "," in k and "stderr" not in k}
        out["tasks"][task] = {
            "metrics": {k.split(",")[0]: float(v) for k, v in metrics.items()},
            "per_sample_acc": {k: float(np.mean(v)) for k, v in own_acc.items()},
            "lls": lls,
            "request_string_mismatches": string_mismatch,
            "token_sequence_mismatches": token_mismatch,
            "context_split_mismatches": context_shift,
        }
        m = out["tasks"][task]["metrics"]
        log(f"  lm-eval fp32 {task}: acc {m.get('acc', float('nan')):.4f} acc_norm {m.get('acc_norm', float('nan')):.4f}"
            f" (strings differ: {len(string_mismatch)}, tokens differ: {len(token_mismatch)}, split differs: "
            f"{len(context_shift)})")
    del lm
    gc.collect()
    return out


# --------------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------------


def _per_char(ll: np.ndarray, ex: Example) -> np.ndarray:
    return np.asarray(ll, np.float64) / np.array([float(len(c)) for c in ex.choices])


def detail_items(idx: list[int], examples: list[Example], a: list[np.ndarray], b: list[np.ndarray],
                 cmp: dict | None = None) -> list[dict]:
    """Per listed item: both scorers' lls, the largest |Δll|, lm-eval's margins (top-1 minus top-2: acc in nats,
    acc_norm in nats per character), which argmaxes differ, and whether Cotune's best score is tied (within 1e-6
    nats: bf16 logits sit on a coarse grid) with another choice's, a tie np.argmax resolves to the first choice."""
    rows = []
    for i in idx:
        ex = examples[i]
        d = np.abs(a[i] - b[i])
        row = {
            "item": i, "label": ex.label, "choices": list(ex.choices),
            "cotune_ll": [round(float(x), 5) for x in a[i]], "lm_eval_ll": [round(float(x), 5) for x in b[i]],
            "max_abs_dll": float(d.max()),
            "lm_eval_margin_acc": margin(b[i]),
            "lm_eval_margin_acc_norm": margin(_per_char(b[i], ex)),
            "cotune_best_tied": bool(margin(a[i]) < 1e-6),
        }
        if cmp is not None:
            row["differs_on"] = [m for m in ("acc", "acc_norm") if i in cmp[f"disagree_{m}"]]
        rows.append(row)
    return rows


def build_row(model: str, task: str, examples: list[Example], dtype: str, cot: dict, ref: dict, top: int,
              truncated_512: int) -> dict:
    """One table row: Cotune (in `dtype`) against lm-eval fp32 on one model x task."""
    a, b = cot["lls"], ref["lls"]
    cmp = compare(a, b, examples)
    pa = predictions(a, examples)
    pb = predictions(b, examples)
    # evaluate_mc's numbers must be what its own lls give (the recorded call is the one it ranked)
    assert abs(accuracy(pa["acc"], examples) - cot["metrics"]["accuracy"]) < 1e-12
    assert abs(accuracy(pa["acc_bytes"], examples) - cot["metrics"]["accuracy_norm"]) < 1e-12
    per_item_max = np.array([float(np.abs(x - y).max()) for x, y in zip(a, b)])
    worst = [int(i) for i in np.argsort(-per_item_max)[:top]]
    disagree = sorted(set(cmp["disagree_acc"]) | set(cmp["disagree_acc_norm"]))
    return {
        "model": model, "task": task, "cotune_dtype": dtype, "n": len(examples),
        "cotune_acc": cot["metrics"]["accuracy"], "cotune_acc_norm": cot["metrics"]["accuracy_norm"],
        "lm_eval_acc": ref["metrics"].get("acc"), "lm_eval_acc_norm": ref["metrics"].get("acc_norm"),
        "lm_eval_acc_bytes": ref["metrics"].get("acc_bytes"),
        "lm_eval_acc_recomputed": accuracy(pb["acc"], examples),
        "lm_eval_acc_norm_recomputed": accuracy(pb["acc_chars"], examples),
        **{k: v for k, v in cmp.items() if not k.startswith("disagree")},
        "n_disagree_acc": len(cmp["disagree_acc"]), "n_disagree_acc_norm": len(cmp["disagree_acc_norm"]),
        "non_ascii_choice_items": non_ascii_choice_items(examples),
        "request_string_mismatches": len(ref["request_string_mismatches"]),
        "token_sequence_mismatches": len(ref["token_sequence_mismatches"]),
        "context_split_mismatches": len(ref["context_split_mismatches"]),
        "items_over_512_tokens": truncated_512,
        "cotune_seconds": cot["seconds"],
        "largest_dll_items": detail_items(worst, examples, a, b),
        "disagreements": detail_items(disagree, examples, a, b, cmp),
        "lm_eval_median_margin_acc": float(np.median([margin(x) for x in b])),
        "lm_eval_median_margin_acc_norm": float(np.median([margin(_per_char(x, ex)) for x, ex in zip(b, examples)])),
        "per_item_ll": {"cotune": [[round(float(v), 6) for v in x] for x in a],
                        "lm_eval": [[round(float(v), 6) for v in x] for x in b]},
    }


def _f(x, digits=4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    head = ("| model | task | Cotune dtype | n | Cotune acc | Cotune acc_norm | lm-eval acc | lm-eval acc_norm | "
            "agree (acc) | agree (acc_norm) | max abs Δll | median abs Δll | tokens differ |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['task']} | {r['cotune_dtype']} | {r['n']} | {_f(r['cotune_acc'])} | "
            f"{_f(r['cotune_acc_norm'])} | {_f(r['lm_eval_acc'])} | {_f(r['lm_eval_acc_norm'])} | "
            f"{_f(r['agreement_acc'], 3)} | {_f(r['agreement_acc_norm'], 3)} | {r['max_abs_dll']:.2e} | "
            f"{r['median_abs_dll']:.2e} | {r['token_sequence_mismatches']} |")
    return "\n".join(lines)


def disagreement_text(rows: list[dict], top: int) -> str:
    lines = []
    for r in rows:
        if not r["disagreements"]:
            continue
        lines.append(f"{r['model']} / {r['task']} / Cotune {r['cotune_dtype']}: {len(r['disagreements'])} item(s) "
                     f"pick differently (lm-eval's median margin: acc {r['lm_eval_median_margin_acc']:.2f} nats, "
                     f"acc_norm {r['lm_eval_median_margin_acc_norm']:.3f} nats/char)")
        for d in sorted(r["disagreements"], key=lambda d: -d["max_abs_dll"])[:top]:
            tie = ", Cotune's best is tied" if d["cotune_best_tied"] else ""
            lines.append(f"  item {d['item']} ({'+'.join(d['differs_on'])}{tie}): max |Δll| {d['max_abs_dll']:.2e}, "
                         f"lm-eval margin acc {d['lm_eval_margin_acc']:.2e} / acc_norm "
                         f"{d['lm_eval_margin_acc_norm']:.2e}; cotune {d['cotune_ll']} lm-eval {d['lm_eval_ll']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_limits(text: str | None) -> dict[str, int]:
    """--limit: None (the defaults), 'full', 'N' (every task) or 'task=N,...' (the others keep their default)."""
    limits = dict(TASK_LIMITS)
    if text is None or not text.strip():
        return limits
    if text.strip().lower() == "full":
        return dict(FULL_LIMITS)
    if text.strip().isdigit():
        return {t: int(text) for t in limits}
    for part in _csv(text):
        task, sep, n = part.partition("=")
        if not sep or task.strip() not in limits or not n.strip().isdigit():
            raise ValueError(f"--limit: expected N, 'full' or task=N with a task of {', '.join(limits)}; got {part!r}")
        limits[task.strip()] = int(n)
    return limits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--tasks", default=",".join(TASK_LIMITS), help=f"comma-separated, of {', '.join(TASK_LIMITS)}")
    ap.add_argument("--limit", default=None,
                    help="items per task: N for every task, or task=N,... (others keep their default), or 'full' ("
                         + ", ".join(f"{t} {n}" for t, n in FULL_LIMITS.items()) + "); default: "
                         + ", ".join(f"{t} {n}" for t, n in TASK_LIMITS.items()))
    ap.add_argument("--dtypes", default="fp32,auto", help="Cotune dtypes to score in (compared with lm-eval fp32)")
    ap.add_argument("--batch-size", type=int, default=8, help="Cotune's evaluate_mc batch size")
    ap.add_argument("--lm-eval-batch-size", type=int, default=2,
                    help="HFLM batch size (it materialises full-vocabulary logits: Gemma's 262k x sequence x batch)")
    ap.add_argument("--max-length", type=int, default=1024,
                    help="Cotune's max_length (lm-eval keeps every context whole up to the model's limit)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a small shared machine two spinning threads ran 5x slower)")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where GGUFs are converted to HF folders")
    ap.add_argument("--data-dir", type=Path, default=None, help="shared data directory (default: found as usual)")
    ap.add_argument("--top", type=int, default=5, help="items listed per row (largest |Δll|, disagreements)")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON document here")
    ap.add_argument("--workdir", type=Path, default=None, help="for the task files (default: a temporary folder)")
    args = ap.parse_args(argv)

    if importlib.util.find_spec("lm_eval") is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    models, tasks_wanted, dtypes = _csv(args.models), _csv(args.tasks), _csv(args.dtypes)
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}: expected {', '.join(MODELS)}")
    for t in tasks_wanted:
        if t not in TASK_LIMITS:
            ap.error(f"unknown task {t!r}: expected {', '.join(TASK_LIMITS)}")
    try:
        limits = parse_limits(args.limit)
    except ValueError as exc:
        ap.error(str(exc))

    # offline: the models are local folders, the task data local JSONL
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    logging.basicConfig(level=logging.WARNING)
    for name in ("lm_eval", "lm-eval", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)

    from cotune.data import load_task
    from cotune.lm.device import configure_threads
    from cotune.lm.model import ensure_hf_dir, load_model_tokenizer, real_model_path

    configure_threads(args.threads)
    t_start, c_start = time.perf_counter(), time.process_time()
    tasks = {t: load_task(t, "validation", data_dir=args.data_dir, limit=limits[t]) for t in tasks_wanted}
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lm-eval-agree-")))
        os.environ.setdefault("HF_DATASETS_CACHE", str(workdir / "hf-datasets"))
        names = {}
        for t, exs in tasks.items():
            names[t], _, _ = write_task_files(workdir / "tasks", t, exs)
        rows, timings = [], {}
        for model in models:
            t_model, c_model = time.perf_counter(), time.process_time()
            model_dir = ensure_hf_dir(real_model_path(model), args.cache_dir)
            log(f"{model}: {model_dir}")
            ref = run_lm_eval(model_dir, workdir / "tasks", tasks, names, args.lm_eval_batch_size, args.max_length,
                              log)
            tok = load_model_tokenizer(model_dir)
            over = {t: sum(any(len(p.ids) > 512 for p in pairs) for pairs in cotune_encodings(tok, exs, 10**6))
                    for t, exs in tasks.items()}
            timings[model] = {"lm_eval_seconds": ref["seconds"], "lm_eval_cpu_seconds": ref["cpu_seconds"]}
            for dtype in dtypes:
                t0, c0 = time.perf_counter(), time.process_time()
                cot = run_cotune(model_dir, tasks, dtype, args.batch_size, args.max_length, log)
                timings[model][f"cotune_{dtype}_seconds"] = time.perf_counter() - t0
                timings[model][f"cotune_{dtype}_cpu_seconds"] = time.process_time() - c0
                for t, exs in tasks.items():
                    rows.append(build_row(model, t, exs, cot["dtype"], cot["tasks"][t], ref["tasks"][t], args.top,
                                          over[t]))
                    rows[-1]["cotune_dtype_requested"] = dtype
                    rows[-1]["cotune_attn"] = cot["attn"]
            timings[model]["total_seconds"] = time.perf_counter() - t_model
            timings[model]["total_cpu_seconds"] = time.process_time() - c_model
            timings[model]["lm_eval_add_bos_token"] = ref["add_bos_token"]
            timings[model]["lm_eval_max_length"] = ref["max_length"]
    doc = {
        "benchmark": "lm_eval_agreement",
        "lm_eval_version": _version("lm_eval"),
        "settings": {"models": models, "tasks": {t: len(e) for t, e in tasks.items()}, "dtypes": dtypes,
                     "batch_size": args.batch_size, "lm_eval_batch_size": args.lm_eval_batch_size,
                     "max_length": args.max_length, "mc_scoring": "shared_prompt", "lm_eval_dtype": "float32"},
        "rows": rows,
        "timings": timings,
        "wall_seconds": time.perf_counter() - t_start,
        "cpu_seconds": time.process_time() - c_start,
        "torch_threads": args.threads,
    }
    text = json.dumps(doc, indent=2, default=float)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print("\n" + markdown(rows))
    dis = disagreement_text(rows, args.top)
    if dis:
        print("\n" + dis)
    print(f"\nwall time {doc['wall_seconds']:.0f} s, CPU time {doc['cpu_seconds']:.0f} s ({args.threads} thread(s))")
    return 0


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist.replace("_", "-"))
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
