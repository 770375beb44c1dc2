"""Faults between real processes: a client killed mid-round, the coordinator restarted mid-run."""

from __future__ import annotations

import time

import pytest

from cotune.demo import wait_for_clients
from cotune.rpc.clients import CoordinatorClient
from cotune.v1 import coordinator_pb2 as pb
from cotune.watch import watch_run
from tests.integration.cluster_fixtures import TEST_PRESET

pytestmark = pytest.mark.integration
# a killed client that does not come back is dropped once the coordinator stops waiting for it (by default 900 s)
CLUSTER_COORDINATOR = {"party_grace_s": 5.0}


def _coordinator(cluster) -> CoordinatorClient:
    client = cluster.coordinator_client()
    wait_for_clients(client, 2, timeout_s=60)
    return client


def _wait_for_step(client, run_id, round_, step, timeout=300):
    deadline = time.monotonic() + timeout
    for event in client.watch_run(run_id, timeout=timeout):
        if event.kind == "step" and event.round == round_ and event.step == step:
            return
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"run {run_id} never reached round {round_} step {step}")


def test_killed_client_is_dropped_and_the_run_goes_on(cluster):
    client = _coordinator(cluster)
    run = client.start_run(pb.RunSpec(algorithm="fedmkt", rounds=1, min_clients=1, max_length=TEST_PRESET.max_length,
                                          fedmkt=pb.FedMKTSpec(top_k=8, ce_weight=TEST_PRESET.lam)))
    _wait_for_step(client, run.run_id, 1, "client_logits")
    cluster.kill("client-2")  # SIGKILL mid-round
    run = watch_run(client, run.run_id, quiet=True)
    assert run.state == pb.RUN_SUCCEEDED, run.error
    round1 = next(r for r in run.rounds if r.round == 1)
    assert "client-2" in round1.dropped
    assert any("client-2" in note for note in round1.notes)
    assert {p.party_id for p in round1.parties} >= {"llm", "client-1"}
    address = cluster.restart("client-2")  # back on a new port: register it again
    assert client.register_client("client-2", address).client.address == address
    client.close()


def test_coordinator_restart_resumes_without_recomputing(cluster):
    client = _coordinator(cluster)
    run = client.start_run(pb.RunSpec(algorithm="fedmkt", rounds=2, max_length=TEST_PRESET.max_length,
                                          fedmkt=pb.FedMKTSpec(top_k=8, ce_weight=TEST_PRESET.lam)))
    _wait_for_step(client, run.run_id, 1, "client_distill")
    before = client.get_run(run.run_id)
    client.close()
    cluster.restart("coordinator")  # SIGKILL, then start again from the same state directory
    client = _coordinator(cluster)
    resumed = client.get_run(run.run_id)
    assert resumed.state in (pb.RUN_RUNNING, pb.RUN_SUCCEEDED)
    final = watch_run(client, run.run_id, quiet=True)
    assert final.state == pb.RUN_SUCCEEDED, final.error
    assert sorted(r.round for r in final.rounds) == [0, 1, 2]
    # every metric delivered before the restart is kept as it was (not recomputed)
    after = {(r.round, p.party_id): dict(p.metrics) for r in final.rounds for p in r.parties}
    for rec in before.rounds:
        for party in rec.parties:
            for name, value in party.metrics.items():
                assert after[(rec.round, party.party_id)][name] == value, (rec.round, party.party_id, name)
    events = [e.message for e in client.watch_run(run.run_id, timeout=30)]
    assert any("resuming" in m for m in events)
    client.close()


def test_a_second_cluster_or_coordinator_on_a_running_workdir_is_refused(cluster, tmp_path):
    import subprocess
    import sys

    import yaml

    from cotune.cluster import LocalCluster
    from cotune.config import ConfigError

    with pytest.raises(ConfigError, match="already running"):
        LocalCluster(cluster.config).up()
    assert all(s.process.poll() is None for s in cluster.services.values())  # nothing of the first was touched
    # a second coordinator on the first's workdir (its SQLite state) refuses to start, naming the holder
    svc = cluster.services["coordinator"]
    config = yaml.safe_load(svc.config_path.read_text())
    path = tmp_path / "coordinator.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "cotune.cli", "serve", "coordinator", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"in use by process {svc.pid}" in proc.stderr + proc.stdout, proc.stderr[-2000:]
