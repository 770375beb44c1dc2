"""What durability costs, and what it buys: per-step checkpoints of party state, and recovery from SIGKILL.

    python benchmarks/durability.py [--quick] [--runs N] [--kills N] [--stages N] [--json out.json]

In one invocation, on this machine (tiny preset: the demo's random-init models with real tokenizers, ARC-Easy):

1. A tiny FedMKT run (round 0: alignment and evaluation; one round) on a local cluster of real processes: the wall time
   of round 1 (its first step event to "round 1 complete") and of the run, over --runs uninterrupted runs.
2. Checkpoint bytes: what each party keeps per run under `<workdir>/runs/<run>/` (cotune.party.runstate), by file: the
   committed `state/` (adapter, optimizer + schedule + counters, algorithm states) that every step rewrites, and the
   `ops/` records (one per step); and how much the coordinator's SQLite state grew over the run. With FedBiOT too
   (not --quick): the LLM server's compressed-model state (emulator LoRA and its optimizer).
3. Checkpoint seconds: in the run, the `checkpoint` profile phase of every task (restore + stage, from the run
   record, against the tasks' total time); and, since there is no switch to turn durability off, timed in-process:
   each party is loaded from its cluster config on a copy of its workdir, restores the run's final committed state
   (`RunStates.enter`: what a restarted party, or a switch of runs, costs), then stages (`RunStates.stage`: adapter + optimizer + algorithm states written and fsynced as `state.next`) and commits
   (`RunStates.commit`: the operation record written, `state.next` promoted) --stages times. Reported as median ms and
   as a share of the party's median task time in the run (time/<step>/total).
4. Recovery per service: the service is killed with SIGKILL in the middle of a step and restarted at once
   (tests/integration/test_kill_matrix.py's cells: llm during its distillation, client-1 during local training, the
   coordinator while the clients compute public logits, the alignment service while it builds a vocabulary map, its
   cache wiped first), --kills times each: kill → restarted and healthy (a client: registered again), kill → the
   coordinator saw it back (its "... is back after" event), kill → the first progress event of the killed service's
   work after its restart; and whether the run ended identical to the uninterrupted one (metrics, artifacts, final
   adapters byte for byte).

Prints progress on stderr, then one JSON document and markdown tables on stdout. Defaults finish in under 10 minutes
on 2 CPU cores; --quick (one run, one kill per service, no FedBiOT, fewer stage repetitions) in about 2-3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cotune.cluster import LocalCluster  # noqa: E402
from cotune.demo import PRESETS, cluster_config, demo_spec, prepare_data, prepare_models, wait_for_clients  # noqa: E402
from cotune.v1 import coordinator_pb2 as pb  # noqa: E402
from tests.integration.test_kill_matrix import (  # noqa: E402
    Cell,
    fingerprint,
    kill_cell,
    run_alone,
    task_walls,
)

PRESET = "tiny"
CLIENTS = ("client-1", "client-2")
# where the kill lands (see the cells of tests/integration/test_kill_matrix.py)
RECOVERY_CELLS = {
    "llm": Cell("fedmkt", "llm", "llm_distill", 1, "distill", ("llm",)),
    "client": Cell("fedmkt", "client-1", "train_local", 1, "train_local", CLIENTS),
    "coordinator": Cell("fedmkt", "coordinator", "client_logits", 1, "public_logits", CLIENTS),
    "alignment": Cell("fedmkt", "alignment", "align:seq_alignment", 0, progress=True, delay=1.0, cold_alignment=True,
                      name="vocab_map"),
}


def log(msg: str) -> None:
    print(f"[durability] {msg}", file=sys.stderr, flush=True)


def _median(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def start_cluster(root: Path, algorithm: str) -> LocalCluster:
    preset = PRESETS[PRESET]
    shutil.rmtree(root / "cluster", ignore_errors=True)  # no runs of an earlier invocation
    data = prepare_data(preset, root)
    models = prepare_models(PRESET, root, algorithm=algorithm)
    cluster = LocalCluster(cluster_config(PRESET, preset, root, data, models, algorithm=algorithm), start_timeout_s=600)
    cluster.up()
    client = cluster.coordinator_client()
    try:
        wait_for_clients(client, len(CLIENTS), timeout_s=120)
    finally:
        client.close()
    return cluster


def coordinator_bytes(cluster: LocalCluster, run_id: str) -> dict:
    """What the coordinator keeps of a run in its SQLite state: the run record, its stored step results (what a
    restarted coordinator replays from) and its events."""
    import sqlite3

    db = sqlite3.connect(f"file:{Path(cluster.workdir) / 'coordinator' / 'state.sqlite3'}?mode=ro", uri=True)
    try:
        def one(sql):
            return db.execute(sql, (run_id,)).fetchone()

        run = one("SELECT COALESCE(SUM(LENGTH(run)), 0) FROM runs WHERE run_id = ?")[0]
        steps, step_bytes = one("SELECT COUNT(*), COALESCE(SUM(LENGTH(result)), 0) FROM steps WHERE run_id = ?")
        events, event_bytes = one("SELECT COUNT(*), COALESCE(SUM(LENGTH(event)), 0) FROM events WHERE run_id = ?")
    finally:
        db.close()
    return {"run_record_bytes": run, "steps": steps, "step_bytes": step_bytes, "events": events,
            "event_bytes": event_bytes}


def round_seconds(cluster: LocalCluster, run: pb.Run, rnd: int = 1) -> float | None:
    """Round `rnd`'s wall time: its first step event to its "round N complete" event."""
    client = cluster.coordinator_client()
    try:
        events = list(client.watch_run(run.run_id, timeout=60))
    finally:
        client.close()
    steps = [e.time for e in events if e.kind == "step" and e.round == rnd]
    done = [e.time for e in events if e.kind == "metrics" and e.round == rnd and "complete" in e.message]
    return round(max(done) - min(steps), 3) if steps and done else None


