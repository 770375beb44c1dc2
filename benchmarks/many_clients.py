"""Many-clients benchmark: how the coordinator's cost grows with the number of SLM clients.

    python benchmarks/many_clients.py [--sizes 10,30,100] [--clients-per-process K] [--json out.json]

For each N in --sizes and each algorithm (fedavg on the tiny same-tokenizer family; fedmkt on the tiny heterogeneous
family, the clients alternating between the GPT-2 and the GPT-NeoX tokenizer, the LLM on Mistral's, through the
alignment service) it builds a local cluster of real processes on loopback with N logical SLM clients, packed K to a
process (`clients_per_process`; default 10 for N <= 10, else ceil(N/4) clamped to 10..25), each client with its own
private shard of ARC-Easy (federated_split into N shards of --per-part examples; the public set is the same for every
N), every model process on one torch thread (COTUNE_TORCH_THREADS=1). The coordinator config lists the clients, so
they register at its start. Then it runs ONE round (RunSpec rounds=1: round 0's baseline evaluation and round 1)
and reports, per N and algorithm:

  run wall time (start_run to the run's end), round 1's wall time (its record's started_at to the run's updated_at),
  coordinator CPU seconds over the run (utime + stime of the coordinator process, /proc/<pid>/stat, before and after),
  coordinator CPU at startup + registration of the N clients, coordinator peak RSS (VmHWM, /proc/<pid>/status,
  reset to the current RSS through /proc/<pid>/clear_refs just before the run where the kernel allows it),
  round overhead per client (coordinator CPU seconds of the run / N), bytes the coordinator moved, and the growth
  ratio of the per-client overhead against the previous size (1.0 = linear growth of the total; > 1 superlinear).

Before the measured sizes, a warm-up fedmkt run with 2 clients builds the alignment service's vocabulary maps and
sequence alignments (cached per tokenizer pair and public set, under the bench workdir's alignment-cache), so no
measured round pays for them (--no-warmup skips it). Models are the demo's tiny random-init ones (cotune.demo), built
once under --workdir (default var/bench/many-clients). Prints progress lines on stderr, then one JSON document and a
markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cotune.cluster import ClusterConfig, LocalCluster  # noqa: E402
from cotune.data import federated_split, load_task, require_shared_data  # noqa: E402
from cotune.demo import PRESETS, cluster_config, demo_spec, prepare_models, wait_for_clients, write_split  # noqa: E402
from tests.integration.blob_server import proc_status_kib  # noqa: E402

ALGORITHMS = ("fedavg", "fedmkt")
# The tiny preset with small private shards (ARC-Easy train holds 2,251 examples: 100 clients + the public set at 16
# each fit) and short sequences: each client trains a couple of steps a round, so the coordinator's share shows.
BENCH_PRESET = replace(PRESETS["tiny"], per_part=16, eval_size=16, max_length=64)
MAX_PUBLIC_SAMPLES = 8
EVAL_MAX_SAMPLES = 8


def log(msg: str) -> None:
    print(f"[many-clients] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# /proc probes (Linux)
# --------------------------------------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses (then VmHWM is the lifetime peak)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------------------
# the cluster of N clients
# --------------------------------------------------------------------------------------------------------------------

def split_data(out: Path, n: int, *, per_part: int = BENCH_PRESET.per_part, eval_size: int = BENCH_PRESET.eval_size,
               seed: int = 0) -> dict[str, Path]:
    """ARC-Easy train cut into a public set and N private shards of `per_part` examples (the public set does not
    depend on N), and the first `eval_size` validation examples; written as JSONL under `out`."""
    shared = require_shared_data()
    train = load_task(BENCH_PRESET.task, "train", data_dir=shared)
    evaluation = load_task(BENCH_PRESET.task, "validation", data_dir=shared)[:eval_size]
    split = federated_split(train, n, seed=seed, eval_examples=evaluation, per_part=per_part)
    return write_split(split, out)


def family_root(workdir: Path, algorithm: str) -> Path:
    return Path(workdir).resolve() / ("shared" if algorithm == "fedavg" else "hetero")


def many_clients_config(workdir: Path, n: int, algorithm: str, *, clients_per_process: int,
                        preset=BENCH_PRESET) -> ClusterConfig:
    """The demo's tiny cluster for `algorithm` (cotune.demo.cluster_config: its model family, alignment service where
    tokenizers differ) grown to N logical clients client-1..client-N, each with its own private shard; clients take
    the demo's two client models in turn (heterogeneous family: GPT-2 and GPT-NeoX tokenizers alternate)."""
    root = family_root(workdir, algorithm)
    data = split_data(root / f"data-{n}", max(n, 2), per_part=preset.per_part, eval_size=preset.eval_size)
    models = prepare_models("tiny", root, algorithm=algorithm)
    base = cluster_config("tiny", preset, root, data, models, algorithm=algorithm)
    templates = base.clients  # client-1 and client-2 of the demo
    clients = []
    for i in range(1, n + 1):
        c = json.loads(json.dumps(templates[(i - 1) % len(templates)]))  # deep copy of plain data
        c["party_id"] = f"client-{i}"
        c["data"]["private"] = str(data[f"client-{i}"])
        clients.append(c)
    return replace(base, workdir=str(root / f"cluster-{n}"), clients=clients, clients_per_process=clients_per_process)


