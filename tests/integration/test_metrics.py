"""Prometheus metrics of a real cluster: every service of the tiny FedMKT cluster (coordinator, LLM server, two SLM
clients, alignment service, each its own process) serves /metrics on its `metrics_address`; scraped over HTTP before,
during and after a one-round FedMKT run, the values move as the run does."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections import defaultdict

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cotune.cluster import LocalCluster
from cotune.demo import cluster_config, prepare_data, prepare_models
from cotune.v1 import coordinator_pb2 as pb
from cotune.watch import watch_run
from tests.integration.cluster_fixtures import TEST_PRESET, coordinator_client

pytestmark = pytest.mark.integration

PARTIES = {"llm": ("llm", "LLMServer"), "client-1": ("slm", "SLMClient"), "client-2": ("slm", "SLMClient")}
SERVICES = ("coordinator", "alignment", *PARTIES)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Scrape:
    """One scrape of one endpoint: sample lookups by name and labels (a subset of the sample's labels)."""

    def __init__(self, text: str):
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def get(self, name: str, **labels) -> float:
        """The sum of the samples `name` whose labels include `labels` (0 when there are none)."""
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.samples)


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return Scrape(r.read().decode())


@pytest.fixture(scope="module")
def metrics_cluster(tmp_path_factory, shared_data):
    """The tiny FedMKT cluster (three tokenizers, so the alignment service takes part), every service with a
    metrics_address of its own: set in each service's section of the cluster config, which LocalCluster passes on."""
    workdir = tmp_path_factory.mktemp("metrics")
    data = prepare_data(TEST_PRESET, workdir)
    models = prepare_models("tiny", workdir, algorithm="fedmkt")
    config = cluster_config("tiny", TEST_PRESET, workdir, data, models, algorithm="fedmkt")
    assert config.alignment is not None and [c["party_id"] for c in config.clients] == ["client-1", "client-2"]
    ports = dict(zip(SERVICES, free_ports(len(SERVICES))))
    sections = {"coordinator": config.coordinator, "alignment": config.alignment, "llm": config.llm,
                **{c["party_id"]: c for c in config.clients}}
    for name, section in sections.items():
        section["metrics_address"] = f"127.0.0.1:{ports[name]}"
    cluster = LocalCluster(config, start_timeout_s=300)
    cluster.up()
    try:
        yield cluster, ports
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def observed(metrics_cluster):
    """Scrapes of every service before the run, while it runs (every 0.1 s: the most operations seen running per
    service) and after it."""
    cluster, ports = metrics_cluster
    coordinator = coordinator_client(cluster)
    try:
        before = {name: scrape(port) for name, port in ports.items()}
        running_seen: dict[str, float] = defaultdict(float)
        during: list[dict[str, Scrape]] = []
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                snap = {}
                for name, port in ports.items():
                    try:
                        snap[name] = s = scrape(port)
                    except OSError:
                        continue
                    running_seen[name] = max(running_seen[name], s.get("cotune_operations_running"))
                during.append(snap)
                stop.wait(0.1)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        spec = pb.RunSpec(name="it-metrics", algorithm="fedmkt", rounds=1, max_length=TEST_PRESET.max_length,
                          fedmkt=pb.FedMKTSpec(setting="heterogeneous", top_k=8, ce_weight=TEST_PRESET.lam,
                                               distill_epochs=1))
        run = watch_run(coordinator, coordinator.start_run(spec).run_id, quiet=True)
        stop.set()
        poller.join(timeout=30)
        after = {name: scrape(port) for name, port in ports.items()}
        return run, before, during, dict(running_seen), after
    finally:
        coordinator.close()


def grew(before: Scrape, after: Scrape, name: str, **labels) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


def test_every_service_serves_its_metrics(observed):
    run, before, during, _, after = observed
    assert run.state == pb.RUN_SUCCEEDED, run.error
    assert len(during) >= 2, "the run ended before it could be scraped while running"
    for name in SERVICES:
        role, party = (PARTIES[name][0], name) if name in PARTIES else (name, "")
        for scrape_ in (before[name], after[name]):
            assert scrape_.get("cotune_service_serving", service=role, party=party) == 1, name
            assert scrape_.has("process_resident_memory_bytes"), name
        assert after[name].get("cotune_blob_store_bytes", service=role, party=party) > 0, name


