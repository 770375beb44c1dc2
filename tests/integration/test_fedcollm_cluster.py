"""FedCoLLM and the LoRA baselines end to end between separate processes over loopback gRPC.

One tiny same-tokenizer cluster (a larger Llama-style LLM holding a copy of the smaller SLM both clients run,
all on Mistral's tokenizer): two FedCoLLM rounds, checked against what the coordinator stored (the aggregate is
recomputed from the clients' uploads, the clients hold the distilled adapter, the co-distillation lowers the KL),
then one round each of fedavg and standalone, and zero-shot.
"""

from __future__ import annotations


import grpc
import pytest

from cotune.algorithms.aggregate import aggregate_uploads, parse_adapter
from cotune.lm.lora import lora_from_bytes, lora_to_bytes
from cotune.v1 import coordinator_pb2 as pb
from cotune.v1 import party_pb2
from cotune.wire.blobs import BlobStore
from tests.integration.cluster_fixtures import (
    TEST_PRESET,
    check_aggregate,
    metrics_of,
    rounds_of,
    run_to_end,
)
from tests.integration.cluster_fixtures import party

pytestmark = pytest.mark.integration
CLUSTER_ALGORITHM = "fedcollm"  # the cluster fixture (conftest.py) builds this algorithm's tiny cluster
CLIENTS = ("client-1", "client-2")
_run, _rounds, _metrics = run_to_end, rounds_of, metrics_of


@pytest.fixture(scope="module")
def fedcollm_run(coordinator):
    return _run(coordinator, algorithm="fedcollm", rounds=2, local_epochs=2,
                fedcollm=pb.FedCoLLMSpec(kl_weight=20.0))


def _check_aggregate(rec, artifacts):
    return check_aggregate(rec, artifacts, CLIENTS)


# -- FedCoLLM -----------------------------------------------------------------------------------------------------
def test_parties_share_one_tokenizer_and_the_llm_holds_the_slm(cluster, addresses):
    llm = party(cluster, "llm").describe()
    clients = [party(cluster, c).describe() for c in CLIENTS]
    assert llm.HasField("companion") and llm.companion.tokenizer_hash == llm.tokenizer_hash
    assert {c.tokenizer_hash for c in clients} == {llm.tokenizer_hash}
    assert {c.lora_layout_hash for c in clients} == {llm.companion.lora_layout_hash}
    assert llm.lora_layout_hash != llm.companion.lora_layout_hash  # the LLM is the larger model


def test_two_fedcollm_rounds_complete_with_metrics(fedcollm_run):
    run = fedcollm_run
    assert run.state == pb.RUN_SUCCEEDED, run.error
    rounds = _rounds(run)
    assert sorted(rounds) == [0, 1, 2]
    for rnd, rec in rounds.items():
        metrics = _metrics(rec)
        assert set(metrics) == {"llm", *CLIENTS}, (rnd, sorted(metrics))
        for pid, m in metrics.items():
            assert "public_loss" in m and 0.0 <= m["eval_accuracy"] <= 1.0, (rnd, pid)
        assert not rec.dropped, list(rec.notes)
    for rnd in (1, 2):
        rec = rounds[rnd]
        assert {"aggregate", "distilled", "broadcast", "upload/client-1", "upload/client-2"} <= set(rec.artifacts)
        assert rec.artifacts["broadcast"] == rec.artifacts["distilled"]
        assert rec.bytes_received["get_lora.adapter"] >= 2 * 30_000  # two ~34 KiB adapters came up
        assert rec.bytes_received["co_distill.slm_adapter"] >= 30_000
    # round 0: everyone starts from the LLM server's SLM copy
    assert rounds[0].artifacts["broadcast"] == rounds[0].artifacts["init"]


def test_aggregate_is_the_sample_weighted_mean_of_the_uploads(fedcollm_run, artifacts):
    for rnd in (1, 2):
        _check_aggregate(_rounds(fedcollm_run)[rnd], artifacts)


