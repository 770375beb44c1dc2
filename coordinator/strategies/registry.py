"""Strategies by algorithm name. A new algorithm is a Strategy subclass registered here."""

from __future__ import annotations

from cotune.rpc.errors import InvalidInput
from coordinator.strategies.base import Strategy
from coordinator.strategies.baselines import Centralized, FedAvg, LLMToSLM, Standalone, ZeroShot
from coordinator.strategies.fedbiot import FedBiOT, FedOT
from coordinator.strategies.fedcollm import FedCoLLM
from coordinator.strategies.fedmkt import FedMKT

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (FedMKT, FedCoLLM, FedBiOT, FedOT, ZeroShot, Standalone, FedAvg,
                                                            LLMToSLM, Centralized)}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise InvalidInput(f"unknown algorithm {name!r}; available: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]()
