"""Where a federated round's time goes, and what the speed-ups buy: one round of each algorithm on the small preset
(Gemma 3 270M LLM, SmolLM2-135M clients, ARC-Easy), run twice in one invocation on fresh clusters:

- off: the reference path: every model in fp32 (`model.dtype: fp32`), multiple-choice items scored one sequence per
  choice (`evaluation.mc_scoring: per_choice`), one step at a time (`overlap_steps: false`), each process on its
  fixed share of the cores (`COTUNE_HOST_CORES=0`);
- on: the defaults: `model.dtype: auto` (bf16 where the CPU/GPU supports it, LoRA and optimizer state in fp32),
  choices scored against one encoding of the shared prompt, independent steps overlapped, each task on the cores
  its run's plan leaves it (RunContext.parallel_tasks).

It prints JSON and markdown tables: the round's wall time (round 1: from its first step to its last), each step's
wall time per party with its phases (cotune.profile), training tokens/s per party, peak RSS per process, and every
metric of every party side by side with whether they agree within the tolerances below.

    python benchmarks/round.py --algorithm fedmkt --json out.json     # one algorithm; speedup and metrics_agree on top
    python benchmarks/round.py                                         # fedmkt, fedcollm and fedbiot
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from cotune.cluster import LocalCluster  # noqa: E402
from cotune.demo import PRESETS, cluster_config, demo_spec, prepare_data, prepare_models, wait_for_clients  # noqa: E402
from cotune.report import step_profiles  # noqa: E402
from cotune.v1 import coordinator_pb2 as pb  # noqa: E402
from cotune.watch import STREAM_DEADLINE_S  # noqa: E402
from tests.integration.blob_server import proc_status_kib  # noqa: E402

ALGORITHMS = ("fedmkt", "fedcollm", "fedbiot")
ENDED = (pb.RUN_SUCCEEDED, pb.RUN_FAILED, pb.RUN_CANCELLED)
MODES = {
    "off": {"dtype": "fp32", "mc_scoring": "per_choice", "overlap_steps": False, "host_cores": "0"},
    "on": {"dtype": "auto", "mc_scoring": "shared_prompt", "overlap_steps": True, "host_cores": ""},
}
# Agreement of "on" with "off" (bf16 weights change every number a little). Losses measured on weights no optimizer
# step has touched (round 0) within 2% relative (or 0.02 absolute); losses in later rounds within 5%: there the two
# runs have trained along different float paths, and the difference grows with every step (the fp32 reference's own
# spread under another seed, --seed-spread, is several times larger). Accuracies within 0.05 (3 of 60 items).
# Timings, counts and byte sizes are not compared.
LOSS_RTOL_UNTRAINED, LOSS_RTOL_TRAINED, LOSS_ATOL, ACC_ATOL = 0.02, 0.05, 0.02, 0.05
NOT_COMPARED = ("time/", "seconds", "_steps", "_samples", "_positions", "_bytes", "bytes_per", "_tokens", "tokens",
                "eval_n", "fedavg_weight", "_params", "layers", "kd_targets", "kd_samples", "kd_from", "kd_none",
                "kd_self", "global_step", "stopped", "_ppl")  # kd_*: samples per teacher; ppl = exp(loss), compared as loss


def _configure(config, mode: dict, workdir: Path, seed: int = 0):
    config = copy.deepcopy(config)
    config.workdir = str(workdir)
    for party in [config.llm, *config.clients]:
        party.setdefault("model", {})["dtype"] = mode["dtype"]
        party["evaluation"] = {"mc_scoring": mode["mc_scoring"]}
        if seed:  # LoRA initialisation and data order; the data split and the models stay
            party["lora"] = {**party.get("lora", {}), "seed": seed}
            party["training"] = {**party.get("training", {}), "seed": seed}
    return config


def _peak_rss_mib(pid: int) -> float:
    try:
        return proc_status_kib(pid)["VmHWM"] / 1024
    except (OSError, KeyError):  # the process is gone
        return float("nan")


def run_once(algorithm: str, mode_name: str, root: Path, preset_name: str, seed: int = 0) -> dict:
    mode = MODES[mode_name]
    preset = PRESETS[preset_name]
    data = prepare_data(preset, root)
    models = prepare_models(preset_name, root, algorithm=algorithm)
    config = _configure(cluster_config(preset_name, preset, root, data, models, algorithm=algorithm), mode,
                        root / f"bench-{algorithm}-{mode_name}", seed)
    if seed:
        mode_name = f"{mode_name}-seed{seed}"
    print(f"[{algorithm}/{mode_name}] starting the cluster (dtype {mode['dtype']}, {mode['mc_scoring']}, "
          f"overlap {mode['overlap_steps']})", file=sys.stderr, flush=True)
    started = time.time()
    os.environ.pop("COTUNE_HOST_CORES", None)  # the cluster sets it to the machine's cores unless a mode turns it off
    if mode["host_cores"]:
        os.environ["COTUNE_HOST_CORES"] = mode["host_cores"]
    with LocalCluster(config, start_timeout_s=900) as cluster:
        client = cluster.coordinator_client()
        try:
            wait_for_clients(client, len(config.clients))
            spec = demo_spec(preset_name, preset, algorithm, rounds=1)
            spec.overlap_steps = mode["overlap_steps"]
            run = client.start_run(spec)
            events = []
            while run.state not in ENDED:  # a WatchRun stream ends at its deadline; watch again from the last event
                try:
                    for event in client.watch_run(run.run_id, after_seq=events[-1].seq if events else 0,
                                                  timeout=STREAM_DEADLINE_S):
                        events.append(event)
                        if event.kind == "step":
                            print(f"[{algorithm}/{mode_name}] round {event.round} {event.step} "
                                  f"(+{event.time - started:.0f}s)", file=sys.stderr, flush=True)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise
                run = client.get_run(run.run_id)
        finally:
            client.close()
        rss = {name: round(_peak_rss_mib(svc.pid), 1) for name, svc in cluster.services.items()}
    if run.state != pb.RUN_SUCCEEDED:
        raise SystemExit(f"{algorithm}/{mode_name}: run {run.run_id} ended {pb.RunState.Name(run.state)}: {run.error}")
    round1 = [e.time for e in events if e.round == 1 and e.kind in ("step", "progress", "metrics")]
    round_wall = max(round1) - min(round1)
    steps = [{"round": r, "step": s, "party": p, **{k: round(v, 2) for k, v in sec.items()}}
             for r, s, p, sec in step_profiles(run)]
    metrics = {f"r{rec.round}/{party.party_id}": {k: v for k, v in party.metrics.items() if not k.startswith("time/")}
               for rec in run.rounds for party in rec.parties}
    tokens_per_s = {}
    for rec in run.rounds:
        for party in rec.parties:
            m = party.metrics
            for step, key in (("train_local", "train_tokens"), ("distill", "distill_tokens"),
                              ("align_emulator", "align_tokens")):
                busy = sum(m.get(f"time/{step}/{p}", 0.0) for p in ("forward", "backward", "optimizer"))
                if key in m and busy > 0:
                    tokens_per_s[f"r{rec.round}/{party.party_id}/{step}"] = round(m[key] / busy, 1)
    return {"mode": mode_name, **mode, "run_id": run.run_id, "round_wall_s": round(round_wall, 1),
            "run_wall_s": round(time.time() - started, 1), "steps": steps, "tokens_per_s": tokens_per_s,
            "peak_rss_mib": rss, "metrics": metrics}


def _compared(name: str) -> bool:
    return not any(tag in name for tag in NOT_COMPARED)


def compare(off: dict, on: dict, spread: dict | None = None) -> list[dict]:
    """Every compared metric of `off` and `on` side by side with whether they agree; with `spread` (the fp32 run under
    another seed), also how far that run's value lies from `off`, for scale."""
    rows = []
    for key in sorted(set(off["metrics"]) & set(on["metrics"])):
        a, b = off["metrics"][key], on["metrics"][key]
        rtol = LOSS_RTOL_UNTRAINED if key.startswith("r0/") else LOSS_RTOL_TRAINED
        for name in sorted(set(a) & set(b)):
            if not _compared(name):
                continue
            x, y = a[name], b[name]
            if "accuracy" in name:
                ok = abs(x - y) <= ACC_ATOL
            else:
                ok = (math.isnan(x) and math.isnan(y)) or abs(x - y) <= max(LOSS_ATOL, rtol * abs(x))
            row = {"where": key, "metric": name, "off": x, "on": y, "agree": bool(ok)}
            other = (spread or {}).get("metrics", {}).get(key, {}).get(name)
            if other is not None:
                row["off_other_seed"] = other
            rows.append(row)
    return rows


