"""`cotune demo`: build data and models for a preset, start a local cluster, run, report, shut down.

Presets:
  tiny   random-init small models with real tokenizers (LLM: Mistral's 32k SentencePiece vocabulary; clients:
         GPT-2 and GPT-NeoX byte-level BPE), a slice of ARC-Easy; about a minute on 2 CPU cores.
         For the algorithms that move SLM adapters (fedcollm, fedavg) and their baselines (zero-shot, standalone,
         centralized) every model shares Mistral's tokenizer instead: a larger Llama-style LLM (hidden 128,
         4 layers) and a smaller Llama-style SLM (hidden 64, 2 layers) on both clients, the LLM server holding a
         copy of the SLM. fedbiot and fedot compress a deeper LLM of that family (hidden 128, 8 layers); the
         clients start on the small SLM and install the compressed model the server ships them.
  small  the real pair: Gemma 3 270M (LLM) and SmolLM2-135M-Instruct (both clients), a small slice of
         ARC-Easy; minutes on 2 CPU cores. fedbiot/fedot compress Gemma 3 270M (18 layers) and ship it to the
         clients. fedcollm pairs Gemma 3 270M with a layer-reduced copy of itself (6 of 18 layers, healed by
         a 200-step fine-tune, built once and cached; see healed_gemma_slm) on the clients, so they share one
         tokenizer; --cross-tokenizer pairs it with SmolLM2 instead.

centralized is the non-federated reference: one client holding the union of the clients' private shards (and the
LLM server holding it too) trains on it; its tables are labelled as such.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# Only the standard library at import time: the CLI reads ALGORITHMS to build its parser, and `cotune --help` must not
# pay for grpc, torch or transformers. Every function imports what it needs.
if TYPE_CHECKING:
    from cotune.cluster import ClusterConfig, Progress
    from cotune.rpc.clients import CoordinatorClient
    from cotune.v1 import coordinator_pb2 as pb


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
    kd_weight: float = 1.0  # FedCoLLM's λ: KL weight in the co-distillation (CE + λ·KL)
    # FedBiOT / FedOT: emulator drop rate, pre-alignment and per-round alignment steps
    fedbiot_drop: float = 0.5
    pre_align_steps: int = 20
    align_steps: int = 5
    align_lr: float | None = None  # None = the LLM server's training lr


PRESETS = {
    # Random-init tiny models: their teachers carry no task knowledge, so CE and KD pull apart; the tiny
    # preset weights KD higher (lam 0.2) so that transfer is visible. The real pair uses the paper's 0.9.
    # Likewise FedCoLLM's KL term: two random-init models are both near-uniform (KL ≈ 0.04 nats), and LoRA on the
    # attention projections moves that little, so at λ = 1 the CE term hides the co-distillation; the tiny preset
    # uses λ = 20 so that the KL visibly falls.
    "tiny": Preset(task="arc_easy", per_part=32, eval_size=64, max_length=128, batch_size=8, lr=5e-3, top_k=16, lam=0.2,
                   kd_weight=20.0, align_lr=1e-3),
    # small, FedBiOT/FedOT: pre_align_steps from the curve measured by benchmarks/fedbiot_alignment.py (Gemma 3 270M,
    # drop 0.5, lr 2e-4, bf16 on 2 CPU cores): the held-out alignment loss (L2 + KL) falls 17.29 → 10.28 (10 steps)
    # → 4.81 (25) → 3.80 (50) → 3.45 (75) → 3.31 (100) and the emulator's held-out public loss 20.5 → 15.0 → 9.1 →
    # 8.5 → 8.5 → 8.3 (full model 3.4): 50 steps take 96% of the reduction measured, and the held-out public loss
    # stops improving there; a step costs 4.4-13 CPU s (8.9 on average on a shared machine). align_steps stays 4:
    # past 50 steps the curve gains ~0.01 a step, so a round's re-alignment only continues its tail.
    "small": Preset(task="arc_easy", per_part=32, eval_size=60, max_length=128, batch_size=4, lr=2e-4, top_k=16, lam=0.9,
                    pre_align_steps=50, align_steps=4),
}
NUM_CLIENTS = 2
# Tiny models: (party, tokenizer file under shared/data/tokenizers, architecture, hidden, layers, seed)
TINY_MODELS = [
    ("llm", "mistral-7b-hf/tokenizer.json", "llama", 64, 2, 0),
    ("client-1", "gpt2/gpt2.vocab", "gpt2", 64, 2, 1),
    ("client-2", "gpt-neox-20b/20B_tokenizer.json", "llama", 64, 2, 2),
]
# Tiny same-tokenizer family (FedCoLLM and the LoRA baselines)
TINY_SHARED_MODELS = [
    ("llm", "mistral-7b-hf/tokenizer.json", "llama", 128, 4, 10),
    ("slm", "mistral-7b-hf/tokenizer.json", "llama", 64, 2, 11),
]
# FedBiOT's tiny LLM: deep enough that dropping half of the non-adapter layers leaves a real emulator
TINY_DEEP_LLM = ("llm", "mistral-7b-hf/tokenizer.json", "llama", 128, 8, 12)
ALGORITHMS = ("fedmkt", "fedcollm", "fedbiot", "fedot", "zero-shot", "standalone", "fedavg", "llm2slm", "centralized")
# Which model family an algorithm's demo uses on the tiny preset: logits-based ones show off different tokenizers.
SHARED_TOKENIZER_ALGORITHMS = ("fedcollm", "fedavg", "zero-shot", "standalone", "centralized", "fedbiot", "fedot")
COMPRESSING_ALGORITHMS = ("fedbiot", "fedot")


def _phase(progress: Progress | None, what: str, *, models: bool = False, heartbeat: bool = False):
    """progress.phase(what, heartbeat=...), or nothing without a Progress (the tests and benchmarks build quietly).
    models: the phase builds or converts models with transformers, whose own progress bars (carriage-return updates
    that clutter a log) the phase's lines replace."""
    if progress is None:
        return contextlib.nullcontext()
    if models:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return progress.phase(what, heartbeat=heartbeat)