def state_bytes(cluster: LocalCluster, run_id: str) -> dict:
    """Per party: the bytes of the run's committed state by file, and of its operation records."""
    out = {}
    for name in ["llm", *CLIENTS]:
        d = Path(cluster.workdir) / name / "runs" / run_id
        if not d.is_dir():
            continue
        files = {str(p.relative_to(d / "state")): p.stat().st_size for p in sorted((d / "state").rglob("*"))
                 if p.is_file()}
        ops = list((d / "ops").glob("*.json"))
        out[name] = {"state_bytes": sum(files.values()), "files": files, "ops": len(ops),
                     "ops_bytes": sum(p.stat().st_size for p in ops)}
    return out


def checkpoint_phase(run: pb.Run) -> dict:
    """Per party, from the run record: seconds of the `checkpoint` profile phase (restoring the run's state and staging
    it after each step, cotune.party.runstate) summed over the run's tasks, against the tasks' total seconds."""
    out: dict[str, dict] = {}
    for rec in run.rounds:
        for p in rec.parties:
            row = out.setdefault(p.party_id, {"checkpoint_s": 0.0, "task_s": 0.0})
            for k, v in p.metrics.items():
                if k.startswith("time/") and k.endswith("/checkpoint"):
                    row["checkpoint_s"] += v
                elif k.startswith("time/") and k.endswith("/total"):
                    row["task_s"] += v
    for row in out.values():
        row["share"] = round(row["checkpoint_s"] / row["task_s"], 4) if row["task_s"] else None
        row["checkpoint_s"], row["task_s"] = round(row["checkpoint_s"], 3), round(row["task_s"], 3)
    return out


def measured_runs(cluster: LocalCluster, spec: pb.RunSpec, n: int, label: str) -> tuple[list[pb.Run], list[dict]]:
    runs, rows = [], []
    for i in range(n):
        started = time.monotonic()
        run = run_alone(cluster, spec)
        wall = time.monotonic() - started
        assert run.state == pb.RUN_SUCCEEDED, run.error
        rows.append({"run_s": round(wall, 3), "round1_s": round_seconds(cluster, run),
                     "coordinator": coordinator_bytes(cluster, run.run_id)})
        log(f"{label} run {i + 1}/{n}: {wall:.1f} s (round 1: {rows[-1]['round1_s']} s)")
        runs.append(run)
    return runs, rows


# -- checkpoint seconds, in-process ------------------------------------------------------------------------------------
def _load_party(cluster: LocalCluster, name: str, workdir: Path):
    import yaml

    from cotune.config import PartyConfig, from_dict

    data = yaml.safe_load(cluster.services[name].config_path.read_text())
    data["workdir"] = str(workdir)
    cfg = from_dict(PartyConfig, data, name)
    if name == "llm":
        from llm_server.server import LLMServer

        party = LLMServer(cfg)
    else:
        from slm_client.client import SLMClient

        party = SLMClient(cfg)
    party.load()
    return party


