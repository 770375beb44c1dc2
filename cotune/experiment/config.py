"""An experiment's config: which grid of variants × tasks × seeds to run, at which sizes (YAML, validated up front).

A *variant* is an algorithm with its settings: the built-in ones are the algorithms by name plus `fedcollm-cross`
(FedCoLLM across tokenizers); a config may define more (e.g. FedMKT with another projection) under `variants:`.
Sizes and training settings start from the model preset's (cotune.demo.PRESETS) and are overridden by the config,
then per task under `task_overrides:`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from cotune.config import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # experiment and variant names: folders of the report
RESERVED_SPEC_FIELDS = {"algorithm", "rounds", "name", "clients"}  # set by the experiment, recorded in each cell
# Preset fields a config may set (globally or per task); the rest of cotune.demo.Preset stays the preset's.
PRESET_KEYS = ("per_part", "eval_size", "max_length", "batch_size", "lr", "top_k", "lam", "kd_weight", "fedbiot_drop",
               "pre_align_steps", "align_steps", "align_lr")
# Variants every config knows: (algorithm, cross_tokenizer, RunSpec fields merged into the demo's spec)
BUILTIN_VARIANTS = {
    **{name: {"algorithm": name} for name in ("zero-shot", "standalone", "fedmkt", "llm2slm", "fedcollm", "fedbiot",
                                               "fedot", "fedavg", "centralized")},
    "fedcollm-cross": {"algorithm": "fedcollm", "cross_tokenizer": True},
}
# Variants whose result does not depend on the seed (the eval set is the same for every seed, nothing is trained):
# run once per task (so no standard error), and paired with every seed of the others.
SEED_FREE_ALGORITHMS = ("zero-shot",)
# the parties' model.dtype (cotune.config.ModelConfig), by its canonical names only (cotune.lm.device also takes
# 'float32' and friends): cells compare settings as written, so one dtype must have one spelling
DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Variant:
    name: str
    algorithm: str
    cross_tokenizer: bool = False
    spec: dict = field(default_factory=dict)  # RunSpec fields as JSON (e.g. {"fedmkt": {"projection": "first_token"}})

    @property
    def seed_free(self) -> bool:
        return self.algorithm in SEED_FREE_ALGORITHMS and not self.spec


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    models: str                      # the model preset of cotune.demo (tiny | small)
    tasks: tuple[str, ...]
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    rounds: int
    preset: dict                     # PRESET_KEYS overrides for every task
    task_overrides: dict             # task -> PRESET_KEYS overrides
    references: tuple[str, ...] = ("standalone", "zero-shot")  # paired differences against these variants
    source: str = ""
    # the parties' model dtype (auto | fp32 | bf16 | fp16). Part of every cell's settings: scores move with the dtype
    # (docs/quality.md), so a grid that is resumed elsewhere must not mix cells of two. 'auto' lets each host pick
    # (cotune.lm.device.pick_dtype) and the report then shows which dtypes its cells ran in.
    dtype: str = "auto"

    def preset_for(self, task: str):
        """The cotune.demo.Preset of one task: the model preset's values, the config's, then the task's."""
        from cotune.demo import PRESETS

        return dataclasses.replace(PRESETS[self.models], task=task,
                                   **{**self.preset, **self.task_overrides.get(task, {})})

    def cells(self) -> list[tuple[str, Variant, int]]:
        """(task, variant, seed) in run order: task by task, seed by seed, every variant of a seed together (so an
        interrupted grid has complete seeds to compare); seed-free variants only with the first seed."""
        return [(task, v, seed) for task in self.tasks for i, seed in enumerate(self.seeds) for v in self.variants
                if i == 0 or not v.seed_free]


def _check_keys(where: str, data: dict, allowed) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _preset_values(where: str, data, models: str) -> dict:
    from cotune.demo import PRESETS

    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of preset values, got {type(data).__name__}")
    _check_keys(where, data, PRESET_KEYS)
    base = PRESETS[models]
    out = {}
    for key, value in data.items():
        want = type(getattr(base, key)) if getattr(base, key) is not None else float
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (want is int and not isinstance(value, int)):
            raise ConfigError(f"{where}.{key}: expected a{'n integer' if want is int else ' number'}, got {value!r}")
        if value < 0 or (key in ("per_part", "eval_size", "max_length", "batch_size") and value < 1):
            raise ConfigError(f"{where}.{key}: out of range: {value!r}")
        out[key] = value
    return out


