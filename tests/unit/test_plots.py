"""`cotune run report`'s files from a synthetic run record (cotune.plots, cotune.run_report): every plot is written as a
valid PNG, REPORT.md embeds each, and data.json holds exactly the record's numbers (read back here from the record
itself, not through cotune.plots); the step timeline places each task where the events say. Also: drawing is the
only thing that imports matplotlib (the CLI's parser and cotune.plots itself do not)."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from cotune.run_report import DATA_FILE, REPORT_FILE, write_report
from cotune.v1 import coordinator_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("accuracy", "public_loss", "kd_loss", "bytes", "timeline")
T0 = 1_700_000_000.0


# -- helpers the integration test shares --------------------------------------------------------------------------
def check_png(path: Path) -> tuple[int, int]:
    """A complete, valid PNG (signature, IHDR first, every chunk's CRC, IEND last; Pillow decodes it to the IHDR's
    size); returns (width, height)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in chunk {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data) and chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND", path
    assert any(kind == b"IDAT" for kind, _ in chunks), path
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert width > 100 and height > 100, (path, width, height)
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decodes every pixel
        assert img.format == "PNG" and img.size == (width, height)
    return width, height


def _metric(run: pb.Run, name: str) -> dict[str, list[list]]:
    out: dict[str, list[list]] = {}
    for rec in sorted(run.rounds, key=lambda r: r.round):
        for p in rec.parties:
            if name in p.metrics and math.isfinite(p.metrics[name]):
                out.setdefault(p.party_id, []).append([rec.round, p.metrics[name]])
    return out


def check_data_matches_record(data: dict, run: pb.Run) -> None:
    """data.json's series are the run record's numbers: metrics per party and round, KD before/after, bytes per
    round and message type, and one timeline bar per recorded task, as long as its time/<step>/wall."""
    series = data["series"]
    assert data["run_id"] == run.run_id and data["state"] == pb.RunState.Name(run.state)
    assert series["accuracy"] == _metric(run, "eval_accuracy")
    assert series["public_loss"] == _metric(run, "public_loss")
    before, after = _metric(run, "distill_kd_before"), _metric(run, "distill_kd_after")
    assert series["kd_loss"] == {pid: {"before": before.get(pid, []), "after": after.get(pid, [])}
                                 for pid in set(before) | set(after)}
    recs = sorted(run.rounds, key=lambda r: r.round)
    assert series["bytes"]["rounds"] == [r.round for r in recs]
    for direction in ("sent", "received"):
        kinds = {k for r in recs for k in getattr(r, f"bytes_{direction}")}
        assert set(series["bytes"][direction]) == kinds
        for kind, values in series["bytes"][direction].items():
            assert values == [getattr(r, f"bytes_{direction}").get(kind, 0) for r in recs], (direction, kind)
    walls = {(rec.round, key[len("time/"):-len("/wall")], p.party_id): value for rec in recs for p in rec.parties
             for key, value in p.metrics.items() if key.startswith("time/") and key.endswith("/wall")}
    bars = {(b["round"], b["step"], b["row"]): b["seconds"] for b in series["timeline"]["bars"] if b["row"] != "coordinator"}
    assert bars == walls
    assert data["plots"] == {name: f"{name}.png" if series[name] else None for name in PLOTS}


def check_report_files(out: Path, run: pb.Run) -> dict:
    """Every plot with data is a valid PNG that REPORT.md embeds; returns data.json."""
    data = json.loads((out / DATA_FILE).read_text(), parse_constant=lambda c: pytest.fail(f"{c} in data.json"))
    report = (out / REPORT_FILE).read_text()
    assert run.run_id in report
    for name, file in data["plots"].items():
        if file is not None:
            check_png(out / file)
            assert f"]({file})" in report, name
    return data


