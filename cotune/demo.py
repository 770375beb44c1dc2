"""`cotune demo`: build data and models for a preset, start a local cluster, run, report, shut down.

Presets:
  tiny   random-init small models with real tokenizers (LLM: Mistral's 32k SentencePiece vocabulary; clients:
         GPT-2 and GPT-NeoX byte-level BPE), a slice of ARC-Easy; about a minute on 2 CPU cores.
  small  the real pair: Gemma 3 270M (LLM) and SmolLM2-135M-Instruct (both clients), a small slice of
         ARC-Easy; minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from cotune.cluster import ClusterConfig, LocalCluster
from cotune.data import federated_split, load_task, require_shared_data, write_jsonl
from cotune.report import bytes_table, markdown_table, run_summary
from cotune.rpc.clients import CoordinatorClient
from cotune.v1 import coordinator_pb2 as pb
from cotune.watch import watch_run


@dataclass(frozen=True)
class Preset:
    task: str
    per_part: int          # public set size == each client's private set size
    eval_size: int
    max_length: int
    batch_size: int
    lr: float
    top_k: int
    lam: float             # CE weight in distillation


PRESETS = {
    # Random-init tiny models: their teachers carry no task knowledge, so CE and KD pull apart; the tiny
    # preset weights KD higher (lam 0.2) so that transfer is visible. The real pair uses the paper's 0.9.
    "tiny": Preset(task="arc_easy", per_part=32, eval_size=64, max_length=128, batch_size=8, lr=5e-3, top_k=16, lam=0.2),
    "small": Preset(task="arc_easy", per_part=32, eval_size=60, max_length=128, batch_size=4, lr=2e-4, top_k=16, lam=0.9),
}
NUM_CLIENTS = 2
# Tiny preset models: (party, tokenizer file under shared/data/tokenizers, architecture)
TINY_MODELS = [
    ("llm", "mistral-7b-hf/tokenizer.json", "llama"),
    ("client-1", "gpt2/gpt2.vocab", "gpt2"),
    ("client-2", "gpt-neox-20b/20B_tokenizer.json", "llama"),
]


def prepare_data(preset: Preset, workdir: Path, seed: int = 0) -> dict[str, Path]:
    shared = require_shared_data()
    train = load_task(preset.task, "train", data_dir=shared)
    evaluation = load_task(preset.task, "validation", data_dir=shared)[: preset.eval_size]
    split = federated_split(train, NUM_CLIENTS, seed=seed, eval_examples=evaluation, per_part=preset.per_part)
    out = workdir / "data"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"public": out / "public.jsonl", "eval": out / "eval.jsonl"}
    write_jsonl(paths["public"], split.public)
    write_jsonl(paths["eval"], split.eval)
    for i, part in enumerate(split.clients, 1):
        paths[f"client-{i}"] = out / f"client-{i}.jsonl"
        write_jsonl(paths[f"client-{i}"], part)
    return paths


def prepare_models(preset_name: str, workdir: Path) -> dict[str, str]:
    if preset_name == "small":
        from cotune.lm.model import real_model_path

        slm = str(real_model_path("smollm2-135m"))
        return {"llm": str(real_model_path("gemma3-270m")), "client-1": slm, "client-2": slm}
    from cotune.lm.tiny import make_tiny_model
    from cotune.lm.tokenizers import load_tokenizer

    tokenizers = require_shared_data() / "tokenizers"
    models = {}
    for seed, (party, tok_file, arch) in enumerate(TINY_MODELS):
        out = workdir / "models" / f"tiny-{party}-{arch}"
        if not (out / "config.json").exists():
            make_tiny_model(load_tokenizer(tokenizers / tok_file), out, arch=arch, seed=seed)
        models[party] = str(out)
    return models


def cluster_config(preset_name: str, preset: Preset, workdir: Path, data: dict[str, Path], models: dict[str, str]) -> ClusterConfig:
    cache = str((workdir.parent / "model-cache").resolve())
    training = {"lr": preset.lr, "batch_size": preset.batch_size, "max_length": preset.max_length}

    def party(name: str, private: Path | None) -> dict:
        cfg = {"model": {"path": models[name], "name": Path(models[name]).name, "cache_dir": cache},
               "training": dict(training),
               "data": {"public": str(data["public"]), "eval": str(data["eval"])}}
        if private is not None:
            cfg["data"]["private"] = str(private)
        return cfg

    clients = []
    for i in range(1, NUM_CLIENTS + 1):
        c = party(f"client-{i}", data[f"client-{i}"])
        c["party_id"] = f"client-{i}"
        clients.append(c)
    return ClusterConfig(workdir=str(workdir / "cluster"), llm=party("llm", None), clients=clients,
                         alignment={"workdir": str((workdir.parent / "alignment-cache").resolve())}, coordinator={})


def wait_for_clients(client: CoordinatorClient, expected: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while len(client.list_clients()) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(client.list_clients())} of {expected} clients registered with the coordinator")
        time.sleep(0.2)


def run_demo(*, preset: str = "small", algorithm: str = "fedmkt", rounds: int = 2, json_path: str | None = None,
             workdir: str | None = None, setting: str = "heterogeneous") -> int:
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose {', '.join(PRESETS)}")
    p = PRESETS[preset]
    root = Path(workdir or Path("var") / "demo").resolve() / preset
    started = time.monotonic()
    print(f"cotune demo: preset {preset}, {algorithm}, {rounds} round(s); workdir {root}", file=sys.stderr)
    data = prepare_data(p, root)
    models = prepare_models(preset, root)
    config = cluster_config(preset, p, root, data, models)
    shutil.rmtree(config.workdir, ignore_errors=True)  # run state is per demo; data, models and caches are kept
    config_path = root / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    print(f"cluster config: {config_path} (start it yourself with `cotune cluster up --config {config_path}`)", file=sys.stderr)
    print("starting local cluster (alignment, llm, 2 clients, coordinator)...", file=sys.stderr, flush=True)
    with LocalCluster(config) as cluster:
        client = CoordinatorClient(cluster.addresses()["coordinator"])
        try:
            wait_for_clients(client, NUM_CLIENTS)
            spec = pb.RunSpec(name=f"demo-{preset}", algorithm=algorithm, rounds=rounds, setting=setting, top_k=p.top_k,
                             max_length=p.max_length, lam=p.lam)
            run = client.start_run(spec)
            run = watch_run(client, run.run_id)
        finally:
            client.close()
    elapsed = time.monotonic() - started
    summary = run_summary(run)
    summary["preset"] = preset
    summary["wall_time_s"] = round(elapsed, 1)
    print()
    print(markdown_table(run))
    traffic = bytes_table(run)
    if traffic:
        print()
        print(traffic)
    print(f"\nrun {run.run_id}: {pb.RunState.Name(run.state)} in {elapsed:.0f}s" + (f" - {run.error}" if run.error else ""))
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=2))
        print(f"wrote {json_path}")
    return 0 if run.state == pb.RUN_SUCCEEDED else 1
