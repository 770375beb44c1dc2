"""FedCoLLM's settings."""

from __future__ import annotations

from dataclasses import dataclass

from cotune.algorithms.aggregate import MODES as AGGREGATION_MODES
from cotune.algorithms.config import Config, Problems, help_field
from cotune.tasks import MAX_EPOCHS, MAX_LOSS_WEIGHT, MAX_TOP_K


@dataclass(frozen=True)
class FedCoLLMConfig(Config):
    section = "fedcollm"

    kl_weight: float = help_field(1.0, "λ in CE + λ·KL of the server's co-distillation, >= 0; 0 = CE only")
    distill_epochs: int = help_field(1, "co-distillation epochs over the public set per round")
    aggregation: str = help_field("factors", "factors (A and B averaged separately, as the paper) | product (exact "
                                             "mean of B·A, re-factorized to rank r)")
    align_tokenizers: bool = help_field(False, "let the LLM and the SLM use different tokenizers, co-distilling "
                                               "through MinED maps (an extension of the paper)")
    top_k: int = help_field(32, "across tokenizers: the teacher's top-k projected through the maps, 1..1024")

    def check(self, p: Problems) -> None:
        p.range(self.name("kl_weight"), self.kl_weight, 0.0, MAX_LOSS_WEIGHT)
        p.range(self.name("distill_epochs"), self.distill_epochs, 1, MAX_EPOCHS)
        p.choice(self.name("aggregation"), self.aggregation, AGGREGATION_MODES)
        p.range(self.name("top_k"), self.top_k, 1, MAX_TOP_K)
