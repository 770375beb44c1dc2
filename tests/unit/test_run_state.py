"""Per-run, durable party state (cotune.party.runstate), on a real SLM client with a tiny model (no gRPC): runs are
isolated, a restarted party continues a run from its committed state and answers a finished step from its record,
a step staged but never recorded is re-run, and a party that lost a run's state says so instead of starting over."""

from __future__ import annotations

import pytest

from tests.unit.lm_fixtures import needs_tokenizer
from tests.unit.test_party_roles import _cfg, data  # noqa: F401 - the tiny model and data fixture


def _client(data, name):
    from slm_client.client import SLMClient

    root, model_dir = data
    party = SLMClient(_cfg(root, model_dir, name, private=True))
    party.load()
    return party


def _stop(party):
    party.ops.shutdown()
    party.workdir_lock.release()


def _task(party, run_id, key, kind, *, round_=0, resumes=False, **fields):
    from cotune.v1 import operations_pb2, party_pb2

    req = party_pb2.TaskRequest(ctx=party_pb2.RunContext(run_id=run_id, round=round_, task_key=key, resumes=resumes))
    getattr(req, kind).CopyFrom(type(getattr(req, kind))(**fields))
    op = party.start_task(req)
    done = party.ops.wait(op.id, 120)
    assert done.state == operations_pb2.OPERATION_SUCCEEDED, done.error_message
    return done


def _train(party, run_id, key, **kw):
    return _task(party, run_id, key, "train_local", epochs=1, **kw)


@needs_tokenizer
def test_runs_are_isolated_and_each_continues_from_its_own_state(data):
    party = _client(data, "isolated")
    try:
        fresh = party.lora_hash()
        _train(party, "runa", "r0/train")
        trained_a = party.lora_hash()
        assert trained_a != fresh
        _task(party, "runb", "r0/evaluate", "evaluate")  # another run starts from the configured model's adapter
        assert party.lora_hash() == fresh and party.trainer.global_step == 0
        _train(party, "runb", "r0/train")
        assert party.lora_hash() == trained_a  # same seed, same data, same start: the same result, independently
        _task(party, "runa", "r1/evaluate", "evaluate", round_=1, resumes=True)  # back to run A, as it was
        assert party.lora_hash() == trained_a and party.trainer.global_step > 0
    finally:
        _stop(party)


@needs_tokenizer
def test_a_restarted_party_continues_the_run_and_answers_finished_steps_from_its_record(data):
    party = _client(data, "restarted")
    try:
        first = _train(party, "run", "r0/train")
        trained, steps = party.lora_hash(), party.trainer.global_step
    finally:
        _stop(party)
    again = _client(data, "restarted")  # a new process on the same workdir
    try:
        retry = _train(again, "run", "r0/train")  # the coordinator re-asks the step it had started
        assert retry.id == first.id and retry.result == first.result  # the recorded result, not a second training
        assert again.lora_hash() == trained and again.trainer.global_step == steps
        _train(again, "run", "r1/train", round_=1, resumes=True)  # the next step continues from the saved optimizer
        assert again.trainer.global_step == 2 * steps
    finally:
        _stop(again)


@needs_tokenizer
def test_a_step_staged_but_never_recorded_is_discarded_and_re_run(data):
    import torch

    party = _client(data, "crashed")
    try:
        _train(party, "run", "r0/train")
        committed = party.lora_hash()
        with torch.no_grad():  # a later step changed the adapter and staged it; the process dies before its record
            next(p for p in party.model.parameters() if p.requires_grad).add_(1.0)
        party.runs.stage("run", "run/1/r1/train")
        assert party.lora_hash() != committed
    finally:
        _stop(party)
    again = _client(data, "crashed")
    try:
        again.runs.enter("run", True)
        assert again.lora_hash() == committed  # the staged state was not taken for the committed one
        assert not (again.runs.root / "run" / "state.next").exists()
    finally:
        _stop(again)


@needs_tokenizer
def test_a_party_that_lost_a_runs_state_refuses_to_start_it_over(data):
    from cotune.errors import Precondition

    party = _client(data, "lost")
    try:
        with pytest.raises(Precondition, match="holds no saved state for run gone"):
            _train(party, "gone", "r2/train", round_=2, resumes=True)
        _train(party, "new", "r0/train")  # a run it never took part in starts fresh
    finally:
        _stop(party)


@needs_tokenizer
def test_a_refused_request_of_another_run_leaves_the_party_as_it_was(data):
    from cotune.errors import InvalidInput
    from cotune.v1 import common_pb2, party_pb2

    party = _client(data, "refused")
    try:
        _train(party, "runa", "r0/train")
        trained = party.lora_hash()
        garbage = party.store.put_bytes(b"not an adapter at all")
        req = party_pb2.TaskRequest(ctx=party_pb2.RunContext(run_id="runb", round=0, task_key="r0/set"),
                                    set_lora=party_pb2.SetLoraTask(adapter=common_pb2.BlobRef(sha256=garbage.sha256,
                                                                                              size=garbage.size)))
        with pytest.raises(InvalidInput):
            party.start_task(req)  # validated against run B's (fresh) state, refused
        assert party.runs.current == "runa" and party.lora_hash() == trained
    finally:
        _stop(party)


@needs_tokenizer
def test_describe_answers_as_each_run_sees_the_party_across_a_restart(data):
    party = _client(data, "described")
    try:
        fresh = party.describe()
        assert fresh.current_run == "" and fresh.lora_hash
        _train(party, "runa", "r0/train")
        trained = party.describe()
        assert trained.current_run == "runa" and trained.lora_hash != fresh.lora_hash
        _task(party, "runb", "r0/evaluate", "evaluate")  # the party now holds run B (the fresh adapter)
        for_a = party.describe("runa")
        assert (for_a.lora_hash, for_a.described_run, for_a.current_run) == (trained.lora_hash, "runa", "runb")
        assert party.describe("unseen").lora_hash == fresh.lora_hash
    finally:
        _stop(party)
    party = _client(data, "described")  # restarted: nothing in memory, the saved state answers for run A
    try:
        assert party.describe().current_run == ""
        assert party.describe("runa").lora_hash == trained.lora_hash
        assert party.describe("unseen").lora_hash == fresh.lora_hash
    finally:
        _stop(party)
