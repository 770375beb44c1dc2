"""Where a task's time goes: exclusive phase timing, its collection by the operation worker, and the report."""

from __future__ import annotations

import time

from cotune.profile import collecting, phase
from cotune.report import profile_table, step_profiles
from cotune.rpc.operations import TIME_PREFIX, OperationManager, OpResult
from cotune.v1 import coordinator_pb2 as pb
from cotune.v1 import operations_pb2


def test_nested_phases_are_exclusive_and_never_exceed_the_wall_time():
    started = time.perf_counter()
    with collecting() as profile:
        with phase("forward"):
            time.sleep(0.05)
            with phase("backward"):  # pauses forward
                time.sleep(0.05)
            time.sleep(0.05)
            with phase("forward"):  # the same phase nested: counted once
                time.sleep(0.02)
    wall = time.perf_counter() - started
    assert 0.05 <= profile.seconds["backward"] < 0.09
    assert 0.12 <= profile.seconds["forward"] < 0.2
    assert sum(profile.seconds.values()) <= wall


def test_phases_outside_a_collection_record_nothing():
    with phase("forward"):
        pass
    with collecting() as profile:
        pass
    assert profile.seconds == {}


def test_an_operation_reports_its_phases_and_total():
    ops = OperationManager(workers=1)

    def work(ctx):
        with phase("codec"):
            time.sleep(0.03)
        return OpResult(metrics={"answer": 42})

    op = ops.wait(ops.start("demo", work).id, 10)
    ops.shutdown()
    assert op.state == operations_pb2.OPERATION_SUCCEEDED
    assert op.metrics["answer"] == 42
    assert op.metrics[f"{TIME_PREFIX}codec_s"] >= 0.03
    assert op.metrics[f"{TIME_PREFIX}total_s"] >= op.metrics[f"{TIME_PREFIX}codec_s"]


def test_the_report_lists_each_step_with_the_rest_of_the_work_as_other():
    run = pb.Run(run_id="r")
    rec = run.rounds.add(round=1)
    rec.parties.add(party_id="client-1").metrics.update(
        {"time/train_local/total": 2.0, "time/train_local/forward": 0.5, "time/train_local/backward": 1.0,
         "time/train_local/wall": 2.5, "time/train_local/transfer": 0.1, "train_loss_last": 1.0})
    rec.parties.add(party_id="llm").metrics.update({"time/distill/total": 5.0, "time/distill/wall": 5.2})
    rows = step_profiles(run)
    assert [(r[1], r[2]) for r in rows] == [("distill", "llm"), ("train_local", "client-1")]  # slowest first
    assert rows[1][3]["other"] == 0.5 and rows[0][3]["other"] == 5.0
    table = profile_table(run)
    assert "| 1 | train_local | client-1 | 2.5 |" in table and "train_loss_last" not in table
