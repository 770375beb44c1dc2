"""Typed run configuration: one frozen dataclass for the settings every run shares and one per algorithm.

Each config owns its defaults, their documentation (`field(metadata={"help": ...})`) and its validation, in the style
of peft's per-tuner configs. On the wire a `RunSpec` carries the shared fields plus a `oneof` of per-algorithm messages
whose scalars are proto3 `optional`: an unset field takes the dataclass default, and any value the algorithm allows,
0 included, can be requested. Validation collects every problem; `parse_spec` raises one `SpecError` naming all of
them, so a user fixes a spec in one round trip.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cotune.errors import InvalidInput
from cotune.tasks import MAX_ADAPTER_ABS, MAX_EPOCHS, MAX_LENGTH_RANGE
from cotune.v1 import coordinator_pb2 as pb

MAX_ROUNDS = 10_000


class SpecError(InvalidInput):
    """A run spec with one or more problems; the message lists every one."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid run spec: " + "; ".join(self.problems))


def help_field(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help}, **kwargs)


class Problems(list):
    """Validation messages, each naming its field."""

    def range(self, name: str, value, lo=None, hi=None, *, lo_open: bool = False) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            self.append(f"{name} must be finite, got {value}")
            return
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and value > hi
        if below or above:
            left = "(" if lo_open else "["
            self.append(f"{name} must be in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}], got {value}")

    def choice(self, name: str, value: str, choices) -> None:
        if value not in choices:
            self.append(f"{name} must be one of {', '.join(choices)}, got {value!r:.60}")


@dataclass(frozen=True)
class Config:
    """Base of every config: frozen, validated on construction, built from its proto message."""

    section: ClassVar[str] = ""  # the RunSpec oneof field it travels in ("" = the algorithm takes no settings)

    def __post_init__(self):
        problems = Problems()
        self.check(problems)
        if problems:
            raise SpecError(problems)

    def check(self, problems: Problems) -> None:
        """Append a message per bad field; field names are written as a user spells them in a spec."""

    @classmethod
    def from_proto(cls, msg) -> Config:
        wire = msg.DESCRIPTOR.fields_by_name
        return cls(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(cls)
                      if not wire[f.name].has_presence or msg.HasField(f.name)})

    def name(self, field_name: str) -> str:
        return f"{self.section}.{field_name}" if self.section else field_name


@dataclass(frozen=True)
class NoConfig(Config):
    """Algorithms without settings of their own (zero-shot, standalone, centralized)."""


@dataclass(frozen=True)
class RunConfig(Config):
    """What every run shares, whatever the algorithm."""

    rounds: int = help_field(1, "federated rounds after round 0 (the baseline evaluation)")
    min_clients: int | None = help_field(None, "quorum per round; unset = every selected client")
    step_timeout_s: float = help_field(1800.0, "deadline of one step on one party, seconds")
    max_public_samples: int = help_field(0, "public samples used for logits and distillation; 0 = all")
    eval_max_samples: int = help_field(0, "evaluation items per party; 0 = all")
    max_length: int = help_field(256, "tokens per public sample (logits, sequence alignment, distillation)")
    local_epochs: int = help_field(1, "epochs of local training on private data per round")
    overlap_steps: bool = help_field(True, "run independent steps of different parties at once (false: one step at "
                                           "a time, the reference order)")
    adapter_max_abs: float = help_field(MAX_ADAPTER_ABS, "adapters (uploads, distilled adapters) holding a value of "
                                                         "larger magnitude are rejected before averaging or use")

    def check(self, p: Problems) -> None:
        p.range("rounds", self.rounds, 1, MAX_ROUNDS)
        if self.min_clients is not None:
            p.range("min_clients", self.min_clients, 1)
        p.range("step_timeout_s", self.step_timeout_s, 0.0, 7 * 24 * 3600.0, lo_open=True)
        p.range("max_public_samples", self.max_public_samples, 0)
        p.range("eval_max_samples", self.eval_max_samples, 0)
        p.range("max_length", self.max_length, *MAX_LENGTH_RANGE)
        p.range("local_epochs", self.local_epochs, 1, MAX_EPOCHS)
        p.range("adapter_max_abs", self.adapter_max_abs, 0.0, 1e38, lo_open=True)

    def quorum(self, selected: int) -> int:
        return selected if self.min_clients is None else self.min_clients


SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))


def parse_spec(spec: pb.RunSpec, config_class: type[Config]) -> tuple[RunConfig, Config]:
    """(shared config, algorithm config) of a spec, or SpecError naming every problem of both."""
    problems: list[str] = []
    run = algo = None
    try:
        run = RunConfig.from_proto(spec)
    except SpecError as exc:
        problems += exc.problems
    given = spec.WhichOneof("config")
    if given and given != config_class.section:
        takes = f"takes `{config_class.section}` settings" if config_class.section else "takes no settings of its own"
        problems.append(f"algorithm {spec.algorithm} {takes}, but the spec sets `{given}`")
    else:
        try:
            algo = config_class.from_proto(getattr(spec, given)) if given else config_class()
        except SpecError as exc:
            problems += exc.problems
    if problems:
        raise SpecError(problems)
    return run, algo


# -- run-spec files -------------------------------------------------------------------------------------------------
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")
# Flat RunSpec fields of earlier versions (snake_case spelling) -> where the setting lives now.
_MOVED = {
    "setting": "fedmkt.setting", "top_k": "fedmkt.top_k (or fedcollm.top_k)", "lam": "fedmkt.ce_weight",
    "distill_epochs": "fedmkt.distill_epochs or fedcollm.distill_epochs", "selection": "fedmkt.selection",
    "logits_bits": "fedmkt.logits_bits", "alignment_method": "fedmkt.alignment_method",
    "aggregation": "fedavg.aggregation, fedcollm.aggregation or fedbiot.aggregation", "kd_weight": "fedcollm.kl_weight",
    "align_tokenizers": "fedcollm.align_tokenizers", "fedbiot.beta": "fedbiot.kl_weight",
}


def spec_from_dict(data: Mapping[str, Any], where: str = "run spec") -> pb.RunSpec:
    """A RunSpec from a YAML/JSON mapping with snake_case keys (the service configs' style). A camelCase key gets an
    error naming its snake_case spelling; unknown keys and mistyped values are errors naming the key."""
    from google.protobuf import json_format

    if not isinstance(data, Mapping):
        raise SpecError([f"{where}: expected a mapping of run-spec fields, got {type(data).__name__}"])
    problems: list[str] = []
    _check_keys(data, pb.RunSpec.DESCRIPTOR, "", problems)
    if problems:
        raise SpecError(problems)
    try:
        return json_format.ParseDict(dict(data), pb.RunSpec())
    except json_format.ParseError as exc:
        raise SpecError([f"{where}: {exc}"]) from exc


def _check_keys(data: Mapping, descriptor, prefix: str, problems: list[str]) -> None:
    fields = {f.name: f for f in descriptor.fields}
    for key, value in data.items():
        name = f"{prefix}{key}"
        f = fields.get(key)
        if f is None:
            snake = _CAMEL.sub("_", str(key)).lower()
            if f"{prefix}{snake}" in _MOVED:
                problems.append(f"{name}: this setting moved; write `{_MOVED[prefix + snake]}`")
            elif snake != key and snake in fields:
                problems.append(f"{name}: run-spec keys are snake_case; write `{prefix}{snake}`")
            else:
                problems.append(f"{name}: unknown key; known: {', '.join(sorted(fields))}")
        elif f.message_type is not None and isinstance(value, Mapping):
            _check_keys(value, f.message_type, f"{name}.", problems)
