"""The coordinator rides out restarts of anything, between real processes over mTLS: the LLM server killed mid-step and
restarted (on its port), a client killed and restarted at once (on a new port, registered again) under the default
quorum, a run that failed because a client stayed away past `party_grace_s` resumed with ResumeRun once it is back
(completed steps replay without being redone; no note recorded twice), and ResumeRun refusing a run that did not fail.

The last test restarts the coordinator with a short grace period, so it stays last in this module."""

from __future__ import annotations

import time

import grpc
import pytest
import yaml

from cotune.security.identity import client_identity
from cotune.v1 import coordinator_pb2 as pb
from cotune.watch import watch_run
from tests.integration.cluster_fixtures import TEST_PRESET, coordinator_client

pytestmark = pytest.mark.integration


def _spec(**kw) -> pb.RunSpec:
    return pb.RunSpec(algorithm="fedmkt", rounds=1, max_length=TEST_PRESET.max_length,
                      fedmkt=pb.FedMKTSpec(top_k=8, ce_weight=TEST_PRESET.lam), **kw)


def _wait_for_step(client, run_id, round_, step, timeout=300) -> int:
    """Follow the run's events until it reaches `step` of `round_`; returns that event's seq."""
    deadline = time.monotonic() + timeout
    for event in client.watch_run(run_id, timeout=timeout):
        if event.kind == "step" and event.round == round_ and event.step == step:
            return event.seq
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"run {run_id} never reached round {round_} step {step}")


def _events(client, run_id, after: int = 0) -> list[pb.RunEvent]:
    return list(client.watch_run(run_id, after_seq=after, timeout=30))


def _back_after(events) -> list[float]:
    """The outages the coordinator waited out, in seconds (its "... is back after N s" events)."""
    return [float(e.message.rsplit(" after ", 1)[1].split(" s")[0]) for e in events if " is back after " in e.message]


def _wait_for_event(client, run_id, after: int, match, timeout=120) -> pb.RunEvent:
    deadline = time.monotonic() + timeout
    for event in client.watch_run(run_id, after_seq=after, timeout=timeout):
        if match(event):
            return event
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"run {run_id}: no such event within {timeout} s")


def test_the_llm_server_killed_mid_step_is_waited_for_and_the_run_succeeds(cluster):
    client = coordinator_client(cluster)
    run = client.start_run(_spec())
    seq = _wait_for_step(client, run.run_id, 1, "llm_distill")
    address = cluster.addresses()["llm"]
    killed = time.monotonic()
    cluster.kill("llm")  # SIGKILL mid-step; kept down until the coordinator's own call retries (~7.5 s) are spent
    wait = _wait_for_event(client, run.run_id, seq, lambda e: e.kind == "warning" and "waiting up to" in e.message)
    assert wait.message.startswith(f"llm server (llm at {address}), round 1 step distill: "), wait.message
    waiting_after_s = time.monotonic() - killed
    assert cluster.restart("llm") == address  # back on the port the coordinator knows
    restarted_s = time.monotonic() - killed
    final = watch_run(client, run.run_id, quiet=True)
    assert final.state == pb.RUN_SUCCEEDED, final.error
    events = _events(client, run.run_id)
    outages = _back_after(events)
    assert outages, [e.message for e in events]
    print(f"\nllm server killed: the coordinator started waiting after {waiting_after_s:.1f} s, the restart was "
          f"up {restarted_s:.1f} s after the kill, the coordinator was back on it after {max(outages):.1f} s of "
          "waiting and re-issued the step")
    assert any("re-issuing the step" in e.message and e.step == "distill" for e in events)
    assert "llm" in {p.party_id for r in final.rounds if r.round == 1 for p in r.parties}
    client.close()


def test_a_client_killed_and_restarted_at_once_is_waited_for_under_the_default_quorum(cluster):
    client = coordinator_client(cluster)
    run = client.start_run(_spec())  # min_clients unset: every client must take part
    _wait_for_step(client, run.run_id, 1, "client_logits")
    old = cluster.addresses()["client-2"]
    started = time.monotonic()
    new = cluster.restart("client-2")  # SIGKILL; a new port; registered again with the coordinator
    restarted_s = time.monotonic() - started
    assert new != old
    final = watch_run(client, run.run_id, quiet=True)
    assert final.state == pb.RUN_SUCCEEDED, final.error
    round1 = next(r for r in final.rounds if r.round == 1)
    assert "client-2" not in round1.dropped and {"client-1", "client-2"} <= {p.party_id for p in round1.parties}
    assert {r.client.client_id: r.client.address for r in client.list_clients()}["client-2"] == new
    events = _events(client, run.run_id)
    assert any(f"slm client (client-2 at {new}): reached at its new address (was {old})" in e.message
               for e in events), [e.message for e in events]
    outages = _back_after(events)
    assert outages
    print(f"\nclient-2: restart (model load included) took {restarted_s:.1f} s; the coordinator waited "
          f"{max(outages):.1f} s, then re-issued the step at {new}")
    client.close()


