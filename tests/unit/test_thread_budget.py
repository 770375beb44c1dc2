"""Thread budgets on a shared host: the run driver tells each task how many tasks its plan runs at once
(RunContext.parallel_tasks: the step's parties times the step sequences overlapped), and a party on a shared host
(COTUNE_HOST_CORES) gives the task cores / parallel_tasks threads, so a task the plan runs alone uses every core and
overlapped tasks do not oversubscribe them. The count comes from the plan, never from timing."""

from __future__ import annotations

import dataclasses

import torch

from cotune.lm.device import threads_for_task
from cotune.v1 import party_pb2
from tests.unit.test_driver_resume import _driver, _parties


def _parallel(party) -> list[int]:
    return [r.ctx.parallel_tasks for r in party.calls]


def _round(d):
    def clients():
        return d.on_parties(d.clients, 1, "distill", lambda c: d.task(c, 1, "distill_c",
                                                                     evaluate=party_pb2.EvaluateTask()))

    d.task(d.llm, 1, "alone", evaluate=party_pb2.EvaluateTask())
    d.concurrently(clients, lambda: d.task(d.llm, 1, "evaluate", evaluate=party_pb2.EvaluateTask()))


def test_the_plan_says_how_many_tasks_run_at_once(tmp_path):
    parties = _parties()
    d = _driver(tmp_path, parties)
    d.run = dataclasses.replace(d.run, overlap_steps=True)
    _round(d)
    assert _parallel(parties["llm"]) == [1, 2]  # alone; then beside the clients' step (two sequences at once)
    assert _parallel(parties["c1"]) == _parallel(parties["c2"]) == [3]  # two clients × two sequences, at most 3


def test_without_overlap_each_step_counts_only_its_own_parties(tmp_path):
    parties = _parties()
    d = _driver(tmp_path, parties)
    d.run = dataclasses.replace(d.run, overlap_steps=False)
    _round(d)
    assert _parallel(parties["llm"]) == [1, 1]
    assert _parallel(parties["c1"]) == [2]


def test_a_shared_host_gives_a_task_its_share_of_the_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("COTUNE_HOST_CORES", "4")
        assert threads_for_task(1) == 4
        assert threads_for_task(3) == 1
        assert threads_for_task(2) == 2
        assert threads_for_task(0) == 2  # unknown: left as it is
        monkeypatch.setenv("COTUNE_HOST_CORES", "0")  # turned off: every task keeps the process's share
        assert threads_for_task(1) == 2
        monkeypatch.delenv("COTUNE_HOST_CORES")
        torch.set_num_threads(3)
        assert threads_for_task(1) == 3  # a host of its own: the configured count stays
    finally:
        torch.set_num_threads(before)
