"""FedMKT across different tokenizers, end to end between separate processes over loopback gRPC."""

from __future__ import annotations

import hashlib
import os

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cotune.rpc.channel import make_channel
from cotune.v1 import common_pb2, coordinator_pb2 as pb, party_pb2
from cotune.watch import watch_run
from cotune.wire.blobs import BlobStore
from tests.integration.cluster_fixtures import TEST_PRESET, party

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def finished_run(coordinator):
    spec = pb.RunSpec(name="it-fedmkt", algorithm="fedmkt", rounds=2, max_length=TEST_PRESET.max_length,
                      fedmkt=pb.FedMKTSpec(setting="heterogeneous", top_k=8, ce_weight=TEST_PRESET.lam, distill_epochs=2))
    run = coordinator.start_run(spec)
    return watch_run(coordinator, run.run_id, quiet=True)


def test_clients_use_tokenizers_other_than_the_llms(cluster, addresses):
    infos = {n: party(cluster, n).describe() for n in ("llm", "client-1", "client-2")}
    hashes = {n: i.tokenizer_hash for n, i in infos.items()}
    assert len(set(hashes.values())) == 3, hashes
    assert len({i.public_set_hash for i in infos.values()}) == 1


def test_two_heterogeneous_rounds_complete_with_metrics_for_every_party(finished_run):
    run = finished_run
    assert run.state == pb.RUN_SUCCEEDED, run.error
    rounds = {r.round: r for r in run.rounds}
    assert sorted(rounds) == [0, 1, 2]
    for rnd in (0, 1, 2):
        parties = {p.party_id: dict(p.metrics) for p in rounds[rnd].parties}
        assert set(parties) == {"llm", "client-1", "client-2"}, f"round {rnd}: {sorted(parties)}"
        for pid, metrics in parties.items():
            assert np.isfinite(metrics["public_loss"]), (rnd, pid)
            assert 0.0 <= metrics["eval_accuracy"] <= 1.0, (rnd, pid)
    for rnd in (1, 2):
        for pid in ("client-1", "client-2"):
            assert "train_loss_last" in {k for p in rounds[rnd].parties if p.party_id == pid for k in p.metrics}
        assert rounds[rnd].bytes_received["public_logits.shard"] > 0
        assert rounds[rnd].bytes_sent["distill.teachers.shard"] > 0


def test_every_step_records_where_its_time_went(finished_run):
    rounds = sorted(finished_run.rounds, key=lambda r: r.round)
    assert all(0 < r.started_at <= r.finished_at for r in rounds)
    assert all(a.finished_at <= b.started_at for a, b in zip(rounds, rounds[1:]))  # a round ends before the next starts
    rec = {r.round: r for r in finished_run.rounds}[1]
    metrics = {p.party_id: dict(p.metrics) for p in rec.parties}
    for pid in ("client-1", "client-2"):
        m = metrics[pid]
        for step in ("train_local", "public_logits", "distill", "evaluate"):
            assert 0 < m[f"time/{step}/total"] <= m[f"time/{step}/wall"], (pid, step)
            assert f"time/{step}/wait" in m and f"time/{step}/transfer" in m, (pid, step)
        assert m["time/train_local/forward"] > 0 and m["time/train_local/backward"] > 0
        assert m["time/train_local/optimizer"] > 0 and m["time/public_logits/codec"] > 0
        assert "time_total_s" not in m  # the party's raw timings are filed by step, not mixed into its metrics
    assert metrics["llm"]["time/distill/forward"] > 0 and "time/distill/wait" not in metrics["llm"]  # ran alone


def test_each_party_distils_towards_its_teacher(finished_run):
    for rec in finished_run.rounds:
        if rec.round == 0:
            continue
        for p in rec.parties:
            m = p.metrics
            assert m["kd_targets"] > 0, (rec.round, p.party_id, dict(m))
            assert m["distill_kd_after"] < m["distill_kd_before"], (rec.round, p.party_id, dict(m))


