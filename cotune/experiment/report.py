"""An experiment's report from its cells: JSON of every metric, a markdown summary (mean ± standard error over seeds,
paired differences against the reference variants) and PNG plots.

What a cell scores (its *final* round, never the best one: choosing a round by its eval score would fit the eval set):
- `llm`: the LLM server's eval score (FedBiOT: its adapter plugged into the full model);
- `slm`: the mean of the clients' eval scores (centralized: its one client).
The eval score is `eval_accuracy` (multiple choice) or the task's generation metric (eval_exact_match, eval_rouge_l).
`bytes`: everything the coordinator sent and received over the run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cotune.data.tasks import GENERATION_METRICS
from cotune.experiment.store import SUCCEEDED, load_cells, write_json_atomic

SCORE_METRICS = ("eval_accuracy", *GENERATION_METRICS.values())  # accuracy carries the generation score too
SIDES = ("llm", "slm")


def _score(metrics: dict) -> float | None:
    for name in SCORE_METRICS:
        value = metrics.get(name)
        if value is not None and math.isfinite(value):
            return value
    return None


def round_scores(run: dict) -> list[dict]:
    """Per round: {"round", "llm", "slm", "clients": {id: score}} (None where a side was not evaluated)."""
    out = []
    for rec in run["rounds"]:
        parties = rec["parties"]
        clients = {pid: _score(m) for pid, m in parties.items() if pid.startswith("client-")}
        clients = {pid: s for pid, s in clients.items() if s is not None}
        out.append({"round": rec["round"], "llm": _score(parties.get("llm", {})),
                    "slm": sum(clients.values()) / len(clients) if clients else None, "clients": clients})
    return out


def cell_scores(record: dict) -> dict:
    """The scores of a succeeded cell's final round (its highest: round 0 for zero-shot), and its bytes moved. The SLM
    score is the mean over the clients scored in that round; `clients_dropped` counts the clients the round dropped
    (their score is missing from that mean)."""
    final = max(round_scores(record["run"]), key=lambda r: r["round"], default=None)
    last = max(record["run"]["rounds"], key=lambda r: r["round"], default={"dropped": []})
    moved = sum(sum(rec["bytes_sent"].values()) + sum(rec["bytes_received"].values()) for rec in record["run"]["rounds"])
    return {"llm": final and final["llm"], "slm": final and final["slm"], "final_round": final and final["round"],
            "clients_dropped": len(last.get("dropped", [])), "bytes": moved}


def cell_headline(record: dict) -> str:
    s = cell_scores(record)
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    return f"LLM {fmt(s['llm'])}, SLM {fmt(s['slm'])} (round {s['final_round']}), {s['bytes'] / 2**20:.1f} MiB moved"


def mean_se(values: list[float]) -> tuple[float | None, float | None, int]:
    """Mean, standard error of the mean (sample sd / √n) and n; None where there is none (no values; one value has no
    standard error). None, not NaN: summary.json stays strict JSON."""
    n = len(values)
    if n == 0:
        return None, None, 0
    mean = sum(values) / n
    if n == 1:
        return mean, None, 1
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n), n


def aggregate(config: dict, cells: list[dict]) -> dict:
    """summary.json: per task and variant, each side's mean ± s.e. over seeds, the paired differences against the
    references (same task and seed; a seed-free variant, zero-shot, pairs with every seed of the other), per-round
    means for the plots, bytes, wall time, and the cells that failed. Only the cells of this config count: its tasks,
    variants and seeds, run with its settings (config["cell_settings"]); the others are counted as `left_out`."""
    settings = config.get("cell_settings", {})
    ours = [c for c in cells if c.get("seed") in config["seeds"]
            and settings.get(f"{c.get('task')}/{c.get('variant')}") is not None
            and c.get("settings") == settings[f"{c.get('task')}/{c.get('variant')}"]]
    ok = [c for c in ours if c.get("state") == SUCCEEDED]
    scores = {(c["task"], c["variant"], c["seed"]): cell_scores(c) for c in ok}
    variants = [v["name"] for v in config["variants"]]
    seed_free = {v["name"] for v in config["variants"] if v.get("seed_free")}
    out = {"config": config, "tasks": {}, "failed": [
        {k: c.get(k) for k in ("task", "variant", "seed", "state", "error")} for c in ours if c not in ok],
        "left_out": len(cells) - len(ours), "cells_succeeded": len(ok), "compute": compute_counts(ok),
        "dtypes": sorted({c["compute"]["dtype"] for c in ok if (c.get("compute") or {}).get("dtype")}),
        "grid_wall_s": round(sum(c.get("wall_s", 0.0) for c in ours), 1)}

    def paired(task: str, name: str, ref: str, side: str) -> dict:
        diffs = []
        for seed in config["seeds"]:
            mine = scores.get((task, name, config["seeds"][0] if name in seed_free else seed))
            other = scores.get((task, ref, config["seeds"][0] if ref in seed_free else seed))
            if mine and other and mine[side] is not None and other[side] is not None:
                diffs.append(mine[side] - other[side])
        if name in seed_free and ref in seed_free:
            diffs = diffs[:1]
        return dict(zip(("mean", "se", "n"), mean_se(diffs)))

    for task in config["tasks"]:
        table = {}
        for name in variants:
            mine = {seed: s for (t, v, seed), s in scores.items() if t == task and v == name}
            cells_here = [c for c in ok if c["task"] == task and c["variant"] == name]
            entry = {"seeds": sorted(mine), "bytes": mean_se([s["bytes"] for s in mine.values()])[0],
                     "wall_s": sum(c["wall_s"] for c in cells_here),
                     "final_rounds": sorted({s["final_round"] for s in mine.values()}),
                     "clients_dropped": sum(s["clients_dropped"] for s in mine.values())}
            for side in SIDES:
                values = [s[side] for s in mine.values() if s[side] is not None]
                entry[side] = dict(zip(("mean", "se", "n"), mean_se(values)))
            entry["per_round"] = _per_round(cells_here)
            entry["vs"] = {ref: {side: paired(task, name, ref, side) for side in SIDES}
                           for ref in config.get("references", []) if ref != name}
            table[name] = entry
        out["tasks"][task] = table
    return out


def _per_round(cells: list[dict]) -> dict:
    """{side: [[round, mean over seeds], ...]} for the plots."""
    rounds: dict[str, dict[int, list[float]]] = {side: {} for side in SIDES}
    for c in cells:
        for r in round_scores(c["run"]):
            for side in SIDES:
                if r[side] is not None:
                    rounds[side].setdefault(r["round"], []).append(r[side])
    return {side: [[k, sum(v) / len(v)] for k, v in sorted(by.items())] for side, by in rounds.items()}


def _cell(stat: dict, signed: bool = False) -> str:
    if not stat or stat["n"] == 0:
        return "—"
    sign = "+" if signed else ""
    if stat["n"] == 1:  # one seed: no standard error to show
        return f"{stat['mean']:{sign}.3f} (n=1)"
    return f"{stat['mean']:{sign}.3f} ± {stat['se']:.3f}" + (f" (n={stat['n']})" if stat["n"] != 3 else "")


def compute_counts(cells: list[dict]) -> dict[str, int]:
    """How many cells ran on each (dtype, device) and processor, e.g. {"bf16 on cpu (Intel Xeon ...)": 32}; bf16
    whose matrix products ran in fp32 on a CPU without native bf16 (cotune.lm.device.Bf16MatmulInFp32) says so."""
    counts: dict[str, int] = {}
    for c in cells:
        key = compute_label(c.get("compute") or {})
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def compute_label(compute: dict, processor: bool = True) -> str:
    """A cell's `compute` in words: "bf16 on cpu (AMD EPYC), matrix products accumulated in fp32"; without the
    processor's name it names the kind of numerics a cell ran with (the grid does not mix kinds in one report)."""
    if not compute:
        return "not recorded"
    return (f"{compute.get('dtype', '?')} on {compute.get('device', '?')}"
            + (f" ({compute['processor']})" if processor and compute.get("processor") else "")
            + (", matrix products accumulated in fp32" if compute.get("bf16_matmul") == "fp32-accumulate" else ""))


