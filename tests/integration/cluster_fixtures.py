"""What the integration tests share: tiny clusters of real service processes on loopback, and readers of what a
run stored (round records, the coordinator's artifact store)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from cotune.algorithms.aggregate import parse_adapter
from cotune.cluster import LocalCluster
from cotune.demo import PRESETS, cluster_config, prepare_data, prepare_models, wait_for_clients
from cotune.lm.lora import lora_from_bytes
from cotune.rpc.channel import make_channel
from cotune.rpc.clients import CoordinatorClient, PartyClient
from cotune.security.identity import COORDINATOR
from cotune.v1 import common_pb2_grpc
from cotune.v1 import coordinator_pb2 as pb
from cotune.watch import watch_run
from cotune.wire.blobs import BlobStore, pull_blob

TEST_PRESET = replace(PRESETS["tiny"], per_part=16, eval_size=24, max_length=96)


def start_tiny_cluster(workdir: Path, algorithm: str = "fedmkt", *, cross_tokenizer: bool = False,
                       coordinator: dict | None = None) -> LocalCluster:
    """The tiny demo cluster for `algorithm` (its model family, one client per shard), started; `coordinator`: settings
    of its coordinator (CoordinatorConfig fields, e.g. party_grace_s)."""
    data = prepare_data(TEST_PRESET, workdir)
    models = prepare_models("tiny", workdir, algorithm=algorithm, cross_tokenizer=cross_tokenizer)
    config = cluster_config("tiny", TEST_PRESET, workdir, data, models, algorithm=algorithm, cross_tokenizer=cross_tokenizer)
    config.coordinator = {**(config.coordinator or {}), **(coordinator or {})}
    cluster = LocalCluster(config, start_timeout_s=300)
    cluster.up()
    return cluster


def coordinator_client(cluster: LocalCluster, clients: int = 2) -> CoordinatorClient:
    """The cluster's coordinator, as its operator, once `clients` clients have registered."""
    client = cluster.coordinator_client()
    wait_for_clients(client, clients, timeout_s=60)
    return client


def run_to_end(coordinator: CoordinatorClient, **spec) -> pb.Run:
    run = coordinator.start_run(pb.RunSpec(name=f"it-{spec['algorithm']}", max_length=TEST_PRESET.max_length, **spec))
    return watch_run(coordinator, run.run_id, quiet=True)


def party(cluster: LocalCluster, name: str) -> PartyClient:
    """Party `name`, dialled as the coordinator (the identity its tasks and blobs answer to)."""
    return cluster.party_client(name)


def rounds_of(run: pb.Run) -> dict[int, pb.RoundRecord]:
    return {r.round: r for r in run.rounds}


def metrics_of(rec: pb.RoundRecord) -> dict[str, dict[str, float]]:
    return {p.party_id: dict(p.metrics) for p in rec.parties}


class Artifacts:
    """Pulls blobs from the coordinator's artifact store (it serves cotune.v1.BlobStore), as the operator."""

    def __init__(self, cluster: LocalCluster, root):
        self.channel = make_channel(cluster.addresses()["coordinator"], cluster.credentials(), peer=COORDINATOR)
        self.stub = common_pb2_grpc.BlobStoreStub(self.channel)
        self.store = BlobStore(root)

    def read(self, sha: str) -> bytes:
        pull_blob(self.stub, self.store, sha)
        return self.store.read_bytes(sha)

    def close(self) -> None:
        self.channel.close()


def check_aggregate(rec: pb.RoundRecord, artifacts: Artifacts, clients) -> dict:
    """The stored aggregate is the sample-weighted mean of the clients' uploads (A and B separately), and the uploads
    really differ (so the check is not vacuous). Returns the aggregate."""
    weights = {pid: m["train_samples"] for pid, m in metrics_of(rec).items() if pid in clients}
    assert set(weights) == set(clients) and all(w > 0 for w in weights.values()), weights
    uploads = {pid: parse_adapter(artifacts.read(rec.artifacts[f"upload/{pid}"])) for pid in clients}
    for pid, (_, meta) in uploads.items():  # each upload names its run, round and sender
        assert meta["cotune.round"] == str(rec.round) and meta["cotune.party_id"] == pid
    aggregate = lora_from_bytes(artifacts.read(rec.artifacts["aggregate"]))
    total = sum(weights.values())
    keys = set(uploads[clients[0]][0])
    assert set(aggregate) == keys and len(keys) > 0
    for key in keys:
        want = sum(weights[p] / total * uploads[p][0][key].astype(np.float64) for p in clients)
        np.testing.assert_allclose(aggregate[key].double().numpy(), want, rtol=0, atol=1e-6)
    differ = [k for k in keys if not np.array_equal(uploads[clients[0]][0][k], uploads[clients[1]][0][k])]
    assert differ, "every client sent the same adapter"
    return aggregate
