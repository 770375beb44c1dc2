"""The run driver rides out restarts and records nothing twice: stored steps replay without a call, a party that forgot
its operation gets the step again under the same key, a party that is down is waited for (party_grace_s) and then
dropped (a client) or fails the run (the LLM server) with an error naming it, its address, the round and the step; a
replayed run adds no note, event or metric twice, and the clients a step dropped stay dropped on replay. No processes:
parties are in-memory stubs."""

from __future__ import annotations

import threading

import grpc
import pytest

from coordinator.driver import RunCancelled, RunDriver, StepFailed
from coordinator.store import StateStore
from cotune.algorithms.base import PartyRef
from cotune.algorithms.config import RunConfig
from cotune.errors import Precondition
from cotune.rpc.clients import OperationLost, TaskFailed
from cotune.v1 import coordinator_pb2 as pb
from cotune.v1 import operations_pb2, party_pb2
from cotune.wire.blobs import BlobStore

PUB = "p" * 64


class _Down(grpc.RpcError):
    def __init__(self, code=grpc.StatusCode.UNAVAILABLE, details="failed to connect to all addresses"):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def _ok(request) -> operations_pb2.Operation:
    op = operations_pb2.Operation(id="op", kind=request.WhichOneof("task"), state=operations_pb2.OPERATION_SUCCEEDED)
    op.result.Pack(party_pb2.EvaluateResult())
    op.metrics["accuracy"] = 0.5
    return op


class Party:
    """A PartyClient stand-in: `script` is a list of what successive run_task calls do (an exception to raise, or
    None to answer); `up` says whether Describe answers (ready)."""

    def __init__(self, pid: str, address: str, script=(), up=True):
        self.pid, self.address, self.script, self.up = pid, address, list(script), up
        self.calls: list[party_pb2.TaskRequest] = []
        self.describes = 0
        self.closed = False

    def push(self, store, sha):
        return 0

    def pull(self, store, sha):
        return 0

    def describe(self, timeout=30.0, retries=4):
        self.describes += 1
        if not self.up:
            raise _Down()
        return party_pb2.PartyInfo(party_id=self.pid, ready=True, public_set_hash=PUB)

    def run_task(self, request, *, timeout_s, on_progress=None, should_stop=None):
        self.calls.append(request)
        action = self.script.pop(0) if self.script else None
        if action is not None:
            raise action
        return _ok(request)

    def close(self):
        self.closed = True


def _refs():
    return {pid: PartyRef(pid, "llm" if pid == "llm" else "slm", party_pb2.PartyInfo(party_id=pid))
            for pid in ("llm", "c1", "c2")}


def _driver(tmp_path, parties: dict[str, Party], *, run: pb.Run | None = None, grace: float = 5.0, redial=None,
            store: StateStore | None = None) -> RunDriver:
    store = store or StateStore(tmp_path / "state.db")
    run = run or pb.Run(run_id="run", spec=pb.RunSpec(public_set_hash=PUB), state=pb.RUN_RUNNING)
    refs = _refs()
    return RunDriver(run=run, config=RunConfig(), store=store, artifacts=BlobStore(tmp_path / "artifacts"),
                     llm=(refs["llm"], parties["llm"]), clients=[(refs[p], parties[p]) for p in ("c1", "c2")],
                     alignment=None, cancel_event=threading.Event(), redial=redial, party_grace_s=grace)


def _evaluate(d: RunDriver, party: PartyRef, rnd: int = 1):
    return d.task(party, rnd, "evaluate", evaluate=party_pb2.EvaluateTask())


def _events(store: StateStore, kind: str | None = None) -> list[pb.RunEvent]:
    return [e for e in store.events_after("run", 0, limit=100_000) if kind is None or e.kind == kind]


def _parties(**scripts) -> dict[str, Party]:
    return {pid: Party(pid, f"127.0.0.1:{5000 + i}", scripts.get(pid, ())) for i, pid in enumerate(("llm", "c1", "c2"))}


def _replay(tmp_path, d: RunDriver, parties: dict[str, Party], **kw) -> RunDriver:
    """A new driver on the same state, as a restarted or resumed coordinator makes one."""
    return _driver(tmp_path, parties, run=d.store.get_run("run"), store=d.store, **kw)


