"""Client channels and calls: message limits, TLS, bearer tokens, deadlines and retries on UNAVAILABLE."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from cotune.errors import InvalidInput

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # chunks are <= 1 MiB; everything else is small
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class TlsFiles:
    """Paths to PEM files for mutual TLS. Empty paths mean plaintext (allowed on loopback only)."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.ca)

    def read(self) -> tuple[bytes, bytes | None, bytes | None]:
        ca = Path(self.ca).read_bytes()
        cert = Path(self.cert).read_bytes() if self.cert else None
        key = Path(self.key).read_bytes() if self.key else None
        return ca, cert, key


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def make_channel(address: str, *, tls: TlsFiles | None = None, token: str = "") -> grpc.Channel:
    tls = tls or TlsFiles()
    if tls.enabled:
        ca, cert, key = tls.read()
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        if token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        return grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
    if not is_loopback(address):  # InvalidInput (a ValueError): often an address a caller registered
        raise InvalidInput(
            f"refusing a plaintext channel to {address}: plaintext is allowed on loopback only; "
            "configure tls.ca/tls.cert/tls.key (README: 'Deploying on separate hosts')"
        )
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    if token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(token))
    return channel


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor):
    def __init__(self, token: str):
        self._meta = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_Details(details, list(details.metadata or []) + [self._meta]), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_Details(details, list(details.metadata or []) + [self._meta]), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(_Details(details, list(details.metadata or []) + [self._meta]), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, metadata):
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


def call(method, request, *, timeout: float = DEFAULT_TIMEOUT_S, retries: int = 4, backoff_s: float = 0.5):
    """Invoke a unary RPC with a deadline, retrying UNAVAILABLE with jittered exponential backoff."""
    attempt = 0
    while True:
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE or attempt >= retries:
                raise
            time.sleep(backoff_s * (2**attempt) * (0.5 + random.random()))
            attempt += 1
