"""Error mapping (cotune/errors.py): only the project's own errors and downstream gRPC errors keep their codes;
everything else (ValueError and TypeError included) is INTERNAL and logged with its traceback, so a bug is never
reported as bad input."""

from __future__ import annotations

import logging
import time

import grpc
import pytest

from cotune import errors
from cotune.errors import (
    AlreadyExists,
    InvalidInput,
    NotFound,
    Precondition,
    ResourceExhausted,
    Unavailable,
    clip,
    refusal_counts,
    rpc_method,
    status_for,
)
from cotune.rpc.operations import OperationManager
from cotune.v1 import operations_pb2 as ops_pb2


class _Aborted(Exception):
    pass


@pytest.fixture(autouse=True)
def _fresh_limits():
    errors._reset_limits()  # rate limits are per process: earlier tests must not eat this test's log budget
    yield
    errors._reset_limits()


class FakeContext:
    """What rpc_method needs of a grpc.ServicerContext: abort(code, message) records and raises."""

    def __init__(self):
        self.code = None
        self.message = None

    def abort(self, code, message):
        self.code, self.message = code, message
        raise _Aborted(f"{code}: {message}")


class FakeRpcError(grpc.RpcError):
    """A downstream call's error, as grpc raises it: code() and details() methods."""

    def __init__(self, code, details):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def _tracebacks(caplog, exc_type) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info and r.exc_info[0] is exc_type]


