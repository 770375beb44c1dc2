"""One hostile client among real processes: it cannot poison a run. client-2 is replaced by
tests/integration/hostile_client.py (same config, same identity), which forges its logits shard's loss over a
confidently wrong distribution and uploads a LoRA adapter of 1e30 values. Runs complete with the honest client and
the LLM; the hostile client is dropped (with a note saying why) or its shard simply never selected."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cotune.cluster import HOST, wait_healthy
from cotune.v1 import coordinator_pb2 as pb
from cotune.watch import watch_run
from tests.integration.cluster_fixtures import TEST_PRESET, metrics_of, rounds_of

pytestmark = pytest.mark.integration

CLUSTER_ALGORITHM = "fedcollm"  # one tokenizer everywhere: FedMKT, FedCoLLM and FedAvg all run on it
ROOT = Path(__file__).resolve().parents[2]
HOSTILE = "client-2"


@pytest.fixture(scope="module")
def hostile(cluster, coordinator):
    """client-2 killed and started again as the hostile client, from its own config and port file, re-registered."""
    svc = cluster.services[HOSTILE]
    cluster.kill(HOSTILE)
    svc.port_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                                          os.environ.get("PYTHONPATH")])))
    env.setdefault("COTUNE_TORCH_THREADS", "1")
    with open(svc.log_path, "ab") as log:
        svc.process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.hostile_client", "--config", str(svc.config_path),
             "--port-file", str(svc.port_file)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    deadline = time.monotonic() + 120
    while not svc.port_file.exists():
        assert svc.process.poll() is None, svc.log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "the hostile client never reported its port"
        time.sleep(0.1)
    svc.address = f"{HOST}:{int(svc.port_file.read_text().strip())}"
    wait_healthy(svc.address, timeout_s=300, service=HOSTILE, process=svc.process, log_path=svc.log_path,
                 creds=cluster.credentials(), peer=cluster.identity_of(HOSTILE))
    coordinator.register_client(HOSTILE, svc.address)
    return svc


def _run(coordinator, **spec) -> pb.Run:
    run = coordinator.start_run(pb.RunSpec(name=f"it-poison-{spec['algorithm']}", min_clients=1,
                                           max_length=TEST_PRESET.max_length, **spec))
    return watch_run(coordinator, run.run_id, quiet=True)


def test_forged_logits_are_dropped_or_never_selected(hostile, coordinator):
    run = _run(coordinator, algorithm="fedmkt", rounds=2, fedmkt=pb.FedMKTSpec(top_k=8, ce_weight=TEST_PRESET.lam))
    assert run.state == pb.RUN_SUCCEEDED, run.error
    rounds = rounds_of(run)
    # round 1: a negative loss is no loss: the coordinator drops the sender before the LLM sees its shard
    assert HOSTILE in rounds[1].dropped
    (note,) = [n for n in rounds[1].notes if HOSTILE in n]
    assert "public_logits" in note and "not a loss" in note, note
    llm1 = metrics_of(rounds[1])["llm"]
    assert "kd_from_client-1" in llm1 and "kd_from_client-2" not in llm1, llm1
    # round 2: a plausible claim (0.0) reaches the LLM, which recomputes the loss from the shard and never picks it
    assert HOSTILE not in rounds[2].dropped, list(rounds[2].notes)
    llm2 = metrics_of(rounds[2])["llm"]
    assert llm2["kd_from_client-2"] == 0, llm2
    assert llm2["teacher_bpb_client-2"] > llm2["teacher_bpb_client-1"], llm2
    assert {"llm", "client-1"} <= set(metrics_of(rounds[2]))


def test_huge_adapter_upload_is_rejected_before_averaging(hostile, coordinator):
    run = _run(coordinator, algorithm="fedcollm", rounds=1, fedcollm=pb.FedCoLLMSpec(kl_weight=TEST_PRESET.lam))
    assert run.state == pb.RUN_SUCCEEDED, run.error
    rec = rounds_of(run)[1]
    assert HOSTILE in rec.dropped
    (note,) = [n for n in rec.notes if HOSTILE in n]
    assert "upload rejected" in note and "magnitude 1e+30" in note, note
    metrics = metrics_of(rec)
    assert "fedavg_weight" in metrics["client-1"] and "fedavg_weight" not in metrics.get(HOSTILE, {})
    assert any(k.startswith("codistill_") for k in metrics["llm"]), metrics["llm"]
