"""Security benchmark: what the hardening holds up to, and what mTLS costs.

    python benchmarks/security.py [--quick] [--fuzz-count N] [--blob-gib G] [--json out.json]

In one invocation, on this machine:

1. Protocol fuzzing (tests/integration/fuzzing.py, as tests/integration/test_fuzz.py runs it): a tiny secure cluster
   (the fedmkt family: coordinator, LLM server, two SLM clients, alignment service), every RPC of the coordinator, the
   LLM server, client-1 and the alignment service gets --fuzz-count hostile messages from an identity allowed to call
   it. Reports messages per service, crashes, hangs, INTERNAL/UNKNOWN answers, refusals by status code (and how many
   the guard refused before a handler ran), log bytes per message, each service's health afterwards and whether every
   RPC still answers a valid request.
2. Idle streams: on the same cluster's coordinator, health-check latency (grpc.health.v1 Check over mTLS, p50/p99)
   with no other calls, then while --idle-streams streams are held open and idle by an allowed caller (the operator):
   PutBlob uploads that stall after their first chunk, GetBlob downloads of a 16 MiB blob never read, health Watch
   and reflection streams never read, spread over 10 connections. The guard's per-method caps admit a few of each
   and refuse the rest with RESOURCE_EXHAUSTED; health checks must not notice.
3. The cost of mTLS, secure vs plaintext in one run:
   a. a --blob-gib GiB (default 1) blob pushed with cotune.wire.blobs.push_blob to a standalone BlobStore service
      (a ServiceHost of role "alignment" in its own process, with the product's request checks), once over mTLS
      (certificates from cotune.security.certs.ensure, the coordinator's identity dialling the alignment's) and once
      in plaintext (no TLS, no identities): MB/s each and the ratio;
   b. one FedAvg round on the tiny preset (demo models and data, cotune.demo), on a cluster with `security: mtls` and
      on one with `security: insecure`: the run's wall seconds (StartRun to its end: round 0's evaluation and round 1),
      the median of --round-runs runs on each cluster, and cluster start-up seconds.

Prints progress on stderr, then one JSON document and markdown tables on stdout. Defaults finish in under 10 minutes
on 2 CPU cores (about 3 minutes measured); --quick (30 messages per RPC, a 128 MiB blob, one shorter run per mode)
in 1-2 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from cotune.cluster import OPERATOR, LocalCluster  # noqa: E402
from cotune.rpc.channel import Credentials, TlsFiles, make_channel  # noqa: E402
from cotune.security.identity import ALIGNMENT, COORDINATOR  # noqa: E402

FUZZ_SERVICES = ("coordinator", "llm", "client-1", "alignment")
IDLE_KINDS = ("PutBlob", "GetBlob", "Health/Watch", "ServerReflectionInfo")


def log(msg: str) -> None:
    print(f"[security] {msg}", file=sys.stderr, flush=True)


def percentiles(samples_s: list[float]) -> dict:
    ms = sorted(x * 1000 for x in samples_s)
    if not ms:
        return {}
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {"n": len(ms), "p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2), "max_ms": round(ms[-1], 2),
            "mean_ms": round(statistics.fmean(ms), 2)}


# --------------------------------------------------------------------------------------------------------------------
# 1. fuzzing
# --------------------------------------------------------------------------------------------------------------------

def fuzz(cluster: LocalCluster, workdir: Path, count: int, seed: int) -> dict:
    from tests.integration.fuzzing import Fuzzer, build_seeds, health, summary, table

    t0 = time.monotonic()
    seeds = build_seeds(cluster, workdir / "fuzz-seeds", services=FUZZ_SERVICES, rng_seed=seed)
    fuzzer = Fuzzer(cluster, seeds, count=count, seed=seed, repro_dir=workdir / "fuzz-reproducers",
                    log=lambda m: log(m.strip()))
    stats, cleanup, probes = [], {}, {}
    try:
        for service in FUZZ_SERVICES:
            stats += fuzzer.fuzz_service(service)
            try:
                cleanup[service] = fuzzer.cleanup(service)
            except Exception as exc:  # noqa: BLE001 - e.g. the service died: reported, the benchmark goes on
                cleanup[service] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        for service in FUZZ_SERVICES:
            probes[service] = fuzzer.probe(service)
    finally:
        fuzzer.close()
    return {"count_per_rpc": count, "seed": seed, "seconds": round(time.monotonic() - t0, 1),
            "services": summary(stats), "health_after": {n: health(cluster, n) for n in cluster.services},
            "alive_after": {n: s.process.poll() is None for n, s in cluster.services.items()},
            "valid_request_after": probes, "reproducers": fuzzer.reproducers, "cleanup": cleanup,
            "rpcs": [s.as_dict() for s in stats],
            "table": table(stats)}


# --------------------------------------------------------------------------------------------------------------------
# 2. idle streams
# --------------------------------------------------------------------------------------------------------------------

def _health_latencies(channel, n: int) -> tuple[list[float], int]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    out, failed = [], 0
    for _ in range(n):
        t = time.perf_counter()
        try:
            stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            out.append(time.perf_counter() - t)
        except grpc.RpcError:
            failed += 1
    return out, failed


def idle_streams(cluster: LocalCluster, workdir: Path, streams: int, checks: int) -> dict:
    """Health-check latency at the coordinator with no other calls, then with `streams` idle streams held open."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from cotune.v1 import common_pb2, common_pb2_grpc
    from cotune.wire.blobs import BlobStore, push_blob, sha256_hex

    address, peer = cluster.services["coordinator"].address, cluster.identity_of("coordinator")
    creds = cluster.credentials(OPERATOR)
    probe = make_channel(address, creds, peer=peer)
    big = BlobStore(workdir / "idle-blobs")
    blob = big.put_bytes(os.urandom(16 << 20))  # GetBlob of this stalls once flow control fills, holding its worker
    push_blob(common_pb2_grpc.BlobStoreStub(probe), big, blob.sha256)

    _health_latencies(probe, 20)  # warm up
    none, none_failed = _health_latencies(probe, checks)

    release = threading.Event()

    def stalled_upload(i: int):
        content = f"an upload that never completes #{i}".encode()  # one blob per stream: they do not collide
        yield common_pb2.Chunk(sha256=sha256_hex(content), offset=0, data=content[:1], total_size=len(content))
        release.wait(120)

    def stalled_reflection():
        yield reflection_pb2.ServerReflectionRequest(list_services="*")
        release.wait(120)

    channels = [make_channel(address, creds, peer=peer) for _ in range(10)]
    calls = []
    t_open = time.monotonic()
    for i in range(streams):
        ch, kind = channels[i % len(channels)], IDLE_KINDS[i % len(IDLE_KINDS)]
        if kind == "PutBlob":
            call = common_pb2_grpc.BlobStoreStub(ch).PutBlob.future(stalled_upload(i), timeout=120)
        elif kind == "GetBlob":
            call = common_pb2_grpc.BlobStoreStub(ch).GetBlob(common_pb2.GetBlobRequest(sha256=blob.sha256), timeout=120)
        elif kind == "Health/Watch":
            call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
        else:
            call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(stalled_reflection(), timeout=120)
        calls.append((kind, call))
    time.sleep(1.5)  # every stream is either admitted (and idle) or refused by now
    held = {k: 0 for k in IDLE_KINDS}
    refused: dict[str, dict] = {k: {} for k in IDLE_KINDS}
    for kind, call in calls:
        if not call.done():
            held[kind] += 1
        else:
            code = call.code().name if call.code() is not None else "?"
            refused[kind][code] = refused[kind].get(code, 0) + 1
    with_streams, with_failed = _health_latencies(probe, checks)
    # a fresh connection (TLS handshake included) while the streams are still held
    t = time.perf_counter()
    fresh = make_channel(address, creds, peer=peer)
    try:
        health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        fresh_ms = round((time.perf_counter() - t) * 1000, 1)
    except grpc.RpcError as exc:
        fresh_ms = f"failed: {exc.code().name}"
    finally:
        fresh.close()
    still_held = sum(1 for _, call in calls if not call.done())
    held_for = time.monotonic() - t_open
    release.set()
    for _, call in calls:
        call.cancel()
    for ch in channels:
        ch.close()
    probe.close()
    shutil.rmtree(workdir / "idle-blobs", ignore_errors=True)
    return {"service": "coordinator", "streams_opened": streams, "held_open": held, "refused": refused,
            "still_held_after_checks": still_held, "held_for_s": round(held_for, 1),
            "health_check": {"no_streams": {**percentiles(none), "failed": none_failed},
                             "with_idle_streams": {**percentiles(with_streams), "failed": with_failed}},
            "fresh_connection_check_ms": fresh_ms}


