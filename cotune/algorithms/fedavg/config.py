"""FedAvg's settings."""

from __future__ import annotations

from dataclasses import dataclass

from cotune.algorithms.aggregate import MODES as AGGREGATION_MODES
from cotune.algorithms.config import Config, Problems, help_field


@dataclass(frozen=True)
class FedAvgConfig(Config):
    section = "fedavg"

    aggregation: str = help_field("factors", "factors (A and B averaged separately) | product (exact mean of B·A, "
                                             "re-factorized to rank r)")

    def check(self, p: Problems) -> None:
        p.choice(self.name("aggregation"), self.aggregation, AGGREGATION_MODES)
