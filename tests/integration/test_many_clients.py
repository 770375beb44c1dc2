"""Several logical SLM clients per process: a local cluster of 4 clients packed 2 to a process (clients_per_process=2),
each on its own port with its own party_id, registered with the coordinator, running a FedAvg round."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cotune.cluster import LocalCluster
from cotune.v1 import coordinator_pb2 as pb
from cotune.watch import watch_run
from tests.integration.cluster_fixtures import coordinator_client, rounds_of

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLIENTS = [f"client-{i}" for i in range(1, 5)]


def _bench():
    """benchmarks/many_clients.py: the N-client cluster config built from the demo's tiny models."""
    spec = importlib.util.spec_from_file_location("many_clients_bench", REPO / "benchmarks" / "many_clients.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def packed(tmp_path_factory, shared_data):
    bench = _bench()
    workdir = tmp_path_factory.mktemp("many_clients")
    config = bench.many_clients_config(workdir, len(CLIENTS), "fedavg", clients_per_process=2)
    cluster = LocalCluster(config, start_timeout_s=300)
    cluster.up()
    yield cluster, bench
    cluster.down()


def test_two_processes_each_host_two_clients(packed):
    cluster, _ = packed
    addresses = cluster.addresses()
    assert set(CLIENTS) <= set(addresses)
    assert len({addresses[c] for c in CLIENTS}) == len(CLIENTS), addresses  # a port per logical client
    by_pid = {}
    for c in CLIENTS:
        by_pid.setdefault(cluster.services[c].pid, []).append(c)
    assert sorted(map(sorted, by_pid.values())) == [["client-1", "client-2"], ["client-3", "client-4"]], by_pid
    assert {pid: sorted(names) for pid, names in cluster.processes().items() if pid in by_pid} == \
        {pid: sorted(names) for pid, names in by_pid.items()}
    assert all(cluster.services[c].process.poll() is None for c in CLIENTS)
    state = json.loads((cluster.workdir / "cluster.json").read_text())  # what `cluster down` reads
    assert {state[c]["pid"] for c in CLIENTS} == set(by_pid)
    others = {cluster.services[n].pid for n in ("llm", "coordinator")}
    assert len(others) == 2 and not others & set(by_pid)  # the clients' processes are their own


def test_every_client_registers_with_its_own_address_and_party_id(packed):
    cluster, _ = packed
    addresses = cluster.addresses()
    coordinator = coordinator_client(cluster, clients=len(CLIENTS))
    try:
        registered = {r.client.client_id: r.client.address for r in coordinator.list_clients()}
    finally:
        coordinator.close()
    assert registered == {c: addresses[c] for c in CLIENTS}
    ids = set()
    for c in CLIENTS:
        party = cluster.party_client(c)
        try:
            ids.add(party.describe().party_id)
        finally:
            party.close()
    assert ids == set(CLIENTS)


def test_one_fedavg_round_succeeds_across_packed_clients(packed):
    cluster, bench = packed
    coordinator = coordinator_client(cluster, clients=len(CLIENTS))
    try:
        run = coordinator.start_run(bench.run_spec("fedavg", len(CLIENTS)))
        run = watch_run(coordinator, run.run_id, quiet=True)
    finally:
        coordinator.close()
    assert run.state == pb.RUN_SUCCEEDED, run.error
    rec = rounds_of(run)[1]
    assert not rec.dropped
    parties = {p.party_id for p in rec.parties}
    assert set(CLIENTS) <= parties, parties
    assert all(f"upload/{c}" in rec.artifacts for c in CLIENTS), sorted(rec.artifacts)
