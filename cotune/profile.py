"""Where a task's time goes: exclusive seconds per phase, measured on the thread that runs the task.

The operation worker collects a `Profile` around each task (`collecting()`); code on that thread marks its phases with
`phase("forward")` etc. Phases nest exclusively: entering a phase pauses the enclosing one, so the seconds of all
phases never add up to more than the task's wall time (the rest is reported as "other"). Outside a collection,
`phase` costs one context-variable lookup. No torch here: the coordinator and the alignment service use it too.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager

# data: tokenization and batch assembly; forward / backward / optimizer: the model; codec: logits shards;
# checkpoint: restoring the run's saved state and saving it after the step (cotune.party.runstate)
PHASES = ("data", "forward", "backward", "optimizer", "codec", "checkpoint")

_current: contextvars.ContextVar[Profile | None] = contextvars.ContextVar("cotune_profile", default=None)


class Profile:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[list] = []  # [phase, started] of the open phases, innermost last

    def _enter(self, name: str) -> None:
        now = time.perf_counter()
        if self._stack:
            outer = self._stack[-1]
            self.seconds[outer[0]] = self.seconds.get(outer[0], 0.0) + now - outer[1]
        self._stack.append([name, now])

    def _exit(self) -> None:
        now = time.perf_counter()
        name, started = self._stack.pop()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - started
        if self._stack:
            self._stack[-1][1] = now  # the enclosing phase resumes


@contextmanager
def collecting() -> Iterator[Profile]:
    """Collect the phases marked on this thread (and the contexts it spawns) until the block ends."""
    profile = Profile()
    token = _current.set(profile)
    try:
        yield profile
    finally:
        _current.reset(token)


@contextmanager
def phase(name: str) -> Iterator[None]:
    profile = _current.get()
    if profile is None:
        yield
        return
    profile._enter(name)
    try:
        yield
    finally:
        profile._exit()