# -- a synthetic run --------------------------------------------------------------------------------------------
def _run() -> tuple[pb.Run, list[pb.RunEvent]]:
    run = pb.Run(run_id="r-plots", spec=pb.RunSpec(algorithm="fedmkt", rounds=2, clients=["client-1", "client-2"]),
                 state=pb.RUN_SUCCEEDED, current_round=2, created_at=T0, updated_at=T0 + 60)
    parties = ("llm", "client-1", "client-2")
    for rnd in range(3):
        rec = run.rounds.add(round=rnd, started_at=T0 + 20 * rnd, finished_at=T0 + 20 * rnd + 19)
        rec.bytes_sent["tokenizer" if rnd == 0 else "distill.teachers.shard"] = 1000 * (rnd + 1)
        rec.bytes_received["public_logits.shard"] = 700 + rnd
        if rnd == 0:
            rec.bytes_received["vocab_map"] = 123_456
        for i, pid in enumerate(parties):
            m = rec.parties.add(party_id=pid).metrics
            m["eval_accuracy"] = float("nan") if (pid, rnd) == ("llm", 1) else 0.25 + 0.1 * rnd + 0.01 * i
            m["public_loss"] = 10.0 - rnd - 0.1 * i
            m["time/evaluate/wall"] = 1.5 + i
            m["time/evaluate/total"] = 1.2 + i
            if rnd:
                m["distill_kd_before"] = 5.0 - rnd + 0.1 * i
                m["distill_kd_after"] = 4.5 - rnd + 0.1 * i
                m["time/distill/wall"] = 3.0 + i
                if pid != "llm":
                    m["time/set_lora/wall"] = 0.25
    events = [pb.RunEvent(seq=1, time=T0, kind="state", state=pb.RUN_RUNNING, message="running")]

    def add(**kw):
        events.append(pb.RunEvent(seq=len(events) + 1, **kw))

    for rnd in range(3):
        base = T0 + 20 * rnd
        add(time=base + 0.5, kind="step", round=rnd, step="evaluate")
        for i, pid in enumerate(parties):
            add(time=base + 2.5 + i, kind="progress", round=rnd, step="evaluate", party_id=pid, done=7, total=7,
                message="evaluate")
        if rnd:
            add(time=base + 6.0, kind="step", round=rnd, step="client_distill")  # named unlike its tasks, "distill"
            for i, pid in enumerate(parties):
                add(time=base + 10.0 + i, kind="progress", round=rnd, step="distill", party_id=pid, done=4,
                    total=4, message="distill")
            add(time=base + 14.0, kind="step", round=rnd, step="set_lora")  # no progress: the step event places it
    add(time=T0 + 60, kind="state", state=pb.RUN_SUCCEEDED, message="RUN_SUCCEEDED")
    return run, events


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run, events = _run()
    out = tmp_path_factory.mktemp("report")
    written = write_report(run, events, out)
    return run, events, out, written


def test_every_plot_is_a_valid_png_and_the_report_embeds_it(report):
    run, _, out, written = report
    assert {p.name for p in written} == {REPORT_FILE, DATA_FILE, *(f"{n}.png" for n in PLOTS)}
    assert {p.name for p in out.iterdir()} == {p.name for p in written}
    data = check_report_files(out, run)
    assert all(data["plots"][n] == f"{n}.png" for n in PLOTS)
    report_text = (out / REPORT_FILE).read_text()
    assert "| 1 | client-1 |" in report_text  # the metrics table, the bytes and profile tables beside the plots
    assert "tokenizer sent / received" in report_text and "| 2 | distill | client-2 |" in report_text


def test_data_json_holds_exactly_the_record_s_numbers(report):
    run, _, out, _ = report
    data = json.loads((out / DATA_FILE).read_text())
    check_data_matches_record(data, run)
    series = data["series"]
    assert [r for r, _ in series["accuracy"]["llm"]] == [0, 2]  # the NaN of round 1 is not drawn
    assert series["kd_loss"]["client-2"] == {"before": [[1, 5.0 - 1 + 0.1 * 2], [2, 5.0 - 2 + 0.1 * 2]],
                                             "after": [[1, 4.5 - 1 + 0.1 * 2], [2, 4.5 - 2 + 0.1 * 2]]}
    assert series["bytes"]["received"]["vocab_map"] == [123_456, 0, 0]
    assert data["summary"]["rounds"][1]["parties"]["llm"]["eval_accuracy"] is None  # NaN: null, still JSON


