"""The experiment harness's config checks and report arithmetic (cotune.experiment), on hand-made cell records."""

import json
import math
import subprocess

import pytest

from cotune.config import ConfigError
from cotune.experiment.config import load_config
from cotune.experiment.report import aggregate, cell_scores, markdown, mean_se, write_report
from cotune.experiment.config import run_spec
from cotune.experiment.grid import cell_settings, set_cell_party, write_config


def _write(tmp_path, text: str):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return str(path)


BASE = "name: t\nmodels: tiny\ntasks: [arc_easy]\nalgorithms: [zero-shot, standalone, fedmkt]\nseeds: [0, 1, 2]\n"


def test_ready_configs_load():
    for name in ("smoke", "cpu-small", "gpu"):
        cfg = load_config(name)
        assert cfg.tasks and cfg.variants and cfg.seeds
    cpu = load_config("cpu-small")
    assert cpu.source == "cotune/experiment/configs/cpu-small.yaml"  # the same on every machine a report is made on
    assert cpu.tasks == ("arc_easy", "boolq", "rte", "sciq") and len(cpu.seeds) == 3
    assert cpu.preset_for("arc_easy").per_part >= 256 and cpu.preset_for("arc_easy").eval_size >= 500
    assert {v.name for v in cpu.variants} == {"zero-shot", "standalone", "fedmkt", "llm2slm", "fedcollm-cross",
                                              "fedbiot", "centralized", "fedmkt-first-token", "fedmkt-same-span"}
    # the projection alternatives differ from the paper's FedMKT in exactly the one setting they measure
    by_name = {v.name: v for v in cpu.variants}
    assert by_name["fedmkt-first-token"].spec == {"fedmkt": {"projection": "first_token"}}
    assert by_name["fedmkt-same-span"].spec == {"fedmkt": {"skip_span_mismatch": True}}
    # zero-shot is trained by nothing and its eval set is fixed: one cell per task, not one per seed
    assert len(cpu.cells()) == 4 * (1 + 8 * 3)
    # its cells ran in bf16: pinned, so a grid resumed on a host that would pick fp32 does not mix the two
    assert cpu.dtype == "bf16" and load_config("gpu").dtype == "bf16"


@pytest.mark.parametrize("extra, message", [
    ("rounds: 0\n", "rounds must be"),
    ("preset: {per_part: -1}\n", "out of range"),
    ("preset: {perpart: 3}\n", "unknown key"),
    ("variants: {x: {algorithm: fedmkt, spec: {fedmkt: {projektion: first_token}}}}\n", "variant x on arc_easy"),
    ("variants: {x: {algorithm: fedmkt, spec: {fedmkt: {top_k: 0}}}}\n", "variant x on arc_easy: .*top_k"),
    ("variants: {x: {algorithm: fedmkt, spec: {fedcollm: {top_k: 4}}}}\n", "takes `fedmkt` settings"),
    ("variants: {x: {algorithm: fedmkt, spec: {rounds: 9}}}\n", "without algorithm, clients, name, rounds"),
    ("variants: {x: {algorithm: fedmkt, cross_tokenizer: true}}\n", "cross_tokenizer is for fedcollm"),
    ("variants: {a/b: {algorithm: fedmkt}}\n", "not a usable name"),
    ("variants: {boolq: {algorithm: fedmkt}}\n", "is a task's name"),
    ("references: [fedavg]\n", "not among the algorithms"),
    ("task_overrides: {boolq: {eval_size: 3}}\n", "not one of this config's tasks"),
    ("bogus: 1\n", "unknown key"),
    ("dtype: fp64\n", "dtype must be one of auto, fp32, bf16, fp16"),
])
def test_bad_configs_say_what_is_wrong(tmp_path, extra, message):
    text = BASE + extra
    if extra.startswith("variants: {x:"):
        text = text.replace("fedmkt]", "fedmkt, x]")
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_duplicates_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="distinct variant names"):
        load_config(_write(tmp_path, BASE.replace("fedmkt]", "fedmkt, fedmkt]")))
    with pytest.raises(ConfigError, match="distinct task names"):
        load_config(_write(tmp_path, BASE.replace("[arc_easy]", "[arc_easy, arc_easy]")))


