"""Run an experiment's grid: every (task, variant, seed) cell on a fresh local cluster, one after another.

The report directory holds, per cell, `cells/<task>/<variant>/seed<N>.json` (every metric of every party per round,
bytes moved, wall time), written atomically when the cell ends; a rerun skips the cells that succeeded, so an
interrupted grid resumes where it stopped. A failed cell is recorded with its error and tried again on the next run.
Data is split once per (task, seed) under `data/`; converted models and alignment maps are cached beside the report
and shared by every cell.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from cotune.experiment.config import ExperimentConfig, Variant, run_spec
from cotune.experiment.store import SUCCEEDED, cell_path, read_cell, write_json_atomic

NUM_CLIENTS = 2
EVAL_HOLDOUT_SEED = 0  # tasks without a train split: the eval slice is cut with this seed, the same for every seed


def cell_data(out: Path, task: str, preset, seed: int) -> dict[str, Path]:
    """The cell's data files (public, eval, client-1.., union), written once per (task, sizes, seed).

    cotune.data.split_task: the public set and private shards are cut by `seed` from the task's pool split (train
    where it has one); the eval set is the first `eval_size` items of its held-out split. A task with one split only
    (SciQ) has its eval slice cut first by EVAL_HOLDOUT_SEED: every seed scores the same items, so zero-shot runs once
    and the paired differences compare like with like."""
    from cotune.data import require_shared_data, split_task, write_jsonl
    from cotune.demo import write_split

    out_dir = out / "data" / task / f"seed{seed}-n{preset.per_part}-e{preset.eval_size}"
    paths = {name: out_dir / f"{name}.jsonl" for name in ("public", "eval", "union",
                                                           *(f"client-{i}" for i in range(1, NUM_CLIENTS + 1)))}
    if all(p.is_file() for p in paths.values()):
        return paths
    try:
        split = split_task(task, NUM_CLIENTS, seed=seed, per_part=preset.per_part, eval_limit=preset.eval_size,
                           eval_seed=EVAL_HOLDOUT_SEED, data_dir=require_shared_data())
    except ValueError as exc:
        raise SystemExit(f"{task}: {exc}; lower per_part or eval_size for it under task_overrides") from None
    written = write_split(split, out_dir)
    write_jsonl(paths["union"], [ex for part in split.clients for ex in part])
    return {**written, "union": paths["union"]}


def _cluster_config(cfg: ExperimentConfig, out: Path, task: str, variant: Variant, seed: int, work: Path):
    from cotune.demo import cluster_config, prepare_models

    preset = cfg.preset_for(task)
    data = cell_data(out, task, preset, seed)
    models_root = out / "models"  # tiny models are built here; GGUF conversions and healed SLMs in out/model-cache
    models = prepare_models(cfg.models, models_root, algorithm=variant.algorithm, cross_tokenizer=variant.cross_tokenizer)
    config = cluster_config(cfg.models, preset, models_root, data, models, algorithm=variant.algorithm,
                            cross_tokenizer=variant.cross_tokenizer)
    config.workdir = str(work / "cluster")
    for party in [config.llm, *config.clients]:
        set_cell_party(party, cfg, task, seed, eval_cache=out / EVAL_CACHE)
    return config, preset


# where the cells' parties keep their evaluations (cotune.lm.eval_cache): the variants of a (task, seed) all evaluate
# the same untrained models before round 1, so only the first cell of a (task, seed) run on this machine does
EVAL_CACHE = "eval-cache"


def set_cell_party(party: dict, cfg: ExperimentConfig, task: str, seed: int, *, eval_cache: Path | None = None) -> None:
    """What a cell sets in each party's config over the demo's: the seed, the task's evaluation, the dtype, and
    where evaluations are kept (`eval_cache`; None: not kept)."""
    from cotune.data.tasks import evaluation_config_for_task

    party["lora"] = {**party.get("lora", {}), "seed": seed}        # LoRA initialisation
    party["training"] = {**party.get("training", {}), "seed": seed}  # data order
    party["evaluation"] = {**party.get("evaluation", {}), **evaluation_config_for_task(task)}  # MC or generation
    if eval_cache is not None:
        party["evaluation"]["cache_dir"] = str(eval_cache)
    if cfg.dtype != "auto":
        party["model"] = {**party["model"], "dtype": cfg.dtype}


def run_cell(cfg: ExperimentConfig, out: Path, task: str, variant: Variant, seed: int, *, say) -> dict:
    """One cell on a fresh cluster (its own workdir, removed afterwards): the run's summary, or its error."""
    from cotune.cluster import LocalCluster
    from cotune.demo import convert_models, wait_for_clients
    from cotune.lm.device import describe_compute
    from cotune.report import run_summary
    from cotune.watch import watch_run

    from cotune.cluster import down_detached, running_pids

    work = out / "work" / f"{task}-{variant.name}-seed{seed}"
    if running_pids(work / "cluster"):  # a grid killed hard (SIGKILL) left this cell's services running
        down_detached(work / "cluster")
    shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()
    record = {"task": task, "variant": variant.name, "algorithm": variant.algorithm, "seed": seed,
              "settings": cell_settings(cfg, task, variant), "compute": describe_compute(cfg.dtype)}
    try:
        config, preset = _cluster_config(cfg, out, task, variant, seed, work)
        record["preset"] = {k: getattr(preset, k) for k in preset.__dataclass_fields__}
        convert_models(config)
        with LocalCluster(config, start_timeout_s=1800) as cluster:
            client = cluster.coordinator_client()
            try:
                wait_for_clients(client, len(config.clients), timeout_s=600)
                run = client.start_run(run_spec(cfg, task, variant))
                say(f"    run {run.run_id} started")
                run = watch_run(client, run.run_id, quiet=True)
            finally:
                client.close()
        summary = run_summary(run)
        record.update(state=summary["state"], error=summary["error"], run=summary)
    except (Exception, SystemExit) as exc:  # one cell's failure is recorded; the grid goes on
        record.update(state="ERROR", error=f"{type(exc).__name__}: {exc}")
    record["wall_s"] = round(time.monotonic() - started, 1)
    if record["state"] == SUCCEEDED:
        shutil.rmtree(work, ignore_errors=True)  # blob stores and shipped models: gigabytes; the summary is kept
    return record


