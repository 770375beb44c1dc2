"""Baselines on the same services, for honest comparison (DESIGN, "Baselines"):

- ``zero-shot``: evaluate every party once (round 0) and stop; `rounds` is ignored.
- ``standalone``: each client trains on its own private data every round, nothing is exchanged; the LLM is
  evaluated once (round 0) since nothing changes it.
- ``fedavg``: FedAvg of the SLM LoRA among homogeneous clients (same tokenizer and LoRA layout): round 0 sets
  the first client's initial adapter on every client; each round clients train, the coordinator averages their
  adapters by sample count (validated like FedCoLLM's uploads) and broadcasts the mean. No LLM involvement.
- ``llm2slm``: FedMKT with the LLM frozen (its `llm_to_slm` setting): clients train, the LLM sends its public
  top-k logits, clients distil from them; nothing flows back into the LLM.
- ``centralized``: the NON-FEDERATED reference, an upper bound on what pooling the data would give: exactly one
  SLM client, which holds the union of every client's private shard (the deployment puts it there; `cotune demo
  --algorithm centralized` builds it), trains on it every round; the LLM server also trains on its private data when
  it holds any (the demo gives it the same union). Every round record says it is not federated.
"""

from __future__ import annotations

from cotune.errors import InvalidInput
from cotune.algorithms import steps as lora_fed
from coordinator.driver import RunDriver, Strategy
from cotune.algorithms.fedmkt.strategy import FedMKT


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

    def trainees(self, d: RunDriver) -> list:
        return d.clients

    def label(self, d: RunDriver, rnd: int) -> None:
        """A note for the round record before the round runs (none here)."""

    def execute(self, d: RunDriver) -> None:
        self.label(d, 0)
        d.set_step(0, "evaluate")
        lora_fed.evaluate(d, [d.llm, *d.clients], 0)
        for rnd in range(1, d.spec.rounds + 1):
            d.check_cancelled()
            self.label(d, rnd)
            active, _ = lora_fed.train_local(d, self.trainees(d), rnd)
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


class Centralized(Standalone):
    """Standalone's loop on different data: the one client holds the union (and the LLM server trains if it holds
    private data), and every round record says so."""

    name = "centralized"
    LABEL = ("centralized: NON-FEDERATED reference - one party trains on the union of the private shards; "
             "no privacy boundary holds in this run")

    def validate(self, spec, llm_info, client_infos) -> None:
        if len(client_infos) != 1:
            raise InvalidInput(f"centralized is the non-federated reference: select exactly one client (spec.clients), the "
                               f"one holding the union of the private shards; got {len(client_infos)}: "
                               f"{', '.join(sorted(client_infos))}")
        (cid, info), = client_infos.items()
        if not info.private_set_size:
            raise InvalidInput(f"centralized: client {cid} holds no private data to train on")

    def trainees(self, d: RunDriver) -> list:
        return [*([d.llm] if d.llm.info.private_set_size else []), *d.clients]

    def label(self, d: RunDriver, rnd: int) -> None:
        d.note(rnd, self.LABEL, kind="info")
