"""Plots of a run for people, and the exact numbers each one draws.

`run_series(run, events)` reads the series out of a run record (cotune.v1.Run) and its events (cotune.v1.RunEvent, as
WatchRun replays them); `draw(series, out_dir)` writes one PNG per series that has data. The series are plain JSON
values, so a report can store what each plot drew (data.json) and a test can check a plot against the run record
without reading pixels. matplotlib (its Agg renderer: no display needed) is imported only by `draw`.

The series:

- ``accuracy``, ``public_loss``: the `eval_accuracy` / `public_loss` metric of every party per round (round 0: before
  training), {party: [[round, value], ...]}; values that are not finite (accuracy of a set without multiple choice)
  are left out.
- ``kd_loss``: `distill_kd_before` and `distill_kd_after` of every party that distilled, per round (the KD loss of its
  distillation step before and after it), {party: {"before": [[round, value], ...], "after": [...]}}.
- ``bytes``: what the coordinator moved per round by message type (RoundRecord.bytes_sent / bytes_received),
  {"rounds": [...], "sent": {type: [bytes per round]}, "received": {...}}.
- ``timeline``: the steps per party, as a Gantt chart with one panel per round. The run record holds no start times,
  so each bar is placed from what the record and the events do hold:

  * the coordinator's row: its current step (Run.current_step) from each "step" event to the next one, or to the
    run's end ("state" event: succeeded, failed, cancelled), whichever comes first; the coordinator's own work (e.g.
    alignment builds, aggregation) shows there too;
  * a party's row: one bar per task the round record timed, `time/<step>/wall` seconds long (the task on that party,
    transfers and waits for it included). It ends at the task's last "progress" event (the coordinator emits one
    for the operation's final state, before pulling its result blobs); a task that reported no progress starts at
    the "step" event of the same name in that round (most steps are named as their tasks), else at the round's
    first step event. Each bar says which it used (`placed`: "progress", "step" or "round").

  {"t0": the run's first event (epoch s), "rounds": [{"round", "start", "end"} (s since t0)], "rows": [...],
  "bars": [{"row", "round", "step", "start" (s since t0), "seconds", "placed"}]}; a panel's x axis is seconds since
  its round's start.
"""

from __future__ import annotations

import math
from pathlib import Path

from cotune.report import _party_order, human_bytes
from cotune.v1 import coordinator_pb2 as pb

COORDINATOR_ROW = "coordinator"
FILES = {"accuracy": "accuracy.png", "public_loss": "public_loss.png", "kd_loss": "kd_loss.png",
         "bytes": "bytes.png", "timeline": "timeline.png"}
TITLES = {"accuracy": "Evaluation accuracy per round", "public_loss": "Public-set loss per round",
          "kd_loss": "KD loss before and after distillation", "bytes": "Bytes moved by the coordinator per round",
          "timeline": "Step timeline"}
DPI = 100
_ENDED = (pb.RUN_SUCCEEDED, pb.RUN_FAILED, pb.RUN_CANCELLED)  # a step in progress ends with the run


# -- series ---------------------------------------------------------------------------------------------------------
def _rounds(run: pb.Run) -> list[pb.RoundRecord]:
    return sorted(run.rounds, key=lambda r: r.round)


def _finite(value: float) -> bool:
    return math.isfinite(value)


def metric_series(run: pb.Run, metric: str) -> dict[str, list[list]]:
    """{party: [[round, value], ...]} of one metric, rounds ascending, parties as the report tables order them."""
    out: dict[str, list[list]] = {}
    for rec in _rounds(run):
        for party in rec.parties:
            value = party.metrics.get(metric)
            if value is not None and _finite(value):
                out.setdefault(party.party_id, []).append([rec.round, value])
    return {pid: out[pid] for pid in sorted(out, key=_party_order)}


def kd_series(run: pb.Run) -> dict[str, dict[str, list[list]]]:
    before, after = metric_series(run, "distill_kd_before"), metric_series(run, "distill_kd_after")
    return {pid: {"before": before.get(pid, []), "after": after.get(pid, [])}
            for pid in sorted(set(before) | set(after), key=_party_order)}


def bytes_series(run: pb.Run) -> dict:
    recs = _rounds(run)
    kinds = {direction: sorted({k for r in recs for k in getattr(r, f"bytes_{direction}")})
             for direction in ("sent", "received")}
    if not any(kinds.values()):
        return {}
    return {"rounds": [r.round for r in recs],
            **{direction: {k: [int(getattr(r, f"bytes_{direction}").get(k, 0)) for r in recs] for k in names}
               for direction, names in kinds.items()}}


