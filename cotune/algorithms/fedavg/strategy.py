"""fedavg: FedAvg of the SLM LoRA among homogeneous clients (same tokenizer and LoRA layout): round 0 sets the first
client's initial adapter on every client; each round clients train, the coordinator averages their adapters by sample
count (validated like FedCoLLM's uploads) and broadcasts the mean. No LLM involvement."""

from __future__ import annotations

from cotune.algorithms import steps
from cotune.algorithms.base import Driver, Strategy
from cotune.algorithms.fedavg.config import FedAvgConfig


class FedAvg(Strategy):
    name = "fedavg"
    config_class = FedAvgConfig
    summary = "FedAvg of client SLM LoRA; no LLM"

    def check(self, config, run, llm, clients) -> list[str]:
        return steps.homogeneity_problems(clients, what="fedavg")

    def execute(self, d: Driver, config: FedAvgConfig) -> None:
        theta = steps.get_adapter(d, d.clients[0], 0, record="init")
        steps.broadcast(d, d.clients, 0, theta)
        d.set_step(0, "evaluate")
        steps.evaluate(d, d.clients, 0)
        for rnd in range(1, d.run.rounds + 1):
            d.check_cancelled()
            active, samples = steps.train_local(d, d.clients, rnd)
            theta, _ = steps.collect_and_aggregate(d, active, rnd, theta, samples, config.aggregation)
            steps.broadcast(d, d.clients, rnd, theta)
            d.set_step(rnd, "evaluate")
            steps.evaluate(d, d.clients, rnd)
            d.emit("metrics", round=rnd, message=f"round {rnd} complete")