def _steps(progress: Progress | None, what: str):
    """A (done, total) callback that reports "what: step done/total" at most every progress interval, or None."""
    if progress is None:
        return None

    def report(done: int, total: int) -> None:
        progress.every(what, lambda _first: f"{what}: step {done}/{total}")

    return report


def write_split(split, out: Path) -> dict[str, Path]:
    """A federated split as JSONL files under `out`: public, eval and client-<i> (from 1), by name."""
    from cotune.data import write_jsonl

    out.mkdir(parents=True, exist_ok=True)
    paths = {"public": out / "public.jsonl", "eval": out / "eval.jsonl"}
    write_jsonl(paths["public"], split.public)
    write_jsonl(paths["eval"], split.eval)
    for i, part in enumerate(split.clients, 1):
        paths[f"client-{i}"] = out / f"client-{i}.jsonl"
        write_jsonl(paths[f"client-{i}"], part)
    return paths


def prepare_data(preset: Preset, workdir: Path, seed: int = 0) -> dict[str, Path]:
    from cotune.data import federated_split, load_task, require_shared_data, write_jsonl

    shared = require_shared_data()
    train = load_task(preset.task, "train", data_dir=shared)
    evaluation = load_task(preset.task, "validation", data_dir=shared)[: preset.eval_size]
    split = federated_split(train, NUM_CLIENTS, seed=seed, eval_examples=evaluation, per_part=preset.per_part)
    out = workdir / "data"
    paths = write_split(split, out)
    paths["union"] = out / "union.jsonl"  # every private shard: the centralized reference trains on it
    write_jsonl(paths["union"], [ex for part in split.clients for ex in part])
    return paths


def model_cache_dir(workdir: Path) -> Path:
    """Where converted GGUF models and built SLMs live: beside the presets' workdirs, shared by them."""
    return (workdir.parent / "model-cache").resolve()


