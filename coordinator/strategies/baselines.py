"""Baselines on the same services, for honest comparison (DESIGN, "Baselines"):

- ``zero-shot``: evaluate every party once (round 0) and stop; `rounds` is ignored.
- ``standalone``: each client trains on its own private data every round, nothing is exchanged; the LLM is
  evaluated once (round 0) since nothing changes it.
- ``fedavg``: FedAvg of the SLM LoRA among homogeneous clients (same tokenizer and LoRA layout): round 0 sets
  the first client's initial adapter on every client; each round clients train, the coordinator averages their
  adapters by sample count (validated like FedCoLLM's uploads) and broadcasts the mean. No LLM involvement.
- ``llm2slm``: FedMKT with the LLM frozen (its `llm_to_slm` setting): clients train, the LLM sends its public
  top-k logits, clients distil from them; nothing flows back into the LLM.
"""

from __future__ import annotations

from cotune.rpc.errors import InvalidInput
from coordinator.strategies import lora_fed
from coordinator.strategies.base import RunDriver, Strategy
from coordinator.strategies.fedmkt import FedMKT


class ZeroShot(Strategy):
    name = "zero-shot"

    def validate(self, spec, llm_info, client_infos) -> None:
        pass

    def execute(self, d: RunDriver) -> None:
        d.set_step(0, "evaluate")
        lora_fed.evaluate(d, [d.llm, *d.clients], 0)
        if d.spec.rounds > 0:
            d.note(0, "zero-shot: evaluation only; spec.rounds is ignored")


class Standalone(Strategy):
    name = "standalone"

    def validate(self, spec, llm_info, client_infos) -> None:
        pass

    def execute(self, d: RunDriver) -> None:
        d.set_step(0, "evaluate")
        lora_fed.evaluate(d, [d.llm, *d.clients], 0)
        for rnd in range(1, d.spec.rounds + 1):
            d.check_cancelled()
            active, _ = lora_fed.train_local(d, d.clients, rnd)
            d.set_step(rnd, "evaluate")
            lora_fed.evaluate(d, active, rnd)
            d.emit("metrics", round=rnd, message=f"round {rnd} complete")


class FedAvg(Strategy):
    name = "fedavg"

    def validate(self, spec, llm_info, client_infos) -> None:
        lora_fed.validate_homogeneous(spec, client_infos, what="fedavg")

    def execute(self, d: RunDriver) -> None:
        theta = lora_fed.initial_adapter(d, d.clients[0])
        lora_fed.broadcast(d, d.clients, 0, theta)
        d.set_step(0, "evaluate")
        lora_fed.evaluate(d, d.clients, 0)
        for rnd in range(1, d.spec.rounds + 1):
            d.check_cancelled()
            active, samples = lora_fed.train_local(d, d.clients, rnd)
            theta, _ = lora_fed.collect_and_aggregate(d, active, rnd, theta, samples)
            lora_fed.broadcast(d, d.clients, rnd, theta)
            d.set_step(rnd, "evaluate")
            lora_fed.evaluate(d, d.clients, rnd)
            d.emit("metrics", round=rnd, message=f"round {rnd} complete")


class LLMToSLM(FedMKT):
    """FedMKT with the LLM frozen: exactly FedMKT's `llm_to_slm` setting, under its own algorithm name."""

    name = "llm2slm"

    def validate(self, spec, llm_info, client_infos) -> None:
        if spec.setting not in ("", "llm_to_slm"):
            raise InvalidInput(f"llm2slm is FedMKT's llm_to_slm setting; leave spec.setting empty, got {spec.setting!r}")
        spec.setting = "llm_to_slm"  # recorded on the run, so a resumed run keeps it
        super().validate(spec, llm_info, client_infos)

    def execute(self, d: RunDriver) -> None:
        d.spec.setting = "llm_to_slm"
        super().execute(d)