def time_checkpoints(cluster: LocalCluster, run: pb.Run, scratch: Path, stages: int,
                     parties=("llm", "client-1")) -> dict:
    """Per party: restore the run's final state from a copy of the party's workdir, then stage + commit it `stages`
    times (after the cluster is down: the workdirs are free)."""
    import base64

    walls = {}
    for rec in run.rounds:
        for p in rec.parties:
            for k, v in p.metrics.items():
                if k.startswith("time/") and k.endswith("/total"):
                    walls.setdefault(p.party_id, []).append(v)
    out = {}
    for name in parties:
        src = Path(cluster.workdir) / name
        dst = scratch / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
        party = _load_party(cluster, name, dst)
        try:
            runs = party.runs
            t0 = time.perf_counter()
            runs.enter(run.run_id, resumes=True)
            restore = time.perf_counter() - t0
            op_file = next((dst / "runs" / run.run_id / "ops").glob("*.json"))
            operation = base64.b64decode(json.loads(op_file.read_text())["operation"])  # a real record's size
            stage_s, commit_s = [], []
            for i in range(stages):
                key = f"{run.run_id}/9/bench/{i}/{name}"
                t0 = time.perf_counter()
                runs.stage(run.run_id, key)
                t1 = time.perf_counter()
                runs.commit(key, "bench", "0" * 64, operation)
                t2 = time.perf_counter()
                stage_s.append(t1 - t0)
                commit_s.append(t2 - t1)
            task = statistics.median(walls.get(name, [float("nan")]))
            stage_ms, commit_ms = 1000 * statistics.median(stage_s), 1000 * statistics.median(commit_s)
            out[name] = {"restore_ms": round(1000 * restore, 2), "stage_ms": round(stage_ms, 2),
                         "commit_ms": round(commit_ms, 2), "stage_p90_ms": round(1000 * sorted(stage_s)[
                             int(0.9 * (len(stage_s) - 1))], 2),
                         "median_task_ms": round(1000 * task, 1),
                         "share_of_task": round((stage_ms + commit_ms) / (1000 * task), 3) if task == task else None}
            log(f"checkpoint {name}: stage {stage_ms:.1f} ms + commit {commit_ms:.1f} ms (restore {1000 * restore:.0f} "
                f"ms; its median task {1000 * task:.0f} ms)")
        finally:
            party.ops.shutdown()
            party.workdir_lock.release()
            shutil.rmtree(dst, ignore_errors=True)
    return out


# -- recovery -------------------------------------------------------------------------------------------------------
def recoveries(cluster: LocalCluster, spec: pb.RunSpec, reference: pb.Run, targets: dict, kills: int) -> dict:
    ref = fingerprint(cluster, reference, targets)
    walls = task_walls(reference)
    out = {}
    for label, cell in RECOVERY_CELLS.items():
        rows = []
        for i in range(kills):
            row = kill_cell(cluster, cell, spec, ref, walls, targets)
            log(f"kill {label} ({cell.service} at {cell.name or cell.step}) {i + 1}/{kills}: landed {row.landed}; "
                f"recovered {row.recovered}, identical {row.identical}; restart {row.restart_s:.1f} s, "
                f"recover {row.recover_s} s" + ("" if row.recovered else f"; the run failed: {row.error}"))
            rows.append(row)
        out[label] = {
            "service": cell.service, "step": cell.name or cell.step, "kills": kills,
            "recovered": sum(r.recovered for r in rows), "identical": sum(r.identical for r in rows),
            "restart_s": _median(r.restart_s for r in rows), "waited_s": _median(r.waited_s for r in rows),
            "recover_s": _median(r.recover_s for r in rows), "run_s": _median(r.run_s for r in rows),
            "landed": sorted({r.landed for r in rows}), "coordinator_saw": sorted({r.coordinator_saw for r in rows}),
            "differences": [d for r in rows for d in r.differences][:20],
            "errors": [r.error for r in rows if not r.recovered]}
    return out