def cell_settings(cfg: ExperimentConfig, task: str, variant: Variant) -> dict:
    """Everything a cell's result depends on besides its seed: the run spec, the models, the data sizes and the
    parties' training settings. A cell on disk counts as done only if it was run with these."""
    from google.protobuf import json_format

    preset = cfg.preset_for(task)
    spec = json_format.MessageToDict(run_spec(cfg, task, variant), preserving_proto_field_name=True)
    spec.pop("name", None)
    return {"models": cfg.models, "cross_tokenizer": variant.cross_tokenizer, "spec": spec,
            "data": {"per_part": preset.per_part, "eval_size": preset.eval_size},
            "training": {"lr": preset.lr, "batch_size": preset.batch_size, "max_length": preset.max_length},
            "dtype": cfg.dtype}


def done_cells(cfg: ExperimentConfig, out: Path) -> list[tuple[str, Variant, int, dict]]:
    """The cells of the grid that `out` holds finished under the config's current settings, with their records."""
    found = []
    for task, variant, seed in select_cells(cfg, ()):
        record = read_cell(cell_path(out, task, variant.name, seed))
        if is_done(record, cell_settings(cfg, task, variant)):
            found.append((task, variant, seed, record))
    return found


def numerics_conflict(cfg: ExperimentConfig, out: Path,
                      done: list[tuple[str, Variant, int, dict]] | None = None) -> str | None:
    """Why this host may not add cells to the report in `out`, or None when it may: its done cells ran with other
    numerics than this host gives: another dtype or device, or bf16 through fp32-accumulated products
    (cotune.lm.device.Bf16MatmulInFp32) where they used native bf16, or the other way round. bf16 is not reproducible
    across these: the RTE zero-shot cell rerun that way on an AVX2 CPU moved the public loss by 0.1% and flipped 5 of
    277 SmolLM2 answers against the AMX cell, about what a change of dtype does (docs/quality.md, "Dtype"), so one
    table would mix two realisations of the same runs. `done`: done_cells(cfg, out) when the caller has read them."""
    from cotune.experiment.report import compute_label
    from cotune.lm.device import describe_compute

    here = compute_label(describe_compute(cfg.dtype), processor=False)
    kinds: dict[str, int] = {}
    for _, _, _, record in done_cells(cfg, out) if done is None else done:
        kind = compute_label(record.get("compute") or {}, processor=False)
        kinds[kind] = kinds.get(kind, 0) + 1
    others = {k: n for k, n in kinds.items() if k != here}
    if not others:
        return None
    return (f"{out} holds {', '.join(f'{n} cell(s) run in {k}' for k, n in others.items())}; this host would run "
            f"{here}. Scores of the same run move between these (answers near a tie flip), so the report would mix "
            "two realisations of its grid. Resume it on a host like the one its cells ran on (their `compute` says "
            "which), or give this host's cells a report directory of their own (--out).")