def test_the_timeline_places_each_task_where_the_events_say(report):
    run, events, out, _ = report
    timeline = json.loads((out / DATA_FILE).read_text())["series"]["timeline"]
    assert timeline["t0"] == T0
    assert timeline["rows"] == ["coordinator", "llm", "client-1", "client-2"]
    bars = {(b["round"], b["step"], b["row"]): b for b in timeline["bars"]}
    # ends at its last progress event: round 1, client-2 (i = 2) finished distilling at +10 + 2 s, after 5 s
    b = bars[(1, "distill", "client-2")]
    assert b["placed"] == "progress" and b["start"] == pytest.approx(20 + 12.0 - 5.0) and b["seconds"] == 5.0
    b = bars[(2, "evaluate", "llm")]
    assert b["placed"] == "progress" and b["start"] == pytest.approx(40 + 2.5 - 1.5)
    # no progress: starts at the step event of its name
    b = bars[(2, "set_lora", "client-1")]
    assert b["placed"] == "step" and b["start"] == pytest.approx(40 + 14.0) and b["seconds"] == 0.25
    # the coordinator's row: each step from its event to the next one, the last to the run's end
    assert bars[(1, "client_distill", "coordinator")]["seconds"] == pytest.approx(8.0)
    assert bars[(2, "set_lora", "coordinator")]["seconds"] == pytest.approx(60 - 54.0)
    assert [r["round"] for r in timeline["rounds"]] == [0, 1, 2]
    assert timeline["rounds"][1]["start"] == pytest.approx(20.5) and timeline["rounds"][1]["end"] == pytest.approx(40.5)


def test_a_run_without_distillation_or_events_leaves_those_plots_out(tmp_path):
    run, _ = _run()
    for rec in run.rounds:
        for p in rec.parties:
            for key in [k for k in p.metrics if k.startswith("distill_kd")]:
                del p.metrics[key]
    written = write_report(run, [], tmp_path)
    assert {p.name for p in written} == {REPORT_FILE, DATA_FILE, "accuracy.png", "public_loss.png", "bytes.png"}
    data = check_report_files(tmp_path, run)
    assert data["plots"]["kd_loss"] is None and data["plots"]["timeline"] is None
    report_text = (tmp_path / REPORT_FILE).read_text()
    assert "no distillation in this run" in report_text and "no events recorded" in report_text


def test_only_drawing_imports_matplotlib():
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        import cotune.cli, cotune.plots, cotune.run_report
        cotune.cli.build_parser()
        print("matplotlib" in sys.modules)
    """)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False"]


def test_run_report_is_a_cli_command():
    from cotune import cli

    args = cli.build_parser().parse_args(["run", "report", "RUN", "--out", "DIR"])
    assert args.fn is cli.cmd_run_report and (args.run_id, args.out) == ("RUN", "DIR")


def test_a_coordinator_step_ends_with_the_run_not_at_the_next_step_after_a_resume():
    from cotune.plots import timeline_series

    run = pb.Run(run_id="r-resumed", state=pb.RUN_SUCCEEDED)
    kinds = [(0.0, "step", pb.RUN_RUNNING, "train_local"), (5.0, "state", pb.RUN_FAILED, ""),
             (3600.0, "state", pb.RUN_PENDING, ""), (3601.0, "step", pb.RUN_RUNNING, "train_local"),
             (3604.0, "state", pb.RUN_SUCCEEDED, ""), (7200.0, "info", pb.RUN_SUCCEEDED, "")]  # an export, later
    events = [pb.RunEvent(seq=i + 1, time=T0 + t, kind=kind, state=state, round=1, step=step)
              for i, (t, kind, state, step) in enumerate(kinds)]
    bars = timeline_series(run, events)["bars"]
    assert [(b["start"], b["seconds"]) for b in bars] == [(0.0, 5.0), (3601.0, 3.0)]