def test_replay_returns_stored_steps_without_asking_the_party(tmp_path):
    parties = _parties()
    d = _driver(tmp_path, parties)
    d.save()
    first = _evaluate(d, d.llm)
    assert len(parties["llm"].calls) == 1 and first.metrics == {"accuracy": 0.5}
    again = _parties()
    replayed = _replay(tmp_path, d, again)
    out = _evaluate(replayed, replayed.llm)
    assert again["llm"].calls == [] and out.metrics == first.metrics and out.result == first.result


def test_a_forgotten_operation_is_issued_again_under_the_same_key(tmp_path):
    lost = OperationLost(operations_pb2.Operation(id="2941abc", kind="evaluate"), "127.0.0.1:5000")
    parties = _parties(llm=[lost])
    d = _driver(tmp_path, parties)
    out = _evaluate(d, d.llm)
    assert out.metrics == {"accuracy": 0.5}
    keys = [r.ctx.task_key for r in parties["llm"].calls]
    assert keys == ["r1/evaluate/llm", "r1/evaluate/llm"]  # the same step, the same key
    assert parties["llm"].calls[0] == parties["llm"].calls[1]  # and the same request: the party binds keys to it
    messages = [e.message for e in _events(d.store)]
    assert any("no longer knows operation 2941abc" in m for m in messages), messages
    assert any("re-issuing the step" in m for m in messages), messages


def test_a_party_that_is_down_or_loading_is_waited_for(tmp_path):
    parties = _parties(c1=[_Down(), _Down(details="party c1 is still loading its model; retry shortly")])
    c1 = parties["c1"]
    c1.up = False
    d = _driver(tmp_path, parties, grace=30.0)
    threading.Timer(0.6, lambda: setattr(c1, "up", True)).start()
    out = _evaluate(d, d.clients[0])
    assert out.metrics == {"accuracy": 0.5} and len(c1.calls) == 3 and c1.describes >= 2
    messages = [e.message for e in _events(d.store)]
    assert any(m.startswith("slm client (c1 at 127.0.0.1:5001), round 1 step evaluate: UNAVAILABLE") and
               "waiting up to 30 s" in m for m in messages), messages
    assert any("is back after" in m for m in messages), messages


def test_past_the_grace_period_a_client_is_dropped_and_the_llm_fails_the_run(tmp_path):
    parties = _parties(c2=[_Down()] * 3, llm=[_Down()] * 3)
    parties["c2"].up = parties["llm"].up = False
    d = _driver(tmp_path, parties, grace=0.3)
    out = d.on_parties(d.clients, 1, "evaluate", lambda p: _evaluate(d, p), quorum=1)
    assert list(out.ok) == ["c1"]
    why = out.failed["c2"]
    assert why.startswith("slm client (c2 at 127.0.0.1:5002), round 1 step evaluate: still unavailable after"), why
    assert "party_grace_s" in why
    rec = d.round_record(1)
    assert list(rec.dropped) == ["c2"] and rec.notes[0].startswith("evaluate: c2 dropped from round 1: slm client")
    with pytest.raises(StepFailed, match=r"^llm server \(llm at 127.0.0.1:5000\), round 1 step evaluate: still "
                                         r"unavailable after") as err:
        _evaluate(d, d.llm)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    # a client that outlasted the grace period is not waited for again in this run
    parties["c2"].script = [_Down()]
    with pytest.raises(StepFailed, match="still unavailable \\(it already outlasted the grace period"):
        d.task(d.clients[1], 2, "evaluate", evaluate=party_pb2.EvaluateTask())


def test_a_failed_task_names_the_service_its_address_the_round_and_the_step(tmp_path):
    op = operations_pb2.Operation(id="x", kind="distill", state=operations_pb2.OPERATION_FAILED,
                                  error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0], error_message="bad teachers")
    parties = _parties(llm=[TaskFailed(op, "127.0.0.1:5000")])
    d = _driver(tmp_path, parties)
    with pytest.raises(StepFailed) as err:
        _evaluate(d, d.llm)
    assert str(err.value) == ("llm server (llm at 127.0.0.1:5000), round 1 step evaluate: distill OPERATION_FAILED: "
                              "bad teachers")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(parties["llm"].calls) == 1  # a refusal is not retried