def timeline_series(run: pb.Run, events) -> dict:
    """Bars of the step timeline (see the module's docstring for how each is placed)."""
    events = sorted(events, key=lambda e: e.seq)
    if not events:
        return {}
    t0 = min(e.time for e in events)
    steps = [e for e in events if e.kind == "step"]
    bars = []
    current = None  # the coordinator's step in progress

    def close(at: float) -> None:
        bars.append({"row": COORDINATOR_ROW, "round": current.round, "step": current.step,
                     "start": current.time - t0, "seconds": max(0.0, at - current.time), "placed": "step"})

    for e in events:
        ends = e.kind == "step" or (e.kind == "state" and e.state in _ENDED)
        if current is not None and ends:
            close(e.time)
            current = None
        if e.kind == "step":
            current = e
    if current is not None:  # the run is still going: up to its last event
        close(max(e.time for e in events))
    last_progress: dict[tuple, float] = {}
    for e in events:
        if e.kind == "progress":
            last_progress[(e.round, e.step, e.party_id)] = e.time
    step_start: dict[tuple, float] = {}
    round_start: dict[int, float] = {}
    for e in steps:
        step_start[(e.round, e.step)] = e.time  # the last one: a step a resumed run redid is timed by its last run
        round_start.setdefault(e.round, e.time)
    for rec in _rounds(run):
        for party in sorted(rec.parties, key=lambda p: _party_order(p.party_id)):
            for key in sorted(party.metrics):
                if not (key.startswith("time/") and key.endswith("/wall")):
                    continue
                step = key[len("time/"):-len("/wall")]
                seconds = party.metrics[key]
                if (rec.round, step, party.party_id) in last_progress:
                    start, placed = last_progress[(rec.round, step, party.party_id)] - seconds, "progress"
                elif (rec.round, step) in step_start:
                    start, placed = step_start[(rec.round, step)], "step"
                else:
                    start, placed = round_start.get(rec.round, rec.started_at or t0), "round"
                bars.append({"row": party.party_id, "round": rec.round, "step": step, "start": start - t0,
                             "seconds": seconds, "placed": placed})
    rounds = []
    for rnd in sorted({b["round"] for b in bars}):
        mine = [b for b in bars if b["round"] == rnd]
        rounds.append({"round": rnd, "start": min(b["start"] for b in mine),
                       "end": max(b["start"] + b["seconds"] for b in mine)})
    rows = [COORDINATOR_ROW] if steps else []
    rows += sorted({b["row"] for b in bars} - {COORDINATOR_ROW}, key=_party_order)
    return {"t0": t0, "rounds": rounds, "rows": rows, "bars": bars}


def run_series(run: pb.Run, events=()) -> dict:
    """Every plot's series (empty where the run has no such data: e.g. no KD in FedAvg, no timeline without events)."""
    return {"accuracy": metric_series(run, "eval_accuracy"), "public_loss": metric_series(run, "public_loss"),
            "kd_loss": kd_series(run), "bytes": bytes_series(run), "timeline": timeline_series(run, events)}


