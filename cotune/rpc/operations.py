"""Long-running operations: a service starts work, returns an Operation at once, and callers poll or wait.

Work functions receive an `OperationContext` to report progress and notice cancellation. Starting the same
`key` twice with the same kind and request fingerprint returns the first operation (idempotent retries); the same key
with another kind or fingerprint is refused (ALREADY_EXISTS), so no caller can attach to an operation started for a
different request. One manager runs its work on a bounded pool; the model services use a single worker so model state
is touched by one task at a time.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import Message

from cotune.errors import AlreadyExists, NotFound, rpc_method, status_for
from cotune.metrics import OperationMetrics
from cotune.profile import collecting
from cotune.tasks import blob_refs
from cotune.v1 import operations_pb2 as ops_pb2
from cotune.v1 import operations_pb2_grpc as ops_grpc

log = logging.getLogger(__name__)
State = ops_pb2.OperationState
TERMINAL = (State.OPERATION_SUCCEEDED, State.OPERATION_FAILED, State.OPERATION_CANCELLED)
_STATE_NAMES = {State.OPERATION_SUCCEEDED: "succeeded", State.OPERATION_FAILED: "failed",
                State.OPERATION_CANCELLED: "cancelled"}


TIME_PREFIX = "time_"  # metrics an operation adds about itself: time_total_s and time_<phase>_s (cotune.profile)


class Cancelled(Exception):
    """Raised inside work when its operation was cancelled."""


@dataclass
class OpResult:
    metrics: dict[str, float] = field(default_factory=dict)  # for the run record: every number worth keeping
    blobs: dict = field(default_factory=dict)  # name -> cotune.wire.blobs.Blob
    info: dict[str, str] = field(default_factory=dict)
    result: Message | None = None  # the task's typed result message, packed into Operation.result


class OperationContext:
    def __init__(self, manager: "OperationManager", op_id: str):
        self._manager = manager
        self.op_id = op_id

    def progress(self, done: int, total: int, stage: str = "", message: str = "") -> None:
        self._manager._update(self.op_id, lambda op: op.progress.CopyFrom(
            ops_pb2.Progress(done=int(done), total=int(total), stage=stage or op.progress.stage, message=message)))

    def cancelled(self) -> bool:
        return self._manager._is_cancelled(self.op_id)

    def check_cancelled(self) -> None:
        if self.cancelled():
            raise Cancelled()


class OperationManager:
    """`journal` (optional): durable records of finished keyed operations, with `load(key)` -> (kind, fingerprint,
    Operation bytes) or None and `commit(key, kind, fingerprint, operation_bytes)`, called before a succeeded
    operation is published (cotune.party.runstate.RunStates), so a restarted service answers a retried key with the
    result it gave before."""

    def __init__(self, *, workers: int = 1, keep: int = 2000, journal=None):
        self._journal = journal
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="op")
        self._ops: OrderedDict[str, ops_pb2.Operation] = OrderedDict()
        self._by_key: dict[str, tuple[str, str, str]] = {}  # key -> (op id, kind, request fingerprint)
        self._key_of: dict[str, str] = {}  # op id -> its key
        self._cancel: set[str] = set()
        self._cond = threading.Condition()
        self._keep = keep
        self.metrics = OperationMetrics()  # operations running and ended; its host binds its labels (ServiceHost)

    def start(self, kind: str, work: Callable[[OperationContext], OpResult], *, key: str = "",
              fingerprint: str = "") -> ops_pb2.Operation:
        """Start `work` as an operation of `kind`. With a `key`, the operation is bound to (kind, fingerprint): a
        request's identity, e.g. a hash of its serialized form. Starting the key again with the same binding returns
        the operation (restarting it only if it failed or was cancelled); with another binding it is AlreadyExists."""
        with self._cond:
            if key and key not in self._by_key and self._journal is not None:
                self._recall(key)
            if key and key in self._by_key:
                op_id, bound_kind, bound = self._by_key[key]
                if (bound_kind, bound) != (kind, fingerprint):
                    what = f"a {bound_kind} task" if bound_kind != kind else "a different request"
                    raise AlreadyExists(f"operation key {key!r:.200} is already bound to {what}; a retry must repeat "
                                        "the same request, and a new request needs a new key")
                existing = self._ops.get(op_id)
                if existing is not None and existing.state not in (State.OPERATION_FAILED, State.OPERATION_CANCELLED):
                    return ops_pb2.Operation.FromString(existing.SerializeToString())
            op_id = uuid.uuid4().hex
            op = ops_pb2.Operation(id=op_id, kind=kind, state=State.OPERATION_PENDING)
            self._ops[op_id] = op
            if key:
                self._by_key[key] = (op_id, kind, fingerprint)
                self._key_of[op_id] = key
            self._trim()
            snapshot = ops_pb2.Operation.FromString(op.SerializeToString())
        self._pool.submit(self._run, op_id, work)
        return snapshot

    def _recall(self, key: str) -> None:
        """Bring a journaled operation back into memory (a service restarted since it finished)."""
        entry = self._journal.load(key)
        if entry is None:
            return
        kind, fingerprint, data = entry
        op = ops_pb2.Operation.FromString(data)
        self._ops[op.id] = op
        self._by_key[key] = (op.id, kind, fingerprint)
        self._key_of[op.id] = key

    def _trim(self) -> None:
        while len(self._ops) > self._keep:
            old_id, old = next(iter(self._ops.items()))
            if old.state not in TERMINAL:
                break
            del self._ops[old_id]
            self._cancel.discard(old_id)
            key = self._key_of.pop(old_id, None)  # forget its key too, so keys cannot pile up without bound
            if key is not None and self._by_key.get(key, ("",))[0] == old_id:
                del self._by_key[key]

    def _run(self, op_id: str, work) -> None:
        metrics, kind, started = self.metrics, self._kind(op_id), time.perf_counter()
        metrics.started(kind)
        ended = False

        def finish(state, *, code=None, message: str = "") -> None:
            nonlocal ended  # counted before the state is published: whoever sees it ended sees it counted
            metrics.ended(kind, _STATE_NAMES[state], time.perf_counter() - started)
            ended = True
            self._finish(op_id, state, code=code, message=message)

        try:
            self._execute(op_id, work, started, finish)
        finally:
            if not ended:  # the work's bookkeeping itself raised
                metrics.ended(kind, "failed", time.perf_counter() - started)

    def _execute(self, op_id: str, work, started: float, finish) -> None:
        self._update(op_id, lambda op: (setattr(op, "state", State.OPERATION_RUNNING), setattr(op, "started_at", time.time())))
        ctx = OperationContext(self, op_id)
        try:
            if ctx.cancelled():
                raise Cancelled()
            with collecting() as profile:
                result = work(ctx)
        except Cancelled:
            finish(State.OPERATION_CANCELLED, code=grpc.StatusCode.CANCELLED, message="cancelled")
            return
        except Exception as exc:  # noqa: BLE001 - reported through the operation
            # an RpcError keeps its code; anything else is INTERNAL, logged with its traceback by status_for
            code, message = status_for(exc, f"operation {op_id} ({self._kind(op_id)})")
            if code != grpc.StatusCode.INTERNAL:
                log.warning("operation %s rejected: %s", op_id, message)
            finish(State.OPERATION_FAILED, code=code, message=message)
            return

        def fill(op):
            for name, value in result.metrics.items():
                op.metrics[name] = float(value)
            for name, seconds in profile.seconds.items():  # where the time went: time_<phase>_s, time_total_s
                op.metrics[f"{TIME_PREFIX}{name}_s"] = seconds
            op.metrics[f"{TIME_PREFIX}total_s"] = time.perf_counter() - started
            for name, blob in result.blobs.items():
                op.blobs[name].CopyFrom(blob.ref())
            for name, value in result.info.items():
                op.info[name] = str(value)
            if result.result is not None:
                op.result.Pack(result.result)
                for name, ref in blob_refs(result.result):  # the typed result's blobs, also listed by name
                    op.blobs[name].CopyFrom(ref)

        self._update(op_id, fill)
        key = self._key_of.get(op_id)
        if key and self._journal is not None:
            try:  # recorded (and the work's staged state committed) before anyone can see it succeeded
                with self._cond:
                    final = ops_pb2.Operation.FromString(self._ops[op_id].SerializeToString())
                    _, kind, fingerprint = self._by_key[key]
                final.state, final.finished_at = State.OPERATION_SUCCEEDED, time.time()
                self._journal.commit(key, kind, fingerprint, final.SerializeToString())
            except Exception as exc:  # noqa: BLE001 - a step whose result cannot be kept did not succeed
                code, message = status_for(exc, f"operation {op_id} (recording its result)")
                finish(State.OPERATION_FAILED, code=code, message=message)
                return
        finish(State.OPERATION_SUCCEEDED)

    def _finish(self, op_id: str, state, *, code=None, message: str = "") -> None:
        def done(op):
            op.state = state
            op.finished_at = time.time()
            if code is not None and state != State.OPERATION_SUCCEEDED:
                op.error_code = code.value[0]
                op.error_message = message

        self._update(op_id, done)

    def _update(self, op_id: str, fn) -> None:
        with self._cond:
            fn(self._ops[op_id])
            self._cond.notify_all()

    def _kind(self, op_id: str) -> str:
        with self._cond:
            return self._ops[op_id].kind

    def _is_cancelled(self, op_id: str) -> bool:
        with self._cond:
            return op_id in self._cancel

    def get(self, op_id: str) -> ops_pb2.Operation:
        with self._cond:
            if op_id not in self._ops:
                raise NotFound(f"unknown operation id {op_id!r:.80}")
            return ops_pb2.Operation.FromString(self._ops[op_id].SerializeToString())

    def wait(self, op_id: str, timeout_s: float) -> ops_pb2.Operation:
        deadline = time.monotonic() + max(0.0, min(timeout_s, 300.0))
        with self._cond:
            if op_id not in self._ops:
                raise NotFound(f"unknown operation id {op_id!r:.80}")
            while self._ops[op_id].state not in TERMINAL:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        return self.get(op_id)

    def cancel(self, op_id: str) -> ops_pb2.Operation:
        with self._cond:
            if op_id not in self._ops:
                raise NotFound(f"unknown operation id {op_id!r:.80}")
            if self._ops[op_id].state not in TERMINAL:
                self._cancel.add(op_id)
        return self.get(op_id)

    def shutdown(self) -> None:
        with self._cond:
            self._cancel.update(self._ops)
        self._pool.shutdown(wait=False, cancel_futures=True)


class OperationsServicer(ops_grpc.OperationsServicer):
    def __init__(self, manager: OperationManager):
        self.manager = manager

    @rpc_method
    def GetOperation(self, request, context):
        return self.manager.get(request.id)

    @rpc_method
    def WaitOperation(self, request, context):
        timeout = request.timeout_s if request.timeout_s > 0 else 30.0
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, max(remaining - 0.5, 0.0))
        return self.manager.wait(request.id, timeout)

    @rpc_method
    def CancelOperation(self, request, context):
        return self.manager.cancel(request.id)
