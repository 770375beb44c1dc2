"""cotune.metrics: the definitions, the bounded HTTP endpoint, the hooks in the guard, the operations, the blob store,
the coordinator's state store and the parties' training counters; and the `metrics_address` config field."""

from __future__ import annotations

import socket
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cotune import metrics
from cotune.config import AlignmentConfig, ConfigError, CoordinatorConfig, PartyConfig, from_dict, validate_security
from cotune.rpc.channel import Credentials, TlsFiles, make_channel
from cotune.rpc.operations import OperationManager, OpResult
from cotune.rpc.server import ServiceHost
from cotune.security.identity import COORDINATOR
from cotune.v1 import common_pb2, common_pb2_grpc
from cotune.wire.blobs import BlobStore, pull_blob, push_blob


def value(name: str, **labels) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def parse(text: str) -> dict[str, list]:
    """name -> samples of every family in a scrape."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


# -- config ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [PartyConfig, AlignmentConfig, CoordinatorConfig])
def test_metrics_address_is_a_config_key_of_every_service(cls):
    assert from_dict(cls, {}).metrics_address == ""
    assert from_dict(cls, {"metrics_address": "0.0.0.0:9090"}).metrics_address == "0.0.0.0:9090"


@pytest.mark.parametrize("address", ["0.0.0.0:9090", "127.0.0.1:0", "[::]:9090", "metrics.local:9100", ""])
def test_metrics_address_accepted(address):
    validate_security(from_dict(AlignmentConfig, {"insecure": True, "metrics_address": address}), "alignment")


@pytest.mark.parametrize("address", ["9090", "0.0.0.0", "0.0.0.0:http", "::1:9090", "host:70000", "a b:9090"])
def test_metrics_address_malformed(address):
    cfg = from_dict(CoordinatorConfig, {"insecure": True, "metrics_address": address})
    with pytest.raises(ConfigError, match="coordinator: metrics_address: expected HOST:PORT"):
        validate_security(cfg, "coordinator")


def test_metrics_address_needs_a_port_of_its_own():
    cfg = from_dict(PartyConfig, {"insecure": True, "listen": "127.0.0.1:7000", "metrics_address": "0.0.0.0:7000"})
    with pytest.raises(ConfigError, match="client-1: metrics_address 0.0.0.0:7000 uses the port of listen"):
        validate_security(cfg, "client-1")
    cfg = from_dict(PartyConfig, {"insecure": True, "health_address": "0.0.0.0:8081", "metrics_address": "0.0.0.0:8081"})
    with pytest.raises(ConfigError, match="uses the port of health_address"):
        validate_security(cfg, "llm")


# -- definitions ------------------------------------------------------------------------------------------------------
def test_every_metric_is_prefixed_and_documented():
    families = [f for f in metrics.REGISTRY.collect() if f.name.startswith("cotune_")]
    names = {f.name for f in families}
    for expected in ("cotune_rpc_requests", "cotune_rpc_duration_seconds", "cotune_operations_running",
                     "cotune_blob_bytes", "cotune_blob_store_bytes", "cotune_runs_ended", "cotune_round_duration_seconds",
                     "cotune_step_duration_seconds", "cotune_clients_dropped", "cotune_message_bytes",
                     "cotune_party_train_tokens_per_second", "cotune_party_model_bytes"):
        assert expected in names, expected
    assert all(len(f.documentation) > 20 for f in families)
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    missing = [n for n in names | {"cotune_runs"} if f"`{n}" not in doc]
    assert not missing, f"docs/metrics.md does not list {missing}"


def test_label_values_stay_bounded():
    assert metrics.label("train_local") == "train_local"
    assert metrics.label("distill.teachers.shard") == "distill.teachers.shard"
    assert metrics.label("align:vocab_map") == "align:vocab_map"
    for odd in ("", "Has Spaces", "x" * 65, "a/b", "é"):
        assert metrics.label(odd) == "other"
    assert metrics.service_labels("slm", "client-1") == ("slm", "client-1")
    assert metrics.service_labels("coordinator", "whatever") == ("coordinator", "")


def test_step_phases_from_a_party_are_filtered():
    before = value("cotune_step_phase_seconds_total", step="unit_step", phase="forward")
    metrics.step_finished("unit_step", {"forward": 0.5, "wall": 1.0, "evil_phase_from_a_party": 3.0})
    assert value("cotune_step_phase_seconds_total", step="unit_step", phase="forward") == before + 0.5
    assert metrics.REGISTRY.get_sample_value("cotune_step_phase_seconds_total",
                                             {"step": "unit_step", "phase": "evil_phase_from_a_party"}) is None
    assert value("cotune_step_duration_seconds_count", step="unit_step") >= 1


def test_training_throughput_and_model_bytes():
    torch = pytest.importorskip("torch")
    metrics.training("unit-party", "train_local", {"train_tokens": 300.0, "train_loss_last": 1.0}, 2.0)
    assert value("cotune_party_train_tokens_total", party="unit-party", task="train_local") == 300
    assert value("cotune_party_train_tokens_per_second", party="unit-party", task="train_local") == 150
    metrics.training("unit-party", "evaluate", {"public_loss": 1.0}, 2.0)  # no tokens trained: nothing
    metrics.training("unit-party", "train_local", None, 1.0)
    assert metrics.REGISTRY.get_sample_value("cotune_party_train_tokens_total",
                                             {"party": "unit-party", "task": "evaluate"}) is None

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model[1].weight = model[0].bias  # a shared tensor counts once
    want = sum(t.numel() * t.element_size() for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values())
    metrics.set_model_bytes("unit-party", "model", model)
    assert value("cotune_party_model_bytes", party="unit-party", model="model") == want > 0


def test_runs_by_state_counted_in_the_state_store(tmp_path):
    from coordinator.store import StateStore
    from cotune.v1 import coordinator_pb2 as pb

    store = StateStore(tmp_path / "state.sqlite3")
    for i, state in enumerate((pb.RUN_SUCCEEDED, pb.RUN_SUCCEEDED, pb.RUN_FAILED)):
        store.put_run(pb.Run(run_id=f"r{i}", state=state, created_at=float(i)))
    metrics.watch_runs(store.count_by_state)
    assert value("cotune_runs", state="succeeded") == 2
    assert value("cotune_runs", state="failed") == 1
    assert value("cotune_runs", state="running") == 0
    del store  # the collector holds it weakly: a scrape after the coordinator is gone shows nothing, and does not fail
    import gc

    gc.collect()
    assert "cotune_runs " not in metrics.scrape()


def test_operations_running_returns_to_zero():
    ops = OperationManager(workers=1)
    ops.metrics = metrics.OperationMetrics("unit", "ops")
    gate = __import__("threading").Event()

    def slow(ctx):
        gate.wait(5)
        return OpResult()

    def boom(ctx):
        raise ValueError("bug")

    op = ops.start("unit_kind", slow)
    deadline = time.monotonic() + 5
    while value("cotune_operations_running", service="unit", party="ops", kind="unit_kind") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gate.set()
    ops.wait(op.id, 5)
    failed = ops.start("unit_kind", boom)
    assert ops.wait(failed.id, 5).state == 4  # OPERATION_FAILED
    assert value("cotune_operations_running", service="unit", party="ops", kind="unit_kind") == 0
    assert value("cotune_operations_total", service="unit", party="ops", kind="unit_kind", state="succeeded") == 1
    assert value("cotune_operations_total", service="unit", party="ops", kind="unit_kind", state="failed") == 1
    assert value("cotune_operation_duration_seconds_count", service="unit", kind="unit_kind") == 2
    ops.shutdown()


# -- a host: RPCs, refusals, blobs, the endpoint ----------------------------------------------------------------------
def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def test_host_counts_rpcs_refusals_and_blob_bytes(tmp_path):
    token = "t" * 32
    host = ServiceHost("cotune.unit", "127.0.0.1:0", role="alignment", tokens={token: COORDINATOR},
                       metrics_address="127.0.0.1:0", labels=("unit-host", ""))
    store = BlobStore(tmp_path / "served")
    host.add_blobs_and_operations(store, OperationManager())
    port = host.start()
    host.set_serving(True)
    try:
        families = parse(scrape(host.metrics_port))
        assert ("cotune_service_serving", {"service": "unit-host", "party": ""}, 1.0) in \
            [(s.name, s.labels, s.value) for s in families["cotune_service_serving"]]
        stat = "cotune.v1.BlobStore/StatBlob"
        before_ok = value("cotune_rpc_requests_total", service="unit-host", party="", method=stat, code="OK")
        before_denied = value("cotune_rpc_requests_total", service="unit-host", party="", method=stat,
                              code="UNAUTHENTICATED")
        local = BlobStore(tmp_path / "local")
        blob = local.put_bytes(b"x" * 3000)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = common_pb2_grpc.BlobStoreStub(channel)
            with pytest.raises(grpc.RpcError) as refused:  # no token: refused by the guard, and counted
                stub.StatBlob(common_pb2.StatBlobRequest(sha256=blob.sha256), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with make_channel(f"127.0.0.1:{port}", Credentials(TlsFiles(), {str(COORDINATOR): token}),
                          peer=COORDINATOR) as authed:
            stub = common_pb2_grpc.BlobStoreStub(authed)
            assert push_blob(stub, local, blob.sha256) == 3000  # StatBlob + PutBlob
            back = BlobStore(tmp_path / "back")
            assert pull_blob(stub, back, blob.sha256) == 3000
        families = parse(scrape(host.metrics_port))
        assert value("cotune_rpc_requests_total", service="unit-host", party="", method=stat, code="OK") >= before_ok + 1
        assert value("cotune_rpc_requests_total", service="unit-host", party="", method=stat,
                     code="UNAUTHENTICATED") == before_denied + 1
        put = [s for s in families["cotune_rpc_duration_seconds"] if s.name.endswith("_count")
               and s.labels == {"service": "unit-host", "method": "cotune.v1.BlobStore/PutBlob"}]
        assert put and put[0].value >= 1
        assert value("cotune_blob_bytes_total", service="unit-host", party="", direction="in") >= 3000
        assert value("cotune_blob_bytes_total", service="unit-host", party="", direction="out") >= 3000
        assert value("cotune_blob_store_bytes", service="unit-host", party="") == store.usage() >= 3000
        assert value("cotune_blob_store_quota_bytes", service="unit-host", party="") == 0  # no quota set
    finally:
        host.stop(0)
    assert value("cotune_service_serving", service="unit-host", party="") == 0
    with pytest.raises(OSError):  # the listener went with the host
        scrape(host.metrics_port)


def test_endpoint_is_shared_per_address_and_bounded():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    a, b = metrics.serve(address), metrics.serve(address)  # two hosts of one process naming one address share it
    try:
        assert a.port == b.port == port
        a.close()
        assert "cotune_rpc_requests" in scrape(port)  # still served: b uses it
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(metrics.MAX_SCRAPES)]
        try:
            time.sleep(0.2)
            with pytest.raises(OSError):  # every slot held by a connection that sends nothing: closed at once
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    r.read()
        finally:
            for conn in idle:
                conn.close()
        deadline = time.monotonic() + 5
        while True:  # the slots come back as the idle connections close
            try:
                assert "cotune_" in scrape(port)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        b.close()
    with pytest.raises(OSError):
        scrape(port)


def test_unbindable_metrics_port_stops_the_host(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        host = ServiceHost("cotune.unit2", "127.0.0.1:0", role="coordinator", metrics_address=f"127.0.0.1:{port}")
        with pytest.raises(OSError, match=f"could not bind the metrics port 127.0.0.1:{port}"):
            host.start()
