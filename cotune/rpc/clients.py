"""Typed clients for the services. Strategies and the CLI talk to services only through these."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from cotune.errors import RpcError
from cotune.rpc.channel import Credentials, call, make_channel
from cotune.security.identity import ALIGNMENT, COORDINATOR, LLM, Identity, client_identity
from cotune.v1 import (
    alignment_pb2,
    alignment_pb2_grpc,
    common_pb2_grpc,
    coordinator_pb2,
    coordinator_pb2_grpc,
    operations_pb2,
    operations_pb2_grpc,
    party_pb2,
    party_pb2_grpc,
)
from cotune.wire.blobs import BlobStore, pull_blob, push_blob

State = operations_pb2.OperationState


class TaskFailed(RpcError):
    """A remote operation ended FAILED or CANCELLED; carries the remote status code. `detail` is the message without
    `where` (for callers that name the service and step themselves)."""

    def __init__(self, op: operations_pb2.Operation, where: str):
        self.op = op
        try:
            self.code = grpc.StatusCode[[c.name for c in grpc.StatusCode if c.value[0] == op.error_code][0]]
        except IndexError:
            self.code = grpc.StatusCode.UNKNOWN
        self.detail = f"{op.kind or 'operation'} {State.Name(op.state)}: {op.error_message}"
        super().__init__(f"{where}: {self.detail}")


class OperationLost(RpcError):
    """The service answered NOT_FOUND for an operation it had started: it restarted and forgot it. Starting the same
    request under the same idempotency key again re-attaches to it (or starts it afresh)."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, op: operations_pb2.Operation, where: str, details: str = ""):
        self.op = op
        self.detail = f"it no longer knows operation {op.id[:12]}… ({op.kind or 'operation'}; restarted?)"
        super().__init__(f"{where}: {self.detail}" + (f": {details}" if details else ""))


