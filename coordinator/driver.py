"""The run driver: runs a strategy's steps against the services, resumably, and moves every byte.

A step has a key unique within its run. Its result is stored when it completes; a restarted coordinator replays the
strategy and completed steps return their stored result at once. Tasks carry the step key to the party, so a step
that was in flight when the coordinator died is re-attached to the same operation instead of being recomputed.

Transport is the driver's alone: before a task starts it pushes every blob the request names (cotune.tasks), after it
succeeds it pulls every blob the typed result names into the artifact store, and it counts the bytes of each transfer
in the round record under `<task>.<field>` (e.g. `distill.teachers.shard` sent, `public_logits.shard` received).
Strategies (cotune/algorithms) only decide what to run.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf.message import DecodeError, Message

from coordinator.store import StateStore
from cotune.algorithms.base import MalformedResult, PartyRef, StepOutcome, TaskOutcome
from cotune.algorithms.config import RunConfig
from cotune.align.vocabmap import VocabMap
from cotune.errors import Precondition, RpcError
from cotune.rpc.clients import AlignmentClient, PartyClient
from cotune.rpc.operations import TIME_PREFIX
from cotune.tasks import RESULT_TYPES, request_blobs, result_blobs, result_problems
from cotune.v1 import coordinator_pb2 as pb
from cotune.v1 import operations_pb2, party_pb2
from cotune.wire.blobs import BlobStore

log = logging.getLogger(__name__)


class RunCancelled(Exception):
    pass


class RunDriver:
    def __init__(self, *, run: pb.Run, config: RunConfig, store: StateStore, artifacts: BlobStore,
                 llm: tuple[PartyRef, PartyClient], clients: Sequence[tuple[PartyRef, PartyClient]],
                 alignment: AlignmentClient | None, cancel_event: threading.Event):
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

    # -- state -------------------------------------------------------------------------------------------------
    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise RunCancelled()

    def save(self) -> None:
        with self._lock:
            self.store.put_run(self.record)

    def emit(self, kind: str, *, round: int = 0, step: str = "", party_id: str = "", done: int = 0, total: int = 0,
             message: str = "") -> None:
        self.store.add_event(pb.RunEvent(run_id=self.run_id, kind=kind, round=round, step=step, party_id=party_id,
                                         done=done, total=total, message=message, state=self.record.state))

    def round_record(self, round: int) -> pb.RoundRecord:
        """The round's record, created at its first change; every change stamps finished_at (its last change)."""
        with self._lock:
            rec = next((r for r in self.record.rounds if r.round == round), None)
            if rec is None:
                rec = self.record.rounds.add(round=round, started_at=time.time())
            rec.finished_at = time.time()
            return rec

    def record_metrics(self, round: int, party_id: str, metrics: dict) -> None:
        self._record_metrics(round, {party_id: metrics})

    def _record_metrics(self, round: int, by_party: dict[str, dict]) -> None:
        """Several parties' metrics in one save of the run record."""
        with self._lock:
            rec = self.round_record(round)
            for party_id, metrics in by_party.items():
                entry = (next((p for p in rec.parties if p.party_id == party_id), None)
                         or rec.parties.add(party_id=party_id))
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
            self.record.current_round = round
            self.record.current_step = step
            self.save()
        self.emit("step", round=round, step=step)

    def record_artifact(self, round: int, name: str, sha: str) -> None:
        with self._lock:
            self.round_record(round).artifacts[name] = sha
            self.save()

    # -- steps -------------------------------------------------------------------------------------------------
    def local_step(self, key: str, fn: Callable[[], dict]) -> dict:
        """Run `fn` (work done here, on the coordinator) once per run: a stored result short-circuits it."""
        self.check_cancelled()
        done = self.store.step_result(self.run_id, key)
        if done is not None:
            return done
        result = fn()
        self.store.put_step(self.run_id, key, result)
        return result

    def task(self, party: PartyRef, round: int, step: str, **task: Message) -> TaskOutcome:
        """Run one task on a party as a resumable step: push the blobs the request names, run it, pull the blobs its
        typed result names. Returns the typed result and the party's metrics."""
        (kind, body), = task.items()
        key = f"r{round}/{step}/{party.party_id}"
        result_type = RESULT_TYPES[kind]
        client = self._rpc[party.party_id]

        def run_task() -> dict:
            ctx = party_pb2.RunContext(run_id=self.run_id, round=round, task_key=key, public_set_hash=self.public_set_hash)
            request = party_pb2.TaskRequest(ctx=ctx, **{kind: body})
            started = time.perf_counter()
            for name, ref in request_blobs(request):
                self.count_bytes(round, "sent", name, client.push(self.artifacts, ref.sha256))
            pushed = time.perf_counter()

            def on_progress(op: operations_pb2.Operation):
                p = op.progress
                if p.total:
                    self.emit("progress", round=round, step=step, party_id=party.party_id, done=p.done, total=p.total,
                              message=p.stage)

            op = client.run_task(request, timeout_s=self.timeout_s, on_progress=on_progress,
                                 should_stop=self._cancel.is_set)
            ran = time.perf_counter()
            result = result_type()
            try:
                unpacked = op.result.Unpack(result)
            except DecodeError as exc:
                raise MalformedResult(party, round, step, f"its {result_type.DESCRIPTOR.name} does not parse: "
                                                          f"{exc}") from exc
            if not unpacked:
                raise MalformedResult(party, round, step, f"{kind} answered with {op.result.type_url or 'no result'}, "
                                                          f"expected {result_type.DESCRIPTOR.full_name}")
            problems = result_problems(kind, result)
            if problems:
                raise MalformedResult(party, round, step, "; ".join(problems))
            for name, ref in result_blobs(kind, result):
                self.count_bytes(round, "received", name, client.pull(self.artifacts, ref.sha256))
            done = time.perf_counter()
            metrics = {k: v for k, v in op.metrics.items() if not k.startswith(TIME_PREFIX)}
            profile = {k[len(TIME_PREFIX):-2]: v for k, v in op.metrics.items()
                       if k.startswith(TIME_PREFIX) and k.endswith("_s")}
            # beyond the party's own work: moving blobs, and waiting for its worker (queue) and for the answer
            profile["transfer"] = (pushed - started) + (done - ran)
            profile["queue"] = max(0.0, (ran - pushed) - profile.get("total", 0.0))
            profile["wall"] = done - started
            return {"metrics": metrics, "profile": profile,
                    "result": base64.b64encode(result.SerializeToString()).decode()}

        stored = self.local_step(key, run_task)
        profile = stored.get("profile", {})
        self.record_metrics(round, party.party_id, {f"time/{step}/{name}": s for name, s in profile.items()})
        return TaskOutcome(result_type.FromString(base64.b64decode(stored["result"])), stored["metrics"],
                           profile.get("wall", 0.0))

    def on_parties(self, parties: Sequence[PartyRef], round: int, step: str, fn: Callable[[PartyRef], object],
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
        # how long each party then waited for the slowest one (from the steps' recorded wall times, so a replay agrees)
        walls = {pid: res.seconds for pid, res in outcome.ok.items() if isinstance(res, TaskOutcome)}
        if len(walls) > 1:
            slowest = max(walls.values())
            self._record_metrics(round, {pid: {f"time/{step}/wait": slowest - wall} for pid, wall in walls.items()})
        needed = len(parties) if quorum is None else quorum
        if len(outcome.ok) < needed:
            raise Precondition(f"round {round} {step}: only {len(outcome.ok)} of {len(parties)} parties succeeded, "
                               f"quorum is {needed}: " + "; ".join(f"{k}: {v}" for k, v in outcome.failed.items()))
        return outcome

    def concurrently(self, *fns: Callable[[], object]) -> list:
        """Run independent step sequences at once (when the run allows overlap; else one after another, in order);
        returns their results in order, or raises the first failure after all have ended."""
        if not self.run.overlap_steps or len(fns) < 2:
            return [fn() for fn in fns]
        with ThreadPoolExecutor(max_workers=len(fns)) as pool:
            futures = [pool.submit(fn) for fn in fns]
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

    def _register_tokenizer(self, holder: PartyRef, sha: str) -> None:
        """Give the alignment service a tokenizer bundle it may build maps between, pulled from `holder`."""
        alignment = self._alignment()
        self.count_bytes(0, "received", "tokenizer", self._rpc[holder.party_id].pull(self.artifacts, sha))
        self.count_bytes(0, "sent", "tokenizer", alignment.push(self.artifacts, sha))
        alignment.register_tokenizer(self.ref(sha))

    def _build(self, op: operations_pb2.Operation, kind: str, party_id: str) -> str:
        """Wait for an alignment-service build (reporting its progress), pull its result here; returns its sha."""
        def progress(o):
            if o.progress.total:
                self.emit("progress", step=f"align:{kind}", party_id=party_id, done=o.progress.done,
                          total=o.progress.total, message=o.progress.stage)

        op = self._alignment().wait(op, timeout_s=self.timeout_s, on_progress=progress)
        sha = next(iter(op.blobs.values())).sha256
        self.count_bytes(0, "received", kind, self._alignment().pull(self.artifacts, sha))
        return sha

    def vocab_map(self, src: PartyRef, dst: PartyRef) -> str:
        """MinED map from src's tokenizer to dst's, built once per run (the alignment service caches across runs)."""
        src_tok, dst_tok = src.info.tokenizer_hash, dst.info.tokenizer_hash

        def build():
            self._register_tokenizer(src, src.info.tokenizer_bundle.sha256)
            self._register_tokenizer(dst, dst.info.tokenizer_bundle.sha256)
            sha = self._build(self._alignment().build_vocab_map(src_tok, dst_tok), "vocab_map", dst.party_id)
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
            alignment = self._alignment()
            self.count_bytes(0, "received", "public_set",
                             self._rpc[self.llm.party_id].pull(self.artifacts, self.public_set_hash))
            self.count_bytes(0, "sent", "public_set", alignment.push(self.artifacts, self.public_set_hash))
            self._register_tokenizer(src, src.info.tokenizer_bundle.sha256)
            self._register_tokenizer(dst, dst.info.tokenizer_bundle.sha256)
            op = alignment.build_sequence_alignment(src_tok, dst_tok, self.public_set_hash, method=method,
                                                    max_length=max_length)
            return {"sha": self._build(op, "seq_alignment", dst.party_id)}

        return self.local_step(f"r0/seq_alignment/{method}/{max_length}/{src_tok}/{dst_tok}", build)["sha"]