# --------------------------------------------------------------------------------------------------------------------
# 3a. blob transfer, mTLS vs plaintext
# --------------------------------------------------------------------------------------------------------------------

def serve_blobs(args) -> None:
    """The standalone blob service (a subcommand of this script): a ServiceHost of role alignment with the product's
    request checks, its BlobStore only."""
    import logging

    from cotune.rpc.limits import check_message
    from cotune.rpc.server import ServiceHost
    from cotune.security.certs import cert_files
    from cotune.wire.blobs import BlobStore

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    tls = None
    if args.certs:
        files = cert_files(args.certs, ALIGNMENT)
        tls = TlsFiles(str(files.ca), str(files.cert), str(files.key))
    host = ServiceHost("bench-blobs", "127.0.0.1:0", role="alignment", tls=tls, check=check_message,
                       identity=ALIGNMENT if tls else None)
    host.add_blobs_and_operations(BlobStore(args.root), None)
    host.set_serving(True)
    host.start(args.port_file)
    host.wait_for_termination_signal()


def _start_blob_server(root: Path, certs: Path | None) -> tuple[subprocess.Popen, str]:
    port_file = root.with_name(root.name + ".port")
    port_file.unlink(missing_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "serve-blobs", "--root", str(root),
            "--port-file", str(port_file)]
    if certs:
        argv += ["--certs", str(certs)]
    env = dict(os.environ, MALLOC_ARENA_MAX="2")  # as the cluster launcher runs services
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the blob server did not start (exit code {proc.returncode})")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{int(port_file.read_text())}"


