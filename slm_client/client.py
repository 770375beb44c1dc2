"""An SLM client: one data owner's small model, its private data, and the shared public set. Its task table is every
task it serves, by kind; a task outside it is FAILED_PRECONDITION."""

from __future__ import annotations

from cotune.algorithms.fedbiot import client as fedbiot
from cotune.algorithms.fedmkt import tasks as fedmkt
from cotune.config import PartyConfig
from cotune.party import tasks as generic
from cotune.party.base import ModelParty, held_elsewhere


class SLMClient(ModelParty):
    role = "slm"
    role_name = "an SLM client"

    def __init__(self, cfg: PartyConfig):
        super().__init__(cfg)
        self.tasks = {
            "train_local": generic.train_local,
            "evaluate": generic.evaluate,
            "get_lora": generic.get_lora,
            "set_lora": generic.set_lora,
            "public_logits": fedmkt.public_logits,   # FedMKT
            "distill": fedmkt.distill,               # FedMKT
            "load_model": fedbiot.load_model,        # FedBiOT
            "train_adapter": fedbiot.train_adapter,  # FedBiOT
        }
        self.not_served = {kind: "LLM server task" for kind in ("co_distill", "compress", "align_emulator")}
        self.targets.update({
            "companion": held_elsewhere("companion SLM: target 'companion' is the LLM server's copy of the SLM "
                                        "(FedCoLLM)"),
            "compressed": held_elsewhere("compressed model as a target: 'compressed' is the LLM server's emulator + "
                                         "adapter, built by its CompressTask (FedBiOT)"),
        })

    def setup(self) -> None:
        fedbiot.attach_layer_map(self)  # a client may be configured with a compressed model directory

    def on_model_installed(self) -> None:
        fedbiot.attach_layer_map(self)

    def install_archive(self, sha: str) -> None:
        fedbiot.install_archive(self, sha)