def test_unknown_task_and_variant(tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'arc'"):
        load_config(_write(tmp_path, BASE.replace("arc_easy", "arc")))
    with pytest.raises(ConfigError, match="unknown variant 'fedmtk'"):
        load_config(_write(tmp_path, BASE.replace("fedmkt", "fedmtk")))
    with pytest.raises(ConfigError, match="no experiment config"):
        load_config(str(tmp_path / "missing.yaml"))


def test_only_selects_cells_by_task_and_variant(tmp_path):
    from cotune.experiment.grid import select_cells

    cfg = load_config(_write(tmp_path, BASE.replace("[arc_easy]", "[arc_easy, boolq]")))
    assert len(select_cells(cfg)) == len(cfg.cells()) == 2 * (1 + 2 * 3)
    picked = select_cells(cfg, ["arc_easy", "fedmkt"])
    assert [(t, v.name, s) for t, v, s in picked] == [("arc_easy", "fedmkt", s) for s in (0, 1, 2)]
    # several variants: any of them, in run order (seed by seed)
    picked = select_cells(cfg, ["boolq", "fedmkt", "standalone"])
    assert [(v.name, s) for _, v, s in picked] == [(v, s) for s in (0, 1, 2) for v in ("standalone", "fedmkt")]
    assert {t for t, _, _ in select_cells(cfg, ["zero-shot"])} == {"arc_easy", "boolq"}
    with pytest.raises(SystemExit, match="fedmtk: not a task or variant"):
        select_cells(cfg, ["arc_easy", "fedmtk"])


def test_a_config_variant_merges_its_spec(tmp_path):
    cfg = load_config(_write(tmp_path, BASE.replace("fedmkt]", "fedmkt, mkt-ft]")
                             + "variants: {mkt-ft: {algorithm: fedmkt, spec: {fedmkt: {projection: first_token}}}}\n"))

    variant = cfg.variants[-1]
    spec = run_spec(cfg, "arc_easy", variant)
    assert spec.algorithm == "fedmkt" and spec.fedmkt.projection == "first_token"
    assert spec.fedmkt.top_k == cfg.preset_for("arc_easy").top_k  # the demo's settings stay under the variant's


def _settings(cfg, variant):
    return cell_settings(cfg, "arc_easy", next(v for v in cfg.variants if v.name == variant))


def _cell(variant, seed, llm, clients, moved=1000, rounds=((0, None),), settings=None):
    """A succeeded cell whose final round has these scores (None: the party was not evaluated)."""
    parties = {}
    if llm is not None:
        parties["llm"] = {"eval_accuracy": llm}
    for i, acc in enumerate(clients, 1):
        parties[f"client-{i}"] = {"eval_accuracy": acc, "train_loss_last": 1.0}
    early = [{"round": r, "parties": {"client-1": {"eval_accuracy": a}} if a is not None else {},
              "bytes_sent": {}, "bytes_received": {}} for r, a in rounds]
    final = {"round": len(early), "parties": parties, "bytes_sent": {"lora": moved}, "bytes_received": {}}
    return {"task": "arc_easy", "variant": variant, "seed": seed, "state": "RUN_SUCCEEDED", "wall_s": 10.0,
            "settings": settings, "run": {"rounds": [*early, final]}}


def test_scores_are_the_final_round_and_the_clients_mean():
    cell = _cell("fedmkt", 0, 0.5, [0.2, 0.4], rounds=((0, 0.9),))  # a better early round does not count
    scores = cell_scores(cell)
    assert scores["llm"] == 0.5 and scores["slm"] == pytest.approx(0.3) and scores["final_round"] == 1
    assert scores["bytes"] == 1000
    # the final round is the run's last, even when it evaluated no one (then there is no score, not an earlier one)
    cell["run"]["rounds"].append({"round": 2, "parties": {}, "bytes_sent": {}, "bytes_received": {}, "dropped": ["client-2"]})
    scores = cell_scores(cell)
    assert (scores["llm"], scores["slm"], scores["final_round"], scores["clients_dropped"]) == (None, None, 2, 1)


def test_mean_se():
    assert mean_se([1.0]) == (1.0, None, 1)  # one value: no standard error
    mean, se, n = mean_se([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3) and se == pytest.approx(1 / math.sqrt(3))
    assert mean_se([]) == (None, None, 0)


def test_paired_differences(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    write_config(cfg, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    cells = [_cell("zero-shot", 0, 0.40, [0.20, 0.20], settings=_settings(cfg, "zero-shot"))]
    for seed, (std, mkt) in enumerate([(0.30, 0.35), (0.32, 0.33), (0.28, 0.37)]):
        cells.append(_cell("standalone", seed, None, [std, std], settings=_settings(cfg, "standalone")))
        cells.append(_cell("fedmkt", seed, 0.45, [mkt, mkt], settings=_settings(cfg, "fedmkt")))
    cells.append({"task": "arc_easy", "variant": "fedmkt", "seed": 2, "state": "ERROR", "error": "boom", "wall_s": 1.0,
                  "settings": _settings(cfg, "fedmkt")})
    # left out: a seed the config does not run, and a cell run with other settings (another top_k)
    cells.append(_cell("fedmkt", 7, 0.9, [0.9, 0.9], settings=_settings(cfg, "fedmkt")))
    other = _settings(cfg, "standalone")
    cells.append(_cell("standalone", 0, None, [0.9, 0.9], settings={**other, "data": {"per_part": 1, "eval_size": 1}}))
    summary = aggregate(config, cells[:-1] + [cells[-1]])
    mkt = summary["tasks"]["arc_easy"]["fedmkt"]
    assert mkt["slm"]["mean"] == pytest.approx(0.35) and mkt["slm"]["n"] == 3
    diff = mkt["vs"]["standalone"]["slm"]
    assert diff["mean"] == pytest.approx((0.05 + 0.01 + 0.09) / 3) and diff["n"] == 3
    assert diff["se"] == pytest.approx(mean_se([0.05, 0.01, 0.09])[1])
    # zero-shot ran once; it pairs with every seed
    assert mkt["vs"]["zero-shot"]["slm"]["n"] == 3 and mkt["vs"]["zero-shot"]["llm"]["mean"] == pytest.approx(0.05)
    assert mkt["vs"]["standalone"]["llm"]["n"] == 0  # standalone evaluates no LLM: nothing to pair
    assert summary["failed"] == [{"task": "arc_easy", "variant": "fedmkt", "seed": 2, "state": "ERROR", "error": "boom"}]
    assert summary["left_out"] == 2
    # the zero-shot row pairs its one run with every seed of the reference
    zs = summary["tasks"]["arc_easy"]["zero-shot"]["vs"]["standalone"]["slm"]
    assert zs["n"] == 3 and zs["mean"] == pytest.approx(0.20 - 0.30)
    text = markdown(summary)
    assert "| fedmkt | 0.350 ± " in text and "boom" in text and "+0.050 ± " in text


def test_write_report_draws_the_plots(tmp_path):
    cfg = load_config(_write(tmp_path, BASE.replace("[arc_easy]", "[arc_easy, rte]")))
    out = tmp_path / "out"
    write_config(cfg, out)
    for cell in [_cell("zero-shot", 0, 0.4, [0.2], settings=_settings(cfg, "zero-shot")),
                 _cell("fedmkt", 0, 0.5, [0.3], rounds=((0, 0.2),), settings=_settings(cfg, "fedmkt"))]:
        path = out / "cells" / "arc_easy" / cell["variant"] / "seed0.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(cell))
    summary = write_report(out)
    assert summary["cells_succeeded"] == 2
    from PIL import Image

    for name in ("arc_easy-rounds.png", "arc_easy-bytes.png"):
        with Image.open(out / "plots" / name) as image:
            assert image.format == "PNG" and image.size[0] > 500
    assert not list((out / "plots").glob("rte-*"))  # no cell of RTE has run: no empty plots
    # the directory can be committed as it is: the report and its cells go into git, what the grid rebuilds does not
    for rebuilt in ("data/arc_easy/public.jsonl", "models/m/config.json", "model-cache/x", "alignment-cache/y",
                    "work/arc_easy-fedmkt-seed0/cluster/log", "a-cache-added-later/z"):
        (out / rebuilt).parent.mkdir(parents=True, exist_ok=True)
        (out / rebuilt).write_text("rebuilt")
    subprocess.run(["git", "init", "-q", str(out)], check=True)
    subprocess.run(["git", "-C", str(out), "add", "-A"], check=True)
    tracked = subprocess.run(["git", "-C", str(out), "ls-files"], check=True, capture_output=True, text=True).stdout
    assert {line.split("/")[0] for line in tracked.split()} == {
        ".gitignore", "cells", "config.json", "runs.json", "summary.json", "summary.md", "plots"}
    assert json.loads((out / "runs.json").read_text())[0]["variant"] in ("fedmkt", "zero-shot")
    assert "# Experiment t" in (out / "summary.md").read_text()


def test_the_dtype_is_part_of_a_cells_settings_and_reaches_every_party(tmp_path):
    auto = load_config(_write(tmp_path, BASE))
    pinned = load_config(_write(tmp_path, BASE + "dtype: fp32\n"))
    variant = pinned.variants[2]
    assert cell_settings(pinned, "arc_easy", variant)["dtype"] == "fp32"
    # a cell run in another dtype is not done for this config: scores move with the dtype
    assert cell_settings(auto, "arc_easy", variant) != cell_settings(pinned, "arc_easy", variant)
    party = {"model": {"path": "m", "dtype": "auto"}, "training": {"lr": 0.1}}
    set_cell_party(party, pinned, "arc_easy", 2)
    assert party["model"] == {"path": "m", "dtype": "fp32"} and party["training"] == {"lr": 0.1, "seed": 2}
    unpinned = {"model": {"path": "m"}}
    set_cell_party(unpinned, auto, "arc_easy", 0)
    assert "dtype" not in unpinned["model"]  # auto: each party picks, and the cell records what this host picked


def test_the_report_says_which_dtypes_its_cells_ran_in(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    write_config(cfg, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    cpu = {"device": "cpu", "dtype": "bf16", "processor": "Xeon"}
    cells = [{**_cell("zero-shot", 0, 0.4, [0.2], settings=_settings(cfg, "zero-shot")), "compute": cpu},
             {**_cell("standalone", 0, None, [0.3], settings=_settings(cfg, "standalone")), "compute": cpu}]
    text = markdown(aggregate(config, cells))
    assert "Ran in bf16 on cpu (Xeon): 2 cell(s)." in text and "not strictly comparable" not in text
    cells.append({**_cell("fedmkt", 0, 0.5, [0.3], settings=_settings(cfg, "fedmkt")),
                  "compute": {**cpu, "dtype": "fp32", "processor": "EPYC"}})
    summary = aggregate(config, cells)
    assert summary["compute"] == {"bf16 on cpu (Xeon)": 2, "fp32 on cpu (EPYC)": 1}
    assert summary["dtypes"] == ["bf16", "fp32"]
    assert "different dtypes, so their scores are not strictly comparable" in markdown(summary)
    # bf16 run through fp32 products on a CPU without native bf16 is the same dtype, labelled as such
    cells[2]["compute"] = {**cpu, "processor": "EPYC", "bf16_matmul": "fp32-accumulate"}
    summary = aggregate(config, cells)
    assert summary["compute"] == {"bf16 on cpu (Xeon)": 2,
                                  "bf16 on cpu (EPYC), matrix products accumulated in fp32": 1}
    assert summary["dtypes"] == ["bf16"] and "not strictly comparable" not in markdown(summary)


def test_a_report_takes_no_cells_run_with_other_numerics(tmp_path, monkeypatch):
    """bf16 through fp32-accumulated products (a CPU without native bf16) and native bf16 give the same run other
    scores: a report directory holding cells of one kind refuses to add cells of the other; a fresh one takes them."""
    import cotune.lm.device as device
    from cotune.experiment.grid import check_same_numerics
    from cotune.experiment.store import cell_path, write_json_atomic

    cfg = load_config(_write(tmp_path, BASE + "dtype: bf16\n"))
    out = tmp_path / "out"
    monkeypatch.setattr(device, "pick_device", lambda pref="auto": __import__("torch").device("cpu"))
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    check_same_numerics(cfg, out)  # no cells yet: any host
    cell = {**_cell("standalone", 0, None, [0.3], settings=_settings(cfg, "standalone")),
            "compute": {"device": "cpu", "dtype": "bf16", "processor": "Xeon", "bf16_matmul": "native"}}
    write_json_atomic(cell_path(out, "arc_easy", "standalone", 0), cell)
    with pytest.raises(SystemExit, match=r"1 cell\(s\) run in bf16 on cpu; this host would run bf16 on cpu, matrix "
                                         r"products accumulated in fp32.*--out"):
        check_same_numerics(cfg, out)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    check_same_numerics(cfg, out)  # a host like the one the cell ran on
    # a cell of other settings (here: another dtype) is not done, so it does not count
    stale = {**cell, "settings": {**cell["settings"], "dtype": "fp32"}}
    write_json_atomic(cell_path(out, "arc_easy", "standalone", 0), stale)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    check_same_numerics(cfg, out)


def test_cell_times_are_estimated_from_the_finished_cells():
    """wall ≈ task factor × variant factor: a (task, variant) not run yet is estimated from the same variant on other
    tasks and other variants on its task; one that has run, by its own mean; nothing links a lone pair."""
    from cotune.experiment.plan import WallEstimate

    est = WallEstimate([("arc", "standalone", 10.0), ("arc", "fedmkt", 20.0), ("arc", "fedmkt", 40.0),
                        ("boolq", "standalone", 25.0), ("sciq", "fedbiot", 7.0), ("rte", "standalone", 0.0),
                        ("rte", "fedmkt", float("nan"))])
    assert est("arc", "fedmkt") == pytest.approx(30.0)  # its own cells' mean
    assert est("boolq", "fedmkt") == pytest.approx(75.0)  # fedmkt takes 3× standalone on arc; boolq's standalone 25
    assert est("sciq", "fedbiot") == pytest.approx(7.0) and est.longest() == pytest.approx(30.0)
    assert est("sciq", "fedmkt") is None  # sciq·fedbiot shares no task or variant with the rest
    assert est("rte", "standalone") is None  # cells without a usable wall time count for nothing
    assert est("gsm8k", "standalone") is None and est("arc", "centralized") is None
    # timings that no product fits (fedmkt takes 2× standalone on arc, 3× on boolq): least squares in log space takes
    # the geometric mean of the two ratios for sciq, which only standalone links to the rest
    est = WallEstimate([("arc", "standalone", 10.0), ("arc", "fedmkt", 20.0), ("boolq", "standalone", 30.0),
                        ("boolq", "fedmkt", 90.0), ("sciq", "standalone", 50.0)])
    assert est("sciq", "fedmkt") == pytest.approx(50.0 * math.sqrt(6.0))
    assert WallEstimate(()).longest() is None and WallEstimate(())("arc", "fedmkt") is None


def test_seed_selects_cells_and_an_unknown_seed_is_refused(tmp_path):
    from cotune.experiment import run_experiment
    from cotune.experiment.grid import select_cells

    config = _write(tmp_path, BASE)
    cfg = load_config(config)
    picked = select_cells(cfg, ["fedmkt"], [2, 1])
    assert [(v.name, s) for _, v, s in picked] == [("fedmkt", 1), ("fedmkt", 2)]
    assert [v.name for _, v, _ in select_cells(cfg, (), [1])] == ["standalone", "fedmkt"]  # zero-shot: seed 0 only
    with pytest.raises(SystemExit, match=r"--seed 7: not a seed of experiment t \(seeds: 0, 1, 2\)"):
        select_cells(cfg, (), [0, 7])
    with pytest.raises(SystemExit, match="--seed 7"):
        run_experiment(config, str(tmp_path / "fresh"), seeds=[7])
    assert not (tmp_path / "fresh").exists()  # refused before anything is written


def _done_cell(cfg, variant, seed, wall_s, compute=None):
    from cotune.lm.device import describe_compute

    cell = _cell(variant, seed, None, [0.3], settings=_settings(cfg, variant))
    return {**cell, "wall_s": wall_s, "compute": compute or describe_compute(cfg.dtype)}


def test_plan_lists_the_cells_left_with_their_estimates_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import cotune.lm.device as device
    from cotune.experiment import run_experiment
    from cotune.experiment.store import cell_path, write_json_atomic

    config = _write(tmp_path, BASE)
    cfg = load_config(config)
    out = tmp_path / "out"
    write_json_atomic(cell_path(out, "arc_easy", "standalone", 0), _done_cell(cfg, "standalone", 0, 600.0))
    write_json_atomic(cell_path(out, "arc_easy", "fedmkt", 0), _done_cell(cfg, "fedmkt", 0, 1800.0))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert run_experiment(config, str(out), plan=True) == 0
    text = capsys.readouterr().out
    assert "7 cells (2 done before, 5 to run)" in text
    assert "| arc_easy | standalone | 1, 2 | 10 min | 20 min |" in text
    assert "| arc_easy | fedmkt | 1, 2 | 30 min | 60 min |" in text
    assert "| arc_easy | zero-shot | 0 | ? | ? |" in text
    assert "4 cell(s) estimated at 80 min; 1 without an estimate (no finished cell links" in text
    assert "this host: may run them" in text
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # no config.json, no .gitignore, no cell
    for bad in ({"plan": True, "report_only": True}, {"plan": True, "budget_hours": 1.0}):
        with pytest.raises(SystemExit, match="pick one|run none"):
            run_experiment(config, str(out), **bad)
    for hours in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(SystemExit, match="--budget must be a positive number of hours"):
            run_experiment(config, str(out), budget_hours=hours)
    # cells run with native bf16, a host that would accumulate bf16 products in fp32: the plan says it is refused
    cfg16 = load_config(_write(tmp_path, BASE + "dtype: bf16\n"))
    out16 = tmp_path / "out16"
    native = {"device": "cpu", "dtype": "bf16", "processor": "Xeon", "bf16_matmul": "native"}
    write_json_atomic(cell_path(out16, "arc_easy", "standalone", 0), _done_cell(cfg16, "standalone", 0, 60.0, native))
    monkeypatch.setattr(device, "pick_device", lambda pref="auto": __import__("torch").device("cpu"))
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert run_experiment(str(tmp_path / "exp.yaml"), str(out16), plan=True) == 0
    assert "this host: refused. " in capsys.readouterr().out and not (out16 / "config.json").exists()


def _budget_run(tmp_path, monkeypatch, name, budget_s, done=((("standalone", 0), 100.0), (("fedmkt", 0), 1000.0))):
    """run_grid with its cell runner replaced by one that returns a record at once and moves a fake clock on by 200 s
    (the cell's wall time): which cells the grid starts, not what a cell does. Returns (started, log)."""
    import io
    import types

    import cotune.experiment.grid as grid
    from cotune.experiment.store import cell_path, write_json_atomic

    cfg = load_config(_write(tmp_path, BASE))
    out = tmp_path / name
    for (variant, seed), wall in done:
        write_json_atomic(cell_path(out, "arc_easy", variant, seed), _done_cell(cfg, variant, seed, wall))
    clock, started = [0.0], []

    def run_cell(cfg_, out_, task, variant, seed, *, say):
        started.append((variant.name, seed))
        clock[0] += 200.0
        return _done_cell(cfg_, variant.name, seed, 200.0)

    monkeypatch.setattr(grid, "run_cell", run_cell)
    monkeypatch.setattr(grid, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(grid.signal, "signal", lambda *a: None)
    log = io.StringIO()
    assert grid.run_grid(cfg, out, budget_s=budget_s, stream=log) == 0
    return started, log.getvalue()


def test_a_budget_starts_only_the_cells_whose_estimate_fits(tmp_path, monkeypatch):
    # the cells left: zero-shot 0 (no estimate; the longest known cell is fedmkt's 1000 s), standalone 1 (est. 100 s),
    # fedmkt 1 (1000 s), standalone 2, fedmkt 2. Each takes 200 s here: this host runs at half the estimated pace.
    started, log = _budget_run(tmp_path, monkeypatch, "a", 450.0)
    # standalone 1 runs; fedmkt 1 (2000 s at this pace) does not fit, standalone 2 (200 s) after it still does
    assert started == [("standalone", 1), ("standalone", 2)]
    assert "[2/5] arc_easy · standalone · seed 1; 8 min of the budget left" in log
    assert ("--budget: 3 cell(s) did not fit in what was left of it; a later run takes them up: arc_easy · zero-shot "
            "· seed 0 (no estimate), arc_easy · fedmkt · seed 1 (~33 min), arc_easy · fedmkt · seed 2 (~33 min)") in log
    # with 350 s, standalone 2 (at this host's pace 200 s) no longer fits in the 150 s left
    started, log = _budget_run(tmp_path, monkeypatch, "b", 350.0)
    assert started == [("standalone", 1)] and "standalone · seed 2 (~3 min)" in log


def test_a_budget_on_a_fresh_grid_probes_with_its_first_cell(tmp_path, monkeypatch):
    """Nothing has finished anywhere: the first cell starts to measure the pace; then cells without an estimate start
    while the longest cell this run has seen still fits."""
    started, log = _budget_run(tmp_path, monkeypatch, "fresh", 700.0, done=())
    assert started == [("zero-shot", 0), ("standalone", 0), ("fedmkt", 0)]  # 600 s spent; 100 s left < 200 s
    assert "4 cell(s) did not fit" in log and "standalone · seed 1 (~3 min)" in log


def test_without_a_budget_every_cell_runs_and_the_progress_line_says_the_time_ahead(tmp_path, monkeypatch):
    started, log = _budget_run(tmp_path, monkeypatch, "all", None)
    assert started == [("zero-shot", 0), ("standalone", 1), ("fedmkt", 1), ("standalone", 2), ("fedmkt", 2)]
    # fedmkt 2 × 1000 s + standalone 2 × 100 s at the finished cells' pace; zero-shot has no estimate yet
    assert "[1/5] arc_easy · zero-shot · seed 0; about 37 min of cells left" in log
    # after zero-shot (200 s, outside the estimate: the pace stays 1): the same cells, and zero-shot is done
    assert "[2/5] arc_easy · standalone · seed 1; about 37 min of cells left" in log


def test_a_forecast_follows_this_hosts_pace_and_its_own_cells():
    from cotune.experiment.plan import Forecast

    forecast = Forecast([("arc", "standalone", 100.0), ("arc", "fedmkt", 300.0)])
    assert forecast("arc", "fedmkt") == pytest.approx(300.0) and forecast("boolq", "standalone") is None
    assert forecast.total([("arc", "fedmkt"), ("boolq", "standalone")]) == pytest.approx(300.0)
    forecast.record("arc", "standalone", 700.0)  # this host runs 7 times slower
    assert forecast("arc", "fedmkt") == pytest.approx(2100.0) and forecast.longest() == pytest.approx(2100.0)
    forecast.record("boolq", "standalone", 50.0)  # not in the estimate: does not move the pace; estimates itself
    assert forecast("arc", "fedmkt") == pytest.approx(2100.0) and forecast("boolq", "standalone") == pytest.approx(50.0)
    forecast.record("rte", "standalone", 0.0)  # a cell without a usable wall time is not recorded
    # a cell nothing estimates counts at this run's mean cell time
    assert forecast.total([("rte", "fedbiot")]) == pytest.approx(375.0)
    assert Forecast(()).longest() is None and Forecast(()).total([("arc", "fedmkt")]) is None


def test_durations_read_in_the_unit_that_fits():
    from cotune.experiment.plan import duration

    assert [duration(x) for x in (-3.0, 45.4, 200.0, 5399.0, 9000.0)] == ["0 s", "45 s", "3 min", "90 min", "2.5 h"]
