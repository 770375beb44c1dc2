"""FedBiOT emulator alignment against steps, on the small preset's real LLM (Gemma 3 270M): how many alignment steps
the emulator needs before it stops improving, to size `pre_align_steps` / `align_steps` from a measured curve.

In process, with the library functions the LLM server's tasks call (cotune.algorithms.fedbiot.server): the model is
loaded as the server loads it (cotune.lm.model.load_causal_lm, dtype `auto`: bf16 base weights on a CPU with native
bf16, fp32 LoRA and optimizer state; attach_lora with the default LoRA config), compressed as CompressTask does
(cotune.algorithms.fedbiot.compress.compress, then a fresh LoRA and a Trainer with the party's training config),
the initial adapter is plugged into the full model (plug_adapter_into_full) and the emulator is aligned by ONE call of
cotune.algorithms.fedbiot.losses.align_emulator on the public set, as the round-0 pre-alignment of AlignEmulatorTask
(seed = training.seed·1_000_003 + round 0). Its LR is constant (no warmup), so the first s steps of that call are what
`pre_align_steps = s` does. The curve is measured from inside that call at the checkpoints (its should_stop hook,
called before every batch, measures in eval mode with the torch RNG saved and restored, so the trajectory is the one
an unobserved call takes):

- the alignment loss (normalized-L2 + β·KL, emulator_alignment_loss) on a HELD-OUT slice of ARC-Easy train (none of
  the demo's public set or private shards) and on the public set it trains on (align_emulator's own before/after
  measurement at step 0 and max steps; at every checkpoint with --train-align);
- the emulator + adapter public loss (response-token CE, cotune.lm.evaluate.evaluate_loss, as EvaluateTask computes
  public_loss) on the public set (the demo's `llm/emulator` public_loss) and on the held-out slice, against the full
  model's on the same slices;
- optionally multiple-choice accuracy (evaluate_mc, shared-prompt scoring) of emulator + adapter on the first
  --eval-items ARC-Easy validation items, against the full model's, at the first and the last checkpoint (at every
  one with --mc-every);
- wall and process-CPU seconds per alignment step (the steps between checkpoints, measurement excluded; on a shared
  machine the wall time mostly measures the others' load).

It writes JSON (--json; rewritten after every checkpoint, so a partial curve survives an interrupted run), prints a
markdown table and a recommendation: the smallest checkpoint whose held-out alignment loss is within --tolerance
(10%) of the best held-out alignment loss measured (the value at max steps when the curve keeps falling).

    nice -n 19 .venv/bin/python benchmarks/fedbiot_alignment.py --json var/bench/fedbiot-alignment.json
    # what fits in ~45 min on 2 shared CPU cores (about 9-29 s a step there, plus 1-4 min per checkpoint):
    nice -n 19 .venv/bin/python benchmarks/fedbiot_alignment.py --max-steps 100 --checkpoints 0,10,25,50,75,100 \\
        --eval-items 50 --json var/bench/fedbiot-alignment.json

Data: the small preset's split as `cotune demo` makes it (cotune.demo.prepare_data, written under --workdir); the
Gemma 3 GGUF's HF conversion is cached in --cache-dir (default: the demo's model cache, var/demo/model-cache).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cotune.algorithms.fedbiot.compress import compress, plug_adapter_into_full  # noqa: E402
from cotune.algorithms.fedbiot.config import FedBiOTConfig  # noqa: E402
from cotune.algorithms.fedbiot.losses import _encode, align_emulator, emulator_alignment_loss  # noqa: E402
from cotune.config import LoraConfig, TrainingConfig  # noqa: E402
from cotune.data import load_task, read_jsonl, require_shared_data  # noqa: E402
from cotune.demo import PRESETS, model_cache_dir, prepare_data  # noqa: E402
from cotune.lm.batching import collate, sorted_batches, to_device  # noqa: E402
from cotune.lm.device import dtype_name  # noqa: E402
from cotune.lm.evaluate import evaluate_loss, evaluate_mc  # noqa: E402
from cotune.lm.layers import num_decoder_layers  # noqa: E402
from cotune.lm.lora import attach_lora  # noqa: E402
from cotune.lm.model import ensure_hf_dir, load_causal_lm, real_model_path  # noqa: E402
from cotune.lm.train import TrainConfig, Trainer  # noqa: E402

DEFAULT_CHECKPOINTS = (0, 10, 25, 50, 100, 150, 200, 300, 400)
PRESET = "small"


def parse_args(argv=None):
    preset = PRESETS[PRESET]
    fb = FedBiOTConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=400, help="alignment steps in all (default 400)")
    ap.add_argument("--checkpoints", default="",
                    help="comma-separated steps to measure at (default 0,10,25,50,100,150,200,300,400 up to "
                         "--max-steps; --max-steps is always measured)")
    ap.add_argument("--heldout", type=int, default=24,
                    help="held-out ARC-Easy train items for the alignment loss and public loss (default 24)")
    ap.add_argument("--eval-items", type=int, default=100,
                    help="ARC-Easy validation items for multiple-choice accuracy (default 100; 0 = off), measured "
                         "at the first and the last checkpoint (--mc-every: at every one)")
    ap.add_argument("--mc-every", action="store_true", help="multiple-choice accuracy at every checkpoint")
    ap.add_argument("--train-align", action="store_true",
                    help="the alignment loss on the public set (the training data) at every checkpoint; without it, "
                         "only at step 0 and max steps, from align_emulator's own before/after measurement")
    ap.add_argument("--tolerance", type=float, default=0.10,
                    help="recommend the smallest checkpoint whose held-out alignment loss is within this fraction "
                         "of the best measured (default 0.10)")
    ap.add_argument("--adapter-layers", type=int, default=fb.adapter_layers)
    ap.add_argument("--drop", type=float, default=preset.fedbiot_drop)
    ap.add_argument("--beta", type=float, default=fb.kl_weight, help="kl_weight β")
    ap.add_argument("--lr", type=float, default=preset.align_lr or preset.lr,
                    help="alignment LR (default: the small preset's align_lr, else its training lr)")
    ap.add_argument("--batch-size", type=int, default=preset.batch_size)
    ap.add_argument("--max-length", type=int, default=preset.max_length)
    ap.add_argument("--dtype", default="auto", help="model.dtype (default auto, as the server)")
    ap.add_argument("--device", default="auto", help="model.device (default auto, as the server)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    ap.add_argument("--workdir", default=str(ROOT / "var" / "bench" / "fedbiot-alignment"),
                    help="where the preset's data split is written")
    ap.add_argument("--cache-dir", default="", help="GGUF conversion cache (default: the demo's model cache)")
    ap.add_argument("--json", default="", help="write the results here (rewritten after every checkpoint)")
    args = ap.parse_args(argv)
    if args.max_steps < 1:
        ap.error("--max-steps must be >= 1")
    wanted = [int(s) for s in args.checkpoints.split(",") if s.strip()] if args.checkpoints else DEFAULT_CHECKPOINTS
    if any(s < 0 for s in wanted):
        ap.error("--checkpoints must be >= 0")
    args.checkpoint_list = sorted({s for s in wanted if s <= args.max_steps} | {0, args.max_steps})
    return args


# ------------------------------------------------------------------------------------------------------------ data
def load_data(args):
    """The small preset's public set (what AlignEmulatorTask trains on and EvaluateTask's public_loss reads), a
    held-out slice of ARC-Easy train outside the demo's split, and ARC-Easy validation items."""
    preset = PRESETS[PRESET]
    workdir = Path(args.workdir)
    paths = prepare_data(preset, workdir)
    public = read_jsonl(paths["public"])
    seen = {ex for key in ("public", "union") for ex in read_jsonl(paths[key])}
    shared = require_shared_data()
    rest = [ex for ex in load_task(preset.task, "train", data_dir=shared) if ex not in seen]
    order = np.random.default_rng(12345).permutation(len(rest))
    heldout = [rest[i] for i in order[: args.heldout]]
    val = load_task(preset.task, "validation", data_dir=shared)[: args.eval_items] if args.eval_items else []
    return public, heldout, val