def test_clients_and_the_server_copy_hold_the_distilled_adapter(cluster, fedcollm_run, addresses, artifacts):
    last = _rounds(fedcollm_run)[2]
    distilled = last.artifacts["distilled"]
    assert distilled != last.artifacts["aggregate"]  # the co-distillation changed θ
    for c in CLIENTS:
        assert party(cluster, c).describe().lora_hash == distilled, c
    assert party(cluster, "llm").describe().companion.lora_hash == distilled
    # the blob is canonical adapter bytes: what a client hashes after loading it
    data = artifacts.read(distilled)
    assert lora_to_bytes(lora_from_bytes(data)) == data


def test_losses_move_in_the_right_direction(fedcollm_run):
    rounds = _rounds(fedcollm_run)
    for rnd in (1, 2):
        metrics = _metrics(rounds[rnd])
        llm = metrics["llm"]
        assert llm["codistill_slm_kl_after"] < llm["codistill_slm_kl_before"], (rnd, llm)
        assert llm["codistill_llm_kl_after"] < llm["codistill_llm_kl_before"], (rnd, llm)
        assert llm["codistill_llm_ce_after"] < llm["codistill_llm_ce_before"], (rnd, llm)
        for c in CLIENTS:
            assert metrics[c]["train_loss_last"] < metrics[c]["train_loss_first"], (rnd, c, metrics[c])
    # the LLM, trained only through the co-distillation, gets better on the public set
    assert _metrics(rounds[2])["llm"]["public_loss"] < _metrics(rounds[0])["llm"]["public_loss"]


# -- bad input at the services -------------------------------------------------------------------------------------
def test_another_rounds_upload_is_detected(cluster, fedcollm_run, addresses, tmp_path):
    """A real client's tagged adapter from round 1 is rejected by an aggregation expecting round 2."""
    client = party(cluster, "client-1")
    ctx = party_pb2.RunContext(run_id=fedcollm_run.run_id, round=1, task_key="r1/get_lora/client-1")
    op = client.run_task(party_pb2.TaskRequest(ctx=ctx, get_lora=party_pb2.GetLoraTask(tag=True)), timeout_s=60)
    store = BlobStore(tmp_path / "blobs")
    client.pull(store, op.blobs["adapter"].sha256)
    stale = store.read_bytes(op.blobs["adapter"].sha256)
    reference, _ = parse_adapter(stale)
    expect = {"client-1": {"cotune.run_id": fedcollm_run.run_id, "cotune.round": "2", "cotune.party_id": "client-1"}}
    with pytest.raises(ValueError, match="round='1', expected '2'"):
        aggregate_uploads({"client-1": stale}, {"client-1": 16}, reference, expect=expect)


def _adapter(party, store, target=""):
    op = party.run_task(party_pb2.TaskRequest(ctx=party_pb2.RunContext(run_id="manual", round=0),
                                              get_lora=party_pb2.GetLoraTask(target=target)), timeout_s=60)
    party.pull(store, op.blobs["adapter"].sha256)
    return lora_from_bytes(store.read_bytes(op.blobs["adapter"].sha256))


