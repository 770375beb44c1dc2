"""`cotune run watch` outside a terminal (a pipe, a log file): plain lines, no carriage returns or escape codes, a line
per step and per piece of work at most its first report, its completion and one every PROGRESS_INTERVAL_S of the
run's time in between; progress says what it counts ("40/224 items", "2/8 batches")."""

from __future__ import annotations

import io
import math
import re

from cotune.v1 import coordinator_pb2 as pb
from cotune.watch import PROGRESS_INTERVAL_S, PlainProgress, watch_run

T0 = 1_700_000_000.0


class FakeClient:
    def __init__(self, events):
        self.events = events

    def watch_run(self, run_id, after_seq=0, timeout=None):
        return iter([e for e in self.events if e.seq > after_seq])

    def get_run(self, run_id):
        return pb.Run(run_id=run_id, state=pb.RUN_SUCCEEDED)


def _events() -> list[pb.RunEvent]:
    """Two rounds of a run: per step, each party reports progress every 0.1 s of run time (some 5000 events)."""
    events = []

    def add(**kw):
        events.append(pb.RunEvent(seq=len(events) + 1, **kw))

    t = T0
    add(time=t, kind="state", state=pb.RUN_RUNNING, message="running")
    for rnd in (1, 2):
        for step, stage, total, seconds in (("train_local", "train", 8, 30.0), ("evaluate", "evaluate", 224, 97.0)):
            add(time=t, kind="step", round=rnd, step=step)
            ticks = int(seconds / 0.1)
            for i in range(ticks + 1):
                for pid in ("client-1", "client-2"):
                    add(time=t + i * 0.1, kind="progress", round=rnd, step=step, party_id=pid,
                        done=total * i // ticks, total=total, message=stage)
            for _ in range(3):  # the coordinator polls the finished operation a few more times
                add(time=t + seconds + 0.5, kind="progress", round=rnd, step=step, party_id="client-1", done=total,
                    total=total, message=stage)
            t += seconds + 1.0
    add(time=t, kind="state", state=pb.RUN_SUCCEEDED, message="RUN_SUCCEEDED")
    return events


def test_outside_a_terminal_watch_prints_a_readable_log():
    events = _events()
    out = io.StringIO()  # isatty() is False: what a pipe or a log file gets
    run = watch_run(FakeClient(events), "r-1", stream=out)
    assert run.state == pb.RUN_SUCCEEDED
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(events) > 5000 and len(lines) < 80, len(lines)
    steps = [e for e in events if e.kind == "step"]
    assert [line for line in lines if not re.search(r": \d+/\d+", line)] == \
           ["run r-1: RUN_RUNNING running"] + [f"[round {e.round}] {e.step}" for e in steps] + ["run r-1: RUN_SUCCEEDED"]
    # per piece of work: the first report, the completion, and at most one line per interval of run time between
    for rnd in (1, 2):
        for step, seconds in (("train_local", 30.0), ("evaluate", 97.0)):
            for pid in ("client-1", "client-2"):
                mine = [line for line in lines if line.startswith(f"[round {rnd}] {step} {pid}")]
                assert len(mine) <= 2 + math.ceil(seconds / PROGRESS_INTERVAL_S), mine
                assert len(mine) == len(set(mine)) and len(mine) >= 2
    # the numbers say what they count; a stage that repeats its step is not repeated
    assert "[round 1] evaluate client-1: 0/224 items" in lines
    assert "[round 1] evaluate client-1: 224/224 items (97 s)" in lines
    assert "[round 2] train_local client-2 train: 8/8 batches (30 s)" in lines
    assert sum(line.startswith("[round 1] evaluate client-1: 224/224") for line in lines) == 1  # polled again: once


def test_progress_lines_come_at_most_every_interval_and_at_completion():
    out = io.StringIO()
    plain = PlainProgress(out, interval_s=5.0)

    def ev(t, done, total=50, party="llm"):
        return pb.RunEvent(time=T0 + t, kind="progress", round=3, step="public_logits", party_id=party, done=done,
                           total=total, message="logits")

    shown = [plain.show(ev(t / 2, done)) for t, done in enumerate(range(0, 50))]  # 0.5 s apart, 24.5 s in all
    assert shown.count(True) == 1 + 4  # the first, then one per 5 s (at 5, 10, 15, 20 s)
    assert plain.show(ev(24.6, 50)) and not plain.show(ev(25.0, 50))  # completion at once, and only once
    assert plain.show(ev(26.0, 3))  # the same step starting over (a retry): new work, shown at once
    assert plain.show(ev(26.0, 0, total=60, party="llm"))  # another total: another piece of work
    lines = out.getvalue().splitlines()
    assert lines[0] == "[round 3] public_logits llm logits: 0/50 samples"
    assert lines[5] == "[round 3] public_logits llm logits: 50/50 samples (25 s)"
    assert lines[6:] == ["[round 3] public_logits llm logits: 3/50 samples",
                         "[round 3] public_logits llm logits: 0/60 samples"]
