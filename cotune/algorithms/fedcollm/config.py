"""FedCoLLM's settings."""

from __future__ import annotations

from dataclasses import dataclass

from cotune.algorithms.aggregate import MODES as AGGREGATION_MODES
from cotune.algorithms.config import Config, Problems, help_field
from cotune.tasks import MAX_EPOCHS, MAX_LOSS_WEIGHT, MAX_TOP_K

# The co-distillation's KD term for a student s learning from a teacher t (the other model, detached), on both paths
# (cotune.algorithms.fedcollm.losses and .losses_cross): "forward" = KL(t‖s), the FedCoLLM authors' code and the
# only one defined against a sparse top-k target; "reverse" = KL(s‖t), the paper's formula as written (the updated
# model first); across tokenizers s is then restricted to t's projected support and renormalized.
KL_DIRECTIONS = ("forward", "reverse")


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
    kl_direction: str = help_field("forward", "the KD term of each model's loss: forward = KL(teacher‖student) (the "
                                              "authors' code) | reverse = KL(student‖teacher) (the paper's formula)")

    def check(self, p: Problems) -> None:
        p.range(self.name("kl_weight"), self.kl_weight, 0.0, MAX_LOSS_WEIGHT)
        p.range(self.name("distill_epochs"), self.distill_epochs, 1, MAX_EPOCHS)
        p.choice(self.name("aggregation"), self.aggregation, AGGREGATION_MODES)
        p.range(self.name("top_k"), self.top_k, 1, MAX_TOP_K)
        p.choice(self.name("kl_direction"), self.kl_direction, KL_DIRECTIONS)
