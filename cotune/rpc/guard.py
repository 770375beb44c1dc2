"""The one server interceptor every service runs: who is calling, may they, and is there room.

For each call, before the handler runs:
1. **Authenticate.** With mTLS the caller's identity is the `id.cotune` SAN of its certificate (TLS has already checked
   the chain and dates). A bearer token, where configured, is bound to one identity: alone (plaintext on loopback) it
   is the identity; beside a certificate it must name the same identity, so a token replayed by another party fails.
   A plaintext host without tokens (the explicit `insecure: true` development mode) has no identities and no checks.
2. **Authorize** against the host's table (cotune.security.policy); refusals are PERMISSION_DENIED or UNAUTHENTICATED
   naming the identity and the method, counted and logged at most once a second per method (cotune.errors).
3. **Limit.** Methods that hold a worker thread for long (streams, waits, registrations that dial out) have a
   per-method concurrency cap, refused with RESOURCE_EXHAUSTED when full, and the caps sum to less than the worker
   pool, so no number of slow or idle callers can starve health checks or quick calls. Streams that make no progress
   for `stream_idle_s` are cancelled. Request messages are checked against cotune.rpc.limits before the handler sees
   them.
4. **Count.** Every call, refused or not, is counted by method and status code and timed (cotune.metrics).

Handlers read the authenticated caller with `caller()` (None in insecure mode).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import grpc

from cotune.errors import note_refusal
from cotune.metrics import RpcMetrics
from cotune.security.identity import Identity
from cotune.security.policy import method_key

log = logging.getLogger(__name__)

_CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("cotune_caller", default=None)

# Methods that hold a worker for long, and how many of each may run at once. Their sum (52) stays well below
# WORKERS, so quick calls and health checks always find a thread.
CONCURRENCY = {
    "cotune.v1.BlobStore/PutBlob": 8,
    "cotune.v1.BlobStore/GetBlob": 8,
    "cotune.v1.Operations/WaitOperation": 16,
    "cotune.v1.Coordinator/WatchRun": 8,
    "cotune.v1.Coordinator/RegisterClient": 4,  # dials the registering address (short deadline)
    "cotune.v1.Coordinator/ExportRun": 2,       # runs a task on every party of the run
    "grpc.health.v1.Health/Watch": 4,
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": 2,
}
WORKERS = 64
STREAM_IDLE_S = 30.0  # a stream that moves no message for this long is cancelled...
# ...except event streams, which are quiet while nothing happens: WatchRun ends itself after 10 minutes (the watchdog
# only catches one stuck on a caller that stopped reading), health Watch only sends on a status change (its cap bounds
# it)
IDLE_EXEMPT = {"cotune.v1.Coordinator/WatchRun": 660.0, "grpc.health.v1.Health/Watch": None}


def caller() -> Identity | None:
    """The identity of the caller of the RPC this thread is serving (None: insecure mode, no identities)."""
    return _CALLER.get()


class _Watchdog:
    """Cancels streams that have made no progress for `idle_s` (one thread per host, started on first use)."""

    def __init__(self, idle_s: float):
        self.idle_s = idle_s
        self._streams: dict[int, list] = {}  # id -> [context, last progress, method, idle limit or None]
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.cancelled = 0

    def watch(self, context, method: str) -> int:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="stream-watchdog", daemon=True)
                self._thread.start()
            self._streams[id(context)] = [context, time.monotonic(), method, IDLE_EXEMPT.get(method, self.idle_s)]
        return id(context)

    def touch(self, key: int) -> None:
        entry = self._streams.get(key)
        if entry is not None:
            entry[1] = time.monotonic()

    def unwatch(self, key: int) -> None:
        with self._lock:
            self._streams.pop(key, None)

    def _loop(self) -> None:
        while True:
            time.sleep(min(1.0, self.idle_s / 4))
            now = time.monotonic()
            with self._lock:
                idle = [(k, e) for k, e in self._streams.items() if e[3] is not None and now - e[1] > e[3]]
                for k, _ in idle:
                    del self._streams[k]
            for _, (context, _, method, limit) in idle:
                self.cancelled += 1
                log.warning("cancelled %s: no message for %.0fs", method, limit)
                context.cancel()


@contextlib.contextmanager
def _timed(observe, method: str, context):
    """Count and time one call (cotune.metrics) with the code it ended with, refusals and failures included."""
    started, code = time.perf_counter(), None
    try:
        yield
    except GeneratorExit:  # the caller went away mid-stream
        code = "CANCELLED"
        raise
    except BaseException:
        code = _code(context, failed=True)
        raise
    finally:
        observe(method, code or _code(context), time.perf_counter() - started)


class Guard(grpc.ServerInterceptor):
    """Authentication, authorization, request limits and concurrency caps for one host (see the module doc).

    `policy`: method key -> identity kinds allowed (cotune.security.policy.POLICIES[role]); `secure`: the host serves
    mTLS; `tokens`: bearer token -> identity it is bound to; `check`: validates a request message (raises an RpcError),
    normally cotune.rpc.limits.check_message; `metrics`: where calls are counted (the host's labels)."""

    def __init__(self, policy: Mapping[str, frozenset], *, secure: bool, tokens: Mapping[str, Identity] | None = None,
                 check: Callable | None = None, concurrency: Mapping[str, int] | None = None,
                 stream_idle_s: float = STREAM_IDLE_S, metrics: RpcMetrics | None = None):
        self.policy = policy
        self.secure = secure
        self.tokens = dict(tokens or {})
        self.enforce = secure or bool(self.tokens)  # insecure without tokens: the development mode, no identities
        self.check = check
        self._slots = {m: threading.BoundedSemaphore(n) for m, n in (concurrency or CONCURRENCY).items()}
        self._limits = dict(concurrency or CONCURRENCY)
        self.watchdog = _Watchdog(stream_idle_s)
        self.metrics = metrics or RpcMetrics()

    # -- the checks -----------------------------------------------------------------------------------------------
    def _identify(self, context, method: str) -> Identity | None:
        """The caller's identity, or abort UNAUTHENTICATED."""
        cert_identity = None
        if self.secure:
            sans = context.auth_context().get("x509_subject_alternative_name", [])
            found = {Identity.from_dns_name(s.decode(errors="replace")) for s in sans} - {None}
            if len(found) != 1:
                self._refuse(context, method, grpc.StatusCode.UNAUTHENTICATED,
                             "the client certificate carries " + ("no Cotune identity (a SAN in id.cotune; make "
                             "certificates with `cotune certs`)" if not found else "several Cotune identities"))
            cert_identity = found.pop()
        token_identity = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                token_identity = self.tokens.get(value[7:]) if value.startswith("Bearer ") else None
                if token_identity is None:
                    self._refuse(context, method, grpc.StatusCode.UNAUTHENTICATED,
                                 "unknown bearer token" + (f" (caller {cert_identity})" if cert_identity else ""))
        if cert_identity and token_identity and token_identity != cert_identity:
            self._refuse(context, method, grpc.StatusCode.UNAUTHENTICATED,
                         f"the bearer token is bound to {token_identity}, but the certificate is {cert_identity}")
        identity = cert_identity or token_identity
        if identity is None and not self.secure:
            self._refuse(context, method, grpc.StatusCode.UNAUTHENTICATED,
                         "a bearer token is required (metadata 'authorization: Bearer <token>')")
        return identity

    def _refuse(self, context, method: str, code: grpc.StatusCode, message: str):
        note_refusal(method, code, message)  # counted, and logged at most once a second per (method, code)
        context.abort(code, f"{method}: {message}")

    @contextlib.contextmanager
    def _admitted(self, context, method: str, streams: bool):
        """Authenticate, authorize, take a concurrency slot and (for streams) watch for idleness while the call runs;
        yields the watchdog key (0 for unary calls)."""
        identity = None
        if self.enforce:
            identity = self._identify(context, method)
            allowed = self.policy.get(method)
            if allowed is None or identity.kind not in allowed:
                self._refuse(context, method, grpc.StatusCode.PERMISSION_DENIED,
                             f"{identity} may not call this method" +
                             (f" (allowed: {', '.join(sorted(allowed))})" if allowed else " (no rule)"))
        slot = self._slots.get(method)
        if slot is not None and not slot.acquire(blocking=False):
            self._refuse(context, method, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"{self._limits[method]} calls of this method are already in progress (the limit); retry later")
        token = _CALLER.set(identity)
        key = self.watchdog.watch(context, method) if streams else 0
        try:
            yield key
        finally:
            if streams:
                self.watchdog.unwatch(key)
            _CALLER.reset(token)
            if slot is not None:
                slot.release()

    def _checked(self, message, context, method: str):
        if self.check is not None:
            try:
                self.check(message)
            except Exception as exc:  # noqa: BLE001 - an RpcError from the checker: the request is refused
                code = getattr(exc, "code", grpc.StatusCode.INVALID_ARGUMENT)
                self._refuse(context, method, code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.INVALID_ARGUMENT,
                             str(exc))
        return message

    def _decode(self, raw, context, method: str, deserialize):
        """The request message parsed from its bytes; a malformed encoding is INVALID_ARGUMENT (one rate-limited log
        line), not gRPC's INTERNAL "Exception deserializing request!" with a traceback per message."""
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or whatever a deserializer raises on garbage
            self._refuse(context, method, grpc.StatusCode.INVALID_ARGUMENT,
                         f"malformed request message ({type(exc).__name__}: {str(exc)[:200]})")

    def _stream_in(self, iterator: Iterator, context, method: str, key: int, deserialize=None) -> Iterator:
        for raw in iterator:
            self.watchdog.touch(key)
            yield self._checked(self._decode(raw, context, method, deserialize), context, method)

    # -- wiring -------------------------------------------------------------------------------------------------------
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = method_key(handler_call_details.method)
        kind = ("stream" if handler.request_streaming else "unary") + "_" + ("stream" if handler.response_streaming else "unary")
        behavior = getattr(handler, kind)
        streams = handler.request_streaming or handler.response_streaming
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        timed = functools.partial(_timed, self.metrics.observe)

        if not self.enforce and method not in self._slots and self.check is None:  # nothing to check: only counted
            if handler.response_streaming:
                def counted(request, context):
                    with timed(method, context):
                        yield from behavior(request, context)
            else:
                def counted(request, context):
                    with timed(method, context):
                        return behavior(request, context)
            return factory(counted, request_deserializer=handler.request_deserializer,
                           response_serializer=handler.response_serializer)

        deserialize = handler.request_deserializer  # parsed here, after authentication, so garbage is refused cleanly

        def admit_request(request, context, key):
            if handler.request_streaming:
                return self._stream_in(request, context, method, key, deserialize)
            return self._checked(self._decode(request, context, method, deserialize), context, method)

        if handler.response_streaming:
            def wrapped(request, context):
                # a generator: the slot, the caller and the watch are held while responses are produced
                with timed(method, context), self._admitted(context, method, True) as key:
                    for response in behavior(admit_request(request, context, key), context):
                        yield response
                        self.watchdog.touch(key)
        else:
            def wrapped(request, context):
                with timed(method, context), self._admitted(context, method, streams) as key:
                    return behavior(admit_request(request, context, key), context)

        return factory(wrapped, request_deserializer=None,
                       response_serializer=handler.response_serializer)


def _code(context, *, failed: bool = False) -> str:
    """The status code name a call ends with: what the handler (or an abort) set, else OK, or UNKNOWN for a call that
    raised without setting one (gRPC answers it UNKNOWN)."""
    code = None
    getter = getattr(context, "code", None)
    if callable(getter):
        try:
            code = getter()
        except Exception:  # noqa: BLE001 - a context without a code
            code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN" if failed else "OK"