class _ServiceClient:
    """`retry_unavailable`: whether calls retry a service that is unreachable (a few seconds of backoff); a caller
    that waits for restarts itself (the run driver, with fresh channels and the client registry) turns it off, so it
    notices a service that is down at once and one that is back without a backoff's delay."""

    def __init__(self, address: str, creds: Credentials | None, peer: Identity, *, retry_unavailable: bool = True):
        self.address = address
        self.peer = peer
        self.retry_unavailable = retry_unavailable
        self.channel = make_channel(address, creds, peer=peer)
        self.blobs = common_pb2_grpc.BlobStoreStub(self.channel)
        self.ops = operations_pb2_grpc.OperationsStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, **kw):
        if not self.retry_unavailable:
            kw["retry_on"] = (grpc.StatusCode.RESOURCE_EXHAUSTED,)
        return call(method, request, **kw)

    def _blob_attempts(self) -> int:
        return 5 if self.retry_unavailable else 2

    def push(self, store: BlobStore, sha: str) -> int:
        return push_blob(self.blobs, store, sha, attempts=self._blob_attempts())

    def pull(self, store: BlobStore, sha: str) -> int:
        return pull_blob(self.blobs, store, sha, attempts=self._blob_attempts())

    def wait(self, op: operations_pb2.Operation, *, timeout_s: float,
             on_progress: Callable[[operations_pb2.Operation], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> operations_pb2.Operation:
        """Wait for an operation to finish, reporting progress; raise TaskFailed unless it succeeded."""
        deadline = time.monotonic() + timeout_s
        while op.state not in (State.OPERATION_SUCCEEDED, State.OPERATION_FAILED, State.OPERATION_CANCELLED):
            if should_stop and should_stop():
                self._cancel_quietly(op)
                raise TaskFailed(op, self.address + " (cancelled by caller)")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._cancel_quietly(op)
                op.error_message = f"deadline of {timeout_s:.0f}s exceeded"
                op.error_code = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
                op.state = State.OPERATION_FAILED
                break
            try:
                op = self._call(self.ops.WaitOperation,
                          operations_pb2.WaitOperationRequest(id=op.id, timeout_s=min(2.0, remaining)),
                          timeout=min(2.0, remaining) + 10)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise OperationLost(op, self.address, exc.details() or "") from exc
                raise
            if on_progress:
                on_progress(op)
        if op.state != State.OPERATION_SUCCEEDED:
            raise TaskFailed(op, self.address)
        return op

    def _cancel_quietly(self, op: operations_pb2.Operation) -> None:
        """Ask the service to cancel `op`; a service that is down (or forgot it) has nothing left to cancel."""
        try:
            self._call(self.ops.CancelOperation, operations_pb2.OperationId(id=op.id), timeout=10.0, retries=1)
        except grpc.RpcError:
            pass

    def serving(self, timeout: float = 5.0) -> bool:
        """Whether the service answers its grpc.health.v1 check with SERVING (one try, no retries)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            resp = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                  timeout=timeout)
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING


class PartyClient(_ServiceClient):
    """An LLM server or SLM client; both expose the same steps. `party_id`: the client's id (its identity is
    client/<party_id>, which its certificate must carry); ignored for the LLM server."""

    def __init__(self, address: str, *, role: str, party_id: str = "", creds: Credentials | None = None,
                 retry_unavailable: bool = True):
        super().__init__(address, creds, LLM if role == "llm" else client_identity(party_id),
                         retry_unavailable=retry_unavailable)
        self.role = role
        stub_cls = party_pb2_grpc.LLMServerStub if role == "llm" else party_pb2_grpc.SLMClientStub
        self.stub = stub_cls(self.channel)

    def describe(self, timeout: float = 30.0, retries: int = 4, *, run_id: str = "") -> party_pb2.PartyInfo:
        """The party as run `run_id` sees it (its saved state, or the configured model for a run it has not seen);
        empty: what it holds now."""
        return self._call(self.stub.Describe, party_pb2.DescribeRequest(run_id=run_id), timeout=timeout,
                          retries=retries)

    def start(self, request: party_pb2.TaskRequest) -> operations_pb2.Operation:
        return self._call(self.stub.StartTask, request, timeout=120.0)

    def run_task(self, request: party_pb2.TaskRequest, *, timeout_s: float, on_progress=None, should_stop=None):
        return self.wait(self.start(request), timeout_s=timeout_s, on_progress=on_progress, should_stop=should_stop)


class AlignmentClient(_ServiceClient):
    def __init__(self, address: str, *, creds: Credentials | None = None, retry_unavailable: bool = True):
        super().__init__(address, creds, ALIGNMENT, retry_unavailable=retry_unavailable)
        self.stub = alignment_pb2_grpc.AlignmentStub(self.channel)

    def register_tokenizer(self, bundle_ref) -> alignment_pb2.TokenizerInfo:
        return self._call(self.stub.RegisterTokenizer, alignment_pb2.RegisterTokenizerRequest(bundle=bundle_ref),
                          timeout=120)

    def build_vocab_map(self, src_hash: str, dst_hash: str) -> operations_pb2.Operation:
        return self._call(self.stub.BuildVocabMap, alignment_pb2.VocabMapRequest(src_hash=src_hash, dst_hash=dst_hash))

    def build_sequence_alignment(self, src_hash: str, dst_hash: str, public_set_hash: str, *, method: str = "offsets",
                                 max_length: int) -> operations_pb2.Operation:
        req = alignment_pb2.SequenceAlignmentRequest(src_hash=src_hash, dst_hash=dst_hash, public_set_hash=public_set_hash,
                                                     method=method, max_length=max_length)
        return self._call(self.stub.BuildSequenceAlignment, req)


class CoordinatorClient:
    def __init__(self, address: str, *, creds: Credentials | None = None):
        self.address = address
        self.channel = make_channel(address, creds, peer=COORDINATOR)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def register_client(self, client_id: str, address: str, labels: dict | None = None):
        desc = coordinator_pb2.ClientDescriptor(client_id=client_id, address=address, labels=labels or {})
        return call(self.stub.RegisterClient, coordinator_pb2.RegisterClientRequest(client=desc), timeout=60)

    def deregister_client(self, client_id: str) -> None:
        call(self.stub.DeregisterClient, coordinator_pb2.DeregisterClientRequest(client_id=client_id))

    def list_clients(self):
        return call(self.stub.ListClients, coordinator_pb2.ListClientsRequest()).clients

    def start_run(self, spec: coordinator_pb2.RunSpec) -> coordinator_pb2.Run:
        return call(self.stub.StartRun, coordinator_pb2.StartRunRequest(spec=spec), timeout=60)

    def get_run(self, run_id: str) -> coordinator_pb2.Run:
        return call(self.stub.GetRun, coordinator_pb2.GetRunRequest(run_id=run_id))

    def cancel_run(self, run_id: str) -> coordinator_pb2.Run:
        return call(self.stub.CancelRun, coordinator_pb2.CancelRunRequest(run_id=run_id))

    def resume_run(self, run_id: str) -> coordinator_pb2.Run:
        return call(self.stub.ResumeRun, coordinator_pb2.ResumeRunRequest(run_id=run_id), timeout=60)

    def export_run(self, run_id: str, timeout: float = 3600.0) -> coordinator_pb2.ExportRunResponse:
        """A SUCCEEDED run's final adapters (in the coordinator's artifact store) and its model card. The coordinator
        asks every party for its adapter, waiting for one that is restarting, hence the long deadline."""
        return call(self.stub.ExportRun, coordinator_pb2.ExportRunRequest(run_id=run_id), timeout=timeout, retries=1)

    def list_runs(self, limit: int = 50):
        return call(self.stub.ListRuns, coordinator_pb2.ListRunsRequest(limit=limit)).runs

    def watch_run(self, run_id: str, after_seq: int = 0, timeout: float | None = None):
        return self.stub.WatchRun(coordinator_pb2.WatchRunRequest(run_id=run_id, after_seq=after_seq), timeout=timeout)
