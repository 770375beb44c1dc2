"""The run driver: runs a strategy's steps against the services, resumably, and moves every byte.

A step has a key unique within its run. Its result is stored when it completes; a restarted coordinator replays the
strategy and completed steps return their stored result at once. Tasks carry the step key to the party, so a step
that was in flight when the coordinator died is re-attached to the same operation instead of being recomputed.

Transport is the driver's alone: before a task starts it pushes every blob the request names (cotune.tasks), after it
succeeds it pulls every blob the typed result names into the artifact store, and it counts the bytes of each transfer
in the round record under `<task>.<field>` (e.g. `distill.teachers.shard` sent, `public_logits.shard` received).
Strategies (cotune/algorithms) only decide what to run.

Services may restart under a run. A party (or the alignment service) that is unreachable, still loading its model,
or that forgot the operation it was running is waited for, up to the coordinator's `party_grace_s`, polling it with
backoff and reporting the wait as run events; the step is then re-issued under the same idempotency key (the party
re-attaches, returns what it stored, or runs it afresh). A client's address is looked up again in the registry each
time it is redialled, since a restarted client may come back elsewhere and register again. Past the grace period a
client is dropped from the step (quorum permitting); the LLM server or the alignment service fail the run. Every error
names the service, its address, the round and the step.

Replays record nothing twice: a note is kept once per (round, message), events of the kinds strategies emit about
finished work once per content, metrics and artifacts only when they change, and the clients a step dropped are
stored with it, so a replay drops them again without asking them (or waiting for them) a second time.
"""

from __future__ import annotations

import base64
import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf.message import DecodeError, Message

from coordinator.store import StateStore
from cotune import metrics as cotune_metrics  # Prometheus (`metrics` here means a party's task metrics)
from cotune.algorithms.base import MalformedResult, PartyRef, StepOutcome, TaskOutcome
from cotune.algorithms.config import RunConfig
from cotune.align.vocabmap import VocabMap
from cotune.errors import Precondition, RpcError, Unavailable
from cotune.rpc.clients import AlignmentClient, OperationLost, PartyClient, TaskFailed
from cotune.rpc.operations import TIME_PREFIX
from cotune.tasks import RESULT_TYPES, request_blobs, result_blobs, result_problems
from cotune.v1 import coordinator_pb2 as pb
from cotune.v1 import operations_pb2, party_pb2
from cotune.wire.blobs import BlobStore

log = logging.getLogger(__name__)

PARTY_GRACE_S = 900.0  # CoordinatorConfig.party_grace_s's default: longer than a model load
MAX_REISSUES = 10      # re-issues of one step after its service came back, before the step fails
WAIT_REPORT_S = 30.0   # how often a wait for a service is reported as an event
# transport failures worth waiting out: the service is down or restarting (UNAVAILABLE), or did not answer in time
TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# The plan's parallelism where a task is issued (RunContext.parallel_tasks): how many step sequences run at once
# (Driver.concurrently) and how many parties the current step has (Driver.on_parties). From the plan, not from timing,
# so a task gets the same thread budget in every run of a spec, replays included.
_LANES: contextvars.ContextVar[int] = contextvars.ContextVar("cotune_driver_lanes", default=1)
_WIDTH: contextvars.ContextVar[int] = contextvars.ContextVar("cotune_driver_width", default=1)
POLL_MAX_S = 1.0  # the longest pause between probes of a party that is down: it is used again within a second
ONCE_KINDS = ("metrics", "warning", "info", "step")  # events a replay would emit again: not when already recorded
DROPPED = "@dropped"  # step-key suffix under which a step stores the parties it dropped (not a party id: '@')


class RunCancelled(Exception):
    pass