# ----------------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def alignment_loss(trainer, full, pairs, layer_map, *, adapter_layers, beta, batch_size) -> dict:
    """emulator_alignment_loss over `pairs` (eval mode), sample-weighted like align_emulator's own measure()."""
    small = trainer.model
    small.eval()
    total = {"loss": 0.0, "l2": 0.0, "kl": 0.0}
    for idx in sorted_batches([len(p.ids) for p in pairs], batch_size):
        b = to_device(collate([pairs[i] for i in idx], trainer.pad_id), trainer.device)
        loss, parts = emulator_alignment_loss(small, full, b["input_ids"], b["attention_mask"], layer_map,
                                              adapter_layers=adapter_layers, beta=beta)
        for key, value in (("loss", float(loss)), *parts.items()):
            total[key] += value * len(idx) / len(pairs)
    return total


@torch.no_grad()
def model_scores(model, tokenizer, public, heldout, val, *, batch_size, max_length, mc: bool = True) -> dict:
    """public_loss as EvaluateTask computes it, on the public set and the held-out slice; MC accuracy on `val`."""
    model.eval()
    out = {"public_loss": evaluate_loss(model, tokenizer, public, batch_size=batch_size, max_length=max_length)["loss"],
           "heldout_loss": evaluate_loss(model, tokenizer, heldout, batch_size=batch_size, max_length=max_length)["loss"]}
    if val and mc:
        acc = evaluate_mc(model, tokenizer, val, batch_size=batch_size, max_length=max_length)
        out.update(accuracy=acc["accuracy"], accuracy_norm=acc["accuracy_norm"], eval_n=acc["n"])
    return out


