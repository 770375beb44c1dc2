"""Errors that map onto gRPC status codes, and the decorator that turns them into clean aborts.

Service code raises these; it never hand-writes `context.abort` for validation, so every bad input gets
the same treatment: the right status code, a message a person can act on, and no state change.
"""

from __future__ import annotations

import functools
import inspect
import logging

import grpc

log = logging.getLogger(__name__)


class RpcError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidInput(RpcError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Precondition(RpcError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(RpcError, KeyError):
    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AlreadyExists(RpcError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Unavailable(RpcError):
    code = grpc.StatusCode.UNAVAILABLE


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed piece of work reports."""
    if isinstance(exc, RpcError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code(), exc.details() or str(exc)
    if isinstance(exc, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def rpc_method(fn):
    """Wrap a servicer method (unary or streaming): RpcError/ValueError become aborts with their code."""

    def _abort(context, exc):
        code, message = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error in %s", fn.__name__)
        context.abort(code, message)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(self, request, context):
            try:
                yield from fn(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                if isinstance(exc, grpc.RpcError) and not hasattr(exc, "code"):
                    raise
                _abort(context, exc)

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            if isinstance(exc, grpc.RpcError) and not hasattr(exc, "code"):
                raise  # context.abort's own exception
            _abort(context, exc)

    return wrapper