def _source_blob(workdir: Path, size: int):
    """A random blob of `size` bytes in a local store (made once per size, reused by later invocations)."""
    import numpy as np

    from cotune.wire.blobs import CHUNK_SIZE, BlobStore

    store = BlobStore(workdir / "source")
    index = workdir / "source" / "sizes.json"
    known = json.loads(index.read_text()) if index.exists() else {}
    sha = known.get(str(size))
    if sha and store.has(sha):
        return store, store.stat(sha)
    rng = np.random.default_rng(0)

    def chunks():
        left = size
        while left:
            n = min(CHUNK_SIZE, left)
            yield rng.bytes(n)
            left -= n

    log(f"making a {size / 2**30:.2f} GiB source blob")
    blob = store.put_stream(chunks())
    known[str(size)] = blob.sha256
    index.write_text(json.dumps(known))
    return store, blob


def blob_transfer(workdir: Path, gib: float, repeats: int) -> dict:
    from cotune.security.certs import cert_files, ensure
    from cotune.v1 import common_pb2_grpc
    from cotune.wire.blobs import push_blob

    size = int(gib * 2**30)
    source, blob = _source_blob(workdir, size)
    certs = workdir / "certs"
    ensure(certs, [ALIGNMENT, COORDINATOR])
    mine = cert_files(certs, COORDINATOR)
    results: dict[str, list[float]] = {"plaintext": [], "mtls": []}
    for attempt in range(repeats):
        for mode in ("plaintext", "mtls") if attempt % 2 == 0 else ("mtls", "plaintext"):
            root = workdir / f"receiver-{mode}"
            shutil.rmtree(root, ignore_errors=True)
            proc, address = _start_blob_server(root, certs if mode == "mtls" else None)
            try:
                creds = Credentials(TlsFiles(str(mine.ca), str(mine.cert), str(mine.key))) if mode == "mtls" else None
                channel = make_channel(address, creds, peer=ALIGNMENT if mode == "mtls" else None)
                stub = common_pb2_grpc.BlobStoreStub(channel)
                t = time.perf_counter()
                moved = push_blob(stub, source, blob.sha256, timeout=3600)
                seconds = time.perf_counter() - t
                channel.close()
                if moved != blob.size:
                    raise RuntimeError(f"{mode}: pushed {moved} bytes of {blob.size}")
                results[mode].append(seconds)
                log(f"blob {mode} #{attempt + 1}: {blob.size / seconds / 1e6:.0f} MB/s ({seconds:.1f}s)")
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                shutil.rmtree(root, ignore_errors=True)
    best = {mode: min(s) for mode, s in results.items()}
    mbps = {mode: round(blob.size / s / 1e6, 1) for mode, s in best.items()}
    return {"bytes": blob.size, "gib": round(blob.size / 2**30, 3), "repeats": repeats,
            "seconds": {m: [round(x, 2) for x in s] for m, s in results.items()},
            "plaintext_MBps": mbps["plaintext"], "mtls_MBps": mbps["mtls"],
            "mtls_over_plaintext": round(mbps["mtls"] / mbps["plaintext"], 3)}


# --------------------------------------------------------------------------------------------------------------------
# 3b. a tiny round, mTLS vs insecure
# --------------------------------------------------------------------------------------------------------------------

