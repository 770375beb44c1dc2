"""What an algorithm plugs into: the `Strategy` it implements and the `Driver` it drives (no torch here).

A strategy decides: which task goes to which party with which inputs, in which order, and what to record. The driver
(coordinator/driver.py) transports: it pushes every blob a task request names to the party, runs the task as a
resumable step, pulls every blob the typed result names into the coordinator's artifact store, and counts the bytes
by field. Unit tests drive strategies with a fake driver (tests/unit/test_strategies.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from google.protobuf.message import Message

from cotune.algorithms.config import Config, NoConfig, RunConfig
from cotune.errors import Precondition
from cotune.v1 import common_pb2, party_pb2

R = TypeVar("R", bound=Message)


@dataclass(frozen=True)
class PartyRef:
    """A party of a run as strategies see it: its id, role ("llm" | "slm") and how it described itself."""

    party_id: str
    role: str
    info: party_pb2.PartyInfo


class MalformedResult(Precondition):
    """A party answered a step with a result that does not hold what the step must return (the wrong type, a missing
    or unreadable blob, an impossible value). Raised wherever a result is read, so it takes the path of any failed
    step: Driver.on_parties drops a client from the round with the reason as a note; the LLM server, which cannot be
    dropped, fails the run with a message naming it and the step."""

    def __init__(self, party: PartyRef, round: int, step: str, why: str):
        who = f"the LLM server ({party.party_id})" if party.role == "llm" else party.party_id
        super().__init__(f"{who} answered step {step} of round {round} with a malformed result: {why}")


@dataclass(frozen=True)
class TaskOutcome(Generic[R]):
    result: R                        # the task's typed result (cotune.tasks.RESULT_TYPES)
    metrics: dict[str, float]        # what the party reported for the run record
    seconds: float = 0.0             # wall time of the step when it ran (transfers included)


@dataclass
class StepOutcome:
    ok: dict[str, Any] = field(default_factory=dict)       # party_id -> what the per-party function returned
    failed: dict[str, str] = field(default_factory=dict)   # party_id -> why it was dropped


class Driver(Protocol):
    """The coordinator-side services a strategy may use; coordinator.driver.RunDriver implements it."""

    run_id: str
    run: RunConfig
    llm: PartyRef
    clients: list[PartyRef]
    public_set_hash: str

    def task(self, party: PartyRef, round: int, step: str, **task: Message) -> TaskOutcome: ...
    def on_parties(self, parties: Sequence[PartyRef], round: int, step: str, fn: Callable[[PartyRef], Any], *,
                   quorum: int | None = None) -> StepOutcome: ...
    def local_step(self, key: str, fn: Callable[[], dict]) -> dict: ...
    def set_step(self, round: int, step: str) -> None: ...
    def record_metrics(self, round: int, party_id: str, metrics: dict[str, float]) -> None: ...
    def record_artifact(self, round: int, name: str, sha: str) -> None: ...
    def note(self, round: int, message: str, *, dropped: str = "", kind: str = "warning", step: str = "") -> None: ...
    def emit(self, kind: str, *, round: int = 0, step: str = "", message: str = "") -> None: ...
    def check_cancelled(self) -> None: ...
    def concurrently(self, *fns: Callable[[], Any]) -> list: ...
    def ref(self, sha: str) -> common_pb2.BlobRef: ...
    def read_artifact(self, sha: str) -> bytes: ...
    def put_artifact(self, data: bytes, media_type: str) -> str: ...
    def vocab_map(self, src: PartyRef, dst: PartyRef) -> str: ...
    def sequence_alignment(self, src: PartyRef, dst: PartyRef, *, method: str, max_length: int) -> str: ...


class Strategy:
    """One algorithm on the coordinator: checks a run against the parties, then drives its rounds."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[Config]] = NoConfig
    summary: ClassVar[str] = ""  # one line for `cotune algorithms`

    def check(self, config: Config, run: RunConfig, llm: party_pb2.PartyInfo,
              clients: dict[str, party_pb2.PartyInfo]) -> list[str]:
        """Problems of running `config` on these parties (what the spec alone cannot tell); [] when it can run."""
        return []

    def execute(self, d: Driver, config: Config) -> None:
        raise NotImplementedError
