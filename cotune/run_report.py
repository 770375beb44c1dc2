"""`cotune run report`: a folder people can read for one run, REPORT.md with PNG plots (cotune.plots) beside the
tables of cotune.report, and data.json holding exactly the series each plot drew (plus the run summary), so the
numbers can be checked against the run record without reading an image."""

from __future__ import annotations

import json
import math
from pathlib import Path

from cotune import plots
from cotune.report import bytes_table, markdown_table, profile_table, run_summary
from cotune.v1 import coordinator_pb2 as pb

REPORT_FILE = "REPORT.md"
DATA_FILE = "data.json"
TERMINAL = (pb.RUN_SUCCEEDED, pb.RUN_FAILED, pb.RUN_CANCELLED)
EVENTS_DEADLINE_S = 300.0  # reading a finished run's events (its stream ends after the last one)
LIVE_EVENTS_S = 5.0  # a run still going: its stream stays open, so read what is there for this long


def fetch(client, run_id: str) -> tuple[pb.Run, list[pb.RunEvent]]:
    """The run record and its events (WatchRun from the start). A run still in progress gets the events so far."""
    import grpc

    run = client.get_run(run_id)
    events: list[pb.RunEvent] = []
    finished = run.state in TERMINAL
    try:
        for event in client.watch_run(run_id, timeout=EVENTS_DEADLINE_S if finished else LIVE_EVENTS_S):
            events.append(event)
    except grpc.RpcError as exc:
        if finished or exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    if not finished:
        run = client.get_run(run_id)  # the record as of the last event read (or later)
    return run, events


def write_report(run: pb.Run, events, out_dir) -> list[Path]:
    """Write REPORT.md, data.json and the plots into `out_dir`; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series = plots.run_series(run, events)
    pngs = plots.draw(series, out, title=f"{run.spec.algorithm} run {run.run_id}")
    data = {"run_id": run.run_id, "algorithm": run.spec.algorithm, "state": pb.RunState.Name(run.state),
            "plots": {name: (pngs[name].name if name in pngs else None) for name in plots.FILES},
            "series": series, "summary": _finite_or_null(run_summary(run))}
    (out / DATA_FILE).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    (out / REPORT_FILE).write_text(markdown(run, series, pngs))
    return [out / REPORT_FILE, out / DATA_FILE, *pngs.values()]


def _finite_or_null(value):
    """`value` with every NaN or infinity replaced by null (e.g. eval_accuracy of a set without multiple choice):
    data.json stays standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def _figure(name: str, pngs: dict, missing: str) -> list[str]:
    return [f"![{plots.TITLES[name]}]({pngs[name].name})", ""] if name in pngs else [f"_{missing}_", ""]


def markdown(run: pb.Run, series: dict, pngs: dict) -> str:
    state = pb.RunState.Name(run.state)
    lines = [f"# Run {run.run_id}: {run.spec.algorithm}", "",
             f"- state: {state}" + (f" ({run.error})" if run.error else ""),
             f"- name: {run.spec.name or '-'}",
             f"- rounds: {run.current_round} of {run.spec.rounds} (round 0: the baseline before training)",
             f"- clients: {', '.join(run.spec.clients) or '-'}", ""]
    if state != "RUN_SUCCEEDED":
        lines += [f"_The run is {state}: what follows is what it recorded so far._", ""]
    lines += ["## Accuracy", ""] + _figure("accuracy", pngs, "no party recorded eval_accuracy")
    lines += ["## Public-set loss", ""] + _figure("public_loss", pngs, "no party recorded public_loss")
    lines += ["## KD loss before and after distillation", "",
              "Each distilling party's KD loss (`distill_kd_before`, `distill_kd_after`) at the start and at the end "
              "of its distillation step, per round (left: open circle before, filled after; right: the change).", ""]
    lines += _figure("kd_loss", pngs, "no distillation in this run (no distill_kd_before/after metrics)")
    lines += ["## Metrics per round", "", markdown_table(run) if run.rounds else "_no rounds recorded_", ""]
    lines += ["## Bytes per round", "", "Every transfer the coordinator made, by the message field that named it.", ""]
    lines += _figure("bytes", pngs, "no bytes recorded")
    traffic = bytes_table(run)
    if traffic:
        lines += [traffic, ""]
    lines += ["## Step timeline", "",
              "Where each round's time goes: one panel per round, a row per party and one for the coordinator's "
              "current step. A party's bar is its task's recorded wall time (`time/<step>/wall`), placed by the "
              "task's last progress event, else by the coordinator's step event of the same name (data.json says "
              "which: `placed`).", ""]
    lines += _figure("timeline", pngs, "no events recorded for this run")
    profile = profile_table(run)
    if profile:
        lines += ["Seconds per step and phase, slowest steps of each round first:", "", profile, ""]
    notes = [(rec.round, note) for rec in sorted(run.rounds, key=lambda r: r.round) for note in rec.notes]
    if notes:
        lines += ["## Notes", ""] + [f"- round {rnd}: {note}" for rnd, note in notes] + [""]
    lines += [f"The numbers behind every plot: [{DATA_FILE}]({DATA_FILE}).", ""]
    return "\n".join(lines)