def _walls(done: list[tuple[str, Variant, int, dict]]) -> list[tuple[str, str, float]]:
    """(task, variant name, wall seconds) of done cells: what cotune.experiment.plan estimates from."""
    return [(task, variant.name, record.get("wall_s") or 0.0) for task, variant, _, record in done]


def check_same_numerics(cfg: ExperimentConfig, out: Path,
                        done: list[tuple[str, Variant, int, dict]] | None = None) -> None:
    """Refuse (SystemExit) to add cells to a report whose done cells ran with other numerics (numerics_conflict)."""
    conflict = numerics_conflict(cfg, out, done)
    if conflict:
        raise SystemExit(conflict)


# what a report directory keeps in git: the report and the cells it is made from, all a grid resumed on another
# machine needs; the rest (data splits, built models, the services' caches, workdirs) is rebuilt when missing
REPORT_ENTRIES = ("cells/", "config.json", "runs.json", "summary.json", "summary.md", "plots/")


def write_config(cfg: ExperimentConfig, out: Path) -> None:
    """config.json: what the report is about (the report reads it, not the YAML, which may have moved), with each
    (task, variant)'s cell settings, so the report leaves out cells run under other settings."""
    out.mkdir(parents=True, exist_ok=True)
    # the report directory can be committed as it is: everything but REPORT_ENTRIES is left out of git, whichever
    # folders the cells' clusters add
    (out / ".gitignore").write_text("/*\n!/.gitignore\n" + "".join(f"!/{name}\n" for name in REPORT_ENTRIES))
    write_json_atomic(out / "config.json", {
        "source": cfg.source, "name": cfg.name, "models": cfg.models, "tasks": cfg.tasks, "seeds": cfg.seeds,
        "rounds": cfg.rounds, "dtype": cfg.dtype,
        "variants": [{**v.__dict__, "seed_free": v.seed_free} for v in cfg.variants],
        "preset": cfg.preset, "task_overrides": cfg.task_overrides, "references": cfg.references,
        "cell_settings": {f"{t}/{v.name}": cell_settings(cfg, t, v) for t in cfg.tasks for v in cfg.variants}})


def is_done(record: dict | None, settings: dict) -> bool:
    return bool(record) and record.get("state") == SUCCEEDED and record.get("settings") == settings


def select_cells(cfg: ExperimentConfig, only: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None) -> list[tuple[str, Variant, int]]:
    """The cells `--only` and `--seed` name, in run order. Each `only` name is a task or a variant of the config: the
    cells kept are those whose task is among the tasks named (any task if none is) and whose variant is among the
    variants named (any if none is), so `--only arc_easy --only fedbiot` is ARC-Easy's FedBiOT cells; `seeds` keeps
    the cells of those seeds (a seed-free variant runs with the config's first seed only). An unknown name or seed
    is refused."""
    only = list(only or [])
    tasks, variants = set(cfg.tasks), {v.name for v in cfg.variants}
    unknown = [name for name in only if name not in tasks | variants]
    if unknown:
        raise SystemExit(f"--only {', '.join(unknown)}: not a task or variant of experiment {cfg.name} "
                         f"(tasks: {', '.join(cfg.tasks)}; variants: {', '.join(v.name for v in cfg.variants)})")
    bad_seeds = [s for s in seeds or () if s not in cfg.seeds]
    if bad_seeds:
        raise SystemExit(f"--seed {', '.join(map(str, bad_seeds))}: not a seed of experiment {cfg.name} "
                         f"(seeds: {', '.join(map(str, cfg.seeds))})")
    want_tasks = {n for n in only if n in tasks} or tasks
    want_variants = {n for n in only if n in variants} or variants
    want_seeds = set(seeds or ()) or set(cfg.seeds)
    return [c for c in cfg.cells() if c[0] in want_tasks and c[1].name in want_variants and c[2] in want_seeds]


