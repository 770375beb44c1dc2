"""Client channels and calls: message limits, TLS, bearer tokens, deadlines and retries on UNAVAILABLE."""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cotune.errors import InvalidInput
from cotune.security.identity import Identity

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # chunks are <= 1 MiB; everything else is small
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
# Servers accept the channels' 30 s keepalive pings, with or without calls in flight (gRPC's default minimum of 5 min
# answers them with GOAWAY too_many_pings), and ping idle callers themselves to notice dead peers.
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),  # gRPC core's name (an unknown key is ignored)
    ("grpc.http2.max_ping_strikes", 2),
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
    """True only for a literal loopback IP address (127.0.0.0/8 or ::1) with a port: a name that merely starts with
    "127." or resolves to loopback is not plaintext-safe."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Credentials:
    """How this process proves who it is when it dials: its mTLS files (the normal case), bearer tokens by the
    identity of the peer they are for (each token is bound to one audience, so a peer cannot replay it elsewhere),
    or neither (plaintext, allowed on a literal loopback address only)."""

    tls: TlsFiles = field(default_factory=TlsFiles)
    peer_tokens: Mapping[str, str] = field(default_factory=dict)  # str(peer identity) -> token

    def token_for(self, peer: Identity | None) -> str:
        return self.peer_tokens.get(str(peer), "") if peer is not None else ""


def make_channel(address: str, creds: Credentials | None = None, *, peer: Identity | None = None) -> grpc.Channel:
    """A channel to `address`. With TLS and `peer`, the server must present `peer`'s certificate (its identity's DNS
    name is what TLS verifies), so a registered address can never stand in for another identity's service."""
    creds = creds or Credentials()
    token = creds.token_for(peer)
    if creds.tls.enabled:
        ca, cert, key = creds.tls.read()
        channel_creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        if token:
            channel_creds = grpc.composite_channel_credentials(channel_creds, grpc.access_token_call_credentials(token))
        options = CHANNEL_OPTIONS + ([("grpc.ssl_target_name_override", peer.dns_name)] if peer is not None else [])
        return grpc.secure_channel(address, channel_creds, options=options)
    if not is_loopback(address):  # InvalidInput (a ValueError): often an address a caller registered
        raise InvalidInput(
            f"refusing a plaintext channel to {address:.100}: plaintext is allowed on a literal loopback address only; "
            "configure tls.ca/tls.cert/tls.key (README: 'Deploying on separate hosts')"
        )
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    if token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(token))
    return channel


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._meta = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_Details(details, list(details.metadata or []) + [self._meta]), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_Details(details, list(details.metadata or []) + [self._meta]), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(_Details(details, list(details.metadata or []) + [self._meta]), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(_Details(details, list(details.metadata or []) + [self._meta]), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, metadata):
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


# UNAVAILABLE: not up (yet); RESOURCE_EXHAUSTED: a concurrency cap is full (cotune.rpc.guard), also transient
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def call(method, request, *, timeout: float = DEFAULT_TIMEOUT_S, retries: int = 4, backoff_s: float = 0.5,
         retry_on: tuple[grpc.StatusCode, ...] = RETRYABLE):
    """Invoke a unary RPC with a deadline, retrying the codes `retry_on` (default UNAVAILABLE and RESOURCE_EXHAUSTED)
    with jittered exponential backoff."""
    attempt = 0
    while True:
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() not in retry_on or attempt >= retries:
                raise
            time.sleep(backoff_s * (2**attempt) * (0.5 + random.random()))
            attempt += 1
