"""Run an experiment's grid: every (task, variant, seed) cell on a fresh local cluster, one after another.

The report directory holds, per cell, `cells/<task>/<variant>/seed<N>.json` (every metric of every party per round,
bytes moved, wall time), written atomically when the cell ends; a rerun skips the cells that succeeded, so an
interrupted grid resumes where it stopped. A failed cell is recorded with its error and tried again on the next run.
Data is split once per (task, seed) under `data/`; converted models and alignment maps are cached beside the report
and shared by every cell.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from cotune.experiment.config import ExperimentConfig, Variant
from cotune.experiment.store import cell_path, read_cell, write_json_atomic

NUM_CLIENTS = 2
EVAL_HOLDOUT_SEED = 0  # tasks without a train split: the eval slice is cut with this seed, the same for every seed


def cell_data(out: Path, task: str, preset, seed: int) -> dict[str, Path]:
    """The cell's data files (public, eval, client-1.., union), written once per (task, sizes, seed).

    The public set and private shards are cut by `seed` from the task's pool split (cotune.data.tasks.
    federated_splits: train where it has one); the eval set is the first `eval_size` items of its eval split, the same
    for every seed. A task with one split only (SciQ) gives it both: a fixed seeded slice for evaluation, the rest
    for the split. (cotune.data.split_task cuts that slice by the run's seed instead; here every seed scores the same
    items, so zero-shot runs once and the paired differences compare like with like.)"""
    from cotune.data import federated_split, load_task, require_shared_data, seeded_permutation, write_jsonl
    from cotune.data.tasks import federated_splits
    from cotune.demo import write_split

    out_dir = out / "data" / task / f"seed{seed}-n{preset.per_part}-e{preset.eval_size}"
    paths = {name: out_dir / f"{name}.jsonl" for name in ("public", "eval", "union",
                                                           *(f"client-{i}" for i in range(1, NUM_CLIENTS + 1)))}
    if all(p.is_file() for p in paths.values()):
        return paths
    shared = require_shared_data()
    pool_split, eval_split = federated_splits(task)
    pool = load_task(task, pool_split, data_dir=shared)
    if eval_split is not None:
        evaluation = load_task(task, eval_split, data_dir=shared)[: preset.eval_size]
    else:
        order = seeded_permutation(len(pool), EVAL_HOLDOUT_SEED)
        evaluation = [pool[i] for i in order[: preset.eval_size]]
        pool = [pool[i] for i in order[preset.eval_size:]]
    need = preset.per_part * (NUM_CLIENTS + 1)
    if len(pool) < need:
        raise SystemExit(f"{task}: {len(pool)} examples left for the public set and {NUM_CLIENTS} private shards of "
                         f"{preset.per_part}, need {need}; lower per_part or eval_size for it under task_overrides")
    split = federated_split(pool, NUM_CLIENTS, seed=seed, eval_examples=evaluation, per_part=preset.per_part)
    written = write_split(split, out_dir)
    write_jsonl(paths["union"], [ex for part in split.clients for ex in part])
    return {**written, "union": paths["union"]}


def _cluster_config(cfg: ExperimentConfig, out: Path, task: str, variant: Variant, seed: int, work: Path):
    from cotune.data.tasks import evaluation_config_for_task
    from cotune.demo import cluster_config, prepare_models

    preset = cfg.preset_for(task)
    data = cell_data(out, task, preset, seed)
    models_root = out / "models"  # tiny models are built here; GGUF conversions and healed SLMs in out/model-cache
    models = prepare_models(cfg.models, models_root, algorithm=variant.algorithm, cross_tokenizer=variant.cross_tokenizer)
    config = cluster_config(cfg.models, preset, models_root, data, models, algorithm=variant.algorithm,
                            cross_tokenizer=variant.cross_tokenizer)
    config.workdir = str(work / "cluster")
    for party in [config.llm, *config.clients]:
        party["lora"] = {**party.get("lora", {}), "seed": seed}        # LoRA initialisation
        party["training"] = {**party.get("training", {}), "seed": seed}  # data order
        party["evaluation"] = {**party.get("evaluation", {}), **evaluation_config_for_task(task)}  # MC or generation
    return config, preset


def _spec(cfg: ExperimentConfig, preset, variant: Variant):
    from google.protobuf import json_format

    from cotune.demo import demo_spec

    spec = demo_spec(cfg.models, preset, variant.algorithm, cfg.rounds, cross_tokenizer=variant.cross_tokenizer)
    spec.name = f"{cfg.name}/{variant.name}"
    json_format.ParseDict(variant.spec, spec)  # the variant's fields over the demo's
    return spec


def run_cell(cfg: ExperimentConfig, out: Path, task: str, variant: Variant, seed: int, *, say) -> dict:
    """One cell on a fresh cluster (its own workdir, removed afterwards): the run's summary, or its error."""
    from cotune.cluster import LocalCluster
    from cotune.demo import convert_models, wait_for_clients
    from cotune.report import run_summary
    from cotune.v1 import coordinator_pb2 as pb
    from cotune.watch import watch_run

    work = out / "work" / f"{task}-{variant.name}-seed{seed}"
    shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()
    record = {"task": task, "variant": variant.name, "algorithm": variant.algorithm,
              "cross_tokenizer": variant.cross_tokenizer, "variant_spec": variant.spec, "seed": seed,
              "models": cfg.models, "rounds": cfg.rounds}
    try:
        config, preset = _cluster_config(cfg, out, task, variant, seed, work)
        record["preset"] = {k: getattr(preset, k) for k in preset.__dataclass_fields__}
        convert_models(config)
        with LocalCluster(config, start_timeout_s=1800) as cluster:
            client = cluster.coordinator_client()
            try:
                wait_for_clients(client, len(config.clients), timeout_s=600)
                run = client.start_run(_spec(cfg, preset, variant))
                say(f"    run {run.run_id} started")
                run = watch_run(client, run.run_id, quiet=True)
            finally:
                client.close()
        summary = run_summary(run)
        record.update(state=summary["state"], error=summary["error"], run=summary)
    except (Exception, SystemExit) as exc:  # one cell's failure is recorded; the grid goes on
        record.update(state="ERROR", error=f"{type(exc).__name__}: {exc}")
    record["wall_s"] = round(time.monotonic() - started, 1)
    if record["state"] == pb.RunState.Name(pb.RUN_SUCCEEDED):
        shutil.rmtree(work, ignore_errors=True)  # blob stores and shipped models: gigabytes; the summary is kept
    return record