def markdown(summary: dict) -> str:
    config = summary["config"]
    tasks = config["tasks"]
    variants = [v["name"] for v in config["variants"]]
    lines = [f"# Experiment {config['name']}", "",
             f"Models: preset `{config['models']}`; {config['rounds']} round(s); seeds {config['seeds']}; "
             f"{summary['cells_succeeded']} cells succeeded; grid wall time {summary['grid_wall_s'] / 3600:.2f} h. "
             "Scores are the final round's, mean ± standard error over seeds (n = 3 unless shown; n = 1: one seed, no "
             "standard error).", ""]
    compute = summary.get("compute") or {}
    if compute:
        lines += ["Ran in " + "; ".join(f"{key}: {n} cell(s)" for key, n in compute.items()) + "."
                  + (" These cells ran in different dtypes, so their scores are not strictly comparable (a dtype moves "
                     "near-tie choices); pin `dtype` in the config." if len(summary.get("dtypes", [])) > 1 else ""),
                  ""]
    if summary.get("left_out"):
        lines += [f"{summary['left_out']} cell file(s) in this directory belong to other settings or seeds and are left "
                  "out.", ""]
    dropped = [f"{t} · {v}" for t, table in summary["tasks"].items() for v, e in table.items() if e["clients_dropped"]]
    if dropped:
        lines += ["Clients were dropped in the final round of " + ", ".join(dropped) + "; their SLM score is the mean "
                  "of the clients left.", ""]
    for side, title in (("slm", "SLM (mean of the clients)"), ("llm", "LLM (server)")):
        lines += [f"## {title}: eval score", "", "| variant | " + " | ".join(tasks) + " |",
                  "|---|" + "---:|" * len(tasks)]
        for name in variants:
            lines.append(f"| {name} | " + " | ".join(_cell(summary["tasks"][t][name][side]) for t in tasks) + " |")
        lines.append("")
    for ref in config.get("references", []):
        lines += [f"## Paired difference against {ref} (same task and seed)", "",
                  "| variant | " + " | ".join(f"{t} SLM | {t} LLM" for t in tasks) + " |",
                  "|---|" + "---:|---:|" * len(tasks)]
        for name in variants:
            if name == ref:
                continue
            cells = []
            for t in tasks:
                vs = summary["tasks"][t][name]["vs"].get(ref, {})
                cells += [_cell(vs.get("slm"), True), _cell(vs.get("llm"), True)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Bytes moved by the coordinator per run (mean over seeds) and wall time of the variant's runs", "",
              "| variant | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for name in variants:
        cells = []
        for t in tasks:
            e = summary["tasks"][t][name]
            cells.append("—" if e["bytes"] is None else f"{e['bytes'] / 2**20:.1f} MiB, {e['wall_s'] / 60:.0f} min")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if summary["failed"]:
        lines += ["", "## Cells that did not succeed", ""]
        lines += [f"- {f['task']} · {f['variant']} · seed {f['seed']}: {f['state']}: {f['error']}" for f in summary["failed"]]
    return "\n".join(lines) + "\n"


def draw(summary: dict, out_dir: Path) -> list[Path]:
    """Per task with a finished cell: score per round (LLM and SLM panels, a line per variant, mean over seeds) and
    final score against bytes moved (log scale, error bars = s.e.)."""
    from cotune.plots import _colors, _round_axis

    out_dir.mkdir(parents=True, exist_ok=True)
    variants = [v["name"] for v in summary["config"]["variants"]]
    colors = _colors(variants)

    def per_round(ax, table, side, name):
        points = table[name]["per_round"][side]
        if len(points) == 1 and points[0][0] == 0:  # evaluated before training only (zero-shot): a reference line
            ax.axhline(points[0][1], linestyle="--", label=name, color=colors[name])
        elif points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name, color=colors[name])
        _round_axis(ax, [p[0] for e in table.values() for p in e["per_round"][side]])

    def against_bytes(ax, table, side, name):
        e = table[name]
        if not e[side]["n"]:
            return
        if e["bytes"]:
            ax.errorbar([e["bytes"]], [e[side]["mean"]], yerr=[e[side]["se"] or 0.0], fmt="o", capsize=3, label=name,
                        color=colors[name])
        else:  # moves nothing (zero-shot, standalone, centralized): a reference line
            ax.axhline(e[side]["mean"], linestyle="--", label=f"{name} (no bytes)", color=colors[name])
        moved = [t["bytes"] for t in table.values() if t["bytes"]]
        if moved:
            ax.set_xscale("log")
            ax.set_xlim(min(moved) / 3, max(moved) * 3)

    written = []
    for task, table in summary["tasks"].items():
        if not any(e[side]["n"] for e in table.values() for side in SIDES):
            continue  # no cell of this task has finished: no empty plots
        for kind, plot, xlabel, ylabel, title in (
                ("rounds", per_round, "round (0: before training)", "eval score (mean over seeds)",
                 "eval score per round"),
                ("bytes", against_bytes, "bytes moved by the coordinator per run", "final eval score",
                 "final eval score against bytes moved (dashed: runs that move nothing)")):
            path = out_dir / f"{task}-{kind}.png"
            _two_panels(path, f"{task}: {title}", xlabel, ylabel,
                        lambda ax, side: [plot(ax, table, side, name) for name in variants])
            written.append(path)
    return written


def _two_panels(path: Path, title: str, xlabel: str, ylabel: str, fill) -> None:
    """A PNG with an LLM and an SLM panel side by side (shared y axis); fill(ax, side) draws into each."""
    from matplotlib.figure import Figure  # Agg, no pyplot state

    from cotune.plots import DPI

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, side in zip(axes, SIDES):
        fill(ax, side)
        ax.set_title(side.upper())
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(ylabel)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(loc="best", fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, format="png", dpi=DPI)


def write_report(out: Path) -> dict:
    """Read the cells of a report directory and (re)write summary.json, summary.md, runs.json and plots/."""
    config = json.loads((out / "config.json").read_text())
    cells = load_cells(out)
    summary = aggregate(config, cells)
    write_json_atomic(out / "summary.json", summary)
    write_json_atomic(out / "runs.json", [{k: c.get(k) for k in ("task", "variant", "seed", "state", "wall_s", "run")}
                                          for c in cells])
    (out / "summary.md").write_text(markdown(summary))
    draw(summary, out / "plots")
    return summary