def tiny_round(workdir: Path, quick: bool, runs: int) -> dict:
    """One FedAvg round (round 0's evaluation, then round 1) on a cluster with `security: mtls` and on one with
    `security: insecure`, `runs` times each on the same cluster; the median run counts."""
    from cotune.demo import PRESETS, cluster_config, demo_spec, prepare_data, prepare_models, wait_for_clients
    from cotune.v1 import coordinator_pb2 as pb

    preset = PRESETS["tiny"]
    if quick:
        preset = replace(preset, per_part=16, eval_size=16, max_length=64)
    root = workdir / ("round-quick" if quick else "round")
    data = prepare_data(preset, root)
    models = prepare_models("tiny", root, algorithm="fedavg")
    base = cluster_config("tiny", preset, root, data, models, algorithm="fedavg")
    out = {"algorithm": "fedavg", "preset": "tiny" + (" (quick: 16 samples per part, max_length 64)" if quick else ""),
           "rounds": 1, "runs": runs}
    for mode in ("mtls", "insecure"):
        config = replace(base, workdir=str(root / f"cluster-{mode}"), security=mode)
        shutil.rmtree(config.workdir, ignore_errors=True)
        t0 = time.monotonic()
        walls, moved = [], 0
        with LocalCluster(config, start_timeout_s=600) as cluster:
            startup = time.monotonic() - t0
            client = cluster.coordinator_client()
            try:
                wait_for_clients(client, len(config.clients))
                for i in range(runs):
                    spec = demo_spec("tiny", preset, "fedavg", rounds=1)
                    t = time.monotonic()
                    run = client.start_run(spec)
                    for _ in client.watch_run(run.run_id):
                        pass
                    run = client.get_run(run.run_id)
                    walls.append(time.monotonic() - t)
                    if run.state != pb.RUN_SUCCEEDED:
                        raise SystemExit(f"tiny round ({mode}): run {run.run_id} ended {pb.RunState.Name(run.state)}: "
                                         f"{run.error}")
                    moved = sum(v for rec in run.rounds
                                for v in [*rec.bytes_sent.values(), *rec.bytes_received.values()])
                    log(f"round {mode} #{i + 1}: {walls[-1]:.1f}s")
            finally:
                client.close()
        out[mode] = {"run_wall_s": round(statistics.median(walls), 2), "run_walls_s": [round(w, 2) for w in walls],
                     "cluster_start_s": round(startup, 1), "bytes_moved_per_run": moved}
        log(f"round {mode}: median {statistics.median(walls):.1f}s (cluster start {startup:.1f}s)")
    out["mtls_over_insecure"] = round(out["mtls"]["run_wall_s"] / out["insecure"]["run_wall_s"], 3)
    return out


# --------------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------------

def _probe_cell(codes: dict) -> str:
    from tests.integration.fuzzing import BAD_PROBE_CODES

    bad = {rpc: code for rpc, code in codes.items() if code in BAD_PROBE_CODES}
    worst = f" ({', '.join(f'{r}: {c}' for r, c in bad.items())})" if bad else ""
    return f"{len(codes) - len(bad)} of {len(codes)}{worst}"


