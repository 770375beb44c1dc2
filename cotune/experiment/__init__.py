"""`cotune experiment --config FILE`: does co-tuning help? A grid of variants × tasks × seeds, each cell a run on a
fresh local cluster, and a report directory (JSON of every metric, markdown mean ± s.e. and paired differences, PNG
plots). Ready configs live in cotune/experiment/configs/ (cpu-small, gpu, smoke). See docs/quality.md."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path


def run_experiment(config: str, out: str | None = None, *, only: Sequence[str] | None = None,
                   seeds: Sequence[int] | None = None, report_only: bool = False, plan: bool = False,
                   budget_hours: float | None = None) -> int:
    from cotune.experiment.config import load_config
    from cotune.experiment.grid import plan_grid, run_grid, select_cells, write_config
    from cotune.experiment.store import load_cells
    from cotune.experiment.report import write_report

    if report_only and plan:
        raise SystemExit("--plan and --report-only: pick one (--plan lists the cells left, --report-only rewrites "
                         "the report)")
    if budget_hours is not None and not (budget_hours > 0 and math.isfinite(budget_hours)):
        raise SystemExit(f"--budget must be a positive number of hours, got {budget_hours}")
    if budget_hours is not None and (plan or report_only):
        raise SystemExit("--budget sizes a run of cells; --plan and --report-only run none")
    cfg = load_config(config)
    select_cells(cfg, only, seeds)  # an unknown --only or --seed is refused before anything is written
    target = Path(out or Path("var") / "experiments" / cfg.name).resolve()
    if plan:
        plan_grid(cfg, target, only=only, seeds=seeds)
        return 0
    if report_only and not load_cells(target):
        raise SystemExit(f"{target}: no finished cells of experiment {cfg.name} here; run it without --report-only first")
    write_config(cfg, target)
    failed = 0 if report_only else run_grid(cfg, target, only=only, seeds=seeds,
                                            budget_s=None if budget_hours is None else budget_hours * 3600)
    summary = write_report(target)
    print((target / "summary.md").read_text())
    print(f"report: {target}/summary.md, summary.json, runs.json, plots/ ({summary['cells_succeeded']} cells "
          f"succeeded, {len(summary['failed'])} not)", file=sys.stderr)
    return 1 if failed else 0