def resolve(name_or_path: str) -> Path:
    """A config file: a path, or the name of a ready config (cotune/experiment/configs/NAME.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    ready = CONFIG_DIR / f"{name_or_path}.yaml"
    if ready.is_file():
        return ready
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"no experiment config {name_or_path!r}: not a file, nor a ready config ({names})")


def _source_name(path: Path) -> str:
    """Where a config came from, as a committed report may record it: a ready config by its package-relative path
    (the same on every machine), any other file by its path."""
    try:
        return f"cotune/experiment/configs/{path.resolve().relative_to(CONFIG_DIR)}"
    except ValueError:
        return str(path)


def load_config(name_or_path: str) -> ExperimentConfig:
    from cotune.config import load_yaml
    from cotune.data.tasks import TASKS
    from cotune.demo import ALGORITHMS, PRESETS

    path = resolve(name_or_path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    _check_keys(str(path), data, ("name", "models", "tasks", "variants", "algorithms", "seeds", "rounds", "preset",
                                  "task_overrides", "references", "dtype"))
    models = data.get("models", "small")
    if models not in PRESETS:
        raise ConfigError(f"{path}: models must be one of {', '.join(PRESETS)}, got {models!r}")
    tasks = data.get("tasks") or []
    if not isinstance(tasks, list) or not tasks or len(set(map(str, tasks))) != len(tasks):
        raise ConfigError(f"{path}: tasks must be a non-empty list of distinct task names, got {tasks!r}")
    for task in tasks:
        if task not in TASKS:
            raise ConfigError(f"{path}: unknown task {task!r}; known: {', '.join(TASKS)}")
    defined = dict(BUILTIN_VARIANTS)
    declared = data.get("variants") or {}
    if not isinstance(declared, dict):
        raise ConfigError(f"{path}: variants must map variant names to {{algorithm, cross_tokenizer, spec}}")
    for vname, spec in declared.items():
        if not isinstance(vname, str) or not NAME_RE.match(vname):
            raise ConfigError(f"{path}: variants: {vname!r} is not a usable name (it names a folder of the report): "
                              "letters, digits, '-', '_' and '.', up to 64")
        if vname in TASKS:
            raise ConfigError(f"{path}: variants: {vname!r} is a task's name; `--only` could not tell them apart")
        if not isinstance(spec, dict) or spec.get("algorithm") not in ALGORITHMS:
            raise ConfigError(f"{path}: variants.{vname}: needs algorithm: one of {', '.join(ALGORITHMS)}")
        _check_keys(f"{path}: variants.{vname}", spec, ("algorithm", "cross_tokenizer", "spec"))
        if not isinstance(spec.get("cross_tokenizer", False), bool):
            raise ConfigError(f"{path}: variants.{vname}.cross_tokenizer must be true or false")
        if spec.get("cross_tokenizer") and spec["algorithm"] != "fedcollm":
            raise ConfigError(f"{path}: variants.{vname}: cross_tokenizer is for fedcollm (FedMKT crosses tokenizers "
                              "by design)")
        fields = spec.get("spec") or {}
        if not isinstance(fields, dict) or set(fields) & RESERVED_SPEC_FIELDS:
            raise ConfigError(f"{path}: variants.{vname}.spec: a mapping of the algorithm's RunSpec settings, without "
                              f"{', '.join(sorted(RESERVED_SPEC_FIELDS))} (the experiment sets those)")
        defined[vname] = spec
    names = data.get("algorithms") or []
    if not isinstance(names, list) or not names or len(set(map(str, names))) != len(names):
        raise ConfigError(f"{path}: algorithms must be a non-empty list of distinct variant names, got {names!r}")
    variants = []
    for vname in names:
        if vname not in defined:
            raise ConfigError(f"{path}: unknown variant {vname!r}; known: {', '.join(sorted(defined))}")
        spec = defined[vname]
        variants.append(Variant(vname, spec["algorithm"], bool(spec.get("cross_tokenizer", False)),
                                dict(spec.get("spec") or {})))
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: seeds must be a list of distinct non-negative integers, got {seeds!r}")
    rounds = data.get("rounds", 2)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or not 1 <= rounds <= 1000:
        raise ConfigError(f"{path}: rounds must be an integer in 1..1000, got {rounds!r}")
    overrides = data.get("task_overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: task_overrides must map task names to preset values")
    for task in overrides:
        if task not in tasks:
            raise ConfigError(f"{path}: task_overrides.{task}: not one of this config's tasks")
    references = data.get("references", [r for r in ("standalone", "zero-shot") if r in names])
    if not isinstance(references, list):
        raise ConfigError(f"{path}: references must be a list of variant names, got {references!r}")
    references = tuple(references)
    for ref in references:
        if ref not in names:
            raise ConfigError(f"{path}: references: {ref!r} is not among the algorithms run")
    dtype = data.get("dtype", "auto")
    if dtype not in DTYPES:
        raise ConfigError(f"{path}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    name = str(data.get("name") or path.stem)
    if not NAME_RE.match(name):
        raise ConfigError(f"{path}: name {name!r}: letters, digits, '-', '_' and '.', up to 64 (it names the report folder)")
    cfg = ExperimentConfig(
        name=name, models=models, tasks=tuple(tasks), variants=tuple(variants),
        seeds=tuple(seeds), rounds=rounds, preset=_preset_values(f"{path}: preset", data.get("preset") or {}, models),
        task_overrides={t: _preset_values(f"{path}: task_overrides.{t}", v, models) for t, v in overrides.items()},
        references=references, source=_source_name(path), dtype=dtype)
    for task in cfg.tasks:
        for variant in cfg.variants:
            check_spec(cfg, task, variant, where=str(path))
    return cfg


def run_spec(cfg: ExperimentConfig, task: str, variant: Variant):
    """The RunSpec of a cell: the demo's settings for the algorithm from the task's preset values, then the variant's
    fields over them."""
    from google.protobuf import json_format

    from cotune.demo import demo_spec

    preset = cfg.preset_for(task)
    spec = demo_spec(cfg.models, preset, variant.algorithm, cfg.rounds, cross_tokenizer=variant.cross_tokenizer)
    spec.name = f"{cfg.name}/{variant.name}"
    json_format.ParseDict(variant.spec, spec)
    return spec


def check_spec(cfg: ExperimentConfig, task: str, variant: Variant, *, where: str) -> None:
    """A cell's spec must pass the coordinator's own checks (names, types, ranges, the algorithm's section), so a typo
    fails when the config loads, not at the start of every cell hours into a grid."""
    from google.protobuf import json_format

    from cotune.algorithms.config import SpecError, parse_spec
    from cotune.algorithms.registry import get_strategy

    try:
        parse_spec(run_spec(cfg, task, variant), get_strategy(variant.algorithm).config_class)
    except (json_format.ParseError, AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: variant {variant.name} on {task}: {exc}") from None
    except SpecError as exc:
        raise ConfigError(f"{where}: variant {variant.name} on {task}: {'; '.join(exc.problems)}") from None