# ------------------------------------------------------------------------------------------------------- reporting
def recommend(points: list[dict], tolerance: float) -> dict:
    """The smallest checkpoint whose held-out alignment loss is within `tolerance` of the best measured."""
    if not points:
        return {}
    best = min(points, key=lambda p: p["heldout_align"]["loss"])
    threshold = best["heldout_align"]["loss"] * (1.0 + tolerance)
    pick = next(p for p in points if p["heldout_align"]["loss"] <= threshold)
    start, last = points[0], points[-1]
    drop = start["heldout_align"]["loss"] - best["heldout_align"]["loss"]
    def per_step(key):  # weighted by the steps timed in each segment
        timed = [(p[key], p["timed_steps"]) for p in points if p.get(key) is not None]
        n = sum(w for _, w in timed)
        return sum(v * w for v, w in timed) / n if n else float("nan")

    sps = per_step("seconds_per_step")
    return {
        "rule": f"smallest measured step count whose held-out alignment loss is <= (1 + {tolerance:g}) x the best "
                f"held-out alignment loss measured (step {best['step']}: {best['heldout_align']['loss']:.4f})",
        "steps": pick["step"],
        "heldout_align_loss": pick["heldout_align"]["loss"],
        "best_step": best["step"],
        "best_heldout_align_loss": best["heldout_align"]["loss"],
        "share_of_reduction": ((start["heldout_align"]["loss"] - pick["heldout_align"]["loss"]) / drop
                               if drop > 0 else float("nan")),
        "emulator_public_loss": pick["emulator"]["public_loss"],
        "emulator_heldout_loss": pick["emulator"]["heldout_loss"],
        "public_loss_gap_to_full": pick["emulator"]["public_loss"] - pick["full"]["public_loss"],
        "heldout_loss_gap_to_full": pick["emulator"]["heldout_loss"] - pick["full"]["heldout_loss"],
        "seconds_per_step": sps,
        "cpu_seconds_per_step": per_step("cpu_seconds_per_step"),
        "estimated_seconds": sps * pick["step"],
        "max_steps_measured": last["step"],
    }


