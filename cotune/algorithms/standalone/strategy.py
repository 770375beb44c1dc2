"""standalone: each client trains on its own private data every round, nothing is exchanged; the LLM is evaluated
once (round 0) since nothing changes it."""

from __future__ import annotations

from cotune.algorithms import steps
from cotune.algorithms.base import Driver, PartyRef, Strategy
from cotune.algorithms.config import NoConfig


class Standalone(Strategy):
    name = "standalone"
    summary = "clients train on their own data only; nothing is exchanged"

    def trainees(self, d: Driver) -> list[PartyRef]:
        return d.clients

    def label(self, d: Driver, rnd: int) -> None:
        """A note for the round record before the round runs (none here)."""

    def execute(self, d: Driver, config: NoConfig) -> None:
        self.label(d, 0)
        d.set_step(0, "evaluate")
        steps.evaluate(d, [d.llm, *d.clients], 0)
        for rnd in range(1, d.run.rounds + 1):
            d.check_cancelled()
            self.label(d, rnd)
            active, _ = steps.train_local(d, self.trainees(d), rnd)
            d.set_step(rnd, "evaluate")
            steps.evaluate(d, active, rnd)
            d.emit("metrics", round=rnd, message=f"round {rnd} complete")