def _tiny(spec: tuple, workdir: Path, prefix: str, progress: Progress | None = None) -> str:
    """A random-init tiny model directory, built once: spec = (party, tokenizer file, arch, hidden, layers, seed)."""
    _name, tok_file, arch, hidden, layers, seed = spec
    out = workdir / "models" / f"{prefix}-{arch}-h{hidden}-l{layers}"
    if not (out / "config.json").exists():
        from cotune.align.tokenizers import load_tokenizer
        from cotune.data import require_shared_data
        from cotune.demo.tiny import make_tiny_model

        with _phase(progress, f"building tiny model {out.name} (once)", models=True):
            make_tiny_model(load_tokenizer(require_shared_data() / "tokenizers" / tok_file), out, arch=arch,
                            hidden=hidden, layers=layers, seed=seed)
    return str(out)


def convert_models(config: ClusterConfig, progress: Progress | None = None) -> None:
    """Convert every GGUF model of a cluster config (model.path, model.companion_slm_path) to the HF folder its
    service will load (cotune.lm.model.ensure_hf_dir, in the party's model.cache_dir), here and now: a conversion
    takes minutes on a small machine, and done by the services it would only show in their logs. Each model gets a
    line: converting... done in N s, or that its converted copy is already there."""
    ggufs: dict[tuple[str, str], None] = {}
    for party in [config.llm, *config.clients]:
        model = party.get("model") or {}
        for key in ("path", "companion_slm_path"):
            path = model.get(key) or ""
            if path.lower().endswith(".gguf"):
                ggufs[(path, model.get("cache_dir") or "")] = None
    for path, cache in ggufs:
        _convert_gguf(path, cache, progress)


def _convert_gguf(path: str, cache: str, progress: Progress | None) -> None:
    """ensure_hf_dir(path, cache) with a line saying what happens: a conversion (minutes), or the cached copy."""
    import gc

    from cotune.lm.model import ensure_hf_dir, gguf_cache_path

    cache_dir = Path(cache) if cache else None
    name, where = Path(path).name, cache or "the default cache"
    if gguf_cache_path(Path(path), cache_dir).is_dir():
        ensure_hf_dir(path, cache_dir)
        if progress is not None:
            progress.say(f"model {name}: using its converted copy in {where}")
        return
    with _phase(progress, f"converting model {name} to an HF folder (once; cached in {where})", models=True,
                heartbeat=True):
        ensure_hf_dir(path, cache_dir)
    gc.collect()  # the dequantized weights are written out; free them before the services start


def healed_gemma_slm(workdir: Path, progress: Progress | None = None) -> Path:
    """The small preset's same-tokenizer SLM for FedCoLLM: Gemma 3 270M cut to 6 of its 18 layers (uniformly, first
    and last kept) and healed by a short fine-tune (200 steps on ARC-Easy train, minus this demo's public set and
    private shards, so the SLM has not seen them), built once (~4 min on 2 CPU cores) and cached beside the other
    models. 201M parameters (the 262k-token embedding dominates) against the LLM's 268M, a third of its layer compute."""
    from cotune.data import load_task, read_jsonl, require_shared_data
    from cotune.demo.heal import layer_reduced_copy
    from cotune.lm.model import real_model_path

    cache = model_cache_dir(workdir)
    data = workdir / "data"
    seen = {ex for path in data.glob("*.jsonl") for ex in read_jsonl(path)}
    train = [ex for ex in load_task("arc_easy", "train", data_dir=require_shared_data()) if ex not in seen]
    gemma = real_model_path("gemma3-270m")
    _convert_gguf(str(gemma), str(cache), progress)  # its own phase line, before the heal's (it reads the HF copy)
    # the phase lines show even when the copy is cached (then it is done in a second or two)
    with _phase(progress, "the fedcollm SLM: Gemma 3 270M cut to 6 layers and healed (built once, about 4 min)",
                models=True):
        return layer_reduced_copy(gemma, cache / "gemma3-270m-l6-healed", keep_layers=6, steps=200, lr=1e-4,
                                  batch_size=4, max_length=128, seed=0, examples=train, cache_dir=cache,
                                  progress=_steps(progress, "healing"))


