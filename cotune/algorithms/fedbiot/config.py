"""FedBiOT's settings (and FedOT's: the same pipeline without per-round emulator alignment)."""

from __future__ import annotations

from dataclasses import dataclass

from cotune.algorithms.aggregate import MODES as AGGREGATION_MODES
from cotune.algorithms.config import Config, Problems, help_field
from cotune.tasks import MAX_ADAPTER_LAYERS, MAX_LOSS_WEIGHT, MAX_LR, MAX_STEPS

@dataclass(frozen=True)
class FedBiOTConfig(Config):
    section = "fedbiot"

    adapter_layers: int = help_field(2, "N: the last N decoder layers of the LLM form the adapter the clients tune")
    drop: float = help_field(0.2, "fraction of the other layers dropped from the emulator, in (0, 1)")
    pre_align_steps: int = help_field(20, "S0: emulator alignment steps before round 1; 0 = none")
    align_steps: int = help_field(10, "S: emulator alignment steps after each aggregation")
    kl_weight: float = help_field(1.0, "β in normalized-L2 + β·KL of the emulator alignment, >= 0; 0 = L2 only")
    prox_eps: float = help_field(0.01, "ε of the clients' proximal term (ε/2)·||θ − θᵗ||², >= 0; 0 = plain CE")
    align_lr: float | None = help_field(None, "emulator LoRA learning rate; unset = the LLM server's training.lr")
    aggregation: str = help_field("factors", "factors | product (see fedcollm.aggregation)")

    def check(self, p: Problems) -> None:
        p.range(self.name("adapter_layers"), self.adapter_layers, 1, MAX_ADAPTER_LAYERS)
        if not 0.0 < self.drop < 1.0:  # also rejects NaN
            p.append(f"{self.name('drop')} must be in (0, 1), got {self.drop}")
        p.range(self.name("pre_align_steps"), self.pre_align_steps, 0, MAX_STEPS)
        p.range(self.name("align_steps"), self.align_steps, 0, MAX_STEPS)
        p.range(self.name("kl_weight"), self.kl_weight, 0.0, MAX_LOSS_WEIGHT)
        p.range(self.name("prox_eps"), self.prox_eps, 0.0, MAX_LOSS_WEIGHT)
        if self.align_lr is not None:
            p.range(self.name("align_lr"), self.align_lr, 0.0, MAX_LR, lo_open=True)
        p.choice(self.name("aggregation"), self.aggregation, AGGREGATION_MODES)

@dataclass(frozen=True)
class FedOTConfig(FedBiOTConfig):
    """FedOT: the emulator is aligned once (pre_align_steps) and never again, so align_steps must stay 0."""

    align_steps: int = help_field(0, "fixed: 0 (fedot never re-aligns; use fedbiot for per-round alignment)")

    def check(self, p: Problems) -> None:
        super().check(p)
        if self.align_steps:
            p.append(f"fedbiot.align_steps: fedot never re-aligns the emulator after aggregation; leave it unset "
                     f"(got {self.align_steps}; use fedbiot for per-round alignment)")