def default_packing(n: int) -> int:
    return 10 if n <= 10 else min(25, max(10, math.ceil(n / 4)))


def run_spec(algorithm: str, n: int):
    from cotune.v1 import coordinator_pb2 as pb

    spec = demo_spec("tiny", BENCH_PRESET, algorithm, 1)
    spec.name = f"many-clients-{algorithm}-{n}"
    spec.max_public_samples = MAX_PUBLIC_SAMPLES
    spec.eval_max_samples = EVAL_MAX_SAMPLES
    if algorithm == "fedmkt":
        spec.fedmkt.top_k = 8
        spec.fedmkt.distill_epochs = 1
    elif algorithm == "fedavg":
        spec.fedavg.CopyFrom(pb.FedAvgSpec())
    return spec


def measure(workdir: Path, n: int, algorithm: str, clients_per_process: int, *, warmup: bool = False) -> dict:
    from cotune.v1 import coordinator_pb2 as pb
    from cotune.watch import watch_run

    label = f"N={n} {algorithm}" + (" (warm-up)" if warmup else "")
    t0 = time.monotonic()
    log(f"{label}: preparing data and models")
    config = many_clients_config(workdir, n, algorithm, clients_per_process=clients_per_process)
    shutil.rmtree(config.workdir, ignore_errors=True)
    processes = math.ceil(n / clients_per_process)
    log(f"{label}: starting the cluster ({n} clients in {processes} process(es) of <= {clients_per_process}"
        + (", alignment service" if config.alignment is not None else "") + ")")
    cluster = LocalCluster(config, start_timeout_s=1800)
    try:
        t_up = time.monotonic()
        cluster.up()
        up_s = time.monotonic() - t_up
        coord_pid = cluster.services["coordinator"].pid
        client = cluster.coordinator_client()
        try:
            wait_for_clients(client, n, timeout_s=300)
            registered = client.list_clients()
            log(f"{label}: cluster up in {up_s:.0f}s, {len(registered)} clients registered; running one round")
            startup_cpu = cpu_seconds(coord_pid)
            peak_reset = reset_peak_rss(coord_pid)
            rss_before = proc_status_kib(coord_pid)["VmRSS"]
            cpu0 = cpu_seconds(coord_pid)
            w0 = time.monotonic()
            run = client.start_run(run_spec(algorithm, n))
            run = watch_run(client, run.run_id, quiet=True)
            wall = time.monotonic() - w0
            cpu1 = cpu_seconds(coord_pid)
            status = proc_status_kib(coord_pid)
        finally:
            client.close()
        slm_pids = {cluster.services[f"client-{i}"].pid for i in range(1, n + 1)}
    finally:
        cluster.down()
    rounds = {r.round: r for r in run.rounds}
    r1 = rounds.get(1)
    result = {
        "n": n, "algorithm": algorithm, "clients_per_process": clients_per_process, "client_processes": len(slm_pids),
        "state": pb.RunState.Name(run.state), "error": run.error,
        "cluster_up_s": round(up_s, 2),
        "run_wall_s": round(wall, 2),
        # the coordinator stamps a round's start only (finished_at stays 0): round 1 ends when the run does
        "round1_wall_s": round(run.updated_at - r1.started_at, 2) if r1 else None,
        "coordinator_cpu_s": round(cpu1 - cpu0, 3),
        "coordinator_startup_cpu_s": round(startup_cpu, 3),
        "coordinator_rss_before_mib": round(rss_before / 1024, 1),
        "coordinator_peak_rss_mib": round(status["VmHWM"] / 1024, 1),
        "peak_is_run_peak": peak_reset,
        "coordinator_cpu_per_client_ms": round(1000 * (cpu1 - cpu0) / n, 2),
        "bytes_moved": sum(sum(r.bytes_sent.values()) + sum(r.bytes_received.values()) for r in run.rounds),
        "parties_in_round1": len(r1.parties) if r1 else 0,
        "dropped_in_round1": list(r1.dropped) if r1 else [],
        "total_s": round(time.monotonic() - t0, 1),
    }
    log(f"{label}: {result['state']} in {wall:.1f}s; coordinator {result['coordinator_cpu_s']:.2f} CPU s "
        f"({result['coordinator_cpu_per_client_ms']:.1f} ms/client), peak RSS {result['coordinator_peak_rss_mib']:.0f} MiB")
    if run.state != pb.RUN_SUCCEEDED:
        log(f"{label}: run failed: {run.error}")
    return result


