"""FedBiOT, FedOT and the centralized reference end to end between separate processes over loopback gRPC.

The tiny FedBiOT cluster: an 8-layer Llama-style LLM on Mistral's tokenizer and two clients configured with a small
SLM of that family. Two FedBiOT rounds are checked against what the coordinator stored and what the services hold:
the compressed model was shipped once and installed by every client, the aggregate is the sample-weighted mean of
the uploads, every client holds the server's re-aligned LoRA, and the losses move the right way.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from cotune.algorithms.fedbiot.compress import INITIAL_LORA_FILE, LAYER_MAP_FILE, unpack_dir
from cotune.algorithms.fedbiot.plan import emulator_layer_indices
from cotune.lm.lora import lora_from_bytes, lora_to_bytes
from cotune.v1 import coordinator_pb2 as pb
from cotune.v1 import party_pb2
from cotune.wire.blobs import BlobStore
from tests.integration.cluster_fixtures import (
    check_aggregate,
    metrics_of,
    party,
    rounds_of,
    run_to_end,
)

pytestmark = pytest.mark.integration
CLUSTER_ALGORITHM = "fedbiot"  # the cluster fixture (conftest.py) builds this algorithm's tiny cluster
CLIENTS = ("client-1", "client-2")
FEDBIOT = {"adapter_layers": 2, "drop": 0.5, "pre_align_steps": 12, "align_steps": 6, "align_lr": 1e-3, "prox_eps": 0.05}


@pytest.fixture(scope="module")
def configured(cluster, addresses):
    """What the clients hold before any run: their configured SLM."""
    return {c: party(cluster, c).describe() for c in CLIENTS}


@pytest.fixture(scope="module")
def fedbiot_run(coordinator, configured):
    return run_to_end(coordinator, algorithm="fedbiot", rounds=2, local_epochs=2,
                      fedbiot=pb.FedBiOTSpec(**FEDBIOT))


def test_two_fedbiot_rounds_complete_with_both_evaluations(fedbiot_run):
    run = fedbiot_run
    assert run.state == pb.RUN_SUCCEEDED, run.error
    rounds = rounds_of(run)
    assert sorted(rounds) == [0, 1, 2]
    for rnd, rec in rounds.items():
        metrics = metrics_of(rec)
        # the LLM: adapter plugged into the full model; llm/emulator: emulator + adapter, on the same eval set
        assert set(metrics) == {"llm", "llm/emulator", *CLIENTS}, (rnd, sorted(metrics))
        for pid, m in metrics.items():
            assert "public_loss" in m and 0.0 <= m["eval_accuracy"] <= 1.0, (rnd, pid)
        assert not rec.dropped, list(rec.notes)
        # every client holds the server's emulator + adapter, so it scores like llm/emulator on the shared eval set
        for c in CLIENTS:
            assert metrics[c]["public_loss"] == pytest.approx(metrics["llm/emulator"]["public_loss"], rel=1e-4), (rnd, c)


def test_the_compressed_model_is_shipped_once_and_installed(cluster, fedbiot_run, addresses, artifacts, configured, tmp_path):
    rounds = rounds_of(fedbiot_run)
    archive = rounds[0].artifacts["model"]
    size = len(artifacts.read(archive))
    # pulled from the server once, pushed to each client once, never again
    assert rounds[0].bytes_received["compress.model"] == size
    assert rounds[0].bytes_sent["load_model.model"] == 2 * size
    assert all("load_model.model" not in rounds[r].bytes_sent for r in (1, 2))
    model_dir = unpack_dir(artifacts.read(archive), tmp_path / "model")
    assert (model_dir / LAYER_MAP_FILE).is_file() and (model_dir / INITIAL_LORA_FILE).is_file()
    llm = party(cluster, "llm").describe()
    kept = emulator_layer_indices(llm.num_layers - 2, 0.5)
    for c in CLIENTS:
        info = party(cluster, c).describe()
        assert info.loaded_model == archive, c
        assert info.num_layers == len(kept) + 2 < llm.num_layers, c
        assert info.tokenizer_hash == llm.tokenizer_hash  # the LLM's tokenizer came with the model
        assert info.lora_layout_hash != configured[c].lora_layout_hash


def test_aggregate_is_the_sample_weighted_mean_of_the_uploads(fedbiot_run, artifacts):
    for rnd in (1, 2):
        check_aggregate(rounds_of(fedbiot_run)[rnd], artifacts, CLIENTS)


def test_every_client_holds_the_realigned_broadcast(cluster, fedbiot_run, addresses, artifacts):
    rounds = rounds_of(fedbiot_run)
    for rnd in (0, 1, 2):
        assert rounds[rnd].artifacts["broadcast"] == rounds[rnd].artifacts["aligned"], rnd
    last = rounds[2]
    aligned = last.artifacts["aligned"]
    for c in CLIENTS:
        assert party(cluster, c).describe().lora_hash == aligned, c
    # the server re-aligned the emulator: the broadcast differs from the aggregate only in the emulator layers,
    # and carries the aggregate's adapter layers unchanged
    aggregate = lora_from_bytes(artifacts.read(last.artifacts["aggregate"]))
    broadcast = lora_from_bytes(artifacts.read(aligned))
    assert lora_to_bytes(broadcast) == artifacts.read(aligned)
    same = {k for k in aggregate if torch.equal(aggregate[k], broadcast[k])}
    changed = set(aggregate) - same
    assert changed and same
    layers = lambda keys: {int(k.split(".layers.")[1].split(".")[0]) for k in keys}  # noqa: E731
    n = party(cluster, "client-1").describe().num_layers
    assert layers(same) == {n - 2, n - 1} and max(layers(changed)) < n - 2


def test_losses_move_in_the_right_direction(fedbiot_run):
    rounds = rounds_of(fedbiot_run)
    pre = metrics_of(rounds[0])["llm"]
    assert pre["align_steps"] == FEDBIOT["pre_align_steps"]
    assert pre["align_loss_after"] < pre["align_loss_before"]
    for rnd in (1, 2):
        metrics = metrics_of(rounds[rnd])
        llm = metrics["llm"]
        assert llm["align_steps"] == FEDBIOT["align_steps"]
        assert llm["align_loss_after"] < llm["align_loss_before"], (rnd, llm)
        for c in CLIENTS:
            m = metrics[c]
            assert m["train_loss_last"] < m["train_loss_first"] and m["train_prox_last"] > 0, (rnd, c, m)
    # the clients' adapters, plugged into the full model, improve it on the public set
    assert metrics_of(rounds[2])["llm"]["public_loss"] < metrics_of(rounds[0])["llm"]["public_loss"]


def test_bad_specs_and_bad_requests_get_clear_errors(cluster, coordinator, addresses, fedbiot_run, tmp_path):
    bad = [
        (dict(algorithm="fedbiot", fedbiot=pb.FedBiOTSpec(adapter_layers=8)), "8 layers"),
        (dict(algorithm="fedbiot", fedbiot=pb.FedBiOTSpec(drop=1.5)), "fedbiot.drop must be in (0, 1)"),
        (dict(algorithm="fedbiot", fedbiot=pb.FedBiOTSpec(prox_eps=float("nan"))), "fedbiot.prox_eps must be finite"),
        (dict(algorithm="fedot", fedbiot=pb.FedBiOTSpec(align_steps=5)), "never re-aligns"),
        (dict(algorithm="centralized"), "exactly one client"),
    ]
    for spec, message in bad:
        with pytest.raises(grpc.RpcError) as err:
            coordinator.start_run(pb.RunSpec(rounds=1, **spec))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details(), err.value.details()

    # a client refuses an archive that is not a compressed model, and keeps its model
    client = party(cluster, "client-1")
    before = client.describe()
    store = BlobStore(tmp_path / "blobs")
    junk = store.put_bytes(b"\0" * 4096, "application/x-tar")
    client.push(store, junk.sha256)
    with pytest.raises(grpc.RpcError) as err:
        client.start(party_pb2.TaskRequest(ctx=party_pb2.RunContext(run_id="manual", round=0),
                                           load_model=party_pb2.LoadModelTask(model=junk.ref())))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "compressed model" in err.value.details()
    after = client.describe()
    assert (after.loaded_model, after.lora_hash) == (before.loaded_model, before.lora_hash)


def test_fedot_round_never_realigns(coordinator, addresses, fedbiot_run):
    run = run_to_end(coordinator, algorithm="fedot", rounds=1,
                     fedbiot=pb.FedBiOTSpec(drop=0.5, pre_align_steps=4, align_lr=1e-3))
    assert run.state == pb.RUN_SUCCEEDED, run.error
    rounds = rounds_of(run)
    assert metrics_of(rounds[0])["llm"]["align_steps"] == 4
    assert "align_steps" not in metrics_of(rounds[1])["llm"]  # plugged into the full model, not re-aligned
    # without re-alignment the broadcast is exactly the aggregate
    assert rounds[1].artifacts["broadcast"] == rounds[1].artifacts["aggregate"]
    # the archive was the same as the first run's (same model, same plan): no client downloaded it again
    assert rounds[0].artifacts["model"] == rounds_of(fedbiot_run)[0].artifacts["model"]
    assert "load_model.model" not in rounds[0].bytes_sent


def test_centralized_reference_is_labelled_and_trains_the_chosen_client(coordinator, fedbiot_run):
    run = run_to_end(coordinator, algorithm="centralized", rounds=1, clients=["client-2"])
    assert run.state == pb.RUN_SUCCEEDED, run.error
    rounds = rounds_of(run)
    assert all(any("NON-FEDERATED" in n for n in r.notes) for r in run.rounds)
    assert set(metrics_of(rounds[1])) == {"client-2"}  # the LLM server holds no private data in this cluster
    assert "train_loss_last" in metrics_of(rounds[1])["client-2"]