def _cells_to_run(cfg: ExperimentConfig, out: Path, only, seeds, done: list[tuple[str, Variant, int, dict]],
                  say) -> list[tuple[str, Variant, int]]:
    """The selected cells not among `done` (done_cells); says how many there are, and how many succeeded under
    other settings."""
    cells = select_cells(cfg, only, seeds)
    finished = {(task, variant.name, seed) for task, variant, seed, _ in done}
    todo = [c for c in cells if (c[0], c[1].name, c[2]) not in finished]
    stale = [c for c in todo if (read_cell(cell_path(out, c[0], c[1].name, c[2])) or {}).get("state") == SUCCEEDED]
    say(f"experiment {cfg.name}: {len(cells)} cells ({len(cells) - len(todo)} done before, {len(todo)} to run); "
        f"report in {out}")
    if stale:
        say(f"    {len(stale)} of them succeeded before under other settings (spec, models, sizes, dtype): run again")
    return todo


def plan_grid(cfg: ExperimentConfig, out: Path, *, only: Sequence[str] | None = None,
              seeds: Sequence[int] | None = None, stream=None) -> None:
    """`--plan`: the cells left and how long they will take (cotune.experiment.plan), and whether this host may run
    them; runs and writes nothing."""
    from cotune.experiment.plan import WallEstimate, plan_table

    def say(text: str) -> None:
        print(text, file=stream or sys.stdout, flush=True)

    done = done_cells(cfg, out)
    todo = _cells_to_run(cfg, out, only, seeds, done, say)
    if not todo:
        return
    say(f"estimated from the wall times of the {len(done)} finished cell(s) here, at the pace of the hosts they ran "
        "on:\n")
    for line in plan_table([(t, v.name, s) for t, v, s in todo], WallEstimate(_walls(done))):
        say(line)
    conflict = numerics_conflict(cfg, out, done)
    say("\nthis host: " + (f"refused. {conflict}" if conflict else "may run them (its numerics match the cells')"))


def run_grid(cfg: ExperimentConfig, out: Path, *, only: Sequence[str] | None = None,
             seeds: Sequence[int] | None = None, budget_s: float | None = None, stream=sys.stderr) -> int:
    """Run every selected cell not yet done (in cfg.cells() order); returns the number of cells that did not
    succeed. With budget_s, a cell starts only if its expected time (cotune.experiment.plan.Forecast) fits in what
    is left of the budget; a cell without one, only if the longest cell time known does (and, when no cell has
    finished anywhere, as a probe). The cells that do not fit are left for a later run."""
    from transformers.utils import logging as hf_logging

    from cotune.experiment.plan import Forecast, duration
    from cotune.experiment.report import cell_headline

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    # building tiny models and converting GGUFs: bars would clutter the grid's log (transformers' own bars, and the
    # GGUF reader's plain tqdm, which only the environment switches off)
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TQDM_DISABLE", "1")
    if threading.current_thread() is threading.main_thread():
        # SIGTERM stops the grid like Ctrl-C: the running cell's cluster is shut down on the way out (its services
        # run in sessions of their own and would outlive a plain exit)
        signal.signal(signal.SIGTERM, _interrupt)

    write_config(cfg, out)
    done = done_cells(cfg, out)
    todo = _cells_to_run(cfg, out, only, seeds, done, say)
    if todo:
        check_same_numerics(cfg, out, done)
    forecast = Forecast(_walls(done))
    started = time.monotonic()
    failed, left = 0, []
    for i, (task, variant, seed) in enumerate(todo, 1):
        expected = forecast(task, variant.name)
        if budget_s is not None:
            budget_left = budget_s - (time.monotonic() - started)
            need = expected if expected is not None else forecast.longest()
            if need is not None and need > budget_left:
                left.append((task, variant, seed, expected))
                continue
            progress = f"; {duration(budget_left)} of the budget left"
        else:
            ahead = forecast.total((t, v.name) for t, v, _ in todo[i - 1:])
            progress = f"; about {duration(ahead)} of cells left" if ahead else ""
        say(f"[{i}/{len(todo)}] {task} · {variant.name} · seed {seed}{progress}")
        record = run_cell(cfg, out, task, variant, seed, say=say)
        write_json_atomic(cell_path(out, task, variant.name, seed), record)
        if record["state"] != SUCCEEDED:
            failed += 1
            say(f"    FAILED after {record['wall_s']:.0f} s: {record['error']}")
        else:
            forecast.record(task, variant.name, record["wall_s"])
            say(f"    done in {record['wall_s']:.0f} s: {cell_headline(record)}")
    if left:
        say(f"--budget: {len(left)} cell(s) did not fit in what was left of it; a later run takes them up: "
            + ", ".join(f"{t} · {v.name} · seed {seed} ({f'~{duration(e)}' if e else 'no estimate'})"
                        for t, v, seed, e in left))
    return failed


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
