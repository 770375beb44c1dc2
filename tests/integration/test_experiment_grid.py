"""`cotune experiment` through the real command line on tiny models: each cell a real local cluster (real service
processes, gRPC over loopback), the report written, a rerun skipping finished cells and rerunning a missing one with
the same result (every run starts from fresh party state, and tiny runs on CPU are deterministic)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CONFIG = """name: grid-test
models: tiny
tasks: [arc_easy]
algorithms: [zero-shot, standalone]
seeds: [0]
rounds: 1
preset: {per_part: 4, eval_size: 4, max_length: 48, batch_size: 4}
dtype: fp32
"""


def _experiment(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "cotune.cli", "experiment", "--config", str(config), "--out", str(out),
                           *extra], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_grid_report_and_resume(tmp_path, shared_data):
    config, out = tmp_path / "grid.yaml", tmp_path / "report"
    config.write_text(CONFIG)
    first = _experiment(config, out)
    assert "2 cells (0 done before, 2 to run)" in first.stderr
    cells = {v: json.loads((out / "cells" / "arc_easy" / v / "seed0.json").read_text()) for v in ("zero-shot", "standalone")}
    for variant, cell in cells.items():
        assert cell["state"] == "RUN_SUCCEEDED", cell.get("error")
        # the dtype is part of the cell's settings, and the cell records what it ran on
        assert cell["settings"]["dtype"] == "fp32" and cell["compute"]["dtype"] == "fp32"
        assert cell["compute"]["device"] == "cpu" and cell["compute"]["torch"]
        final = cell["run"]["rounds"][-1]["parties"]
        assert set(final) >= {"client-1", "client-2"}
        for metrics in final.values():
            assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert len(cells["standalone"]["run"]["rounds"]) == 2 and len(cells["zero-shot"]["run"]["rounds"]) == 1
    # standalone's parties before round 1 are zero-shot's (same seed, models and items): their evaluations come from
    # the cache zero-shot's parties filled, with zero-shot's scores; the trained round is evaluated afresh
    before = cells["standalone"]["run"]["rounds"][0]["parties"]
    assert before and all(m.get("eval_cached") == 1.0 for m in before.values())
    assert _scores(cells["standalone"])[0] == _scores(cells["zero-shot"])[0]
    assert not any("eval_cached" in m for m in cells["standalone"]["run"]["rounds"][1]["parties"].values())
    assert not any("eval_cached" in m for m in cells["zero-shot"]["run"]["rounds"][0]["parties"].values())
    assert not (out / "work").exists() or not any((out / "work").iterdir())  # succeeded cells leave no cluster state
    summary = json.loads((out / "summary.json").read_text())
    std = summary["tasks"]["arc_easy"]["standalone"]
    finals = [cells["standalone"]["run"]["rounds"][-1]["parties"][c]["eval_accuracy"] for c in ("client-1", "client-2")]
    assert std["slm"]["mean"] == pytest.approx(sum(finals) / 2) and std["slm"]["n"] == 1
    assert "Ran in fp32 on cpu" in first.stdout
    assert "## Paired difference against zero-shot" in first.stdout and "| standalone |" in first.stdout
    for name in ("arc_easy-rounds.png", "arc_easy-bytes.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resume: nothing left to run; then a lost cell is run again, the same as before
    again = _experiment(config, out)
    assert "2 cells (2 done before, 0 to run)" in again.stderr
    (out / "cells" / "arc_easy" / "zero-shot" / "seed0.json").unlink()
    shutil.rmtree(out / "eval-cache")  # evaluated again, not read back: the rerun shows the run is deterministic
    plan = _experiment(config, out, "--plan", "--seed", "0")  # lists what is left and runs nothing
    assert "2 cells (1 done before, 1 to run)" in plan.stdout and "| arc_easy | zero-shot | 0 | ? | ? |" in plan.stdout
    assert "this host: may run them" in plan.stdout
    assert not (out / "cells" / "arc_easy" / "zero-shot" / "seed0.json").exists()
    third = _experiment(config, out, "--seed", "0")
    assert "2 cells (1 done before, 1 to run)" in third.stderr
    rerun = json.loads((out / "cells" / "arc_easy" / "zero-shot" / "seed0.json").read_text())
    assert _scores(rerun) == _scores(cells["zero-shot"])


def _scores(cell: dict) -> list[dict]:
    """Every metric of every party per round but the timings (which differ from run to run) and the cache's mark."""
    return [{p: {k: v for k, v in m.items() if not k.startswith("time/") and k != "eval_cached"}
             for p, m in r["parties"].items()} for r in cell["run"]["rounds"]]
