"""`cotune run report` on a finished tiny run, through the real command line (a subprocess, as a user runs it) against a
real cluster: REPORT.md, data.json and every PNG are written, each PNG is a valid image the report embeds, and
data.json holds the run record's numbers (fetched here with the coordinator client); the step timeline has a bar for
every task the record timed, placed from the run's own events (none by the fallback), within the run's span, one task
at a time per party.

FedCoLLM on the same-tokenizer tiny cluster: it records accuracy, public loss, the LLM's KD before/after its
co-distillation, bytes per message type, and needs no alignment service (a quick run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cotune.run_report import DATA_FILE, REPORT_FILE
from cotune.v1 import coordinator_pb2 as pb
from tests.integration.cluster_fixtures import run_to_end
from tests.unit.test_plots import PLOTS, check_data_matches_record, check_report_files

pytestmark = pytest.mark.integration
CLUSTER_ALGORITHM = "fedcollm"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def finished(coordinator):
    run = run_to_end(coordinator, algorithm="fedcollm", rounds=1, fedcollm=pb.FedCoLLMSpec(kl_weight=20.0))
    assert run.state == pb.RUN_SUCCEEDED, run.error
    return run


def test_cli_report_of_a_finished_run(cluster, coordinator, finished, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "cotune.cli", "run", "report", finished.run_id, "--out", str(out),
                           "--cluster-dir", str(cluster.workdir)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    files = {f"{name}.png" for name in PLOTS} | {REPORT_FILE, DATA_FILE}
    assert {Path(line).name for line in proc.stdout.split()} == files  # the command names what it wrote
    assert {p.name for p in out.iterdir()} == files

    run = coordinator.get_run(finished.run_id)
    data = check_report_files(out, run)  # every PNG valid and embedded in REPORT.md
    check_data_matches_record(data, run)  # accuracy, public loss, KD, bytes, task durations: the record's numbers
    series = data["series"]
    assert set(series["accuracy"]) >= {"llm", "client-1", "client-2"}
    assert [r for r, _ in series["accuracy"]["client-1"]] == [0, 1]
    assert series["kd_loss"]["llm"]["before"] and series["kd_loss"]["llm"]["after"]
    assert sum(sum(v) for v in series["bytes"]["sent"].values()) > 0

    timeline = series["timeline"]
    bars = timeline["bars"]
    events = list(coordinator.watch_run(finished.run_id, timeout=60))
    span = max(e.time for e in events) - timeline["t0"]
    assert timeline["t0"] == min(e.time for e in events)
    steps = [(e.round, e.step) for e in events if e.kind == "step"]
    assert [(b["round"], b["step"]) for b in bars if b["row"] == "coordinator"] == steps
    for b in bars:
        assert b["placed"] in ("progress", "step"), b  # the events place every task of this run
        assert -0.5 <= b["start"] and b["start"] + b["seconds"] <= span + 0.5, (b, span)
    for row in set(b["row"] for b in bars) - {"coordinator"}:  # a party runs one task at a time
        mine = sorted((b for b in bars if b["row"] == row), key=lambda b: b["start"])
        for a, b in zip(mine, mine[1:]):
            assert b["start"] >= a["start"] + a["seconds"] - 1.0, (a, b)
    report = (out / REPORT_FILE).read_text()
    assert "## Step timeline" in report and "| 1 | llm |" in report
    print(f"\nreport of {finished.run_id}: {sorted(files)}; {len(bars)} timeline bars over {span:.1f} s")
