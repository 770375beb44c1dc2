"""Prometheus metrics: every metric a Cotune service exposes, and the plaintext HTTP endpoint that serves them.

One registry per process (`REGISTRY`, not prometheus_client's global one): every service hosted by the process counts
into it, and each service's `metrics_address` (cotune.config, started by cotune.rpc.server.ServiceHost) serves all of
it. Per-service series carry `service` (coordinator | alignment | llm | slm) and `party` (the party id of an LLM server
or SLM client, empty otherwise) labels, so several services in one process (tests; SLM clients packed k to a process by
serve_parties) stay apart. Label values are always bounded: method names, status codes, task kinds, step and phase
names, message types, party ids; never run ids, blob hashes or anything a caller chooses freely.

Hot paths pay a cached child lookup and an increment: per RPC (cotune.rpc.guard), per blob chunk (1 MiB,
cotune.wire.blobs), per operation (cotune.rpc.operations), per step (coordinator.driver); nothing per token.
docs/metrics.md lists every metric.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import weakref
from collections.abc import Callable, Mapping
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)   # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
PlatformCollector(registry=REGISTRY)  # python_info
GCCollector(registry=REGISTRY)        # python_gc_*

SERVICE_LABELS = ("service", "party")

# seconds: a quick call is ~1 ms on loopback; WaitOperation long-polls up to 300 s; blob streams and WatchRun run long
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0, 600.0)
# seconds: a tiny model's step takes well under a second, a large model's epoch hours
STEP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)

# -- every service ------------------------------------------------------------------------------------------------
RPCS = Counter("cotune_rpc_requests", "RPCs this service answered, by method and status code (refusals by the guard "
               "included: UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, INVALID_ARGUMENT)",
               (*SERVICE_LABELS, "method", "code"), registry=REGISTRY)
RPC_SECONDS = Histogram("cotune_rpc_duration_seconds", "Time from an RPC's arrival at the guard to its end (for "
                        "streams: the whole stream), by method", ("service", "method"), buckets=RPC_BUCKETS,
                        registry=REGISTRY)
SERVING = Gauge("cotune_service_serving", "1 while the service reports SERVING on grpc.health.v1 (0 while its model "
                "loads and while it shuts down)", SERVICE_LABELS, registry=REGISTRY)
OPS_RUNNING = Gauge("cotune_operations_running", "Long-running operations (tasks, builds) executing now, by kind",
                    (*SERVICE_LABELS, "kind"), registry=REGISTRY)
OPS_FINISHED = Counter("cotune_operations", "Long-running operations that ended, by kind and final state "
                       "(succeeded, failed, cancelled)", (*SERVICE_LABELS, "kind", "state"), registry=REGISTRY)
OP_SECONDS = Histogram("cotune_operation_duration_seconds", "Run time of long-running operations, by kind",
                       ("service", "kind"), buckets=STEP_BUCKETS, registry=REGISTRY)
BLOB_BYTES = Counter("cotune_blob_bytes", "Blob bytes moved by this service's blob store: direction in = received "
                     "(PutBlob served, or pulled from a peer), out = sent (GetBlob served, or pushed to a peer)",
                     (*SERVICE_LABELS, "direction"), registry=REGISTRY)
STORE_BYTES = Gauge("cotune_blob_store_bytes", "Bytes the blob store holds or has reserved (complete blobs, partial "
                    "uploads at their declared size, temporaries)", SERVICE_LABELS, registry=REGISTRY)
STORE_QUOTA = Gauge("cotune_blob_store_quota_bytes", "The blob store's disk quota (blob_quota_gib, or the automatic "
                    "one)", SERVICE_LABELS, registry=REGISTRY)

# -- the coordinator ----------------------------------------------------------------------------------------------
RUNS_ENDED = Counter("cotune_runs_ended", "Run executions that ended in this process, by final state (succeeded, "
                     "failed, cancelled)", ("state",), registry=REGISTRY)
ROUND_SECONDS = Histogram("cotune_round_duration_seconds", "Wall time of a run's round (from its first step to the "
                          "first step of the next round, or the run's end), by algorithm; rounds replayed from stored "
                          "results after a restart are not observed", ("algorithm",), buckets=STEP_BUCKETS,
                          registry=REGISTRY)
STEP_SECONDS = Histogram("cotune_step_duration_seconds", "Wall time of one task step on one party (pushing its "
                         "inputs, running it, pulling its results, waiting for a restarting party), by step; stored "
                         "steps replayed after a restart are not observed", ("step",), buckets=STEP_BUCKETS,
                         registry=REGISTRY)
STEP_PHASE_SECONDS = Counter("cotune_step_phase_seconds", "Where the steps' time went, summed over parties: the "
                             "party's own phases (data, forward, backward, optimizer, codec, checkpoint, total) and "
                             "the coordinator's (transfer, queue, wall); the run record's time/<step>/<phase>",
                             ("step", "phase"), registry=REGISTRY)
CLIENTS_DROPPED = Counter("cotune_clients_dropped", "Clients dropped from a round (a failed step, a rejected upload), "
                          "by the step that dropped them", ("step",), registry=REGISTRY)
MESSAGE_BYTES = Counter("cotune_message_bytes", "Bytes the coordinator moved between services, by direction (sent, "
                        "received) and message type (the task field, e.g. distill.teachers.shard, get_lora.adapter)",
                        ("direction", "type"), registry=REGISTRY)

# -- parties ------------------------------------------------------------------------------------------------------
TRAIN_TOKENS = Counter("cotune_party_train_tokens", "Tokens trained on (the tasks' train_tokens, distill_tokens, "
                       "codistill_tokens), by party and task kind", ("party", "task"), registry=REGISTRY)
TRAIN_SECONDS = Counter("cotune_party_train_seconds", "Seconds spent in the tasks that trained those tokens; "
                        "rate(tokens) / rate(seconds) is the throughput", ("party", "task"), registry=REGISTRY)
TRAIN_TPS = Gauge("cotune_party_train_tokens_per_second", "Training throughput of the party's last training task, "
                  "tokens per second of the task's work", ("party", "task"), registry=REGISTRY)
MODEL_BYTES = Gauge("cotune_party_model_bytes", "Parameter and buffer bytes of the models a party holds in memory "
                    "(model: its own; companion: FedCoLLM's SLM on the LLM server), set when a model is installed",
                    ("party", "model"), registry=REGISTRY)

# task result metrics that count trained tokens (cotune.party.tasks, cotune.algorithms.*)
TOKEN_METRICS = ("train_tokens", "distill_tokens", "codistill_tokens")
# the phases a step's time is split into: the party's (cotune.profile.PHASES and "total") and the coordinator's; a
# party names its own phases in its operation's metrics, so any other name is dropped rather than made a label value
STEP_PHASES = frozenset(("data", "forward", "backward", "optimizer", "codec", "checkpoint", "other", "total",
                         "transfer", "queue", "wall"))
_NAME_RE = re.compile(r"^[a-z0-9_.:\-]{1,64}$")


def label(value: str) -> str:
    """A label value from code-defined names (steps, kinds, message types): itself when it looks like one, else
    "other", so nothing unexpected ever grows the number of series."""
    return value if _NAME_RE.match(value or "") else "other"


def service_labels(role: str, party_id: str = "") -> tuple[str, str]:
    """(service, party) of a service host: its role, and its party id for the LLM server and SLM clients."""
    return role, party_id if role in ("llm", "slm") else ""


# -- RPCs ---------------------------------------------------------------------------------------------------------
class RpcMetrics:
    """The RPC counters of one service host, with the per-method children cached: observing a call is two dict
    lookups, an increment and a histogram observation."""

    def __init__(self, service: str = "", party: str = ""):
        self.service, self.party = service, party
        self._counts: dict[tuple[str, str], Counter] = {}
        self._seconds: dict[str, Histogram] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        counter = self._counts.get((method, code))
        if counter is None:
            counter = self._counts[(method, code)] = RPCS.labels(self.service, self.party, method, code)
        hist = self._seconds.get(method)
        if hist is None:
            hist = self._seconds[method] = RPC_SECONDS.labels(self.service, method)
        counter.inc()
        hist.observe(seconds)

    def serving(self, serving: bool) -> None:
        SERVING.labels(self.service, self.party).set(1 if serving else 0)


# -- operations -----------------------------------------------------------------------------------------------------
class OperationMetrics:
    """The operations gauges of one OperationManager (bound to its host's labels by ServiceHost)."""

    def __init__(self, service: str = "", party: str = ""):
        self.service, self.party = service, party

    def started(self, kind: str) -> None:
        OPS_RUNNING.labels(self.service, self.party, label(kind)).inc()

    def ended(self, kind: str, state: str, seconds: float) -> None:
        kind = label(kind)
        OPS_RUNNING.labels(self.service, self.party, kind).dec()
        OPS_FINISHED.labels(self.service, self.party, kind, state).inc()
        OP_SECONDS.labels(self.service, kind).observe(seconds)


# -- blob stores ----------------------------------------------------------------------------------------------------
class BlobMetrics:
    """Byte counters of one blob store (bound to its host's labels by ServiceHost; unbound stores count under empty
    labels)."""

    def __init__(self, service: str = "", party: str = ""):
        self.received = BLOB_BYTES.labels(service, party, "in")
        self.sent = BLOB_BYTES.labels(service, party, "out")


def bind_store(store, service: str, party: str) -> None:
    """Count `store`'s transfers under (service, party) and expose its size and quota."""
    store.metrics = BlobMetrics(service, party)
    ref = weakref.ref(store)

    def usage() -> float:
        s = ref()
        return float(s.usage()) if s is not None else 0.0

    def quota() -> float:
        s = ref()
        return float(s.quota_bytes or 0) if s is not None else 0.0

    STORE_BYTES.labels(service, party).set_function(usage)
    STORE_QUOTA.labels(service, party).set_function(quota)


UNBOUND_BLOBS = BlobMetrics()


# -- the coordinator ----------------------------------------------------------------------------------------------
class _RunsCollector:
    """cotune_runs{state}: the coordinator's runs by state, counted in its state database at scrape time (so it is
    right after a restart, and costs nothing between scrapes)."""

    STATES = ("pending", "running", "succeeded", "failed", "cancelled")

    def __init__(self):
        self._source: Callable[[], Mapping[str, int]] | None = None

    def watch(self, source: Callable[[], Mapping[str, int]]) -> None:
        """`source()`: run count by state name; kept as a weak reference when it is a bound method."""
        try:
            ref = weakref.WeakMethod(source)
        except TypeError:
            self._source = source
        else:
            self._source = lambda: (ref() or (lambda: None))()

    def describe(self):
        yield GaugeMetricFamily("cotune_runs", "Runs in the coordinator's state database, by state")

    def collect(self):
        if self._source is None:
            return
        try:
            counts = self._source()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database is busy or gone
            log.debug("counting runs by state failed", exc_info=True)
            return
        if counts is None:
            return
        family = GaugeMetricFamily("cotune_runs", "Runs in the coordinator's state database, by state",
                                   labels=("state",))
        for state in sorted(set(self.STATES) | set(counts)):
            family.add_metric((state,), float(counts.get(state, 0)))
        yield family


RUNS = _RunsCollector()
REGISTRY.register(RUNS)


def watch_runs(source: Callable[[], Mapping[str, int]]) -> None:
    RUNS.watch(source)


def message_bytes(direction: str, kind: str, n: int) -> None:
    MESSAGE_BYTES.labels(direction, label(kind)).inc(n)


def step_finished(step: str, profile: Mapping[str, float]) -> None:
    """A task step ran (not replayed): its wall time and where the time went (the run record's time/<step>/*)."""
    step = label(step)
    wall = profile.get("wall")
    if wall is not None:
        STEP_SECONDS.labels(step).observe(max(0.0, wall))
    for phase, seconds in profile.items():
        if phase in STEP_PHASES and seconds > 0:
            STEP_PHASE_SECONDS.labels(step, phase).inc(seconds)


def client_dropped(step: str) -> None:
    CLIENTS_DROPPED.labels(label(step)).inc()


# -- parties --------------------------------------------------------------------------------------------------------
def training(party: str, task: str, metrics: Mapping[str, float], seconds: float) -> None:
    """A task finished on `party`: if it trained tokens, count them and the task's seconds, and set its throughput."""
    try:
        tokens = sum(float(metrics.get(name, 0) or 0) for name in TOKEN_METRICS) if metrics else 0.0
    except (TypeError, ValueError, AttributeError):  # never fail a task over its metrics
        return
    if not tokens > 0 or seconds <= 0:
        return
    task = label(task)
    TRAIN_TOKENS.labels(party, task).inc(tokens)
    TRAIN_SECONDS.labels(party, task).inc(seconds)
    TRAIN_TPS.labels(party, task).set(tokens / seconds)


def model_bytes(model) -> int:
    """Parameter and buffer bytes of a torch module (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def set_model_bytes(party: str, which: str, model) -> None:
    MODEL_BYTES.labels(party, label(which)).set(model_bytes(model) if model is not None else 0)


# -- the endpoint ---------------------------------------------------------------------------------------------------
MAX_SCRAPES = 4          # scrapes served at once; more connections are closed at once (a scrape takes milliseconds)
SCRAPE_TIMEOUT_S = 10.0  # a connection that sends nothing for this long is closed


class _Handler(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT_S  # applied to the socket: a client that trickles its request cannot hold a thread

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


class _Server(ThreadingMixIn, WSGIServer):
    """wsgiref's server, a thread per scrape, at most MAX_SCRAPES at once: nothing sent to the metrics port can pile
    up threads in the service."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args, **kwargs):
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class Endpoint:
    """One metrics listener's use by one service host; `close()` stops the listener when its last user closes it."""

    def __init__(self, address: str, port: int):
        self.address, self.port = address, port
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release(self.address)


_servers: dict[str, list] = {}  # address -> [server, thread, users]
_servers_lock = threading.Lock()


def serve(address: str) -> Endpoint:
    """Serve REGISTRY in the Prometheus text format over plain HTTP at `address` (HOST:PORT; any path; GET).
    Services of one process that name the same address share its listener; port 0 binds a free port (Endpoint.port).
    Raises OSError when the address cannot be bound."""
    from cotune.config import split_host_port

    host, port = split_host_port(address, "metrics_address")
    with _servers_lock:
        entry = _servers.get(address) if port else None
        if entry is not None:
            entry[2] += 1
            return Endpoint(address, entry[0].server_port)
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        server_class = type("MetricsServer", (_Server,), {"address_family": family})
        server = make_server(sockaddr[0], port, make_wsgi_app(REGISTRY), server_class, handler_class=_Handler)
        thread = threading.Thread(target=server.serve_forever, name=f"metrics-{server.server_port}", daemon=True)
        thread.start()
        key = address if port else f"{address}#{server.server_port}"
        _servers[key] = [server, thread, 1]
        return Endpoint(key, server.server_port)


def _release(key: str) -> None:
    with _servers_lock:
        entry = _servers.get(key)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] > 0:
            return
        del _servers[key]
    server, thread, _ = entry
    server.shutdown()
    server.server_close()
    thread.join(timeout=5.0)


def scrape() -> str:
    """REGISTRY in the text format (what the endpoint serves)."""
    return generate_latest(REGISTRY).decode()