def test_a_restarted_client_is_redialled_at_its_registered_address(tmp_path):
    parties = _parties(c1=[_Down()])
    parties["c1"].up = False
    moved = Party("c1", "127.0.0.1:6001")
    d = _driver(tmp_path, parties, redial=lambda ref: moved if ref.party_id == "c1" else parties[ref.party_id])
    out = _evaluate(d, d.clients[0])
    assert out.metrics == {"accuracy": 0.5} and len(moved.calls) == 1
    assert d.describe_party(d.clients[0]) == "slm client (c1 at 127.0.0.1:6001)"
    assert any("reached at its new address (was 127.0.0.1:5001)" in e.message for e in _events(d.store))
    d.close()
    assert parties["c1"].closed and moved.closed


def test_cancelling_while_waiting_for_a_party_stops_at_once(tmp_path):
    parties = _parties(llm=[_Down()])
    parties["llm"].up = False
    d = _driver(tmp_path, parties, grace=600.0)
    threading.Timer(0.3, d._cancel.set).start()
    with pytest.raises(RunCancelled):
        _evaluate(d, d.llm)


def test_notes_events_and_metrics_are_recorded_once_across_replays(tmp_path):
    parties = _parties()
    d = _driver(tmp_path, parties)
    d.save()
    d.set_step(1, "evaluate")
    _evaluate(d, d.llm)
    d.note(1, "set_lora: c1 holds adapter abc… (dtype cast?)")
    d.note(1, "set_lora: c1 holds adapter abc… (dtype cast?)")  # the same note twice in one execution
    d.emit("metrics", round=1, message="round 1 complete")
    d.record_metrics(1, "c1", {"fedavg_weight": 2.0})
    d.record_artifact(1, "aggregate", "a" * 64)
    before = d.store.get_run("run")
    n_events = len(_events(d.store))
    assert list(before.rounds[0].notes) == ["set_lora: c1 holds adapter abc… (dtype cast?)"]

    replayed = _replay(tmp_path, d, _parties())
    replayed.set_step(1, "evaluate")  # the step the run was at: shown again, once
    replayed.set_step(1, "evaluate")
    _evaluate(replayed, replayed.llm)
    replayed.note(1, "set_lora: c1 holds adapter abc… (dtype cast?)")
    replayed.emit("metrics", round=1, message="round 1 complete")
    replayed.record_metrics(1, "c1", {"fedavg_weight": 2.0})
    replayed.record_artifact(1, "aggregate", "a" * 64)
    after = d.store.get_run("run")
    assert list(after.rounds[0].notes) == list(before.rounds[0].notes)
    assert after.rounds[0].finished_at == before.rounds[0].finished_at  # a replay does not touch a finished round
    new = _events(d.store)[n_events:]
    assert [(e.kind, e.step) for e in new] == [("step", "evaluate")]


def test_a_step_that_met_its_quorum_drops_the_same_clients_on_replay(tmp_path):
    parties = _parties(c2=[TaskFailed(operations_pb2.Operation(kind="evaluate", state=operations_pb2.OPERATION_FAILED,
                                                               error_message="out of memory"), "x")])
    d = _driver(tmp_path, parties)
    d.save()
    out = d.on_parties(d.clients, 1, "evaluate", lambda p: _evaluate(d, p), quorum=1)
    assert list(out.failed) == ["c2"]
    notes = list(d.store.get_run("run").rounds[0].notes)

    again = _parties()
    replayed = _replay(tmp_path, d, again)
    out = replayed.on_parties(replayed.clients, 1, "evaluate", lambda p: _evaluate(replayed, p), quorum=1)
    assert list(out.ok) == ["c1"] and out.failed == {"c2": notes[0].split("dropped from round 1: ", 1)[1]}
    assert again["c2"].calls == [] and again["c1"].calls == []  # neither asked again
    run = d.store.get_run("run")
    assert list(run.rounds[0].notes) == notes and list(run.rounds[0].dropped) == ["c2"]


