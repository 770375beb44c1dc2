"""FedMKT's settings (and llm2slm's, its one-way setting under its own name)."""

from __future__ import annotations

from dataclasses import dataclass

from cotune.algorithms.config import Config, Problems, help_field
from cotune.align.seqalign import METHODS as ALIGNMENT_METHODS
from cotune.align.vocabmap import PROJECTIONS
from cotune.tasks import MAX_EPOCHS, MAX_TOP_K

SETTINGS = ("heterogeneous", "homogeneous", "one_to_one", "llm_to_slm")
SELECTIONS = ("dualmince", "fate_self")


@dataclass(frozen=True)
class FedMKTConfig(Config):
    section = "fedmkt"

    setting: str = help_field("heterogeneous", "heterogeneous | homogeneous (clients share one tokenizer) | one_to_one "
                                               "(one client) | llm_to_slm (the LLM is frozen; clients learn from it)")
    top_k: int = help_field(16, "logits kept per public position, 1..1024")
    ce_weight: float = help_field(0.9, "λ in λ·CE + (1 − λ)·KD, in [0, 1]; 0 = pure distillation, 1 = CE only")
    distill_epochs: int = help_field(1, "distillation epochs over the public set per round")
    selection: str = help_field("dualmince", "dualmince (the paper: per sample, the teacher with the lowest loss, "
                                             "if it beats the receiver) | fate_self (FATE-LLM's self-distillation fallback)")
    logits_bits: int = help_field(0, "0 = lossless logits codec; 2..16 = bits per quantized log-probability")
    alignment_method: str = help_field("offsets", "sequence alignment across tokenizers: offsets | dtw")
    projection: str = help_field("mined", "across tokenizers, how teacher ids become the receiver's: mined (the "
                                          "paper's MinED map) | first_token (the first token of the receiver's own "
                                          "encoding of the teacher token's text: GPT-2 ' lens' -> Llama-2 '▁l')")
    skip_span_mismatch: bool = help_field(False, "across tokenizers, distil only at positions where the teacher's "
                                                 "and the student's next tokens cover the same text")

    def check(self, p: Problems) -> None:
        p.choice(self.name("setting"), self.setting, SETTINGS)
        p.range(self.name("top_k"), self.top_k, 1, MAX_TOP_K)
        p.range(self.name("ce_weight"), self.ce_weight, 0.0, 1.0)
        p.range(self.name("distill_epochs"), self.distill_epochs, 1, MAX_EPOCHS)
        p.choice(self.name("selection"), self.selection, SELECTIONS)
        if self.logits_bits != 0:
            p.range(self.name("logits_bits"), self.logits_bits, 2, 16)
        p.choice(self.name("alignment_method"), self.alignment_method, ALIGNMENT_METHODS)
        p.choice(self.name("projection"), self.projection, PROJECTIONS)

    @property
    def mutual(self) -> bool:
        """Whether knowledge also flows from the clients into the LLM."""
        return self.setting != "llm_to_slm"


@dataclass(frozen=True)
class LLMToSLMConfig(FedMKTConfig):
    """llm2slm: FedMKT with the LLM frozen. Its settings are FedMKT's, with `setting` fixed to llm_to_slm."""

    setting: str = help_field("llm_to_slm", "fixed: llm_to_slm")

    def check(self, p: Problems) -> None:
        super().check(p)
        if self.setting != "llm_to_slm":
            p.append(f"fedmkt.setting: llm2slm is FedMKT's llm_to_slm setting; leave it unset (got {self.setting!r})")