def add_growth(results: list[dict]) -> None:
    """growth: per-client overhead at this N / at the previous N of the same algorithm (1.0 = linear)."""
    for algorithm in ALGORITHMS:
        rows = sorted((r for r in results if r["algorithm"] == algorithm), key=lambda r: r["n"])
        prev = None
        for r in rows:
            if prev is not None and prev["coordinator_cpu_per_client_ms"] > 0:
                r["per_client_growth"] = round(r["coordinator_cpu_per_client_ms"] / prev["coordinator_cpu_per_client_ms"], 2)
                r["growth_vs_n"] = f"{prev['n']}->{r['n']}"
            else:
                r["per_client_growth"] = None
            prev = r


def markdown(results: list[dict]) -> str:
    lines = ["| N | algorithm | clients/process | state | run wall s | round 1 wall s | coordinator CPU s | "
             "startup+registration CPU s | peak RSS MiB | CPU per client ms | per-client growth | bytes moved |",
             "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in sorted(results, key=lambda r: (r["algorithm"], r["n"])):
        growth = "—" if r.get("per_client_growth") is None else f"×{r['per_client_growth']:.2f} ({r['growth_vs_n']})"
        lines.append(f"| {r['n']} | {r['algorithm']} | {r['clients_per_process']} | {r['state'].replace('RUN_', '').lower()} "
                     f"| {r['run_wall_s']:.1f} | {r['round1_wall_s'] or 0:.1f} | {r['coordinator_cpu_s']:.2f} "
                     f"| {r['coordinator_startup_cpu_s']:.2f} | {r['coordinator_peak_rss_mib']:.0f} "
                     f"| {r['coordinator_cpu_per_client_ms']:.1f} | {growth} | {r['bytes_moved'] / 1e6:.1f} MB |")
    lines += ["", "per-client growth: coordinator CPU per client at this N over that at the previous N (×1.00 = the "
              "coordinator's cost grows linearly in N; above 1, faster)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,30,100", help="comma-separated numbers of clients")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated: fedavg, fedmkt")
    ap.add_argument("--clients-per-process", type=int, default=0, help="logical clients per process (0 = by N)")
    ap.add_argument("--workdir", type=Path, default=REPO / "var" / "bench" / "many-clients")
    ap.add_argument("--no-warmup", action="store_true", help="skip the fedmkt warm-up that fills the alignment cache")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    for a in algorithms:
        if a not in ALGORITHMS:
            raise SystemExit(f"unknown algorithm {a!r}; choose from {', '.join(ALGORITHMS)}")
    os.environ["COTUNE_TORCH_THREADS"] = "1"  # every model process on one torch thread (the launcher passes it on)
    started = time.monotonic()
    out = {"environment": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                           "loadavg_at_start": os.getloadavg(), "machine": platform.machine()},
           "preset": {"per_part": BENCH_PRESET.per_part, "max_length": BENCH_PRESET.max_length,
                      "batch_size": BENCH_PRESET.batch_size, "max_public_samples": MAX_PUBLIC_SAMPLES,
                      "eval_max_samples": EVAL_MAX_SAMPLES},
           "results": []}
    if "fedmkt" in algorithms and not args.no_warmup:
        warm = measure(args.workdir, 2, "fedmkt", 2, warmup=True)
        out["warmup"] = {"state": warm["state"], "run_wall_s": warm["run_wall_s"]}
    for n in sizes:
        k = args.clients_per_process or default_packing(n)
        for algorithm in algorithms:
            out["results"].append(measure(args.workdir, n, algorithm, k))
            add_growth(out["results"])
            if args.json:  # partial results survive an interrupted run
                args.json.write_text(json.dumps(out, indent=1))
    out["total_s"] = round(time.monotonic() - started, 1)
    text = json.dumps(out, indent=1)
    print(text)
    print()
    print(markdown(out["results"]))
    if args.json:
        args.json.write_text(text)
    return out


if __name__ == "__main__":
    main()
