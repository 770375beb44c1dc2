"""The LLM server: the party that holds the large model (CUDA when present) and, except in the centralized baseline,
no private data. Its task table is every task it serves, by kind; a task outside it is FAILED_PRECONDITION."""

from __future__ import annotations

from cotune.algorithms.fedbiot import server as fedbiot
from cotune.algorithms.fedcollm import server as fedcollm
from cotune.algorithms.fedmkt import tasks as fedmkt
from cotune.config import PartyConfig
from cotune.metrics import set_model_bytes
from cotune.party import tasks as generic
from cotune.party.base import ModelParty
from cotune.party.runstate import StateKind
from cotune.v1 import party_pb2


class LLMServer(ModelParty):
    role = "llm"
    role_name = "the LLM server"

    def __init__(self, cfg: PartyConfig):
        super().__init__(cfg)
        self.tasks = {
            "evaluate": generic.evaluate,
            "get_lora": generic.get_lora,
            "set_lora": generic.set_lora,
            "public_logits": fedmkt.public_logits,     # FedMKT
            "distill": fedmkt.distill,                 # FedMKT
            "co_distill": fedcollm.co_distill,         # FedCoLLM
            "compress": fedbiot.compress,              # FedBiOT
            "align_emulator": fedbiot.align_emulator,  # FedBiOT
        }
        if self.private:  # the centralized baseline gives the LLM server (pooled) private data to train on
            self.tasks["train_local"] = generic.train_local
        self.not_served = {
            "train_local": "it holds no private data (data.private; only the centralized baseline configures some)",
            "load_model": "it keeps its configured model; LoadModelTask installs a shipped model on an SLM client",
            "train_adapter": "SLM client task",
        }
        self.targets.update({
            "companion": fedcollm.companion_target,    # FedCoLLM's copy of the SLM
            "compressed": fedbiot.compressed_target,   # FedBiOT's emulator + adapter, after a CompressTask
        })
        self.durable_states.update({  # kept per run (cotune.party.runstate)
            fedcollm.STATE: StateKind(fedcollm.save_companion, fedcollm.restore_companion, fedcollm.reset_companion),
            fedbiot.STATE: StateKind(fedbiot.save_compressed, fedbiot.restore_compressed, lambda party: None),
        })

    def setup(self) -> None:
        if self.cfg.model.companion_slm_path:
            fedcollm.load_companion(self)
            set_model_bytes(self.cfg.party_id, "companion", self.target("companion").model)

    def describe_extra(self, info: party_pb2.PartyInfo) -> None:
        companion = fedcollm.describe_companion(self)
        if companion is not None:
            info.companion.CopyFrom(companion)
