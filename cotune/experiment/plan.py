"""How long the cells a grid has left will take, estimated from the wall times of the cells it has finished.

A cell's time is modelled as a task factor times a variant factor (wall ≈ T[task] · V[variant], fitted by least
squares in log space over the finished cells), so a (task, variant) that has not run yet is estimated from the same
variant on the other tasks and the other variants on its task. A (task, variant) with finished cells of its own is
estimated by their mean. A cell has no estimate when its task or its variant has no finished cell, or when no chain
of finished cells links its task to its variant. The figures are the pace of the hosts the finished cells ran on; a
grid run rescales them by the pace it measures on its own host (`Forecast`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np


class WallEstimate:
    """wall_s(task, variant) from finished cells: (task, variant name, wall seconds) triples (a wall time that is
    missing, zero or not finite counts for nothing)."""

    def __init__(self, finished: Iterable[tuple[str, str, float]]):
        walls: dict[tuple[str, str], list[float]] = defaultdict(list)
        for task, variant, wall in finished:
            if wall and math.isfinite(wall) and wall > 0:
                walls[(task, variant)].append(float(wall))
        self.own = {key: sum(v) / len(v) for key, v in walls.items()}
        self._log_factor = _fit_log_additive({k: math.log(v) for k, v in self.own.items()})
        self._component = _components(self.own)

    def __call__(self, task: str, variant: str) -> float | None:
        if (task, variant) in self.own:
            return self.own[(task, variant)]
        t, v = self._component.get(("task", task)), self._component.get(("variant", variant))
        if t is None or t != v:
            return None
        return math.exp(self._log_factor[("task", task)] + self._log_factor[("variant", variant)])

    def longest(self) -> float | None:
        """The longest finished (task, variant)'s mean time; None when nothing has finished."""
        return max(self.own.values(), default=None)


def _fit_log_additive(logs: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """Least squares of log wall = a[task] + b[variant], one equation per finished (task, variant). The system is
    short of full rank (a constant can move from every task to every variant of a component); lstsq's minimum-norm
    solution is one of them, and a[task] + b[variant] is the same in all where the two are connected."""
    if not logs:
        return {}
    nodes = sorted({("task", t) for t, _ in logs} | {("variant", v) for _, v in logs})
    column = {node: i for i, node in enumerate(nodes)}
    design = np.zeros((len(logs), len(nodes)))
    for row, (t, v) in enumerate(logs):
        design[row, column[("task", t)]] = design[row, column[("variant", v)]] = 1.0
    solution = np.linalg.lstsq(design, np.array(list(logs.values())), rcond=None)[0]
    return {node: float(solution[column[node]]) for node in nodes}


def _components(pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Connected components of the task–variant graph whose edges are the finished (task, variant) pairs: only
    inside one does the fit relate a task's factor to a variant's."""
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def root(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for task, variant in pairs:
        parent[root(("task", task))] = root(("variant", variant))
    roots: dict[tuple[str, str], int] = {}
    return {node: roots.setdefault(root(node), len(roots)) for node in list(parent)}


class Forecast:
    """What a grid run expects its cells to take: the estimate from the cells finished before it, rescaled by the
    pace this host has shown against that estimate (its actual over the estimated time of the cells it ran; 1 before
    any), so a slower or faster host's budget and remaining time follow what it measured. A cell that estimate does
    not cover is estimated from this run's own finished cells alone."""

    def __init__(self, finished_before: Iterable[tuple[str, str, float]]):
        self.before = WallEstimate(finished_before)
        self.ran: list[tuple[str, str, float]] = []
        self.here = WallEstimate(())
        self.actual = self.estimated = 0.0

    def _pace(self) -> float:
        return self.actual / self.estimated if self.estimated else 1.0

    def __call__(self, task: str, variant: str) -> float | None:
        est = self.before(task, variant)
        return self.here(task, variant) if est is None else est * self._pace()

    def longest(self) -> float | None:
        """The longest (task, variant) time known, at this host's pace; None when no cell has finished anywhere."""
        known = []
        if self.before.own:
            known.append(self.before.longest() * self._pace())
        if self.here.own:
            known.append(self.here.longest())
        return max(known, default=None)

    def record(self, task: str, variant: str, wall_s: float) -> None:
        """A cell this run finished, in wall_s seconds."""
        if not (math.isfinite(wall_s) and wall_s > 0):
            return
        est = self.before(task, variant)
        if est is not None:
            self.actual += wall_s
            self.estimated += est
        self.ran.append((task, variant, wall_s))
        self.here = WallEstimate(self.ran)

    def total(self, cells: Iterable[tuple[str, str]]) -> float | None:
        """The expected time of these (task, variant) cells, those without an expectation counted at this run's
        mean cell time; None when nothing is known."""
        expected = [self(task, variant) for task, variant in cells]
        known = [e for e in expected if e is not None]
        if len(known) < len(expected) and self.ran:
            return sum(known) + (len(expected) - len(known)) * sum(w for *_, w in self.ran) / len(self.ran)
        return sum(known) if known else None


def duration(seconds: float) -> str:
    """'45 s' below two minutes, '12 min' below an hour and a half, else '2.4 h'."""
    if seconds < 120:
        return f"{max(seconds, 0):.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def plan_table(todo: Sequence[tuple[str, str, int]], estimate: WallEstimate) -> list[str]:
    """The cells left, one line per (task, variant) in run order: its seeds, the time of one cell and of all of
    them; then the total, and what has no estimate."""
    groups: dict[tuple[str, str], list[int]] = {}
    for task, variant, seed in todo:
        groups.setdefault((task, variant), []).append(seed)
    lines = ["| task | variant | seeds | one cell | all |", "|---|---|---|---:|---:|"]
    known_s = 0.0
    unknown: dict[str, int] = {}
    for (task, variant), seeds in groups.items():
        est = estimate(task, variant)
        if est is None:
            unknown[task] = unknown.get(task, 0) + len(seeds)
            lines.append(f"| {task} | {variant} | {', '.join(map(str, seeds))} | ? | ? |")
            continue
        known_s += est * len(seeds)
        lines.append(f"| {task} | {variant} | {', '.join(map(str, seeds))} | {duration(est)} | "
                     f"{duration(est * len(seeds))} |")
    n_known = len(todo) - sum(unknown.values())
    total = f"{n_known} cell(s) estimated at {duration(known_s)}"
    if unknown:
        total += (f"; {sum(unknown.values())} without an estimate (no finished cell links their task to their "
                  f"variant: {', '.join(f'{t} {n}' for t, n in unknown.items())})")
    return [*lines, "", total]
