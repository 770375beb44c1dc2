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


def status_for(exc: BaseException, where: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed piece of work reports.

    Only this module's errors (RpcError subclasses: the code says what the caller did wrong) and a genuine
    grpc.RpcError from a downstream call keep their codes. Everything else, ValueError, TypeError and KeyError
    included, is a bug or an unexpected failure in our code: it becomes INTERNAL and is logged here with its
    traceback (`where` names the work that failed), so a shape bug is never reported as "bad input". Code that
    parses or validates caller input raises InvalidInput (or another RpcError) itself."""
    if isinstance(exc, RpcError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return exc.code(), exc.details() or str(exc)
    log.error("internal error%s", f" in {where}" if where else "", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}): {exc}"


def rpc_method(fn):
    """Wrap a servicer method (unary or streaming): an RpcError becomes an abort with its code, a downstream
    grpc.RpcError keeps its code, and any other exception aborts with INTERNAL, logged with its traceback."""

    def _abort(context, exc):
        code, message = status_for(exc, fn.__qualname__)
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