def test_a_client_that_failed_the_run_and_completes_the_step_on_resume_is_no_longer_dropped(tmp_path):
    parties = _parties(c2=[_Down()] * 3)
    parties["c2"].up = False
    d = _driver(tmp_path, parties, grace=0.2)
    d.save()
    with pytest.raises(Precondition, match=r"round 1 evaluate: only 1 of 2 parties succeeded, quorum is 2: c2: slm "
                                           r"client \(c2 at 127.0.0.1:5002\), round 1 step evaluate"):
        d.on_parties(d.clients, 1, "evaluate", lambda p: _evaluate(d, p))
    assert list(d.store.get_run("run").rounds[0].dropped) == ["c2"]

    again = _parties()
    resumed = _replay(tmp_path, d, again)
    out = resumed.on_parties(resumed.clients, 1, "evaluate", lambda p: _evaluate(resumed, p))
    assert sorted(out.ok) == ["c1", "c2"] and again["c1"].calls == [] and len(again["c2"].calls) == 1
    rec = d.store.get_run("run").rounds[0]
    assert list(rec.dropped) == []
    (note,) = rec.notes
    assert note.startswith("evaluate: c2 failed in round 1 before the run was resumed, then completed the step: "
                           "slm client (c2 at 127.0.0.1:5002)")


class Alignment:
    """An AlignmentClient stand-in: `waits` is a list of what successive waits do (an exception, or None to answer
    with the built map); `up` says whether its health check answers SERVING."""

    def __init__(self, address: str, built_sha: str, waits=()):
        self.address, self.built, self.waits, self.up = address, built_sha, list(waits), True
        self.registered: list[str] = []
        self.builds = 0

    def push(self, store, sha):
        return 0

    def pull(self, store, sha):
        return 0

    def serving(self, timeout=5.0):
        return self.up

    def register_tokenizer(self, ref):
        self.registered.append(ref.sha256)

    def build_vocab_map(self, src_hash, dst_hash):
        self.builds += 1
        return operations_pb2.Operation(id=f"build-{self.builds}", kind="vocab_map")

    def wait(self, op, *, timeout_s, on_progress=None):
        action = self.waits.pop(0) if self.waits else None
        if action is not None:
            raise action
        op.state = operations_pb2.OPERATION_SUCCEEDED
        op.blobs["map"].sha256 = self.built
        return op


def _vocab_map_parties(d: RunDriver):
    import numpy as np

    from cotune.align.vocabmap import VocabMap

    src, dst = d.clients[0], d.llm
    for ref, tok, size in ((src, "5" * 64, 4), (dst, "d" * 64, 8)):
        ref.info.tokenizer_hash, ref.info.vocab_size = tok, size
        ref.info.tokenizer_bundle.CopyFrom(d.artifacts.put_bytes(tok.encode()).ref())
    vmap = VocabMap(ids=np.array([0, 1, 2, 7], np.int32), distance=np.zeros(4, np.int32), src_hash="5" * 64,
                    dst_hash="d" * 64)
    return src, dst, d.artifacts.put_bytes(vmap.to_bytes()).sha256


def test_an_alignment_build_the_service_forgot_is_issued_again(tmp_path):
    d = _driver(tmp_path, _parties())
    src, dst, built = _vocab_map_parties(d)
    lost = OperationLost(operations_pb2.Operation(id="build-1", kind="vocab_map"), "127.0.0.1:7000")
    d.alignment = Alignment("127.0.0.1:7000", built, waits=[lost])
    assert d.vocab_map(src, dst) == built
    # the whole build again: tokenizers registered again (a restarted service may not know them), the same request
    assert d.alignment.builds == 2 and len(d.alignment.registered) == 4
    messages = [e.message for e in _events(d.store)]
    assert any(m.startswith("alignment service (at 127.0.0.1:7000), round 0 step align:vocab_map: it no longer knows "
                            "operation build-1") for m in messages), messages


def test_an_alignment_service_that_stays_down_fails_the_build_naming_it(tmp_path):
    d = _driver(tmp_path, _parties(), grace=0.3)
    src, dst, built = _vocab_map_parties(d)
    d.alignment = Alignment("127.0.0.1:7000", built, waits=[_Down()] * 5)
    d.alignment.up = False
    with pytest.raises(StepFailed, match=r"^alignment service \(at 127.0.0.1:7000\), round 0 step align:vocab_map: "
                                         r"still unavailable after [\d.]+ s \(party_grace_s = 0.3\): it does not answer"):
        d.vocab_map(src, dst)
