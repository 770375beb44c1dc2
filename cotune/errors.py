"""Errors that map onto gRPC status codes, and the decorator that turns them into clean aborts.

Service code raises these; it never hand-writes `context.abort` for validation, so every bad input gets
the same treatment: the right status code, a message a person can act on, and no state change.

Errors stay quiet and safe: a refused request costs at most one log line a second per (method, code), never a
traceback; internal errors log their traceback at most ten times a minute; messages sent to callers never echo local
filesystem paths (`status_for` scrubs them from INTERNAL messages) and should echo caller input only through `clip`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path

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


class PermissionDenied(RpcError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(RpcError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(RpcError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


# -- safe messages ---------------------------------------------------------------------------------------------------
MAX_MESSAGE = 2000  # characters of a status message sent to a caller (gRPC carries it in a trailer)


def clip(value, n: int = 80) -> str:
    """A caller-provided value for an error message: its repr (quotes, control characters escaped), cut to about `n`
    characters with the full length noted."""
    if isinstance(value, (str, bytes)) and len(value) > n:
        return f"{value[:n]!r}… ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    text = repr(value)
    return text if len(text) <= n + 3 else f"{text[:n]}…"


_ABS_PATH = re.compile(r"(?<![\w.~/-])(?:/[^\s/'\"`,;:()\[\]{}<>|]+){2,}/?")  # 2+ components, not in a URL or word
_private_roots: dict[str, re.Pattern] = {}


def add_private_root(path: str | os.PathLike) -> None:
    """Scrub paths under `path` (a service's workdir, say) from INTERNAL messages, even where `path` contains spaces.
    The home directory is registered from the start; any other absolute path is scrubbed by its shape."""
    root = str(Path(path).expanduser().resolve())
    if root != "/":
        _private_roots[root] = re.compile(re.escape(root) + r"(?![^/\s'\"`])[^\s'\"`]*")


try:
    add_private_root(Path.home())
except (RuntimeError, KeyError, OSError):  # no home directory
    pass


def scrub_paths(text: str) -> str:
    """`text` with local filesystem paths replaced by `<path>`."""
    for root, pattern in _private_roots.items():
        if root in text:
            text = pattern.sub("<path>", text)
    return _ABS_PATH.sub("<path>", text)


def _cap(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else f"{message[:MAX_MESSAGE]}… ({len(message)} characters)"


# -- quiet logs ------------------------------------------------------------------------------------------------------
class _RateLimit:
    """At most `n` events per `window` seconds per key; the rest are counted and reported with the next one logged."""

    def __init__(self, n: int, window: float):
        self.n, self.window = n, window
        self._state: dict = {}  # key -> [window start, events logged in it, suppressed since the last one logged]
        self._lock = threading.Lock()

    def allow(self, key) -> int | None:
        """None: suppress this event; else how many were suppressed since the last one allowed."""
        now = time.monotonic()
        with self._lock:
            state = self._state.get(key)
            if state is None:
                if len(self._state) >= 4096:  # keys are (method, code): bounded, but never let them grow unchecked
                    self._state.clear()
                state = self._state[key] = [now, 0, 0]
            if now - state[0] >= self.window:
                state[0], state[1] = now, 0
            if state[1] >= self.n:
                state[2] += 1
                return None
            state[1] += 1
            suppressed, state[2] = state[2], 0
            return suppressed

    def reset(self) -> None:
        with self._lock:
            self._state.clear()


_refusal_log = _RateLimit(1, 1.0)     # per (method, code)
_internal_log = _RateLimit(10, 60.0)  # all internal errors together
_refusals: Counter = Counter()
_refusals_lock = threading.Lock()


def refusal_counts() -> dict[tuple[str, str], int]:
    """Error statuses returned through rpc_method (and note_refusal), by (method, status code name)."""
    with _refusals_lock:
        return dict(_refusals)


def note_refusal(method: str, code: grpc.StatusCode, message: str) -> None:
    """Count a refused call and log it in one line, at most once a second per (method, code)."""
    with _refusals_lock:
        _refusals[(method, code.name)] += 1
    if code == grpc.StatusCode.INTERNAL:
        return  # status_for logged it (with its traceback, rate-limited)
    suppressed = _refusal_log.allow((method, code))
    if suppressed is not None:
        line = repr(message)[1:-1]  # one line: control characters escaped
        log.warning("refused %s: %s %s%s", method, code.name, line if len(line) <= 300 else f"{line[:300]}…",
                    f" ({suppressed} similar suppressed)" if suppressed else "")


def _reset_limits() -> None:
    """Forget rate-limit state and counts (tests)."""
    _refusal_log.reset()
    _internal_log.reset()
    with _refusals_lock:
        _refusals.clear()


# -- mapping ---------------------------------------------------------------------------------------------------------
def status_for(exc: BaseException, where: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed piece of work reports.

    Only this module's errors (RpcError subclasses: the code says what the caller did wrong) and a genuine
    grpc.RpcError from a downstream call keep their codes. Everything else, ValueError, TypeError and KeyError
    included, is a bug or an unexpected failure in our code: it becomes INTERNAL and is logged here with its
    traceback (`where` names the work that failed; at most 10 a minute, the rest counted), so a shape bug is never
    reported as "bad input". Code that parses or validates caller input raises InvalidInput (or another RpcError)
    itself. INTERNAL messages have local paths scrubbed (OSError messages carry them)."""
    if isinstance(exc, RpcError):
        return exc.code, _cap(str(exc))
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return exc.code(), _cap(exc.details() or str(exc))
    suppressed = _internal_log.allow("internal")
    if suppressed is not None:
        log.error("internal error%s%s", f" in {where}" if where else "",
                  f" ({suppressed} more internal errors were not logged)" if suppressed else "", exc_info=exc)
    return grpc.StatusCode.INTERNAL, _cap(scrub_paths(f"internal error ({type(exc).__name__}): {exc}"))


def abort(context, exc: BaseException, method: str):
    """Abort the call `context` serves with the status for `exc`, counted and logged as `method`'s refusal."""
    code, message = status_for(exc, method)
    note_refusal(method, code, message)
    context.abort(code, message)


def _aborted(context) -> bool:
    """True once context.abort() has run (it raises a bare Exception; the status is already set)."""
    return bool(getattr(getattr(context, "_state", None), "aborted", False))


def rpc_method(fn):
    """Wrap a servicer method (unary or streaming): an RpcError becomes an abort with its code, a downstream
    grpc.RpcError keeps its code, and any other exception aborts with INTERNAL, logged with its traceback."""
    method = fn.__qualname__

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(self, request, context):
            try:
                yield from fn(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                if _aborted(context) or (isinstance(exc, grpc.RpcError) and not hasattr(exc, "code")):
                    raise
                abort(context, exc, method)

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            if _aborted(context) or (isinstance(exc, grpc.RpcError) and not hasattr(exc, "code")):
                raise  # context.abort's own exception (e.g. the guard refusing a streamed message)
            abort(context, exc, method)

    return wrapper