# -- bad input: clear errors, services stay up, state unchanged ----------------------------------------------
def _code(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def test_unknown_run_id(coordinator, finished_run):
    code, details = _code(lambda: coordinator.get_run("no-such-run"))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown run id" in details
    code, _ = _code(lambda: list(coordinator.watch_run("no-such-run", timeout=10)))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = _code(lambda: coordinator.cancel_run("no-such-run"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_malformed_logits_shard_is_rejected(cluster, addresses, finished_run, tmp_path):
    client = party(cluster, "client-1")
    before = client.describe().lora_hash
    local = BlobStore(tmp_path / "blobs")
    garbage = local.put_bytes(os.urandom(4096))
    client.push(local, garbage.sha256)
    task = party_pb2.TaskRequest(
        ctx=party_pb2.RunContext(run_id="manual", round=1),
        distill=party_pb2.DistillTask(teachers=[party_pb2.TeacherShard(sender_id="x", shard=garbage.ref())], ce_weight=0.5,
                                      epochs=1, selection="dualmince", max_length=TEST_PRESET.max_length))
    code, details = _code(lambda: client.start(task))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "shard" in details
    assert client.describe().lora_hash == before


def test_a_task_of_the_other_role_is_refused_naming_the_role(cluster, addresses, finished_run):
    ctx = party_pb2.RunContext(run_id="manual", round=0)
    code, details = _code(lambda: party(cluster, "client-1").start(
        party_pb2.TaskRequest(ctx=ctx, compress=party_pb2.CompressTask(adapter_layers=1, drop=0.5))))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "SLM client" in details and "compress" in details, details
    code, details = _code(lambda: party(cluster, "llm").start(
        party_pb2.TaskRequest(ctx=ctx, train_adapter=party_pb2.TrainAdapterTask(epochs=1))))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "LLM server" in details and "train_adapter" in details, details


def test_chunk_with_wrong_hash_is_rejected_and_nothing_stored(cluster, addresses):
    llm = party(cluster, "llm")
    declared = hashlib.sha256(b"what the sender claims").hexdigest()
    chunk = common_pb2.Chunk(sha256=declared, offset=0, data=b"what actually arrived", total_size=21)
    code, details = _code(lambda: llm.blobs.PutBlob(iter([chunk]), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "nothing was stored" in details
    status = llm.blobs.StatBlob(common_pb2.StatBlobRequest(sha256=declared), timeout=10)
    assert not status.complete and status.received == 0


def test_lora_of_wrong_shape_is_rejected(cluster, addresses, finished_run, tmp_path):
    from cotune.lm.lora import lora_from_bytes, lora_to_bytes

    client = party(cluster, "client-2")
    op = client.run_task(party_pb2.TaskRequest(ctx=party_pb2.RunContext(run_id="manual", round=0), get_lora=party_pb2.GetLoraTask()),
                         timeout_s=60)
    before = client.describe().lora_hash  # (run "manual" in memory: the refused request below is of that run)
    local = BlobStore(tmp_path / "blobs")
    client.pull(local, op.blobs["adapter"].sha256)
    state = lora_from_bytes(local.read_bytes(op.blobs["adapter"].sha256))
    key = sorted(state)[0]
    state[key] = state[key][:, :-1].contiguous() if state[key].dim() == 2 else state[key][:-1]
    bad = local.put_bytes(lora_to_bytes(state))
    client.push(local, bad.sha256)
    task = party_pb2.TaskRequest(ctx=party_pb2.RunContext(run_id="manual", round=0), set_lora=party_pb2.SetLoraTask(adapter=bad.ref()))
    code, details = _code(lambda: client.start(task))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and key in details
    assert client.describe().lora_hash == before


def test_services_stay_up_and_run_state_is_unchanged(cluster, addresses, coordinator, finished_run):
    # runs after the bad-input tests (file order): every service still SERVING, the finished run untouched
    for name, address in addresses.items():
        channel = make_channel(address, cluster.credentials(), peer=cluster.identity_of(name))
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        channel.close()
        assert status == health_pb2.HealthCheckResponse.SERVING, name
    again = coordinator.get_run(finished_run.run_id)
    assert again.state == finished_run.state
    assert [r.SerializeToString() for r in again.rounds] == [r.SerializeToString() for r in finished_run.rounds]