def markdown(result: dict) -> str:
    out = []
    f = result["fuzz"]
    out += [f"### Protocol fuzzing: {f['count_per_rpc']} messages per RPC (seed {f['seed']}), {f['seconds']} s", "",
            "| service | RPCs | messages | crashes | hangs | INTERNAL/UNKNOWN | refusals by code "
            "| refused by the guard "
            "| log B/message | health after | RPCs answering a valid request after |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|"]
    for name, row in f["services"].items():
        refusals = ", ".join(f"{c} {n}" for c, n in sorted(row["refusals"].items(), key=lambda kv: -kv[1]))
        out.append(f"| {name} | {row['rpcs']} | {row['messages']} | {row['crashes']} | {row['hangs']} "
                   f"| {row['internal']} | {refusals} | {row['refused_at_edge']} | {row['log_bytes_per_message']} "
                   f"| {f['health_after'].get(name, '?')} | {_probe_cell(f['valid_request_after'].get(name, {}))} |")
    i = result["idle_streams"]
    h = i["health_check"]
    out += ["", f"### Health checks at the coordinator while {i['streams_opened']} idle streams are held "
            f"(over {i['held_for_s']} s)", "",
            "| | checks | p50 ms | p99 ms | max ms | failed |", "|---|---:|---:|---:|---:|---:|"]
    for label, key in (("no other calls", "no_streams"), (f"{i['streams_opened']} idle streams", "with_idle_streams")):
        r = h[key]
        out.append(f"| {label} | {r.get('n', 0)} | {r.get('p50_ms')} | {r.get('p99_ms')} | {r.get('max_ms')} "
                   f"| {r['failed']} |")
    out += ["", "| idle stream kind | held open | refused |", "|---|---:|---|"]
    for kind in IDLE_KINDS:
        refused = ", ".join(f"{c} {n}" for c, n in i["refused"][kind].items()) or "0"
        out.append(f"| {kind} | {i['held_open'][kind]} | {refused} |")
    out.append(f"\nA new connection's first health check (TLS handshake included) while they were held: "
               f"{i['fresh_connection_check_ms']} ms.")
    b, r = result["blob"], result["round"]
    out += ["", "### The cost of mTLS", "",
            "| measure | plaintext | mTLS | mTLS / plaintext |", "|---|---:|---:|---:|",
            f"| push_blob {b['gib']} GiB (MB/s, best of {b['repeats']}) | {b['plaintext_MBps']} | {b['mtls_MBps']} "
            f"| {b['mtls_over_plaintext']} |",
            f"| a fedavg run (round 0 evaluation + 1 round), {r['preset']} (wall s, median of {r['runs']}) "
            f"| {r['insecure']['run_wall_s']} | {r['mtls']['run_wall_s']} "
            f"| {r['mtls_over_insecure']} |",
            f"| cluster start-up (s) | {r['insecure']['cluster_start_s']} | {r['mtls']['cluster_start_s']} | |"]
    return "\n".join(out)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "serve-blobs":
        ap = argparse.ArgumentParser()
        ap.add_argument("mode")
        ap.add_argument("--root", required=True)
        ap.add_argument("--port-file", required=True)
        ap.add_argument("--certs")
        serve_blobs(ap.parse_args())
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 30 messages per RPC, a 128 MiB blob, one short run per security mode")
    parser.add_argument("--fuzz-count", type=int, help="messages per RPC (default 200; --quick 30)")
    parser.add_argument("--seed", type=int, default=0, help="fuzz RNG seed")
    parser.add_argument("--idle-streams", type=int, default=100)
    parser.add_argument("--health-checks", type=int, help="health checks per measurement (default 500; --quick 200)")
    parser.add_argument("--blob-gib", type=float, help="size of the transferred blob in GiB (default 1; --quick 0.125)")
    parser.add_argument("--repeats", type=int, help="blob transfers per mode, alternating (the best counts; default 3, "
                                                     "--quick 1)")
    parser.add_argument("--round-runs", type=int, help="fedavg runs per security mode (median counts; default 3, "
                                                       "--quick 1)")
    parser.add_argument("--workdir", default="var/bench/security")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    count = args.fuzz_count or (30 if args.quick else 200)
    checks = args.health_checks or (200 if args.quick else 500)
    gib = args.blob_gib or (0.125 if args.quick else 1.0)
    repeats = args.repeats or (1 if args.quick else 3)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    from tests.integration.cluster_fixtures import start_tiny_cluster

    started = time.monotonic()
    fuzz_root = workdir / "fuzz"
    shutil.rmtree(fuzz_root / "cluster", ignore_errors=True)
    shutil.rmtree(fuzz_root / "fuzz-reproducers", ignore_errors=True)
    log("starting the tiny secure cluster (fedmkt family: coordinator, llm, 2 clients, alignment)")
    cluster = start_tiny_cluster(fuzz_root, "fedmkt")
    try:
        log(f"fuzzing {', '.join(FUZZ_SERVICES)}: {count} messages per RPC")
        fuzz_result = fuzz(cluster, fuzz_root, count, args.seed)
        log(f"idle streams: {args.idle_streams} at the coordinator, {checks} health checks each way")
        idle = idle_streams(cluster, fuzz_root, args.idle_streams, checks)
    finally:
        cluster.down()
    log(f"blob transfer: {gib} GiB, plaintext vs mTLS")
    blob = blob_transfer(workdir / "blob", gib, repeats)
    log("one fedavg round on the tiny preset, mtls vs insecure")
    round_result = tiny_round(workdir, args.quick, args.round_runs or (1 if args.quick else 3))
    fuzz_table = fuzz_result.pop("table")
    result = {"quick": args.quick, "cpus": os.cpu_count(), "seconds": round(time.monotonic() - started, 1),
              "fuzz": fuzz_result, "idle_streams": idle, "blob": blob, "round": round_result}
    text = json.dumps(result, indent=2)
    print(text)
    print()
    print(markdown(result))
    print()
    print("#### Fuzzing per RPC\n")
    print(fuzz_table)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