@pytest.mark.parametrize(("exc", "code"), [
    (InvalidInput("bad field"), grpc.StatusCode.INVALID_ARGUMENT),
    (Precondition("upload first"), grpc.StatusCode.FAILED_PRECONDITION),
    (NotFound("no such run"), grpc.StatusCode.NOT_FOUND),
    (AlreadyExists("exists"), grpc.StatusCode.ALREADY_EXISTS),
    (Unavailable("later"), grpc.StatusCode.UNAVAILABLE),
    (ResourceExhausted("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_project_errors_keep_their_code_and_message_and_log_no_traceback(exc, code, caplog):
    caplog.set_level(logging.DEBUG)
    assert status_for(exc) == (code, str(exc))
    assert str(exc) in {"bad field", "upload first", "no such run", "exists", "later", "full"}  # NotFound is not quoted
    assert not [r for r in caplog.records if r.exc_info]


def test_a_downstream_grpc_error_keeps_its_code():
    assert status_for(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "peer down")) == (grpc.StatusCode.UNAVAILABLE, "peer down")


@pytest.mark.parametrize("exc", [ValueError("shape mismatch [3, 4] vs [4, 3]"), KeyError("lora_A"),
                                 TypeError("unsupported operand"), RuntimeError("CUDA error")])
def test_every_other_exception_is_internal_and_logged_with_its_traceback(exc, caplog):
    try:  # a raised exception, so it has a traceback to log
        raise exc
    except Exception as raised:  # noqa: BLE001
        with caplog.at_level(logging.ERROR, logger="cotune.errors"):
            code, message = status_for(raised, "the test")
    assert code == grpc.StatusCode.INTERNAL
    assert message == f"internal error ({type(exc).__name__}): {exc}"
    records = _tracebacks(caplog, type(exc))
    assert len(records) == 1, caplog.records
    assert records[0].exc_info[1] is exc and records[0].exc_info[2] is not None
    assert "the test" in records[0].getMessage()


def test_rpc_method_aborts_with_internal_for_a_key_error(caplog):
    class Servicer:
        @rpc_method
        def Get(self, request, context):
            return {"a": 1}[request]

        @rpc_method
        def Stream(self, request, context):
            yield 1
            raise KeyError(request)

        @rpc_method
        def Bad(self, request, context):
            raise InvalidInput(f"bad request {request!r}")

    servicer = Servicer()
    assert servicer.Get("a", FakeContext()) == 1
    ctx = FakeContext()
    with caplog.at_level(logging.ERROR, logger="cotune.errors"), pytest.raises(_Aborted):
        servicer.Get("missing", ctx)
    assert ctx.code == grpc.StatusCode.INTERNAL and ctx.message == "internal error (KeyError): 'missing'"
    assert len(_tracebacks(caplog, KeyError)) == 1 and "Get" in _tracebacks(caplog, KeyError)[0].getMessage()

    ctx = FakeContext()
    stream = servicer.Stream("gone", ctx)
    assert next(stream) == 1
    with caplog.at_level(logging.ERROR, logger="cotune.errors"), pytest.raises(_Aborted):
        next(stream)
    assert ctx.code == grpc.StatusCode.INTERNAL and ctx.message == "internal error (KeyError): 'gone'"

    caplog.clear()
    ctx = FakeContext()
    with caplog.at_level(logging.DEBUG), pytest.raises(_Aborted):
        servicer.Bad("x", ctx)
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and ctx.message == "bad request 'x'"
    assert not [r for r in caplog.records if r.exc_info]


def _finished(manager: OperationManager, op) -> ops_pb2.Operation:
    op = manager.wait(op.id, 30)
    assert op.state in (ops_pb2.OperationState.OPERATION_SUCCEEDED, ops_pb2.OperationState.OPERATION_FAILED,
                        ops_pb2.OperationState.OPERATION_CANCELLED), op
    return op


def test_an_operation_failing_with_a_key_error_is_internal_and_logged(caplog):
    manager = OperationManager(workers=1)

    def work(ctx):
        return {}["lora_B"]

    def rejected(ctx):
        raise InvalidInput("bad shard")

    try:
        with caplog.at_level(logging.ERROR):
            op = _finished(manager, manager.start("train", work))
        assert op.state == ops_pb2.OperationState.OPERATION_FAILED
        assert op.error_code == grpc.StatusCode.INTERNAL.value[0]
        assert op.error_message == "internal error (KeyError): 'lora_B'"
        records = _tracebacks(caplog, KeyError)
        assert len(records) == 1 and op.id in records[0].getMessage() and "train" in records[0].getMessage()

        op = _finished(manager, manager.start("distill", rejected))
        assert op.state == ops_pb2.OperationState.OPERATION_FAILED
        assert op.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and op.error_message == "bad shard"
    finally:
        manager.shutdown()


class _Servicer:
    @rpc_method
    def Bad(self, request, context):
        raise InvalidInput(f"bad request {clip(request)}")

    @rpc_method
    def Broken(self, request, context):
        raise KeyError(request)


def _call(method, request="x"):
    with pytest.raises(_Aborted):
        method(request, FakeContext())


def test_refusals_cost_one_log_line_a_second_and_no_traceback(caplog, monkeypatch):
    monkeypatch.setattr(errors._refusal_log, "window", 0.2)
    servicer = _Servicer()
    with caplog.at_level(logging.DEBUG, logger="cotune.errors"):
        for _ in range(50):
            _call(servicer.Bad, "y" * 10_000)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "refused _Servicer.Bad: INVALID_ARGUMENT bad request 'yyy" in lines[0]
        assert len(lines[0]) < 400  # a long input is clipped, in the log and in the status message
        time.sleep(0.25)
        _call(servicer.Bad)
    assert len(caplog.records) == 2 and "(49 similar suppressed)" in caplog.records[1].getMessage()
    assert not [r for r in caplog.records if r.exc_info]
    assert refusal_counts()[("_Servicer.Bad", "INVALID_ARGUMENT")] == 51


def test_internal_errors_log_ten_tracebacks_a_minute_then_count(caplog, monkeypatch):
    servicer = _Servicer()
    with caplog.at_level(logging.ERROR, logger="cotune.errors"):
        for i in range(25):
            _call(servicer.Broken, f"key-{i}")
        assert len(_tracebacks(caplog, KeyError)) == 10
        monkeypatch.setattr(errors._internal_log, "window", 0.01)
        time.sleep(0.02)
        _call(servicer.Broken)
    records = _tracebacks(caplog, KeyError)
    assert len(records) == 11 and "(15 more internal errors were not logged)" in records[-1].getMessage()
    assert refusal_counts()[("_Servicer.Broken", "INTERNAL")] == 26


def test_internal_messages_never_show_local_paths(tmp_path, monkeypatch):
    monkeypatch.setattr(errors, "_private_roots", dict(errors._private_roots))
    spaced = tmp_path / "my work dir"
    errors.add_private_root(spaced)
    for path in (tmp_path / "blobs" / "x.part", spaced / "sub dir" / "adapter.safetensors"):
        try:
            open(path)
        except OSError as exc:
            code, message = status_for(exc, "the test")
        assert code == grpc.StatusCode.INTERNAL
        assert str(tmp_path) not in message and "<path>" in message, message
        assert message.startswith("internal error (FileNotFoundError): [Errno 2] No such file or directory: '<path>")
    kept = "expected float32/bfloat16 at http://host/a/b, 340 MB/s, upload/client-1"
    assert errors.scrub_paths(kept) == kept
    assert status_for(Precondition("a message we wrote ourselves: /kept/as/is"))[1].endswith("/kept/as/is")


def test_clip_and_message_caps():
    assert clip("short") == "'short'"
    assert clip("a\x1b[2Jb") == "'a\\x1b[2Jb'"  # control characters escaped
    assert clip("z" * 1000) == f"{'z' * 80!r}… (1000 characters)"
    assert clip("z" * 100, 10) == "'zzzzzzzzzz'… (100 characters)"
    assert clip(list(range(1000)), 20) == "[0, 1, 2, 3, 4, 5, 6…"
    _, message = status_for(RuntimeError("x" * 100_000))
    assert len(message) < errors.MAX_MESSAGE + 100