def fmt(v, spec=".3f"):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(result: dict) -> str:
    full = result["full"]
    mc = "accuracy" in full
    head = ["step", "s/step (CPU s)", "align held-out (L2 + β·KL)", "L2", "KL", "align train (public set)",
            "public loss emu (full)", "held-out loss emu (full)"]
    if mc:
        head.append(f"MC acc emu (full), n={full.get('eval_n', 0)}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for p in result["curve"]:
        h, t, e = p["heldout_align"], p["train_align"], p["emulator"]
        sps = (f"{fmt(p.get('seconds_per_step'), '.2f')} ({fmt(p.get('cpu_seconds_per_step'), '.2f')})"
               if p.get("seconds_per_step") is not None else "—")
        row = [str(p["step"]), sps, fmt(h["loss"], ".4f"), fmt(h["l2"], ".4f"), fmt(h["kl"], ".4f"),
               fmt(t["loss"], ".4f") if t else "—",
               f"{fmt(e['public_loss'])} ({fmt(full['public_loss'])})",
               f"{fmt(e['heldout_loss'])} ({fmt(full['heldout_loss'])})"]
        if mc:
            row.append(f"{fmt(e['accuracy'])} ({fmt(full.get('accuracy'))})" if "accuracy" in e else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write(result: dict, path: str) -> None:
    if path:
        tmp = Path(path + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)


# ------------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    preset = PRESETS[PRESET]
    public, heldout, val = load_data(args)
    cache = Path(args.cache_dir) if args.cache_dir else model_cache_dir(ROOT / "var" / "demo" / PRESET)
    gguf = real_model_path("gemma3-270m")
    ensure_hf_dir(gguf, cache)

    # the LLM server's model: load_causal_lm + attach_lora with the party's LoRA config (ModelParty.install_model)
    lc, tc = LoraConfig(), TrainingConfig()
    t0 = time.perf_counter()
    full, tokenizer = load_causal_lm(gguf, cache_dir=cache, device=args.device, dtype=args.dtype)
    full = attach_lora(full, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, seed=lc.seed)
    load_s = time.perf_counter() - t0
    # CompressTask: compress the base weights, attach a fresh LoRA, a Trainer with the party's training config
    t0 = time.perf_counter()
    small, layer_map = compress(full, adapter_layers=args.adapter_layers, drop=args.drop)
    small = attach_lora(small, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, seed=lc.seed)
    trainer = Trainer(small, tokenizer, TrainConfig(lr=preset.lr, batch_size=args.batch_size,
                                                    max_length=args.max_length, seed=tc.seed))
    # AlignEmulatorTask at round 0: no aggregate yet; the (initial) adapter is plugged into the full model
    plug_adapter_into_full(full, small, layer_map, adapter_layers=args.adapter_layers)
    compress_s = time.perf_counter() - t0
    seed = tc.seed * 1_000_003 + 0
    heldout_pairs = _encode(tokenizer, heldout, args.max_length)
    public_pairs = _encode(tokenizer, public, args.max_length)
    opts = dict(adapter_layers=args.adapter_layers, beta=args.beta, batch_size=args.batch_size)
    score_opts = dict(batch_size=args.batch_size, max_length=args.max_length)

    t0 = time.perf_counter()
    full_scores = model_scores(full, tokenizer, public, heldout, val, **score_opts)
    full_eval_s = time.perf_counter() - t0
    dtype = next(p.dtype for n, p in full.named_parameters() if "lora_" not in n)
    result = {
        "benchmark": "fedbiot_alignment",
        "model": "gemma3-270m", "gguf": str(gguf), "dtype": dtype_name(dtype), "device": str(trainer.device),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "nice": os.nice(0),
        "settings": {"preset": PRESET, "adapter_layers": args.adapter_layers, "drop": args.drop, "beta": args.beta,
                     "lr": args.lr, "batch_size": args.batch_size, "max_length": args.max_length, "seed": seed,
                     "lora": {"r": lc.r, "alpha": lc.alpha, "dropout": lc.dropout, "seed": lc.seed},
                     "max_steps": args.max_steps, "checkpoints": args.checkpoint_list, "tolerance": args.tolerance,
                     "preset_pre_align_steps": preset.pre_align_steps, "preset_align_steps": preset.align_steps},
        "data": {"public": len(public_pairs), "heldout": len(heldout_pairs), "eval_items": len(val),
                 "public_epochs_at_max_steps": args.max_steps * args.batch_size / max(1, len(public_pairs))},
        "layers": {"original": num_decoder_layers(full), "compressed": len(layer_map),
                   "layer_map": [layer_map[j] for j in sorted(layer_map)]},
        "params": {"full": sum(p.numel() for p in full.parameters()),
                   "compressed": sum(p.numel() for p in small.parameters())},
        "seconds": {"load": load_s, "compress": compress_s, "full_eval": full_eval_s},
        "full": full_scores,
        "curve": [],
        "complete": False,
    }
    print(f"gemma3-270m {result['dtype']} on {result['device']} ({result['torch_threads']} threads): "
          f"{result['layers']['original']} layers -> {len(layer_map)} {result['layers']['layer_map']}; "
          f"public {len(public_pairs)}, held-out {len(heldout_pairs)}, MC {len(val)}; full model: "
          f"public loss {full_scores['public_loss']:.3f}, held-out {full_scores['heldout_loss']:.3f}"
          + (f", acc {full_scores['accuracy']:.3f}" if val else "") + f" ({full_eval_s:.0f}s)", flush=True)
    write(result, args.json)

    def group_steps() -> int:
        return trainer.groups["emulator"].steps if "emulator" in trainer.groups else 0

    pending = list(args.checkpoint_list)
    last_step = args.checkpoint_list[-1]
    # per optimizer step k: wall and process CPU seconds from the hook before it to the hook after it (measurement
    # excluded); CPU seconds do not depend on what else the machine runs (2 threads busy: about 2x the wall time)
    clock = {"last": None, "wall": {}, "cpu": {}}

    def checkpoint(step: int, *, train_align: dict | None = None) -> None:
        t_meas = time.perf_counter()
        mc = bool(val) and (args.mc_every or step in (0, last_step))
        rng = torch.get_rng_state()
        was_training = trainer.model.training
        try:
            heldout_align = alignment_loss(trainer, full, heldout_pairs, layer_map, **opts)
            if args.train_align and train_align is None:
                train_align = alignment_loss(trainer, full, public_pairs, layer_map, **opts)
            emu = model_scores(trainer.model, tokenizer, public, heldout, val, mc=mc, **score_opts)
        finally:
            torch.set_rng_state(rng)
            trainer.model.train(was_training)
        prev = result["curve"][-1]["step"] if result["curve"] else 0
        wall = [s for k, s in clock["wall"].items() if prev < k <= step]
        cpu = [s for k, s in clock["cpu"].items() if prev < k <= step]
        point = {"step": step, "seconds_per_step": float(np.mean(wall)) if wall else None,
                 "cpu_seconds_per_step": float(np.mean(cpu)) if cpu else None, "timed_steps": len(wall),
                 "align_seconds": float(sum(clock["wall"].values())),
                 "heldout_align": heldout_align, "train_align": train_align, "emulator": emu,
                 "full": {k: full_scores[k] for k in ("public_loss", "heldout_loss")},
                 "measure_seconds": time.perf_counter() - t_meas}
        result["curve"].append(point)
        result["recommendation"] = recommend(result["curve"], args.tolerance)  # on the curve so far
        result["seconds"]["total"] = time.perf_counter() - t_start
        write(result, args.json)
        print(f"step {step:4d}: align held-out {heldout_align['loss']:.4f} (L2 {heldout_align['l2']:.4f}, "
              f"KL {heldout_align['kl']:.4f})" + (f", train {train_align['loss']:.4f}" if train_align else "")
              + f"; emulator public loss {emu['public_loss']:.3f} held-out {emu['heldout_loss']:.3f}"
              + (f" acc {emu['accuracy']:.3f}" if "accuracy" in emu else "")
              + (f"; {point['seconds_per_step']:.2f} s/step ({point['cpu_seconds_per_step']:.2f} CPU s)" if wall
                 else "")
              + f"; measured in {point['measure_seconds']:.0f}s (total {result['seconds']['total']:.0f}s)", flush=True)

    def hook() -> bool:
        """align_emulator's should_stop, asked before every batch: time the step just made, measure at checkpoints."""
        now, cpu_now = time.perf_counter(), time.process_time()
        done = group_steps()
        if clock["last"] is not None and done > 0:
            clock["wall"][done] = now - clock["last"][0]
            clock["cpu"][done] = cpu_now - clock["last"][1]
        if pending and pending[0] == done:
            pending.pop(0)
            checkpoint(done)
        clock["last"] = (time.perf_counter(), time.process_time())
        return False

    t0 = time.perf_counter()
    m = align_emulator(trainer, full, public, layer_map, steps=args.max_steps, beta=args.beta,
                       adapter_layers=args.adapter_layers, lr=args.lr, batch_size=args.batch_size,
                       max_length=args.max_length, seed=seed, should_stop=hook)
    run_s = time.perf_counter() - t0
    # the train-set alignment loss at step 0 and max steps: align_emulator's own measure() before and after
    before = {k: float(m[f"align_{k}_before"]) for k in ("loss", "l2", "kl")}
    after = {k: float(m[f"align_{k}_after"]) for k in ("loss", "l2", "kl")}
    if result["curve"] and result["curve"][0]["step"] == 0 and result["curve"][0]["train_align"] is None:
        result["curve"][0]["train_align"] = before
    # the last step is not followed by a hook call (its time is left out of seconds_per_step): measure it here
    if pending and pending[-1] == group_steps():
        checkpoint(pending.pop(), train_align=after)
    result["align_emulator"] = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in m.items()}
    result["seconds"].update(align_call=run_s, total=time.perf_counter() - t_start)
    result["recommendation"] = recommend(result["curve"], args.tolerance)
    result["complete"] = True
    write(result, args.json)

    print()
    print(table(result))
    r = result["recommendation"]
    print(f"\nrule: {r['rule']}")
    print(f"recommendation: {r['steps']} steps (held-out alignment loss {r['heldout_align_loss']:.4f}, "
          f"{100 * r['share_of_reduction']:.0f}% of the reduction to the best); emulator public loss "
          f"{r['emulator_public_loss']:.3f} vs full {full_scores['public_loss']:.3f} (gap "
          f"{r['public_loss_gap_to_full']:.3f}), held-out {r['emulator_heldout_loss']:.3f} vs "
          f"{full_scores['heldout_loss']:.3f} (gap {r['heldout_loss_gap_to_full']:.3f}); "
          f"{r['seconds_per_step']:.2f} s/step ({r['cpu_seconds_per_step']:.2f} CPU s) -> about "
          f"{r['estimated_seconds']:.0f}s of alignment")
    print(f"total {result['seconds']['total']:.0f}s" + (f"; wrote {args.json}" if args.json else ""))
    return 0

if __name__ == "__main__":
    sys.exit(main())
