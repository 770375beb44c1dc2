"""What every strategy builds on: a `RunDriver` that runs resumable steps against the services.

A step has a key unique within its run. Its result (metrics and blob ids, JSON) is stored when it
completes; a restarted coordinator replays the strategy and completed steps return their stored result
at once. Tasks carry the step key to the party, so a step that was in flight when the coordinator died is
re-attached to the same operation instead of being recomputed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from cotune.rpc.clients import AlignmentClient, PartyClient
from cotune.errors import Precondition, RpcError
from cotune.v1 import coordinator_pb2 as pb
from cotune.v1 import operations_pb2, party_pb2
from cotune.wire.blobs import BlobStore
from coordinator.store import StateStore

log = logging.getLogger(__name__)


class RunCancelled(Exception):
    pass


@dataclass
class Party:
    party_id: str
    role: str               # "llm" | "slm"
    client: PartyClient
    info: party_pb2.PartyInfo


@dataclass
class StepOutcome:
    ok: dict = field(default_factory=dict)       # party_id -> result
    failed: dict = field(default_factory=dict)   # party_id -> error message


class RunDriver:
    def __init__(self, *, run: pb.Run, store: StateStore, artifacts: BlobStore, llm: Party, clients: Sequence[Party],
                 alignment: AlignmentClient | None, cancel_event: threading.Event):
        self.run = run
        self.run_id = run.run_id
        self.spec = run.spec
        self.store = store
        self.artifacts = artifacts
        self.llm = llm
        self.clients = list(clients)
        self.alignment = alignment
        self._cancel = cancel_event
        self._lock = threading.RLock()
        self.public_set_hash = ""
        self.timeout_s = self.spec.step_timeout_s or 1800.0

    # -- state -------------------------------------------------------------------------------------------------
    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise RunCancelled()

    def save(self) -> None:
        with self._lock:
            self.store.put_run(self.run)

    def emit(self, kind: str, *, round: int = 0, step: str = "", party_id: str = "", done: int = 0, total: int = 0,
             message: str = "") -> None:
        self.store.add_event(pb.RunEvent(run_id=self.run_id, kind=kind, round=round, step=step, party_id=party_id,
                                         done=done, total=total, message=message, state=self.run.state))

    def round_record(self, round: int) -> pb.RoundRecord:
        with self._lock:
            for rec in self.run.rounds:
                if rec.round == round:
                    return rec
            rec = self.run.rounds.add(round=round, started_at=time.time())
            return rec

    def record_metrics(self, round: int, party_id: str, metrics: dict) -> None:
        with self._lock:
            rec = self.round_record(round)
            entry = next((p for p in rec.parties if p.party_id == party_id), None) or rec.parties.add(party_id=party_id)
            for name, value in metrics.items():
                entry.metrics[name] = float(value)
            self.save()

    def note(self, round: int, message: str, *, dropped: str = "", kind: str = "warning") -> None:
        """Keep `message` in the round record and emit it (kind "warning", or "info" for plain facts)."""
        with self._lock:
            rec = self.round_record(round)
            rec.notes.append(message)
            if dropped and dropped not in rec.dropped:
                rec.dropped.append(dropped)
            self.save()
        self.emit(kind, round=round, party_id=dropped, message=message)

    def count_bytes(self, round: int, direction: str, kind: str, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            rec = self.round_record(round)
            target = rec.bytes_sent if direction == "sent" else rec.bytes_received
            target[kind] = target[kind] + int(n)

    def set_step(self, round: int, step: str) -> None:
        with self._lock:
            self.run.current_round = round
            self.run.current_step = step
            self.save()
        self.emit("step", round=round, step=step)

    # -- steps -------------------------------------------------------------------------------------------------
    def step(self, key: str, fn: Callable[[], dict]) -> dict:
        """Run `fn` once per run: a stored result short-circuits it."""
        self.check_cancelled()
        done = self.store.step_result(self.run_id, key)
        if done is not None:
            return done
        result = fn()
        self.store.put_step(self.run_id, key, result)
        return result

    def task(self, party: Party, round: int, step: str, *, before: Callable[[], None] | None = None, **task) -> dict:
        """Run one task on a party as a resumable step; returns {'metrics': {...}, 'blobs': {name: sha}, 'info': {...}}.
        `before` runs first inside the step (e.g. delivering the blobs the task reads)."""
        key = f"r{round}/{step}/{party.party_id}"

        def run_task():
            if before is not None:
                before()
            ctx = party_pb2.RunContext(run_id=self.run_id, round=round, task_key=key, public_set_hash=self.public_set_hash)
            request = party_pb2.TaskRequest(ctx=ctx, **task)

            def on_progress(op: operations_pb2.Operation):
                p = op.progress
                if p.total:
                    self.emit("progress", round=round, step=step, party_id=party.party_id, done=p.done, total=p.total,
                              message=p.stage)

            op = party.client.run_task(request, timeout_s=self.timeout_s, on_progress=on_progress,
                                       should_stop=self._cancel.is_set)
            return {"metrics": dict(op.metrics), "blobs": {n: b.sha256 for n, b in op.blobs.items()}, "info": dict(op.info)}

        return self.step(key, run_task)

    def on_parties(self, parties: Sequence[Party], round: int, step: str, fn: Callable[[Party], dict],
                   *, quorum: int | None = None) -> StepOutcome:
        """Run `fn` for every party in parallel. A party that fails is dropped from the round and reported;
        the step fails only when fewer than `quorum` parties succeed."""
        outcome = StepOutcome()
        if not parties:
            return outcome
        with ThreadPoolExecutor(max_workers=min(len(parties), 16)) as pool:
            futures = {p.party_id: pool.submit(fn, p) for p in parties}
            for pid, fut in futures.items():
                try:
                    outcome.ok[pid] = fut.result()
                except RunCancelled:
                    raise
                except (RpcError, grpc.RpcError, OSError) as exc:  # TaskFailed, validation and transport errors
                    message = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                    outcome.failed[pid] = message
                    self.note(round, f"{step}: {pid} dropped from round {round}: {message}", dropped=pid)
        self.check_cancelled()
        needed = len(parties) if quorum is None else quorum
        if len(outcome.ok) < needed:
            raise Precondition(f"round {round} {step}: only {len(outcome.ok)} of {len(parties)} parties succeeded, "
                               f"quorum is {needed}: " + "; ".join(f"{k}: {v}" for k, v in outcome.failed.items()))
        return outcome

    # -- blobs ---------------------------------------------------------------------------------------------------
    def fetch(self, party: Party, sha: str, round: int, kind: str) -> None:
        """Store-and-forward, inbound: pull a party's blob into the coordinator's artifact store."""
        self.count_bytes(round, "received", kind, party.client.pull(self.artifacts, sha))

    def deliver(self, party: Party, sha: str, round: int, kind: str) -> None:
        """Store-and-forward, outbound: push an artifact to a party (no-op when it already holds it)."""
        self.count_bytes(round, "sent", kind, party.client.push(self.artifacts, sha))

    def ref(self, sha: str):
        return self.artifacts.stat(sha).ref()

    # -- alignment service -------------------------------------------------------------------------------------------
    def register_tokenizers(self, bundles: Sequence[tuple[Party, str]]) -> None:
        """Give the alignment service tokenizer bundles it may build maps between: (the party holding it, its sha)."""
        for holder, sha in bundles:
            self.fetch(holder, sha, 0, "tokenizer")
            self.count_bytes(0, "sent", "tokenizer", self.alignment.push(self.artifacts, sha))
            self.alignment.register_tokenizer(self.ref(sha))

    def alignment_artifact(self, op: operations_pb2.Operation, kind: str, party_id: str) -> str:
        """Wait for an alignment-service build (reporting its progress), pull its result here; returns its sha."""
        def progress(o):
            if o.progress.total:
                self.emit("progress", step=f"align:{kind}", party_id=party_id, done=o.progress.done,
                          total=o.progress.total, message=o.progress.stage)

        op = self.alignment.wait(op, timeout_s=self.timeout_s, on_progress=progress)
        sha = next(iter(op.blobs.values())).sha256
        self.count_bytes(0, "received", kind, self.alignment.pull(self.artifacts, sha))
        return sha


class Strategy:
    """One algorithm: validates a spec against the parties, then drives the rounds."""

    name = ""

    def validate(self, spec: pb.RunSpec, llm_info: party_pb2.PartyInfo, client_infos: dict[str, party_pb2.PartyInfo]) -> None:
        raise NotImplementedError

    def execute(self, driver: RunDriver) -> None:
        raise NotImplementedError