def test_party_rpcs_operations_and_training_move(observed):
    _, before, _, running_seen, after = observed
    for name, (role, service) in PARTIES.items():
        b, a = before[name], after[name]
        for method in ("StartTask", "Describe"):
            key = dict(service=role, party=name, method=f"cotune.v1.{service}/{method}", code="OK")
            assert grew(b, a, "cotune_rpc_requests_total", **key) > 0, (name, method)
        assert grew(b, a, "cotune_rpc_duration_seconds_count", service=role,
                    method=f"cotune.v1.{service}/StartTask") > 0, name
        assert a.get("cotune_operations_running", service=role, party=name) == 0, name  # back to idle
        assert grew(b, a, "cotune_operations_total", service=role, party=name, state="succeeded") > 0, name
        # the coordinator pushed the teachers' shards and pulled this party's shard and adapter
        assert grew(b, a, "cotune_blob_bytes_total", service=role, party=name, direction="in") > 0, name
        assert grew(b, a, "cotune_blob_bytes_total", service=role, party=name, direction="out") > 0, name
        assert a.get("cotune_party_model_bytes", party=name, model="model") > 0, name
        assert a.get("cotune_party_train_tokens_per_second", party=name, task="distill") > 0, name
        assert grew(b, a, "cotune_party_train_tokens_total", party=name) > 0, name
    for name in ("client-1", "client-2"):
        assert after[name].get("cotune_party_train_tokens_per_second", party=name, task="train_local") > 0, name
    assert sum(running_seen.get(name, 0) for name in PARTIES) >= 1, f"no task seen running: {running_seen}"


def test_alignment_service_counts_its_builds(observed):
    _, before, _, _, after = observed
    b, a = before["alignment"], after["alignment"]
    assert grew(b, a, "cotune_rpc_requests_total", service="alignment", method="cotune.v1.Alignment/BuildVocabMap") > 0
    assert grew(b, a, "cotune_operations_total", service="alignment", state="succeeded") > 0
    assert a.get("cotune_operations_running", service="alignment") == 0
    # the coordinator pulled the maps it built (what it is sent may already be in its store, e.g. the tokenizers
    # when its cache outlives a cluster: a service that holds a blob is sent nothing)
    assert grew(b, a, "cotune_blob_bytes_total", service="alignment", direction="out") > 0


def test_coordinator_counts_runs_steps_rounds_and_bytes(observed):
    run, before, _, _, after = observed
    b, a = before["coordinator"], after["coordinator"]
    assert grew(b, a, "cotune_runs", state="succeeded") == 1
    assert a.get("cotune_runs", state="running") == 0
    assert grew(b, a, "cotune_runs_ended_total", state="succeeded") == 1
    assert grew(b, a, "cotune_rpc_requests_total", service="coordinator", method="cotune.v1.Coordinator/StartRun",
                code="OK") == 1
    for step in ("train_local", "public_logits", "distill", "evaluate"):
        assert grew(b, a, "cotune_step_duration_seconds_count", step=step) > 0, step
        assert grew(b, a, "cotune_step_phase_seconds_total", step=step, phase="wall") > 0, step
    assert grew(b, a, "cotune_step_phase_seconds_total", step="train_local", phase="forward") > 0
    assert grew(b, a, "cotune_round_duration_seconds_count", algorithm="fedmkt") == 2  # rounds 0 and 1
    # the bytes of each message type, as the run's round records count them
    recorded = defaultdict(int)
    for rec in run.rounds:
        for kind, n in rec.bytes_sent.items():
            recorded[("sent", kind)] += n
        for kind, n in rec.bytes_received.items():
            recorded[("received", kind)] += n
    assert recorded[("received", "public_logits.shard")] > 0 and recorded[("sent", "distill.teachers.shard")] > 0
    for (direction, kind), n in recorded.items():
        assert grew(b, a, "cotune_message_bytes_total", direction=direction, type=kind) == n, (direction, kind)
    assert grew(b, a, "cotune_blob_bytes_total", service="coordinator", direction="in") > 0  # pulled results
    assert grew(b, a, "cotune_clients_dropped_total") == 0