# -- drawing ----------------------------------------------------------------------------------------------------------
def draw(series: dict, out_dir, *, title: str = "") -> dict[str, Path]:
    """Write the PNG of every series that has data into `out_dir`; returns {series name: path}."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend; PNGs render with Agg

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drawers = {"accuracy": _draw_metric, "public_loss": _draw_metric, "kd_loss": _draw_kd, "bytes": _draw_bytes,
               "timeline": _draw_timeline}
    written = {}
    for name, fn in drawers.items():
        data = series.get(name)
        if not data:
            continue
        fig = fn(Figure, data, name)
        fig.suptitle(f"{TITLES[name]}" + (f" ({title})" if title else ""))
        path = out / FILES[name]
        fig.savefig(path, format="png", dpi=DPI)
        written[name] = path
    return written


def _colors(names) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _round_axis(ax, rounds) -> None:
    """Rounds on the x axis: a tick per round (up to 20 of them, else integer ticks), a margin either side."""
    from matplotlib.ticker import MaxNLocator

    rounds = sorted(set(rounds))
    if rounds and len(rounds) <= 20:
        ax.set_xticks(range(rounds[0], rounds[-1] + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rounds:
        ax.set_xlim(rounds[0] - 0.5, rounds[-1] + 0.5)
    ax.set_xlabel("round (0: before training)")
    ax.grid(True, alpha=0.3)


def _draw_metric(Figure, data: dict, name: str):
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    colors = _colors(list(data))
    for pid, points in data.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=pid, color=colors[pid])
    ax.set_ylabel({"accuracy": "eval accuracy", "public_loss": "public loss (nats per token)"}[name])
    _round_axis(ax, [p[0] for points in data.values() for p in points])
    ax.legend(loc="best", fontsize="small")
    return fig


def _draw_kd(Figure, data: dict, name: str):
    """Left: each party's KD loss before (open circle) and after (filled) its distillation, joined, per round (the
    parties side by side); right: the change, after − before (below zero: the step brought the student closer to
    its teachers)."""
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    levels, changes = fig.subplots(1, 2)
    colors = _colors(list(data))
    width = 0.7 / max(len(data), 1)
    for i, (pid, sides) in enumerate(data.items()):
        dx = (i - (len(data) - 1) / 2) * width
        before, after = dict(map(tuple, sides["before"])), dict(map(tuple, sides["after"]))
        for rnd in sorted(set(before) | set(after)):
            ys = [v for v in (before.get(rnd), after.get(rnd)) if v is not None]
            levels.plot([rnd + dx] * len(ys), ys, color=colors[pid], linewidth=1.5)
            if rnd in before:
                levels.plot(rnd + dx, before[rnd], marker="o", fillstyle="none", color=colors[pid], linestyle="")
            if rnd in after:
                levels.plot(rnd + dx, after[rnd], marker="o", color=colors[pid], linestyle="")
        both = sorted(set(before) & set(after))
        changes.bar([r + dx for r in both], [after[r] - before[r] for r in both], width=width * 0.9,
                    color=colors[pid], label=pid)
    rounds = [p[0] for sides in data.values() for pts in sides.values() for p in pts]
    levels.set_ylabel("KD loss")
    levels.set_title("before (open) and after (filled) the step", fontsize="medium")
    _round_axis(levels, rounds)
    changes.axhline(0.0, color="black", linewidth=0.8)
    changes.set_ylabel("after − before")
    changes.set_title("change over the step", fontsize="medium")
    _round_axis(changes, rounds)
    fig.legend([Line2D([], [], color=colors[p], marker="o") for p in data], list(data), loc="outside right center",
               fontsize="small", title="party")
    return fig


def _draw_bytes(Figure, data: dict, name: str):
    from matplotlib.ticker import FuncFormatter

    rounds = data["rounds"]
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    kinds = sorted(set(data.get("sent", {})) | set(data.get("received", {})))
    colors = _colors(kinds)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, direction in zip(axes, ("sent", "received")):
        bottom = [0] * len(rounds)
        for kind, values in data.get(direction, {}).items():
            ax.bar(rounds, values, bottom=bottom, label=kind, color=colors[kind], width=0.6)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_title({"sent": "coordinator → parties", "received": "parties → coordinator"}[direction])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_bytes(v)))
        _round_axis(ax, rounds)
    axes[0].set_ylabel("bytes")
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize="small",
                   title="message type")
    return fig


def _draw_timeline(Figure, data: dict, name: str):
    rounds, rows, bars = data["rounds"], data["rows"], data["bars"]
    steps = sorted({b["step"] for b in bars})
    colors = _colors(steps)
    fig = Figure(figsize=(12, 1.2 + (0.45 * len(rows) + 0.9) * len(rounds)), layout="constrained")
    axes = fig.subplots(len(rounds), 1, squeeze=False)[:, 0]
    index = {row: i for i, row in enumerate(rows)}
    for ax, rnd in zip(axes, rounds):
        span = max(rnd["end"] - rnd["start"], 1e-6)
        for b in (b for b in bars if b["round"] == rnd["round"]):
            x = b["start"] - rnd["start"]
            y = index[b["row"]]
            ax.broken_barh([(x, b["seconds"])], (y - 0.38, 0.76), facecolors=colors[b["step"]],
                           edgecolor="black", linewidth=0.3)
            if b["seconds"] > 0.08 * span:
                ax.text(x + b["seconds"] / 2, y, b["step"], ha="center", va="center", fontsize="x-small", clip_on=True)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xlim(0, span * 1.02)
        ax.set_title(f"round {rnd['round']}: {span:.1f} s", fontsize="medium", loc="left")
        ax.grid(True, axis="x", alpha=0.3)
    axes[-1].set_xlabel("seconds since the round's first step")
    from matplotlib.patches import Patch

    fig.legend([Patch(facecolor=colors[s]) for s in steps], steps, loc="outside right center", fontsize="small",
               title="step")
    return fig
