"""Strategies by algorithm name. A new algorithm is a Strategy subclass registered here."""

from __future__ import annotations

from cotune.errors import InvalidInput
from coordinator.driver import Strategy
from cotune.algorithms.baselines import Centralized, FedAvg, LLMToSLM, Standalone, ZeroShot
from cotune.algorithms.fedbiot.strategy import FedBiOT, FedOT
from cotune.algorithms.fedcollm.strategy import FedCoLLM
from cotune.algorithms.fedmkt.strategy import FedMKT

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (FedMKT, FedCoLLM, FedBiOT, FedOT, ZeroShot, Standalone, FedAvg,
                                                            LLMToSLM, Centralized)}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise InvalidInput(f"unknown algorithm {name!r}; available: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]()