def prepare_models(preset_name: str, workdir: Path, *, algorithm: str = "fedmkt",
                   cross_tokenizer: bool = False, progress: Progress | None = None) -> dict[str, str]:
    """Model directories by party for an algorithm's demo.

    tiny: logits-based algorithms get three different tokenizers; the others one shared family, where the clients
    run the SLM and the result also names it as "companion" (the LLM server's SLM copy for FedCoLLM); fedbiot/fedot
    get that family's deeper LLM to compress. small: the real Gemma 3 / SmolLM2 pair. cross_tokenizer (fedcollm):
    the LLM keeps its own tokenizer and the clients all run one SLM on another (tiny: GPT-2's; small: SmolLM2).
    progress: a line per model built (tiny models, the healed SLM)."""
    clients = [f"client-{i}" for i in range(1, NUM_CLIENTS + 1)]
    if cross_tokenizer:
        if algorithm != "fedcollm":
            raise SystemExit("--cross-tokenizer is for fedcollm (FedMKT crosses tokenizers by design)")
        hetero = prepare_models(preset_name, workdir, progress=progress)
        slm = hetero["client-1"]
        return {"llm": hetero["llm"], "companion": slm, **{c: slm for c in clients}}
    if algorithm in SHARED_TOKENIZER_ALGORITHMS and preset_name == "tiny":
        slm = _tiny(TINY_SHARED_MODELS[1], workdir, "tiny-shared-slm", progress)
        if algorithm in COMPRESSING_ALGORITHMS:
            return {"llm": _tiny(TINY_DEEP_LLM, workdir, "tiny-shared-llm", progress), **{c: slm for c in clients}}
        return {"llm": _tiny(TINY_SHARED_MODELS[0], workdir, "tiny-shared-llm", progress), "companion": slm,
                **{c: slm for c in clients}}
    if preset_name == "small":
        from cotune.lm.model import real_model_path

        if algorithm == "fedcollm":
            slm = str(healed_gemma_slm(workdir, progress))
            return {"llm": str(real_model_path("gemma3-270m")), "companion": slm, **{c: slm for c in clients}}
        slm = str(real_model_path("smollm2-135m"))
        return {"llm": str(real_model_path("gemma3-270m")), **{c: slm for c in clients}}
    return {spec[0]: _tiny(spec, workdir, f"tiny-{spec[0]}", progress) for spec in TINY_MODELS}


def cluster_config(preset_name: str, preset: Preset, workdir: Path, data: dict[str, Path], models: dict[str, str], *,
                   algorithm: str = "fedmkt", cross_tokenizer: bool = False) -> ClusterConfig:
    """The local cluster for a demo: the LLM server, one client per private shard (centralized: one client holding
    their union, which the LLM server also trains on), and the alignment service where tokenizers differ."""
    from cotune.cluster import ClusterConfig

    cache = str(model_cache_dir(workdir))
    training = {"lr": preset.lr, "batch_size": preset.batch_size, "max_length": preset.max_length}

    def party(name: str, private: Path | None) -> dict:
        cfg = {"model": {"path": models[name], "name": Path(models[name]).name, "cache_dir": cache},
               "training": dict(training),
               "data": {"public": str(data["public"]), "eval": str(data["eval"])}}
        if private is not None:
            cfg["data"]["private"] = str(private)
        return cfg

    centralized = algorithm == "centralized"
    llm = party("llm", data["union"] if centralized else None)
    if models.get("companion"):
        llm["model"]["companion_slm_path"] = models["companion"]
        llm["model"]["companion_slm_name"] = Path(models["companion"]).name
    clients = []
    for i in range(1, (1 if centralized else NUM_CLIENTS) + 1):
        c = party(f"client-{i}", data["union"] if centralized else data[f"client-{i}"])
        c["party_id"] = f"client-{i}"
        clients.append(c)
    # only logits cross tokenizers; the LoRA-moving algorithms (and the shared family) have nothing to align
    needs_alignment = (algorithm in ("fedmkt", "llm2slm") and not models.get("companion")) or cross_tokenizer
    alignment = {"workdir": str((workdir.parent / "alignment-cache").resolve())} if needs_alignment else None
    return ClusterConfig(workdir=str(workdir / "cluster"), llm=llm, clients=clients, alignment=alignment, coordinator={})