# -- report ---------------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    def f(v, nd=1):
        return "—" if v is None else f"{v:.{nd}f}"

    lines = ["#### A tiny FedMKT run (round 0: alignment, evaluation; round 1)\n",
             "| run | run (s) | round 1 (s) | coordinator keeps: run record (KiB) | step results (n, KiB) | "
             "events (n, KiB) |", "|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(result["fedmkt"]["runs"], 1):
        c = r["coordinator"]
        lines.append(f"| {i} | {f(r['run_s'])} | {f(r['round1_s'], 2)} | {c['run_record_bytes'] / 1024:.1f} | "
                     f"{c['steps']}, {c['step_bytes'] / 1024:.1f} | {c['events']}, {c['event_bytes'] / 1024:.1f} |")
    lines += ["", "#### Checkpoints per party (written at every step)\n",
              "| algorithm | party | state (KiB) | of which | ops records (steps, KiB) | restore (ms) | stage (ms) | "
              "commit (ms) | share of its median task | in the run: checkpoint phase / task time (s) |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for algo in ("fedmkt", "fedbiot"):
        part = result.get(algo)
        if not part:
            continue
        for name, b in part["state"].items():
            t = part.get("checkpoint", {}).get(name, {})
            files = ", ".join(f"{k} {v / 1024:.0f}" for k, v in sorted(b["files"].items(), key=lambda kv: -kv[1])
                              if v >= 1024)
            share = t.get("share_of_task")
            ph = part.get("checkpoint_phase", {}).get(name)
            in_run = "—" if not ph else f"{ph['checkpoint_s']:.2f} / {ph['task_s']:.1f}"
            lines.append(f"| {algo} | {name} | {b['state_bytes'] / 1024:.0f} | {files} | {b['ops']}, "
                         f"{b['ops_bytes'] / 1024:.0f} | {f(t.get('restore_ms'))} | {f(t.get('stage_ms'))} | "
                         f"{f(t.get('commit_ms'))} | {'—' if share is None else f'{100 * share:.0f}%'} | {in_run} |")
    lines += ["", "#### Recovery from SIGKILL mid-step (restarted at once)\n",
              "| service | killed at | recovered | identical | restart (s) | coordinator waited (s) | "
              "time to recover (s) |"
              " run (s) | kill landed |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for label, r in result["recovery"].items():
        lines.append(f"| {r['service']} | {r['step']} | {r['recovered']}/{r['kills']} | "
                     f"{r['identical']}/{r['kills']} | "
                     f"{f(r['restart_s'])} | {f(r['waited_s'])} | {f(r['recover_s'])} | {f(r['run_s'])} | "
                     f"{'; '.join(r['landed'])} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one run, one kill per service, no FedBiOT, 10 stages")
    parser.add_argument("--runs", type=int, help="uninterrupted FedMKT runs (default 3; --quick 1)")
    parser.add_argument("--kills", type=int, help="kills per service (median counts; default 3; --quick 1)")
    parser.add_argument("--stages", type=int, help="stage + commit repetitions per party (default 30; --quick 10)")
    parser.add_argument("--workdir", default="var/bench/durability")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    n_runs = args.runs or (1 if args.quick else 3)
    kills = args.kills or (1 if args.quick else 3)
    stages = args.stages or (10 if args.quick else 30)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    preset = PRESETS[PRESET]
    result: dict = {"quick": args.quick, "cpus": os.cpu_count(), "preset": PRESET}

    log("starting the tiny fedmkt cluster (alignment, llm, 2 clients, coordinator)")
    t0 = time.monotonic()
    cluster = start_cluster(workdir / "fedmkt", "fedmkt")
    result["cluster_up_s"] = round(time.monotonic() - t0, 1)
    spec = demo_spec(PRESET, preset, "fedmkt", rounds=1)
    targets = {"llm": ("",), **{c: ("",) for c in CLIENTS}}
    try:
        runs, rows = measured_runs(cluster, spec, n_runs, "fedmkt")
        reference = runs[-1]
        result["fedmkt"] = {"spec": {"rounds": 1, "top_k": preset.top_k, "public": preset.per_part,
                                     "max_length": preset.max_length},
                            "runs": rows, "state": state_bytes(cluster, reference.run_id),
                            "checkpoint_phase": checkpoint_phase(reference)}
        log(f"recovery: {kills} kill(s) per service")
        result["recovery"] = recoveries(cluster, spec, reference, targets, kills)
    finally:
        cluster.down()
    log(f"checkpoint timing in-process ({stages} stages per party)")
    result["fedmkt"]["checkpoint"] = time_checkpoints(cluster, reference, workdir / "scratch", stages)

    if not args.quick:
        log("starting the tiny fedbiot cluster (8-layer llm, 2 clients, coordinator)")
        cluster = start_cluster(workdir / "fedbiot", "fedbiot")
        try:
            bspec = demo_spec(PRESET, preset, "fedbiot", rounds=1)
            bruns, brows = measured_runs(cluster, bspec, 1, "fedbiot")
            result["fedbiot"] = {"runs": brows, "state": state_bytes(cluster, bruns[-1].run_id),
                                 "checkpoint_phase": checkpoint_phase(bruns[-1])}
        finally:
            cluster.down()
        result["fedbiot"]["checkpoint"] = time_checkpoints(cluster, bruns[-1], workdir / "scratch-fedbiot", stages)

    result["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    print()
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
