"""Idle and slow callers cannot starve a service: against a secure tiny cluster of real processes, hold 100 idle
streams (PutBlob streams that send nothing or one chunk and stall, GetBlob streams never read, WatchRun and health
Watch streams never read) against the coordinator and the LLM server, and keep 100 callers registering clients at a
"black hole" (a TCP listener that accepts and never answers, so the coordinator's dial hangs until its deadline). While
they are held, health checks on every service must answer within 2 s each, ListRuns must answer, and one-round FedAvg
runs must succeed. Once the guard's idle watchdog has had its turn, every capped method must admit calls again. How
every held call ended is counted (RESOURCE_EXHAUSTED refusals at the per-method caps, CANCELLED by the watchdog after
~30 s, ...) and printed with the health-check latencies; the services' own logs confirm the watchdog's cancels.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cotune.cluster import OPERATOR
from cotune.rpc.channel import CHANNEL_OPTIONS
from cotune.rpc.clients import CoordinatorClient
from cotune.rpc.guard import CONCURRENCY, STREAM_IDLE_S
from cotune.security.certs import cert_files
from cotune.security.identity import COORDINATOR, Identity
from cotune.v1 import common_pb2, common_pb2_grpc
from cotune.v1 import coordinator_pb2 as pb
from cotune.v1 import coordinator_pb2_grpc
from cotune.watch import watch_run
from cotune.wire.blobs import BlobStore, push_blob
from tests.integration.cluster_fixtures import TEST_PRESET

pytestmark = pytest.mark.integration

CLUSTER_ALGORITHM = "fedavg"  # the cheapest run; its tiny cluster has no alignment service

# idle streams held per target: (caller identity, method -> how many); 100 in all, each count above the guard's cap
HELD = {
    "coordinator": (OPERATOR, {"PutBlob": 14, "GetBlob": 14, "WatchRun": 12, "Watch": 10}),
    "llm": (COORDINATOR, {"PutBlob": 18, "GetBlob": 18, "Watch": 14}),
}
BLACK_HOLE_CALLERS = 100
HEALTH_DEADLINE_S = 2.0
SECOND_RUN_AT_S = 20.0                # a second run starts while the idle streams are still held
HOLD_AT_LEAST_S = STREAM_IDLE_S + 4   # then the watchdog (which looks every second) has cancelled the idle streams
BIG_BLOB = 16 << 20                   # what the unread GetBlob streams ask for
FULL = {"PutBlob": "cotune.v1.BlobStore/PutBlob", "GetBlob": "cotune.v1.BlobStore/GetBlob",
        "WatchRun": "cotune.v1.Coordinator/WatchRun", "Watch": "grpc.health.v1.Health/Watch",
        "RegisterClient": "cotune.v1.Coordinator/RegisterClient"}
SHORT = {v: k for k, v in FULL.items()}
WATCHDOG_LINE = re.compile(r"cancelled (\S+): no message for")


def _channel(cluster, name: str, identity: Identity) -> grpc.Channel:
    """A channel on its own connection (no subchannel sharing), as `identity`, pinned to service `name`."""
    files = cert_files(cluster.certs_dir, identity)
    creds = grpc.ssl_channel_credentials(root_certificates=files.ca.read_bytes(), private_key=files.key.read_bytes(),
                                         certificate_chain=files.cert.read_bytes())
    options = CHANNEL_OPTIONS + [("grpc.ssl_target_name_override", cluster.identity_of(name).dns_name),
                                 ("grpc.use_local_subchannel_pool", 1)]
    return grpc.secure_channel(cluster.addresses()[name], creds, options=options)


class BlackHole:
    """A TCP listener that accepts connections and never sends a byte."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="black-hole", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.sock.close()