def codistill_table(run: pb.Run) -> str:
    """FedCoLLM's server-side co-distillation per round: CE and KL before/after for the LLM and its SLM copy."""
    rows = []
    for rec in sorted(run.rounds, key=lambda r: r.round):
        for party in rec.parties:
            m = party.metrics
            if "codistill_llm_kl_before" not in m:
                continue
            # each side's distillation term, in the run's KL direction (fedcollm.kl_direction; forward by default)
            for side, label in (("llm", "LLM f: CE + λ·KD(g→f)"), ("slm", "SLM copy g: CE + λ·KD(f→g)")):
                rows.append(f"| {rec.round} | {label} | {m[f'codistill_{side}_ce_before']:.3f} | {m[f'codistill_{side}_ce_after']:.3f} "
                            f"| {m[f'codistill_{side}_kl_before']:.4f} | {m[f'codistill_{side}_kl_after']:.4f} |")
    if not rows:
        return ""
    return "\n".join(["| round | co-distillation (LLM server) | CE before | CE after | KL before | KL after |",
                      "|---:|---|---:|---:|---:|---:|", *rows])


def emulator_table(run: pb.Run) -> str:
    """FedBiOT/FedOT on the LLM server per round: the emulator alignment, and the adapter evaluated both ways."""
    rows = []
    for rec in sorted(run.rounds, key=lambda r: r.round):
        parties = {p.party_id: p.metrics for p in rec.parties}
        llm, emu = parties.get("llm", {}), parties.get("llm/emulator")
        if emu is None:
            continue
        steps = int(llm.get("align_steps", 0))
        align = f"{llm['align_loss_before']:.4f} → {llm['align_loss_after']:.4f}" if steps else "—"
        rows.append(f"| {rec.round} | {steps} | {align} | {llm.get('eval_accuracy', float('nan')):.3f} "
                    f"| {emu.get('eval_accuracy', float('nan')):.3f} | {llm.get('public_loss', float('nan')):.3f} "
                    f"| {emu.get('public_loss', float('nan')):.3f} |")
    if not rows:
        return ""
    return "\n".join(["| round | align steps | align loss (L2 + β·KL) | acc: adapter in full model | acc: emulator + adapter "
                      "| public loss: full | public loss: emulator |", "|---:|---:|---|---:|---:|---:|---:|", *rows])


def wait_for_clients(client: CoordinatorClient, expected: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while len(client.list_clients()) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(client.list_clients())} of {expected} clients registered with the coordinator")
        time.sleep(0.2)


def demo_spec(name: str, p: Preset, algorithm: str, rounds: int, *, setting: str = "heterogeneous",
              cross_tokenizer: bool = False) -> pb.RunSpec:
    """The run spec of a demo: the preset's values for the algorithm's settings, defaults for the rest."""
    from cotune.v1 import coordinator_pb2 as pb

    spec = pb.RunSpec(name=f"demo-{name}", algorithm=algorithm, rounds=rounds, max_length=p.max_length)
    if algorithm in ("fedmkt", "llm2slm"):
        spec.fedmkt.top_k = p.top_k
        spec.fedmkt.ce_weight = p.lam
        if algorithm == "fedmkt":
            spec.fedmkt.setting = setting
    elif algorithm == "fedcollm":
        spec.fedcollm.kl_weight = p.kd_weight
        spec.fedcollm.top_k = p.top_k
        spec.fedcollm.align_tokenizers = cross_tokenizer
    elif algorithm in COMPRESSING_ALGORITHMS:
        spec.fedbiot.drop = p.fedbiot_drop
        spec.fedbiot.pre_align_steps = p.pre_align_steps
        if algorithm == "fedbiot":
            spec.fedbiot.align_steps = p.align_steps
        if p.align_lr is not None:
            spec.fedbiot.align_lr = p.align_lr
    return spec


