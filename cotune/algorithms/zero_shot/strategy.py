"""zero-shot: evaluate every party once (round 0) and stop; `rounds` is ignored."""

from __future__ import annotations

from cotune.algorithms import steps
from cotune.algorithms.base import Driver, Strategy
from cotune.algorithms.config import NoConfig


class ZeroShot(Strategy):
    name = "zero-shot"
    summary = "evaluate every party once, before any training"

    def execute(self, d: Driver, config: NoConfig) -> None:
        d.set_step(0, "evaluate")
        steps.evaluate(d, [d.llm, *d.clients], 0)
        if d.run.rounds > 1:
            d.note(0, "zero-shot: evaluation only; rounds is ignored")