def benchmark(algorithm: str, root: Path, preset: str, seed_spread: bool = False) -> dict:
    off = run_once(algorithm, "off", root, preset)
    on = run_once(algorithm, "on", root, preset)
    spread = run_once(algorithm, "off", root, preset, seed=1) if seed_spread else None
    rows = compare(off, on, spread)
    return {"algorithm": algorithm, "speedup": round(off["round_wall_s"] / on["round_wall_s"], 2),
            "metrics_agree": all(r["agree"] for r in rows), "off": off, "on": on, "metrics": rows,
            **({"off_other_seed": spread} if spread else {})}


def _relative(a: float, b: float) -> str:
    return f"{abs(a - b) / abs(a):.1%}" if a and math.isfinite(a) and math.isfinite(b) else ""


def markdown(result: dict) -> str:
    off, on = result["off"], result["on"]
    out = [f"### {result['algorithm']}: round 1 {off['round_wall_s']} s → {on['round_wall_s']} s "
           f"(speedup {result['speedup']}×), metrics agree: {result['metrics_agree']}", "",
           "| step | party | wall off | wall on | forward off / on | backward off / on | data off / on | other off / on |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    on_steps = {(s["round"], s["step"], s["party"]): s for s in on["steps"]}
    for s in off["steps"]:
        if s["round"] != 1:
            continue
        t = on_steps.get((1, s["step"], s["party"]), {})
        cell = lambda k: f"{s.get(k, 0):.1f} / {t.get(k, 0):.1f}"  # noqa: E731
        out.append(f"| {s['step']} | {s['party']} | {s.get('wall', 0):.1f} | {t.get('wall', 0):.1f} | {cell('forward')} "
                   f"| {cell('backward')} | {cell('data')} | {cell('other')} |")
    out += ["", "| tokens/s (training, distillation, emulator alignment) | off | on |", "|---|---:|---:|"]
    for key in sorted(off["tokens_per_s"]):
        out.append(f"| {key} | {off['tokens_per_s'][key]} | {on['tokens_per_s'].get(key, '')} |")
    out += ["", "| process | peak RSS off (MiB) | on |", "|---|---:|---:|"]
    for name in sorted(off["peak_rss_mib"]):
        out.append(f"| {name} | {off['peak_rss_mib'][name]} | {on['peak_rss_mib'].get(name, '')} |")
    spread = "off_other_seed" in result
    out += ["", "| where | metric | off | on | on vs off | agree |" + (" off, seed 1 | seed 1 vs off |" if spread else ""),
            "|---|---|---:|---:|---:|---|" + ("---:|---:|" if spread else "")]
    for r in result["metrics"]:
        line = (f"| {r['where']} | {r['metric']} | {r['off']:.4f} | {r['on']:.4f} | {_relative(r['off'], r['on'])} "
                f"| {'yes' if r['agree'] else 'NO'} |")
        if spread:
            other = r.get("off_other_seed")
            line += (f" {other:.4f} | {_relative(r['off'], other)} |" if other is not None else " | |")
        out.append(line)
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", choices=[*ALGORITHMS, "all"], default="all")
    parser.add_argument("--preset", default="small", help="demo preset (small = the real models; tiny for a smoke run)")
    parser.add_argument("--workdir", default="var/demo", help="the demo's workdir: data, models and caches are reused")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--seed-spread", action="store_true",
                        help="also run the fp32 reference with another LoRA/data-order seed and show how far each "
                             "metric moves: the scale against which the on/off tolerance is set")
    args = parser.parse_args()
    root = Path(args.workdir).resolve() / args.preset
    algorithms = ALGORITHMS if args.algorithm == "all" else (args.algorithm,)
    results = [benchmark(a, root, args.preset, args.seed_spread) for a in algorithms]
    summary = results[0] if len(results) == 1 else {
        "speedup": {r["algorithm"]: r["speedup"] for r in results},
        "metrics_agree": all(r["metrics_agree"] for r in results), "algorithms": results}
    if len(results) == 1:
        summary = {"speedup": results[0]["speedup"], "metrics_agree": results[0]["metrics_agree"], **results[0]}
    text = json.dumps(summary, indent=2)
    print(text)
    for r in results:
        print()
        print(markdown(r))
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
