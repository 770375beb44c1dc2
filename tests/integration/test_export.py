"""ExportRun and `cotune run export` between real processes over mTLS (the tiny same-tokenizer cluster: an LLM holding a
copy of the SLM both clients run).

A FedCoLLM run ends with every client holding the broadcast adapter, which is the LLM server's companion SLM adapter
after co-distillation (`distilled`, then `broadcast`, of the last round: evaluation changes no adapter). A zero-shot run
then puts every party on another run (fresh adapters). Exporting the first run must still give what it ended with:
each client's adapter and the companion's equal the last round's broadcast tensor for tensor, the LLM's own adapter is
its trained one (not the fresh one it holds now), the files load with cotune and with peft as the model card says, and
the run's round records are left as they were. A run that did not succeed is refused with FAILED_PRECONDITION naming
its state, a client identity with PERMISSION_DENIED."""

from __future__ import annotations

import hashlib
import time

import grpc
import pytest
import torch

from cotune.algorithms.aggregate import parse_adapter
from cotune.cli import main as cli_main
from cotune.export import CARD_FILE, describe_adapter, file_name
from cotune.lm.lora import lora_from_bytes, lora_to_bytes
from cotune.security.identity import client_identity
from cotune.v1 import coordinator_pb2 as pb
from cotune.watch import watch_run
from tests.integration.cluster_fixtures import TEST_PRESET, party, rounds_of, run_to_end

pytestmark = pytest.mark.integration
CLUSTER_ALGORITHM = "fedcollm"  # the cluster fixture (conftest.py) builds this algorithm's tiny cluster
CLIENTS = ("client-1", "client-2")
NAMES = {"llm", "llm/companion", *CLIENTS}