def write_config(cfg: ExperimentConfig, out: Path) -> None:
    """config.json: what the report is about (the report reads it, not the YAML, which may have moved)."""
    write_json_atomic(out / "config.json", {"source": cfg.source, "name": cfg.name, "models": cfg.models,
                                            "tasks": cfg.tasks, "seeds": cfg.seeds, "rounds": cfg.rounds,
                                            "variants": [v.__dict__ for v in cfg.variants], "preset": cfg.preset,
                                            "task_overrides": cfg.task_overrides, "references": cfg.references})


def run_grid(cfg: ExperimentConfig, out: Path, *, only: str | None = None, stream=sys.stderr) -> int:
    """Run every cell not yet done (in cfg.cells() order); returns the number of cells that did not succeed."""
    from transformers.utils import logging as hf_logging

    from cotune.experiment.report import cell_headline

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    hf_logging.disable_progress_bar()  # building tiny models and converting GGUFs: bars would clutter the grid's log

    write_config(cfg, out)
    cells = [c for c in cfg.cells() if only is None or only in (c[0], c[1].name)]
    done = [c for c in cells if (read_cell(cell_path(out, c[0], c[1].name, c[2])) or {}).get("state") == "RUN_SUCCEEDED"]
    todo = [c for c in cells if c not in done]
    say(f"experiment {cfg.name}: {len(cells)} cells ({len(done)} done before, {len(todo)} to run); report in {out}")
    failed, spent = 0, []
    for i, (task, variant, seed) in enumerate(todo, 1):
        eta = f"; about {(sum(spent) / len(spent)) * (len(todo) - i + 1) / 60:.0f} min left" if spent else ""
        say(f"[{i}/{len(todo)}] {task} · {variant.name} · seed {seed}{eta}")
        record = run_cell(cfg, out, task, variant, seed, say=say)
        write_json_atomic(cell_path(out, task, variant.name, seed), record)
        spent.append(record["wall_s"])
        if record["state"] != "RUN_SUCCEEDED":
            failed += 1
            say(f"    FAILED after {record['wall_s']:.0f} s: {record['error']}")
        else:
            say(f"    done in {record['wall_s']:.0f} s: {cell_headline(record)}")
    return failed