def run_demo(*, preset: str = "small", algorithm: str = "fedmkt", rounds: int = 2, json_path: str | None = None,
             workdir: str | None = None, setting: str = "heterogeneous", cross_tokenizer: bool = False,
             progress: Progress | None = None) -> int:
    """Progress (a line per phase: data, models built or converted, each service until it serves, then the run's
    events) goes to stderr, the result tables to stdout."""
    import yaml

    from cotune.cluster import LocalCluster, Progress, default_cluster_dirs
    from cotune.watch import watch_run

    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose {', '.join(PRESETS)}")
    if algorithm not in ALGORITHMS:
        raise SystemExit(f"unknown algorithm {algorithm!r}; choose {', '.join(ALGORITHMS)}")
    progress = progress or Progress()
    shared = preset == "tiny" and algorithm in SHARED_TOKENIZER_ALGORITHMS and not cross_tokenizer
    p = PRESETS[preset]
    root = Path(workdir or Path("var") / "demo").resolve() / (f"{preset}-shared" if shared else preset)
    started = time.monotonic()
    progress.say(f"cotune demo: preset {preset}, {algorithm}, {rounds} round(s); workdir {root}")
    with progress.phase("preparing the data"):
        data = prepare_data(p, root)
    models = prepare_models(preset, root, algorithm=algorithm, cross_tokenizer=cross_tokenizer, progress=progress)
    config = cluster_config(preset, p, root, data, models, algorithm=algorithm, cross_tokenizer=cross_tokenizer)
    convert_models(config, progress)
    shutil.rmtree(config.workdir, ignore_errors=True)  # run state is per demo; data, models and caches are kept
    config_path = root / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    progress.say(f"cluster config: {config_path} (start it yourself with `cotune cluster up --config {config_path}`)")
    services = ("alignment, " if config.alignment is not None else "") + f"llm, {len(config.clients)} client(s), coordinator"
    progress.say(f"starting the local cluster ({services}); each service loads its model before it serves")
    with LocalCluster(config, progress=progress) as cluster:
        found = cluster.workdir in [path.resolve() for path in default_cluster_dirs()]
        progress.say("while the demo runs, `cotune run list` / `run status RUN_ID` from this folder reach its coordinator"
                     + ("" if found else f" with --cluster-dir {cluster.workdir}"))
        client = cluster.coordinator_client()
        try:
            wait_for_clients(client, len(config.clients))
            spec = demo_spec(preset, p, algorithm, rounds, setting=setting, cross_tokenizer=cross_tokenizer)
            run = client.start_run(spec)
            progress.say(f"run {run.run_id} started")
            run = watch_run(client, run.run_id)
        finally:
            client.close()
    from cotune.report import bytes_table, markdown_table, profile_table, run_summary
    from cotune.v1 import coordinator_pb2 as pb

    elapsed = time.monotonic() - started
    summary = run_summary(run)
    summary["preset"] = preset
    summary["wall_time_s"] = round(elapsed, 1)
    print()
    print(markdown_table(run))
    for extra in (codistill_table(run), emulator_table(run)):
        if extra:
            print()
            print(extra)
    traffic = bytes_table(run)
    if traffic:
        print()
        print(traffic)
    profile = profile_table(run)
    if profile:
        print("\nwhere the time went (seconds per step and party):")
        print(profile)
    print(f"\nrun {run.run_id}: {pb.RunState.Name(run.state)} in {elapsed:.0f}s" + (f" - {run.error}" if run.error else ""))
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=2))
        print(f"wrote {json_path}")
    return 0 if run.state == pb.RUN_SUCCEEDED else 1