def test_co_distill_rejects_an_adapter_that_does_not_fit(cluster, fedcollm_run, addresses, tmp_path):
    llm = party(cluster, "llm")
    store = BlobStore(tmp_path / "blobs")
    own = _adapter(llm, store)  # the LLM's own adapter: the wrong layout for its SLM copy
    poisoned = _adapter(llm, store, target="companion")
    before = llm.describe()  # (run "manual" in memory now: the refused requests below are of that run)
    key = sorted(poisoned)[0]
    poisoned[key][0, 0] = float("nan")
    for state, message in ((own, "does not fit the companion SLM"), (poisoned, "NaN")):
        blob = store.put_bytes(lora_to_bytes(state))
        llm.push(store, blob.sha256)
        req = party_pb2.TaskRequest(ctx=party_pb2.RunContext(run_id="manual", round=0),
                                    co_distill=party_pb2.CoDistillTask(slm_adapter=blob.ref(), kl_weight=1.0, epochs=1,
                                                                           max_length=TEST_PRESET.max_length))
        with pytest.raises(grpc.RpcError) as err:
            llm.start(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details(), err.value.details()
    after = llm.describe()
    assert (after.lora_hash, after.companion.lora_hash) == (before.lora_hash, before.companion.lora_hash)


def test_bad_specs_get_clear_errors(coordinator):
    runs_before = len(coordinator.list_runs())
    with pytest.raises(grpc.RpcError) as err:
        coordinator.start_run(pb.RunSpec(algorithm="fedcollm", rounds=1, fedcollm=pb.FedCoLLMSpec(aggregation="median")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fedcollm.aggregation must be one of" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        coordinator.start_run(pb.RunSpec(algorithm="llm2slm", rounds=1, fedmkt=pb.FedMKTSpec(setting="heterogeneous")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "llm_to_slm" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        coordinator.start_run(pb.RunSpec(algorithm="fedcolm", rounds=1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fedcollm" in err.value.details()
    # every problem of a spec in one error, each naming its field; values "0 = default" used to make impossible pass
    with pytest.raises(grpc.RpcError) as err:
        coordinator.start_run(pb.RunSpec(algorithm="fedcollm", rounds=0, max_length=4, fedbiot=pb.FedBiOTSpec()))
    details = err.value.details()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(f in details for f in ("rounds must be", "max_length must be", "takes `fedcollm` settings")), details
    with pytest.raises(grpc.RpcError) as err:
        coordinator.start_run(pb.RunSpec(algorithm="fedcollm", rounds=1, local_epochs=0,
                                         fedcollm=pb.FedCoLLMSpec(kl_weight=-1, distill_epochs=0)))
    details = err.value.details()
    assert all(f in details for f in ("local_epochs", "fedcollm.kl_weight", "fedcollm.distill_epochs")), details
    assert len(coordinator.list_runs()) == runs_before, "a refused spec created a run"


# -- baselines on the same cluster ---------------------------------------------------------------------------------
def test_fedavg_round_averages_and_broadcasts(cluster, coordinator, addresses, artifacts, fedcollm_run):
    run = _run(coordinator, algorithm="fedavg", rounds=1, fedavg=pb.FedAvgSpec(aggregation="factors"))
    assert run.state == pb.RUN_SUCCEEDED, run.error
    rounds = _rounds(run)
    assert set(_metrics(rounds[1])) == set(CLIENTS)  # no LLM involvement
    _check_aggregate(rounds[1], artifacts)
    for c in CLIENTS:
        assert party(cluster, c).describe().lora_hash == rounds[1].artifacts["aggregate"]


def test_standalone_and_zero_shot_exchange_nothing(cluster, coordinator, addresses, fedcollm_run):
    before = {c: party(cluster, c).describe().lora_hash for c in CLIENTS}
    run = _run(coordinator, algorithm="standalone", rounds=1)
    assert run.state == pb.RUN_SUCCEEDED, run.error
    rounds = _rounds(run)
    assert sorted(rounds) == [0, 1]
    assert set(_metrics(rounds[1])) == set(CLIENTS)
    assert not any(r.bytes_sent or r.bytes_received for r in run.rounds)
    after = {c: party(cluster, c).describe().lora_hash for c in CLIENTS}
    assert after["client-1"] != after["client-2"]  # trained apart, nothing averaged
    assert all(after[c] != before[c] for c in CLIENTS)
    standalone_start = _metrics(rounds[0])

    run = _run(coordinator, algorithm="zero-shot", rounds=1)
    assert run.state == pb.RUN_SUCCEEDED, run.error
    assert [r.round for r in run.rounds] == [0]
    zero_shot = _metrics(run.rounds[0])
    assert set(zero_shot) == {"llm", *CLIENTS}
    # runs are isolated: each starts from the configured models, so both evaluate the same fresh clients at round 0,
    # whatever the runs before them trained
    for c in CLIENTS:
        assert zero_shot[c]["public_loss"] == standalone_start[c]["public_loss"], c
    fresh = {c: party(cluster, c).describe().lora_hash for c in CLIENTS}
    assert fresh["client-1"] == fresh["client-2"] and not set(fresh.values()) & set(after.values())