def test_resume_refuses_a_run_that_did_not_fail(cluster):
    client = coordinator_client(cluster)
    run = client.start_run(pb.RunSpec(algorithm="zero-shot", max_length=TEST_PRESET.max_length, eval_max_samples=4))
    assert watch_run(client, run.run_id, quiet=True).state == pb.RUN_SUCCEEDED
    with pytest.raises(grpc.RpcError) as err:
        client.resume_run(run.run_id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"run {run.run_id} is RUN_SUCCEEDED" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.resume_run("no-such-run")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    as_client = cluster.coordinator_client(client_identity("client-1"))  # operators only
    with pytest.raises(grpc.RpcError) as err:
        as_client.resume_run(run.run_id)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    as_client.close()
    client.close()


def _restart_coordinator_with(cluster, **settings) -> None:
    svc = cluster.services["coordinator"]
    config = yaml.safe_load(svc.config_path.read_text())
    config.update(settings)
    svc.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cluster.restart("coordinator")


def test_a_run_failed_past_the_grace_period_resumes_once_the_client_is_back(cluster):
    _restart_coordinator_with(cluster, party_grace_s=2.0)
    client = coordinator_client(cluster)
    run = client.start_run(_spec())
    _wait_for_step(client, run.run_id, 1, "client_logits")
    address = cluster.addresses()["client-2"]
    cluster.kill("client-2")  # and kept away past the grace period
    failed = watch_run(client, run.run_id, quiet=True)
    assert failed.state == pb.RUN_FAILED
    assert f"slm client (client-2 at {address}), round 1 step " in failed.error, failed.error
    assert "party_grace_s = 2" in failed.error, failed.error
    failed_at = (failed.current_round, failed.current_step)

    cluster.restart("client-2")  # back on a new port, registered again
    resumed = client.resume_run(run.run_id)
    assert resumed.state in (pb.RUN_PENDING, pb.RUN_RUNNING, pb.RUN_SUCCEEDED) and not resumed.error
    final = watch_run(client, run.run_id, quiet=True)
    assert final.state == pb.RUN_SUCCEEDED, final.error
    events = _events(client, run.run_id)
    resumed_seq = next(e.seq for e in events if e.kind == "state" and e.message.startswith("resumed by an operator"))

    # completed steps were replayed, not redone: no party trained again, and what they recorded stands unchanged
    redone = {(e.round, e.step) for e in events if e.seq > resumed_seq and e.kind == "progress"}
    assert (1, "train_local") not in redone and (0, "evaluate") not in redone, redone
    after = {(r.round, p.party_id): dict(p.metrics) for r in final.rounds for p in r.parties}
    for rec in failed.rounds:
        for party in rec.parties:
            for name, value in party.metrics.items():
                if name.startswith("time/") and name.endswith("/wait"):
                    continue  # the wait for the slowest party of a step that only now completed
                assert after[(rec.round, party.party_id)][name] == value, (rec.round, party.party_id, name)
    # nothing recorded twice: notes, "round complete" events, step events (but the step the run failed at)
    for rec in final.rounds:
        assert len(rec.notes) == len(set(rec.notes)), list(rec.notes)
        assert "client-2" not in rec.dropped, (rec.round, list(rec.dropped), list(rec.notes))
    assert [e.message for e in events if e.kind == "metrics" and e.round == 1].count("round 1 complete") == 1
    steps = [(e.round, e.step) for e in events if e.kind == "step"]
    repeated = {s for s in steps if steps.count(s) > 1}
    assert repeated <= {failed_at}, (repeated, failed_at)
    round1 = next(r for r in final.rounds if r.round == 1)
    assert any("client-2 failed in round 1 before the run was resumed, then completed the step" in n
               for n in round1.notes), list(round1.notes)
    client.close()
