"""Every algorithm, by name. Adding one = a folder under cotune/algorithms/ and one line in REGISTERED."""

from __future__ import annotations

import importlib

from cotune.algorithms.base import Strategy
from cotune.errors import InvalidInput

REGISTERED = (
    "cotune.algorithms.fedmkt.strategy:FedMKT",
    "cotune.algorithms.fedmkt.strategy:LLMToSLM",
    "cotune.algorithms.fedcollm.strategy:FedCoLLM",
    "cotune.algorithms.fedbiot.strategy:FedBiOT",
    "cotune.algorithms.fedbiot.strategy:FedOT",
    "cotune.algorithms.fedavg.strategy:FedAvg",
    "cotune.algorithms.zero_shot.strategy:ZeroShot",
    "cotune.algorithms.standalone.strategy:Standalone",
    "cotune.algorithms.centralized.strategy:Centralized",
)


def _load(entry: str) -> type[Strategy]:
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in map(_load, REGISTERED)}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise InvalidInput(f"unknown algorithm {name!r:.60}; available: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]()