@pytest.fixture(scope="module")
def runs(coordinator):
    """(the FedCoLLM run to export, the zero-shot run every party took part in after it)."""
    first = run_to_end(coordinator, algorithm="fedcollm", rounds=1, fedcollm=pb.FedCoLLMSpec(kl_weight=20.0))
    assert first.state == pb.RUN_SUCCEEDED, first.error
    other = run_to_end(coordinator, algorithm="zero-shot")
    assert other.state == pb.RUN_SUCCEEDED, other.error
    return first, other


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _same_tensors(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_export_gives_each_party_s_final_adapter_of_that_run(cluster, coordinator, artifacts, runs):
    first, _ = runs
    last = rounds_of(first)[1]
    broadcast = last.artifacts["broadcast"]
    assert last.artifacts["distilled"] == broadcast  # the companion's adapter is what the clients were sent
    final = lora_from_bytes(artifacts.read(broadcast))
    # the parties hold the zero-shot run now: fresh adapters, not the first run's
    before = {name: party(cluster, name).describe() for name in ("llm", *CLIENTS)}
    for c in CLIENTS:
        assert before[c].lora_hash != broadcast
    assert before["llm"].companion.lora_hash != broadcast

    started = time.monotonic()
    response = coordinator.export_run(first.run_id)
    took = time.monotonic() - started
    assert set(response.adapters) == NAMES, dict(response.adapters)
    exported = {name: artifacts.read(ref.sha256) for name, ref in response.adapters.items()}
    for name, data in exported.items():
        assert _sha(data) == response.adapters[name].sha256 and len(data) == response.adapters[name].size
        _, meta = parse_adapter(data)  # tagged with the run, its last round and the sender
        pid, _, target = name.partition("/")
        assert (meta["cotune.run_id"], meta["cotune.round"], meta["cotune.party_id"], meta["cotune.target"]) == \
               (first.run_id, "1", pid, target or "model"), meta
    for name in (*CLIENTS, "llm/companion"):
        assert _same_tensors(lora_from_bytes(exported[name]), final), name
    llm = lora_from_bytes(exported["llm"])  # the LLM's co-distilled adapter, not the fresh one it held
    assert _sha(lora_to_bytes(llm)) != before["llm"].lora_hash and not _same_tensors(llm, final)

    after = coordinator.get_run(first.run_id)
    assert dict(after.exports) == {n: r.sha256 for n, r in response.adapters.items()}
    assert [r.SerializeToString(deterministic=True) for r in after.rounds] == \
           [r.SerializeToString(deterministic=True) for r in first.rounds]  # nothing added to the run's records

    card = response.model_card_markdown
    for needle in (first.run_id, "fedcollm", "## Final metrics (round 1)", "set_peft_model_state_dict",
                   *(file_name(n) for n in NAMES)):
        assert needle in card, needle
    for rec in last.parties:
        if "eval_accuracy" in rec.metrics:
            assert f"| {rec.party_id} | {rec.metrics['eval_accuracy']:.3f} |" in card, rec.party_id

    started = time.monotonic()
    again = coordinator.export_run(first.run_id)  # stored steps: nothing is asked of the parties again
    assert {n: r.sha256 for n, r in again.adapters.items()} == {n: r.sha256 for n, r in response.adapters.items()}
    assert coordinator.get_run(first.run_id).updated_at == after.updated_at
    print(f"\nexport of {len(NAMES)} adapters: {took:.1f} s; again: {time.monotonic() - started:.2f} s")


def test_cli_writes_the_adapters_and_the_card(cluster, coordinator, artifacts, runs, tmp_path):
    first, _ = runs
    out = tmp_path / "export"
    assert cli_main(["run", "export", first.run_id, "--out", str(out), "--cluster-dir", str(cluster.workdir)]) == 0
    run = coordinator.get_run(first.run_id)
    files = {p.name for p in out.iterdir()}
    assert files == {file_name(n) for n in NAMES} | {CARD_FILE}, files
    for name, sha in run.exports.items():
        data = (out / file_name(name)).read_bytes()
        assert _sha(data) == sha and data == artifacts.read(sha)
        assert lora_from_bytes(data)
    card = (out / CARD_FILE).read_text()
    assert first.run_id in card and all(c in card for c in CLIENTS)

    # the card's recipe: peft, onto the clients' SLM, with the rank and modules the card gives
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from cotune.lm.model import load_causal_lm

    data = (out / file_name("client-1")).read_bytes()
    info = describe_adapter(data, party_id="client-1", target="", sha256=_sha(data), model="")
    assert f"| {info.rank} | {', '.join(info.modules)} |" in card
    model, _ = load_causal_lm(cluster.config.clients[0]["model"]["path"], device="cpu", dtype="fp32")
    model = get_peft_model(model, LoraConfig(r=info.rank, lora_alpha=16, target_modules=list(info.modules)))
    result = set_peft_model_state_dict(model, load_file(str(out / file_name("client-1"))))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]


def test_runs_that_did_not_succeed_are_refused(coordinator, runs):
    def refused(run_id: str) -> str:
        with pytest.raises(grpc.RpcError) as err:
            coordinator.export_run(run_id)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        return err.value.details()

    failed = run_to_end(coordinator, algorithm="fedavg", rounds=1, adapter_max_abs=1e-9)  # the init adapter is refused
    assert failed.state == pb.RUN_FAILED, pb.RunState.Name(failed.state)
    assert "RUN_FAILED" in refused(failed.run_id)
    running = coordinator.start_run(pb.RunSpec(algorithm="fedavg", rounds=1, max_length=TEST_PRESET.max_length))
    try:
        details = refused(running.run_id)
        assert "RUN_PENDING" in details or "RUN_RUNNING" in details, details
    finally:
        coordinator.cancel_run(running.run_id)
    assert watch_run(coordinator, running.run_id, quiet=True).state == pb.RUN_CANCELLED
    assert "RUN_CANCELLED" in refused(running.run_id)
    with pytest.raises(grpc.RpcError) as err:
        coordinator.export_run("no-such-run")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_only_operators_may_export(cluster, runs):
    first, _ = runs
    as_client = cluster.coordinator_client(client_identity("client-1"))
    try:
        with pytest.raises(grpc.RpcError) as err:
            as_client.export_run(first.run_id)
    finally:
        as_client.close()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
    assert "client/client-1" in err.value.details()