class Held:
    """The held calls, each with its target, method, and how and when it ended (as its caller saw it)."""

    def __init__(self):
        self.calls: list[dict] = []

    def add(self, target: str, method: str, call) -> None:
        entry = {"target": target, "method": method, "call": call, "started": time.monotonic(), "ended": None,
                 "code": None, "how": ""}
        self.calls.append(entry)

        def done(c, entry=entry):
            if entry["ended"] is None:
                entry["ended"] = time.monotonic()
                code = c.code()
                entry["code"] = code.name if code is not None else "OK"

        call.add_done_callback(done)

    def drain(self, budget_s: float) -> None:
        """Read what the never-read response streams still hold, to learn how the server ended them: a caller that
        never reads sees the end of its stream only once it reads the messages before it."""
        def read(entry):
            try:
                for _ in entry["call"]:
                    pass
            except grpc.RpcError:
                pass
            entry["how"] = "seen when drained at cleanup"

        pending = [e for e in self.calls if e["ended"] is None and e["method"] != "PutBlob"]
        with ThreadPoolExecutor(max_workers=max(1, len(pending))) as pool:
            futures = [pool.submit(read, e) for e in pending]
            deadline = time.monotonic() + budget_s
            for e, f in zip(pending, futures):
                try:
                    f.result(timeout=max(0.1, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - still open: cancelled below
                    pass
            self.cancel_rest()

    def cancel_rest(self) -> None:
        for entry in self.calls:
            if entry["ended"] is None:
                entry["how"] = "still open at cleanup, cancelled by the test"
                entry["call"].cancel()


def _stalled_chunks(sha: str, total: int, first: bytes | None, release: threading.Event):
    """A PutBlob request stream that sends `first` (or nothing) and then stalls until `release`."""
    if first is not None:
        yield common_pb2.Chunk(sha256=sha, offset=0, data=first, total_size=total)
    release.wait()


def _bucket(seconds: float) -> str:
    return "<1s" if seconds < 1 else f"{seconds:.0f}s" if seconds < 10 else f"~{seconds:.0f}s"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _watchdog_cancels(cluster, name: str, offset: int) -> Counter:
    """The watchdog's cancels the service `name` logged after byte `offset` of its log, by method."""
    text = cluster.services[name].log_path.read_bytes()[offset:].decode(errors="replace")
    return Counter(SHORT.get(m, m) for m in WATCHDOG_LINE.findall(text))


def test_idle_and_black_hole_callers_do_not_starve_the_cluster(cluster, coordinator, tmp_path):
    services = [n for n in cluster.addresses() if n != "coordinator"] + ["coordinator"]
    log_offsets = {name: cluster.services[name].log_path.stat().st_size for name in HELD}
    # a big blob in the coordinator's artifact store and in the LLM's store, for the unread GetBlob streams
    local = BlobStore(tmp_path / "local")
    big = local.put_bytes(os.urandom(BIG_BLOB))
    seed_channels = {name: _channel(cluster, name, HELD[name][0]) for name in HELD}
    for channel in seed_channels.values():
        push_blob(common_pb2_grpc.BlobStoreStub(channel), local, big.sha256)

    release = threading.Event()  # lets the stalled PutBlob request streams end at cleanup
    stop = threading.Event()
    held = Held()
    hole = BlackHole()
    held_channels = {name: [_channel(cluster, name, HELD[name][0]) for _ in range(4)] for name in HELD}
    reg_channels = [_channel(cluster, "coordinator", OPERATOR) for _ in range(4)]
    probe_channels = {name: _channel(cluster, name, OPERATOR) for name in services}
    black_hole_outcomes: Counter = Counter()
    outcomes_lock = threading.Lock()
    slow_refusals: list[tuple[float, float]] = []  # (when, took) of RESOURCE_EXHAUSTED answers slower than 0.5 s
    latencies: dict[str, list[float]] = {"warm": [], "cold": []}
    health_failures: list[str] = []
    slowest: list[tuple[float, float, str, str]] = []  # (latency, when, service, connection)
    runs: list[tuple[pb.Run, float]] = []
    probes: dict[str, str] = {}
    after_watchdog: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=BLACK_HOLE_CALLERS + 1, thread_name_prefix="starve")
    op = coordinator_pb2_grpc.CoordinatorStub(probe_channels["coordinator"])
    # connect every channel first, so "kept connection" latencies and refusal times exclude TLS handshakes
    for channel in [*probe_channels.values(), *reg_channels, *(c for cs in held_channels.values() for c in cs)]:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    t0 = time.monotonic()

    def open_streams(name: str, method: str, n: int, run_id: str = "") -> None:
        for i in range(n):
            channel = held_channels[name][i % len(held_channels[name])]
            if method == "PutBlob":
                sha = hashlib.sha256(os.urandom(16)).hexdigest()  # a claimed upload that never completes
                first = os.urandom(64 << 10) if i % 2 else None   # every other one sends a chunk, then stalls
                call = common_pb2_grpc.BlobStoreStub(channel).PutBlob.future(
                    _stalled_chunks(sha, 4 << 20, first, release), timeout=120)
            elif method == "GetBlob":
                call = common_pb2_grpc.BlobStoreStub(channel).GetBlob(
                    common_pb2.GetBlobRequest(sha256=big.sha256), timeout=120)
            elif method == "Watch":
                call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
            else:
                call = coordinator_pb2_grpc.CoordinatorStub(channel).WatchRun(pb.WatchRunRequest(run_id=run_id),
                                                                             timeout=120)
            held.add(name, method, call)

    def black_hole_caller(i: int) -> None:
        """Registers a client at the black hole, again and again: admitted calls hold a slot for the coordinator's
        dial deadline; refused ones wait a second and retry."""
        stub = coordinator_pb2_grpc.CoordinatorStub(reg_channels[i % len(reg_channels)])
        desc = pb.ClientDescriptor(client_id=f"hole-{i}", address=f"127.0.0.1:{hole.port}")
        while not stop.is_set():
            started = time.monotonic()
            try:
                stub.RegisterClient(pb.RegisterClientRequest(client=desc), timeout=30)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            took = time.monotonic() - started
            with outcomes_lock:
                black_hole_outcomes[code, "held" if took > 1 else "quick"] += 1
                if code == "RESOURCE_EXHAUSTED" and took > 0.5:
                    slow_refusals.append((round(started - t0, 1), round(took, 2)))
            if code == "RESOURCE_EXHAUSTED":
                stop.wait(1.0)

    def prober() -> None:
        """Health checks on every service over kept connections, and on one service over a new connection, every
        quarter second until the end."""
        k = 0
        while not stop.is_set():
            for name in services:
                started = time.monotonic()
                try:
                    resp = health_pb2_grpc.HealthStub(probe_channels[name]).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_DEADLINE_S)
                    assert resp.status == health_pb2.HealthCheckResponse.SERVING, resp
                    latencies["warm"].append(time.monotonic() - started)
                    slowest.append((latencies["warm"][-1], started - t0, name, "kept"))
                except (grpc.RpcError, AssertionError) as exc:
                    health_failures.append(f"{name} (kept connection) at {started - t0:.1f}s: {exc!r:.200}")
            name = services[k % len(services)]
            k += 1
            channel = _channel(cluster, name, OPERATOR)
            started = time.monotonic()
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                          timeout=HEALTH_DEADLINE_S)
                latencies["cold"].append(time.monotonic() - started)
                slowest.append((latencies["cold"][-1], started - t0, name, "new"))
            except grpc.RpcError as exc:
                health_failures.append(f"{name} (new connection) at {started - t0:.1f}s: {exc!r:.200}")
            finally:
                channel.close()
            stop.wait(0.25)

    def run_once(name: str, watchers: int = 0) -> None:
        spec = pb.RunSpec(name=name, algorithm="fedavg", rounds=1, max_length=TEST_PRESET.max_length,
                          max_public_samples=8, eval_max_samples=8, fedavg=pb.FedAvgSpec())
        run = op.StartRun(pb.StartRunRequest(spec=spec), timeout=60)
        if watchers:
            open_streams("coordinator", "WatchRun", watchers, run.run_id)
            # what an operator following the run (cotune run start --watch) meets while idle watchers hold the cap
            client = CoordinatorClient(cluster.addresses()["coordinator"], creds=cluster.credentials())
            try:
                probes["operator watch_run() while idle watchers hold WatchRun's cap"] = \
                    pb.RunState.Name(watch_run(client, run.run_id, quiet=True).state)
            except grpc.RpcError as exc:
                probes["operator watch_run() while idle watchers hold WatchRun's cap"] = exc.code().name
            finally:
                client.close()
        while run.state not in (pb.RUN_SUCCEEDED, pb.RUN_FAILED, pb.RUN_CANCELLED):
            assert time.monotonic() - t0 < 300, f"run {run.run_id} did not finish within 300 s"
            time.sleep(0.5)
            run = op.GetRun(pb.GetRunRequest(run_id=run.run_id), timeout=HEALTH_DEADLINE_S)
        runs.append((run, time.monotonic() - t0))

    def admitted_again(name: str, identity: Identity) -> None:
        """Once the watchdog has run, each capped method admits a new call again (slots were released)."""
        channel = _channel(cluster, name, identity)
        try:
            blobs = common_pb2_grpc.BlobStoreStub(channel)
            for method, call in (
                    ("GetBlob", lambda: next(iter(blobs.GetBlob(common_pb2.GetBlobRequest(sha256=big.sha256), timeout=10)))),
                    ("PutBlob", lambda: push_blob(blobs, local, local.put_bytes(os.urandom(4096)).sha256, attempts=1))):
                # (health Watch is an event stream the watchdog leaves alone: its held calls keep its cap full)
                try:
                    call()
                    after_watchdog[f"{name} {method}"] = "OK"
                except grpc.RpcError as exc:
                    after_watchdog[f"{name} {method}"] = exc.code().name
        finally:
            channel.close()

    try:
        # 1. the idle streams (the WatchRun ones join once a run exists) and the black-hole registrations
        for name, (_, methods) in HELD.items():
            for method, n in methods.items():
                if method != "WatchRun":
                    open_streams(name, method, n)
        for i in range(BLACK_HOLE_CALLERS):
            pool.submit(black_hole_caller, i)
        # 2. health checks until the end
        probe_thread = threading.Thread(target=prober, name="health-prober", daemon=True)
        probe_thread.start()
        time.sleep(2.0)  # every held call is admitted or refused by now
        # 3. quick calls answer; a run (followed by idle watchers) completes, and another one later
        started = time.monotonic()
        op.ListRuns(pb.ListRunsRequest(), timeout=HEALTH_DEADLINE_S)
        list_runs_s = time.monotonic() - started
        llm_channel = _channel(cluster, "llm", COORDINATOR)
        try:  # a legitimate upload to a party whose PutBlob cap idle uploads hold (see the report)
            push_blob(common_pb2_grpc.BlobStoreStub(llm_channel), local, local.put_bytes(os.urandom(1024)).sha256)
            probes["coordinator push_blob() to the LLM while idle uploads hold its PutBlob cap"] = "OK"
        except grpc.RpcError as exc:
            probes["coordinator push_blob() to the LLM while idle uploads hold its PutBlob cap"] = exc.code().name
        finally:
            llm_channel.close()
        run_once("starvation-1", watchers=HELD["coordinator"][1]["WatchRun"])
        while time.monotonic() - t0 < SECOND_RUN_AT_S:
            time.sleep(0.25)
        run_once("starvation-2")
        # 4. after the watchdog's turn, the caps admit calls again
        while time.monotonic() - t0 < HOLD_AT_LEAST_S:
            time.sleep(0.25)
        admitted_again("coordinator", OPERATOR)
        admitted_again("llm", COORDINATOR)
        held_for_s = time.monotonic() - t0
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        if "probe_thread" in locals():
            probe_thread.join(timeout=10)
        held.drain(budget_s=15)
        release.set()
        for channel in [*seed_channels.values(), *probe_channels.values(), *reg_channels,
                        *(c for cs in held_channels.values() for c in cs)]:
            channel.close()
        hole.close()
    cancels = {name: _watchdog_cancels(cluster, name, log_offsets[name]) for name in HELD}

    # -- the report
    ends: Counter = Counter()
    for e in held.calls:
        took = f" after {_bucket(e['ended'] - e['started'])}" if not e["how"] else ""
        ends[e["target"], e["method"], f"{e['code']}{took}" + (f" ({e['how']})" if e["how"] else "")] += 1
    print(f"\n== starvation: {len(held.calls)} idle streams and {BLACK_HOLE_CALLERS} black-hole registration callers, "
          f"held {held_for_s:.0f}s")
    for (target, method, how), n in sorted(ends.items()):
        print(f"  {target:11s} {method:8s} (cap {CONCURRENCY[FULL[method]]:2d}): {n:3d} {how}")
    for (code, speed), n in sorted(black_hole_outcomes.items()):
        print(f"  coordinator RegisterClient (cap {CONCURRENCY[FULL['RegisterClient']]}) at a black hole: {n:5d} {code} "
              f"({'held until the dial deadline' if speed == 'held' else 'at once'})")
    for name, counts in cancels.items():
        print(f"  {name} log, watchdog cancels: {dict(sorted(counts.items()))}")
    for kind, values in latencies.items():
        print(f"  health Check, {'kept connections' if kind == 'warm' else 'new connections'}: n={len(values)} "
              f"p50={1000 * statistics.median(values):.1f}ms p99={1000 * _percentile(values, 0.99):.1f}ms "
              f"max={1000 * max(values):.1f}ms")
    print("  slowest health checks (latency, at, service, connection): "
          + ", ".join(f"{1000 * lat:.0f}ms at {at:.1f}s {name} {conn}" for lat, at, name, conn in sorted(slowest)[-5:]))
    if slow_refusals:
        print(f"  RegisterClient refusals slower than 0.5s: {len(slow_refusals)}, at (s, took s): {sorted(slow_refusals)[:12]}")
    print(f"  ListRuns while held: {1000 * list_runs_s:.1f}ms")
    for run, at in runs:
        print(f"  run {run.spec.name} ({run.run_id}): {pb.RunState.Name(run.state)} at {at:.0f}s {run.error[:200]}")
    for what, code in probes.items():
        print(f"  probe: {what}: {code}")
    print(f"  after the watchdog ({held_for_s:.0f}s): {after_watchdog}")

    assert not health_failures, "\n".join(health_failures)
    assert max(latencies["warm"] + latencies["cold"]) < HEALTH_DEADLINE_S
    assert len(latencies["warm"]) > 100 and len(latencies["cold"]) > 25
    assert [r.state for r, _ in runs] == [pb.RUN_SUCCEEDED, pb.RUN_SUCCEEDED], [r.error for r, _ in runs]
    # each capped method refused what went over its cap (GetBlob streams may finish into the caller's buffers and
    # free their slot, so fewer of those may be refused)
    for name, (_, methods) in HELD.items():
        for method, n in methods.items():
            mine = [e for e in held.calls if e["target"] == name and e["method"] == method]
            refused = sum(e["code"] == "RESOURCE_EXHAUSTED" for e in mine)
            cap = CONCURRENCY[FULL[method]]
            if method in ("PutBlob", "Watch"):
                assert refused == n - cap, (name, method, refused)
                # the admitted ones never end by themselves: PutBlob's were cancelled by the watchdog, as the services
                # logged; health Watch is an event stream the watchdog exempts, so its calls ended at our cleanup
                assert all(e["code"] == "CANCELLED" for e in mine if e["code"] != "RESOURCE_EXHAUSTED"), (name, method)
                assert cancels[name][method] == (cap if method == "PutBlob" else 0), (name, method, cancels[name])
            elif method == "GetBlob":
                assert 0 < refused <= n - cap, (name, method, refused)
                assert all(e["code"] in ("RESOURCE_EXHAUSTED", "CANCELLED", "OK") for e in mine), (name, method)
    puts = [e for e in held.calls if e["method"] == "PutBlob" and e["code"] == "CANCELLED"]
    assert all(STREAM_IDLE_S - 1 <= e["ended"] - e["started"] <= STREAM_IDLE_S + 5 for e in puts), \
        sorted(e["ended"] - e["started"] for e in puts)
    assert black_hole_outcomes[("RESOURCE_EXHAUSTED", "quick")] > 0 and black_hole_outcomes[("FAILED_PRECONDITION", "held")] > 0
    assert {code for code, _ in black_hole_outcomes} <= {"RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"}
    assert set(after_watchdog.values()) == {"OK"}, after_watchdog
    # and no client the black-hole registrations named was registered
    assert {r.client.client_id for r in coordinator.list_clients()} == {"client-1", "client-2"}