class StepFailed(RpcError):
    """A step failed at a service; the message names the service, its address, the round and the step, and the code
    is the service's (or UNAVAILABLE when it could not be reached)."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self.code = code
        super().__init__(message)


class _Peer:
    """A service the driver dials: a party (by id) or the alignment service."""

    def __init__(self, key: str, label: Callable[[], str], current: Callable[[], object],
                 fresh: Callable[[], object], probe: Callable[[object], str | None],
                 adopt: Callable[[object, int, str], None]):
        self.key = key          # the party id, or "alignment"
        self.label = label      # "llm server (llm at ADDR)", in messages
        self.current = current  # the client the driver uses now
        self.fresh = fresh      # a new client at the service's current address (a fresh channel: no reconnect backoff)
        self.probe = probe      # None when the service is back and ready, else why not
        self.adopt = adopt      # adopt(client, round, step): make a fresh client that answered the driver's client


class RunDriver:
    def __init__(self, *, run: pb.Run, config: RunConfig, store: StateStore, artifacts: BlobStore,
                 llm: tuple[PartyRef, PartyClient], clients: Sequence[tuple[PartyRef, PartyClient]],
                 alignment: AlignmentClient | None, cancel_event: threading.Event,
                 redial: Callable[[PartyRef], PartyClient] | None = None,
                 redial_alignment: Callable[[], AlignmentClient] | None = None,
                 party_grace_s: float = PARTY_GRACE_S):
        """`redial(party)`: a new client of the party at its address now (the LLM server's configured one, a client's
        registered one), used when it must be reached again after a failure; `redial_alignment` likewise. Without
        them the driver keeps the clients it was given. `party_grace_s`: how long to wait for a service that is
        down or loading before giving up on it."""
        self.record = run
        self.run_id = run.run_id
        self.run = config
        self.store = store
        self.artifacts = artifacts
        self.llm = llm[0]
        self.clients = [ref for ref, _ in clients]
        self._rpc: dict[str, PartyClient] = {ref.party_id: client for ref, client in [llm, *clients]}
        self.alignment = alignment
        self._cancel = cancel_event
        self._lock = threading.RLock()
        self.public_set_hash = run.spec.public_set_hash
        self.timeout_s = config.step_timeout_s
        self._redial = redial
        self._redial_alignment = redial_alignment
        self.party_grace_s = float(party_grace_s)
        self._retired: list = []         # clients replaced by a redial (closed with the driver: threads may hold them)
        self._gave_up: set[str] = set()  # services waited for past the grace period: later steps do not wait again
        # what earlier executions of this run recorded, so that a replay records none of it twice
        self._recorded_events: set[tuple] = set()
        seq = 0
        while True:
            events = self.store.events_after(self.run_id, seq)
            if not events:
                break
            seq = events[-1].seq
            self._recorded_events.update(self._signature(e.kind, e.round, e.step, e.party_id, e.message)
                                         for e in events if e.kind in ONCE_KINDS)
        self._prior_notes = {(r.round, n) for r in run.rounds for n in r.notes}
        # the step the run was at when it stopped: it is redone, so its step event is shown again (once)
        self._resume_point: tuple[int, str] | None = (run.current_round, run.current_step) if run.current_step else None
        # round timing for cotune_round_duration_seconds: the round being timed, since when, and whether any step of it
        # ran in this execution (a round replayed from stored results is not observed)
        self._round_clock: tuple[int, float] | None = None
        self._round_worked = False

    # -- state -------------------------------------------------------------------------------------------------
    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise RunCancelled()

    def save(self) -> None:
        with self._lock:
            self.store.put_run(self.record)

    @staticmethod
    def _signature(kind: str, round: int, step: str, party_id: str, message: str) -> tuple:
        return kind, round, step, party_id, message

    def emit(self, kind: str, *, round: int = 0, step: str = "", party_id: str = "", done: int = 0, total: int = 0,
             message: str = "", once: bool | None = None) -> None:
        """Add a run event. An event of the kinds in ONCE_KINDS (steps, metrics, notes: what a replay of finished
        work emits again) that an earlier execution of this run (before a coordinator restart or a ResumeRun) already
        recorded with the same content is not added again, unless `once=False` (news each time, e.g. a wait for a
        service, or the step a resumed run redoes)."""
        if (once if once is not None else kind in ONCE_KINDS) and \
                self._signature(kind, round, step, party_id, message) in self._recorded_events:
            return
        self.store.add_event(pb.RunEvent(run_id=self.run_id, kind=kind, round=round, step=step, party_id=party_id,
                                         done=done, total=total, message=message, state=self.record.state))

    def _find_round(self, round: int) -> pb.RoundRecord | None:
        return next((r for r in self.record.rounds if r.round == round), None)

    def round_record(self, round: int) -> pb.RoundRecord:
        """The round's record, created at its first change; every change stamps finished_at (its last change)."""
        with self._lock:
            rec = self._find_round(round)
            if rec is None:
                rec = self.record.rounds.add(round=round, started_at=time.time())
            rec.finished_at = time.time()
            return rec

    def record_metrics(self, round: int, party_id: str, metrics: dict) -> None:
        self._record_metrics(round, {party_id: metrics})

    def _record_metrics(self, round: int, by_party: dict[str, dict]) -> None:
        """Several parties' metrics in one save of the run record; nothing is touched when every value is already
        recorded (a replay), so a finished round keeps its finished_at."""
        with self._lock:
            rec = self._find_round(round)
            if rec is not None and all(_recorded(rec, party_id, metrics) for party_id, metrics in by_party.items()):
                return
            rec = self.round_record(round)
            for party_id, metrics in by_party.items():
                entry = (next((p for p in rec.parties if p.party_id == party_id), None)
                         or rec.parties.add(party_id=party_id))
                for name, value in metrics.items():
                    entry.metrics[name] = float(value)
            self.save()

    def note(self, round: int, message: str, *, dropped: str = "", kind: str = "warning", step: str = "") -> None:
        """Keep `message` in the round record and emit it (kind "warning", or "info" for plain facts). A note is kept
        once per (round, message): the same note from a replayed step is already there. `dropped`: the party the
        note drops from the round, at `step` (counted in cotune_clients_dropped_total)."""
        with self._lock:
            rec = self._find_round(round)
            if rec is not None and message in rec.notes and (not dropped or dropped in rec.dropped):
                return
            rec = self.round_record(round)
            if message not in rec.notes:
                rec.notes.append(message)
            if dropped and dropped not in rec.dropped:
                rec.dropped.append(dropped)
                cotune_metrics.client_dropped(step)
            self.save()
        self.emit(kind, round=round, party_id=dropped, message=message, once=False)  # new in the record: news

    def _drop_note(self, round: int, step: str, party_id: str) -> str:
        return f"{step}: {party_id} dropped from round {round}: "

    def _clear_earlier_drop(self, round: int, step: str, party_id: str) -> None:
        """A party dropped from `step` by an earlier execution of this run (that then failed) completed the step now
        that the run resumed: it is no longer dropped from the round, and its note says so."""
        prefix = self._drop_note(round, step, party_id)
        with self._lock:
            rec = self._find_round(round)
            if rec is None:
                return
            hits = [i for i, n in enumerate(rec.notes) if n.startswith(prefix) and (round, n) in self._prior_notes]
            if not hits:
                return
            for i in hits:
                rec.notes[i] = (f"{step}: {party_id} failed in round {round} before the run was resumed, then completed "
                                f"the step: {rec.notes[i][len(prefix):]}")
            marker = f": {party_id} dropped from round {round}: "
            if party_id in rec.dropped and not any(marker in n for n in rec.notes):
                rec.dropped.remove(party_id)
            rec.finished_at = time.time()
            self.save()

    def count_bytes(self, round: int, direction: str, kind: str, n: int) -> None:
        if n <= 0:
            return
        cotune_metrics.message_bytes(direction, kind, n)
        with self._lock:
            rec = self.round_record(round)
            target = rec.bytes_sent if direction == "sent" else rec.bytes_received
            target[kind] = target[kind] + int(n)

    def set_step(self, round: int, step: str) -> None:
        with self._lock:
            self._time_round(round)
            self.record.current_round = round
            self.record.current_step = step
            self.save()
            again = self._resume_point == (round, step)  # the step being redone after a restart or resume
            if again:
                self._resume_point = None
        self.emit("step", round=round, step=step, once=not again)

    def _time_round(self, round: int) -> None:
        """A step of `round` starts: a later round than the one being timed ends that one (caller holds the lock)."""
        now = time.monotonic()
        if self._round_clock is not None and round <= self._round_clock[0]:
            return
        self.finish_rounds(now)
        self._round_clock = (round, now)

    def finish_rounds(self, now: float | None = None) -> None:
        """The round being timed ended (a later round started, or the run succeeded): observe its duration, unless
        every step of it was replayed from stored results."""
        with self._lock:
            if self._round_clock is not None and self._round_worked:
                seconds = (time.monotonic() if now is None else now) - self._round_clock[1]
                cotune_metrics.ROUND_SECONDS.labels(cotune_metrics.label(self.record.spec.algorithm)).observe(seconds)
            self._round_clock, self._round_worked = None, False

    def record_artifact(self, round: int, name: str, sha: str) -> None:
        with self._lock:
            rec = self._find_round(round)
            if rec is not None and rec.artifacts.get(name) == sha:
                return
            self.round_record(round).artifacts[name] = sha
            self.save()

    # -- steps -------------------------------------------------------------------------------------------------
    def local_step(self, key: str, fn: Callable[[], dict]) -> dict:
        """Run `fn` (work done here, on the coordinator) once per run: a stored result short-circuits it."""
        self.check_cancelled()
        done = self.store.step_result(self.run_id, key)
        if done is not None:
            return done
        self._round_worked = True
        result = fn()
        self.store.put_step(self.run_id, key, result)
        return result

    def task(self, party: PartyRef, round: int, step: str, **task: Message) -> TaskOutcome:
        """Run one task on a party as a resumable step: push the blobs the request names, run it, pull the blobs its
        typed result names. Returns the typed result and the party's metrics. A party that is down, restarting or
        loading is waited for (party_grace_s) and the step re-issued under its key."""
        (kind, body), = task.items()
        key = f"r{round}/{step}/{party.party_id}"
        result_type = RESULT_TYPES[kind]

        def run_task() -> dict:
            # a party that completed steps of this run must continue from its saved state, never start over
            ctx = party_pb2.RunContext(run_id=self.run_id, round=round, task_key=key, public_set_hash=self.public_set_hash,
                                       resumes=self.store.has_party_steps(self.run_id, party.party_id),
                                       parallel_tasks=self.parallel_tasks())
            request = party_pb2.TaskRequest(ctx=ctx, **{kind: body})
            started = time.perf_counter()
            marks: dict[str, float] = {}

            def on_progress(op: operations_pb2.Operation):
                p = op.progress
                if p.total:
                    self.emit("progress", round=round, step=step, party_id=party.party_id, done=p.done, total=p.total,
                              message=p.stage)

            def attempt(client) -> tuple[operations_pb2.Operation, Message]:
                marks["attempt"] = time.perf_counter()
                for name, ref in request_blobs(request):
                    self.count_bytes(round, "sent", name, client.push(self.artifacts, ref.sha256))
                marks["pushed"] = time.perf_counter()
                op = client.run_task(request, timeout_s=self.timeout_s, on_progress=on_progress,
                                     should_stop=self._cancel.is_set)
                marks["ran"] = time.perf_counter()
                result = result_type()
                try:
                    unpacked = op.result.Unpack(result)
                except DecodeError as exc:
                    raise MalformedResult(party, round, step, f"its {result_type.DESCRIPTOR.name} does not parse: "
                                                              f"{exc}") from exc
                if not unpacked:
                    raise MalformedResult(party, round, step, f"{kind} answered with "
                                                              f"{op.result.type_url or 'no result'}, expected "
                                                              f"{result_type.DESCRIPTOR.full_name}")
                problems = result_problems(kind, result)
                if problems:
                    raise MalformedResult(party, round, step, "; ".join(problems))
                for name, ref in result_blobs(kind, result):
                    self.count_bytes(round, "received", name, client.pull(self.artifacts, ref.sha256))
                return op, result

            op, result = self._resilient(self._party_peer(party), round, step, attempt)
            done = time.perf_counter()
            metrics = {k: v for k, v in op.metrics.items() if not k.startswith(TIME_PREFIX)}
            profile = {k[len(TIME_PREFIX):-2]: v for k, v in op.metrics.items()
                       if k.startswith(TIME_PREFIX) and k.endswith("_s")}
            # beyond the party's own work (in the attempt that succeeded): moving blobs, and waiting for its worker
            # (queue) and for the answer; wall includes any wait for the party to come back
            profile["transfer"] = (marks["pushed"] - marks["attempt"]) + (done - marks["ran"])
            profile["queue"] = max(0.0, (marks["ran"] - marks["pushed"]) - profile.get("total", 0.0))
            profile["wall"] = done - started
            cotune_metrics.step_finished(step, profile)
            return {"metrics": metrics, "profile": profile,
                    "result": base64.b64encode(result.SerializeToString()).decode()}

        stored = self.local_step(key, run_task)
        profile = stored.get("profile", {})
        self.record_metrics(round, party.party_id, {f"time/{step}/{name}": s for name, s in profile.items()})
        return TaskOutcome(result_type.FromString(base64.b64decode(stored["result"])), stored["metrics"],
                           profile.get("wall", 0.0))

    # -- services that restart --------------------------------------------------------------------------------------
    @staticmethod
    def _address(client) -> str:
        return getattr(client, "address", "") or "?"

    def describe_party(self, party: PartyRef) -> str:
        """How messages name a party: "llm server (llm at ADDR)", "slm client (client-1 at ADDR)"."""
        client = self._rpc.get(party.party_id)
        what = "llm server" if party.role == "llm" else "slm client"
        return f"{what} ({party.party_id} at {self._address(client)})"

    def _party_peer(self, party: PartyRef) -> _Peer:
        pid = party.party_id

        def fresh():
            return self._redial(party) if self._redial is not None else self._rpc[pid]

        def adopt(client, round: int, step: str):
            with self._lock:
                old = self._rpc[pid]
                if client is old:
                    return
                self._rpc[pid] = client
                self._retired.append(old)
            if self._address(client) != self._address(old):
                self.emit("info", round=round, step=step, party_id=pid, once=False,
                          message=f"{self.describe_party(party)}: reached at its new address (was {self._address(old)})")

        return _Peer(pid, lambda: self.describe_party(party), lambda: self._rpc[pid], fresh,
                     lambda client: self._party_problem(party, client), adopt)

    def _party_problem(self, party: PartyRef, client) -> str | None:
        """None when the party answers Describe, ready, holding the run's public set; else why not."""
        try:
            info = client.describe(timeout=5.0, retries=0)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        if not info.ready:
            return "it is still loading its model"
        if self.public_set_hash and info.public_set_hash != self.public_set_hash:
            raise StepFailed(f"{self.describe_party(party)} came back holding public set {info.public_set_hash[:16]}…, "
                             f"not the run's {self.public_set_hash[:16]}…", grpc.StatusCode.FAILED_PRECONDITION)
        return None

    def _alignment_peer(self) -> _Peer:
        def label():
            return f"alignment service (at {self._address(self.alignment)})"

        def fresh():
            return self._redial_alignment() if self._redial_alignment is not None else self._alignment()

        def probe(client):
            serving = getattr(client, "serving", None)
            return None if serving is None or serving(timeout=5.0) else "it does not answer its health check SERVING"

        def adopt(client, round: int, step: str):
            with self._lock:
                if client is not self.alignment:
                    self._retired.append(self.alignment)
                    self.alignment = client

        return _Peer("alignment", label, self._alignment, fresh, probe, adopt)

    def _resilient(self, peer: _Peer, round: int, step: str, attempt: Callable[[object], object]):
        """`attempt(client)` against `peer`, riding out its restarts: when it is unreachable or loading (UNAVAILABLE,
        DEADLINE_EXCEEDED of a call), forgot the operation (NOT_FOUND: it restarted), or ended it CANCELLED without
        being asked (it shut down), wait for it to come back (party_grace_s) and attempt again; a step's requests
        carry its idempotency key, so the service re-attaches, returns its stored result or runs the step afresh. Any
        other failure raises at once, naming the service, its address, the round and the step."""
        reissues = 0
        while True:
            self.check_cancelled()
            client = peer.current()
            try:
                return attempt(client)
            except RunCancelled:
                raise
            except (MalformedResult, StepFailed):
                raise  # they name the party and the step; not the transport's doing
            except OperationLost as exc:
                why = exc.detail
            except TaskFailed as exc:
                if self._cancel.is_set():
                    raise RunCancelled() from exc
                if exc.code != grpc.StatusCode.CANCELLED:
                    raise StepFailed(f"{self._where(peer, round, step)}: {exc.detail}", exc.code) from exc
                why = f"it cancelled the operation without being asked (shutting down?): {exc.detail}"
            except Unavailable as exc:  # e.g. a party described itself not ready
                why = str(exc)
            except grpc.RpcError as exc:
                if self._cancel.is_set():
                    raise RunCancelled() from exc
                code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
                details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
                if code not in TRANSIENT:
                    raise StepFailed(f"{self._where(peer, round, step)}: {code.name}: {details}", code) from exc
                why = f"{code.name}: {details}"
            except RpcError as exc:  # our own errors (e.g. a blob that could not be delivered): name where
                raise StepFailed(f"{self._where(peer, round, step)}: {exc}", exc.code) from exc
            reissues += 1
            if reissues > MAX_REISSUES:
                raise StepFailed(f"{self._where(peer, round, step)}: still failing after {MAX_REISSUES} re-issues; "
                                 f"last: {why}")
            self._await(peer, round, step, why)
            self.emit("info", round=round, step=step, party_id=peer.key if peer.key != "alignment" else "", once=False,
                      message=f"{self._where(peer, round, step)}: re-issuing the step (same key; attempt "
                              f"{reissues + 1})")

    def _where(self, peer: _Peer, round: int, step: str) -> str:
        return f"{peer.label()}, round {round} step {step}"

    def _await(self, peer: _Peer, round: int, step: str, why: str) -> None:
        """Wait for `peer` to answer ready again, polling a fresh client (a new channel each time, so gRPC's reconnect
        backoff never delays noticing it) with backoff. Raises StepFailed (UNAVAILABLE) once party_grace_s has passed
        (at once for a service that already outlasted it in this run)."""
        gave_up = peer.key in self._gave_up
        grace = 0.0 if gave_up else self.party_grace_s
        party_id = peer.key if peer.key != "alignment" else ""
        started = time.monotonic()
        if not gave_up:
            self.emit("warning", round=round, step=step, party_id=party_id, once=False,
                      message=f"{self._where(peer, round, step)}: {why}; waiting up to {grace:g} s for it to come "
                              "back")
        delay, report_at, problem = 0.25, started + WAIT_REPORT_S, why
        while True:
            client = peer.fresh()
            try:
                problem = peer.probe(client)
            except BaseException:
                _close(client, unless=peer.current())
                raise
            waited = time.monotonic() - started
            if problem is None:
                peer.adopt(client, round, step)
                self._gave_up.discard(peer.key)
                self.emit("info", round=round, step=step, party_id=party_id, once=False,
                          message=f"{peer.label()} is back after {waited:.1f} s")
                return
            _close(client, unless=peer.current())
            if waited >= grace:
                self._gave_up.add(peer.key)
                first = f" (first: {why})" if why != problem else ""
                if gave_up:
                    raise StepFailed(f"{self._where(peer, round, step)}: still unavailable (it already outlasted the "
                                     f"grace period, party_grace_s = {self.party_grace_s:g} s, earlier in this run): "
                                     f"{problem}{first}")
                raise StepFailed(f"{self._where(peer, round, step)}: still unavailable after {_secs(waited)} s "
                                 f"(party_grace_s = {grace:g}): {problem}{first}")
            if time.monotonic() >= report_at:
                report_at += WAIT_REPORT_S
                self.emit("info", round=round, step=step, party_id=party_id, once=False,
                          message=f"waiting for {peer.label()} to come back ({_secs(waited)} s of {grace:g} s): {problem}")
            if self._cancel.wait(min(delay, max(0.0, grace - waited))):
                raise RunCancelled()
            delay = min(delay * 1.6, POLL_MAX_S)

    def connect(self, fallback: dict[str, party_pb2.PartyInfo] | None = None) -> None:
        """Describe every party (in parallel), waiting for one that is down or loading (party_grace_s), and keep
        what it says in its PartyRef. A client that does not come back in time keeps `fallback[client]` (how it
        described itself when it registered, if it was ready then) and is dropped from the steps it misses; the LLM
        server not coming back fails the run."""
        fallback = fallback or {}

        def one(party: PartyRef) -> None:
            def attempt(client):
                info = client.describe(run_id=self.run_id)
                if not info.ready:
                    raise Unavailable(f"{party.party_id} is still loading its model")
                return info

            try:
                info = self._resilient(self._party_peer(party), self.record.current_round, "connect", attempt)
            except StepFailed as exc:
                known = fallback.get(party.party_id)
                if party.role == "llm" or known is None or not known.ready:
                    raise
                self.emit("warning", round=self.record.current_round, party_id=party.party_id, once=False,
                          message=f"{exc}; going on with how it described itself when it registered")
                info = known
            party.info.CopyFrom(info)

        parties = [self.llm, *self.clients]
        with ThreadPoolExecutor(max_workers=min(len(parties), 16)) as pool:
            futures = [pool.submit(one, p) for p in parties]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Close every client this driver holds (the parties', the alignment service's, and those redials replaced)."""
        for client in [*self._rpc.values(), *self._retired, self.alignment]:
            if client is not None:
                _close(client)

    def on_parties(self, parties: Sequence[PartyRef], round: int, step: str, fn: Callable[[PartyRef], object],
                   *, quorum: int | None = None) -> StepOutcome:
        """Run `fn` for every party in parallel. A party that fails is dropped from the round and reported;
        the step fails only when fewer than `quorum` parties succeed. The parties a step that met its quorum dropped
        are stored with it: a replay drops them again at once, without asking them (or waiting for them) again."""
        outcome = StepOutcome()
        if not parties:
            return outcome
        dropped_key = f"r{round}/{step}/{DROPPED}"
        settled = self.store.step_result(self.run_id, dropped_key) or {}
        failed: dict[str, str] = {pid: why for pid, why in settled.items() if pid in {p.party_id for p in parties}}
        todo = [p for p in parties if p.party_id not in failed]
        if todo:
            one = self._in_context(_WIDTH, len(parties), fn)
            with ThreadPoolExecutor(max_workers=min(len(todo), 16)) as pool:
                futures = {p.party_id: pool.submit(one, p) for p in todo}
                for pid, fut in futures.items():
                    try:
                        outcome.ok[pid] = fut.result()
                    except RunCancelled:
                        raise
                    except (RpcError, grpc.RpcError, OSError) as exc:  # TaskFailed, validation and transport errors
                        message = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                        failed[pid] = message
                        self.note(round, self._drop_note(round, step, pid) + message, dropped=pid, step=step)
                    else:
                        self._clear_earlier_drop(round, step, pid)
        outcome.failed = {p.party_id: failed[p.party_id] for p in parties if p.party_id in failed}
        self.check_cancelled()
        # how long each party then waited for the slowest one (from the steps' recorded wall times, so a replay agrees)
        walls = {pid: res.seconds for pid, res in outcome.ok.items() if isinstance(res, TaskOutcome)}
        if len(walls) > 1:
            slowest = max(walls.values())
            self._record_metrics(round, {pid: {f"time/{step}/wait": slowest - wall} for pid, wall in walls.items()})
        needed = len(parties) if quorum is None else quorum
        if len(outcome.ok) < needed:
            raise Precondition(f"round {round} {step}: only {len(outcome.ok)} of {len(parties)} parties succeeded, "
                               f"quorum is {needed}: " + "; ".join(f"{k}: {v}" for k, v in outcome.failed.items()))
        new = {pid: why for pid, why in outcome.failed.items() if pid not in settled}
        if new:  # the step stands without them: a replay drops them again
            with self._lock:
                self.store.put_step(self.run_id, dropped_key,
                                    {**(self.store.step_result(self.run_id, dropped_key) or {}), **new})
        return outcome

    def parallel_tasks(self) -> int:
        """How many tasks the plan has in flight where a task is issued now: the current step's parties times the
        step sequences running at once, at most every party of the run."""
        return max(1, min(1 + len(self.clients), _LANES.get() * _WIDTH.get()))

    @staticmethod
    def _in_context(var: contextvars.ContextVar, value: int, fn: Callable):
        """`fn` to run on pool threads with `var` set to `value` and the caller's other context variables (pool threads
        do not inherit them); each call gets its own copy, so calls may run at once."""
        base = contextvars.copy_context()

        def run(*args):
            ctx = base.copy()
            ctx.run(var.set, value)
            return ctx.run(fn, *args)
        return run

    def concurrently(self, *fns: Callable[[], object]) -> list:
        """Run independent step sequences at once (when the run allows overlap; else one after another, in order);
        returns their results in order, or raises the first failure after all have ended."""
        if not self.run.overlap_steps or len(fns) < 2:
            return [fn() for fn in fns]
        lanes = _LANES.get() * len(fns)
        with ThreadPoolExecutor(max_workers=len(fns)) as pool:
            futures = [pool.submit(self._in_context(_LANES, lanes, fn)) for fn in fns]
            errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return [f.result() for f in futures]

    # -- artifacts ------------------------------------------------------------------------------------------------
    def ref(self, sha: str):
        return self.artifacts.stat(sha).ref()

    def read_artifact(self, sha: str) -> bytes:
        return self.artifacts.read_bytes(sha)

    def put_artifact(self, data: bytes, media_type: str) -> str:
        return self.artifacts.put_bytes(data, media_type).sha256

    # -- alignment service -------------------------------------------------------------------------------------------
    def _alignment(self) -> AlignmentClient:
        if self.alignment is None:
            raise Precondition("this run needs the alignment service (the parties use different tokenizers), but the "
                               "coordinator has none configured (coordinator config: alignment)")
        return self.alignment

    def _pull_from(self, party: PartyRef, sha: str, kind: str, step: str) -> None:
        """Pull blob `sha` from `party` into the artifact store (waiting for the party if it is restarting)."""
        self._resilient(self._party_peer(party), 0, step,
                        lambda client: self.count_bytes(0, "received", kind, client.pull(self.artifacts, sha)))

    def _build(self, step: str, party_id: str, blobs: Sequence[tuple[str, str]], tokenizers: Sequence[str],
               start: Callable[[AlignmentClient], operations_pb2.Operation], kind: str) -> str:
        """An alignment-service build as one attempt: push the blobs it needs ((kind, sha) pairs), register the
        tokenizers, start the build, wait for it (reporting progress) and pull its result here; returns its sha. A
        restarted service is waited for and the whole attempt repeated: builds are keyed by content, so re-issuing
        one re-attaches to it, returns it from the service's cache, or builds it afresh."""
        def progress(o):
            if o.progress.total:
                self.emit("progress", step=step, party_id=party_id, done=o.progress.done,
                          total=o.progress.total, message=o.progress.stage)

        def attempt(alignment) -> str:
            for what, sha in blobs:
                self.count_bytes(0, "sent", what, alignment.push(self.artifacts, sha))
            for sha in tokenizers:
                alignment.register_tokenizer(self.ref(sha))
            op = alignment.wait(start(alignment), timeout_s=self.timeout_s, on_progress=progress)
            sha = next(iter(op.blobs.values())).sha256
            self.count_bytes(0, "received", kind, alignment.pull(self.artifacts, sha))
            return sha

        self._alignment()  # a run that needs the service, on a coordinator without one, fails here, saying so
        return self._resilient(self._alignment_peer(), 0, step, attempt)

    def vocab_map(self, src: PartyRef, dst: PartyRef) -> str:
        """MinED map from src's tokenizer to dst's, built once per run (the alignment service caches across runs)."""
        src_tok, dst_tok = src.info.tokenizer_hash, dst.info.tokenizer_hash

        def build():
            step = "align:vocab_map"
            self._alignment()
            bundles = [(p, p.info.tokenizer_bundle.sha256) for p in (src, dst)]
            for holder, sha in bundles:
                self._pull_from(holder, sha, "tokenizer", step)
            sha = self._build(step, dst.party_id, [("tokenizer", b) for _, b in bundles], [b for _, b in bundles],
                              lambda a: a.build_vocab_map(src_tok, dst_tok), "vocab_map")
            # the map must cover exactly the sender's vocabulary and point into the receiver's, as each describes it
            try:
                VocabMap.from_bytes(self.read_artifact(sha)).check_sizes(src.info.vocab_size, dst.info.vocab_size)
            except ValueError as exc:
                raise Precondition(f"vocab map {src.party_id} → {dst.party_id} ({sha[:12]}…) does not fit these "
                                   f"parties: {exc}") from exc
            return {"sha": sha}

        return self.local_step(f"r0/vocab_map/{src_tok}/{dst_tok}", build)["sha"]

    def sequence_alignment(self, src: PartyRef, dst: PartyRef, *, method: str, max_length: int) -> str:
        """Public-set positions of src's tokenization -> dst's, built once per run."""
        src_tok, dst_tok = src.info.tokenizer_hash, dst.info.tokenizer_hash

        def build():
            step = "align:seq_alignment"
            self._alignment()
            self._pull_from(self.llm, self.public_set_hash, "public_set", step)
            bundles = [(p, p.info.tokenizer_bundle.sha256) for p in (src, dst)]
            for holder, sha in bundles:
                self._pull_from(holder, sha, "tokenizer", step)
            sha = self._build(step, dst.party_id,
                              [("public_set", self.public_set_hash), *[("tokenizer", b) for _, b in bundles]],
                              [b for _, b in bundles],
                              lambda a: a.build_sequence_alignment(src_tok, dst_tok, self.public_set_hash,
                                                                   method=method, max_length=max_length),
                              "seq_alignment")
            return {"sha": sha}

        return self.local_step(f"r0/seq_alignment/{method}/{max_length}/{src_tok}/{dst_tok}", build)["sha"]


def _recorded(rec: pb.RoundRecord, party_id: str, metrics: dict) -> bool:
    """Whether `rec` already holds every one of `metrics` for `party_id`, with the same value (NaN equals NaN)."""
    entry = next((p for p in rec.parties if p.party_id == party_id), None)
    if entry is None:
        return not metrics
    for name, value in metrics.items():
        if name not in entry.metrics:
            return False
        have, want = entry.metrics[name], float(value)
        if have != want and not (math.isnan(have) and math.isnan(want)):
            return False
    return True


def _secs(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"


def _close(client, *, unless=None) -> None:
    if client is not None and client is not unless and callable(getattr(client, "close", None)):
        try:
            client.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            log.debug("closing %r failed", client, exc_info=True)
