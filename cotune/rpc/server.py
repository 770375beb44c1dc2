"""Server bootstrap shared by every service: limits, mTLS, the guard (identities, authorization, concurrency caps),
health, reflection, metrics, shutdown."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cotune import metrics
from cotune.config import validate_security
from cotune.errors import add_private_root
from cotune.rpc.limits import check_message
from cotune.rpc.channel import SERVER_OPTIONS, Credentials, TlsFiles, is_loopback
from cotune.rpc.guard import WORKERS, Guard
from cotune.security.identity import Identity, client_identity
from cotune.security.policy import POLICIES

log = logging.getLogger(__name__)

# The plaintext health port (`health_address`): grpc.health.v1 only, for probes that cannot present a client certificate.
# Unauthenticated, so it gets its own small pool, tiny messages and at most HEALTH_WATCHES Watch streams: nothing sent to
# it can occupy the main port's workers, and Check always finds a thread.
HEALTH_WORKERS = 4
HEALTH_WATCHES = 2
HEALTH_MAX_CALLS = 32  # calls in progress or queued; more are refused RESOURCE_EXHAUSTED instead of piling up
HEALTH_SERVER_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024),
    ("grpc.max_receive_message_length", 4 * 1024),
    ("grpc.keepalive_permit_without_calls", 0),
]


def tls_files(cfg) -> TlsFiles:
    return TlsFiles(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)


def credentials(cfg) -> Credentials:
    """What a service presents when it dials others: its certificate and its per-peer tokens."""
    return Credentials(tls_files(cfg), dict(cfg.auth.peer_tokens))


class _Health(health.HealthServicer):
    """grpc.health.v1 with List (the installed servicer predates it and answers UNIMPLEMENTED with a logged traceback
    per call)."""

    def List(self, request, context):
        with self._lock:
            statuses = {name: health_pb2.HealthCheckResponse(status=s) for name, s in self._server_status.items()}
        return health_pb2.HealthListResponse(statuses=statuses)


class ServiceHost:
    """One gRPC server process: register servicers, start NOT_SERVING, flip to SERVING when ready.

    `role` picks the authorization table (cotune.security.policy.POLICIES); `tls` empty means plaintext, which the
    caller must have asked for explicitly (`insecure: true`) and which listens on a literal loopback address only.
    `tokens`: bearer token -> the identity it is bound to. `health_address` (empty = none): a second, plaintext listener
    serving only grpc.health.v1, with the same health state as the main port (see HEALTH_WORKERS).
    `metrics_address` (empty = none): a plaintext HTTP listener serving the process's Prometheus metrics
    (cotune.metrics); this host's series carry `labels` (service, party: cotune.metrics.service_labels)."""

    def __init__(self, name: str, address: str, *, role: str, tls: TlsFiles | None = None,
                 tokens: Mapping[str, Identity] | None = None, check=None, identity: Identity | None = None,
                 health_address: str = "", metrics_address: str = "", labels: tuple[str, str] | None = None):
        self.name = name
        self.identity = identity  # with TLS, the identity this service's certificate must carry
        self.address = address
        self.tls = tls or TlsFiles()
        self.policy = POLICIES[role]
        self.labels = labels or metrics.service_labels(role)
        self.rpc_metrics = metrics.RpcMetrics(*self.labels)
        self.guard = Guard(self.policy, secure=self.tls.enabled, tokens=tokens, check=check, metrics=self.rpc_metrics)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix=name),
                                  options=SERVER_OPTIONS, interceptors=[self.guard])
        self.health = _Health(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        self.port: int | None = None
        self.health_address = health_address
        self.health_port: int | None = None
        self._health_server: grpc.Server | None = None
        self.metrics_address = metrics_address
        self.metrics_port: int | None = None
        self._metrics: metrics.Endpoint | None = None
        self._check = check
        self._stopped = threading.Event()
        self.set_serving(False)

    def add(self, add_fn, servicer, descriptor_module, service_name: str) -> None:
        """Register `servicer` with its generated `add_XServicer_to_server` function. Every method it serves must have
        a rule in the host's authorization table."""
        service = descriptor_module.DESCRIPTOR.services_by_name[service_name]
        missing = [m.name for m in service.methods if f"{service.full_name}/{m.name}" not in self.policy]
        if missing:
            raise RuntimeError(f"{self.name}: no authorization rule for {service.full_name} {', '.join(missing)} "
                               "(cotune/security/policy.py)")
        add_fn(servicer, self.server)
        self._service_names.append(service.full_name)

    def add_blobs_and_operations(self, store, operations) -> None:
        """Every service serves its blob store and its long-running operations (both counted under this host's
        metric labels)."""
        from cotune.rpc.operations import OperationsServicer
        from cotune.v1 import common_pb2, common_pb2_grpc, operations_pb2, operations_pb2_grpc
        from cotune.wire.blobs import BlobStoreServicer

        metrics.bind_store(store, *self.labels)
        self.add(common_pb2_grpc.add_BlobStoreServicer_to_server, BlobStoreServicer(store), common_pb2, "BlobStore")
        if operations is not None:
            operations.metrics = metrics.OperationMetrics(*self.labels)
            self.add(operations_pb2_grpc.add_OperationsServicer_to_server, OperationsServicer(operations), operations_pb2, "Operations")

    def start(self, port_file: str | None = None) -> int:
        """Bind and start; with `port_file`, write the bound port there (how the cluster launcher finds it)."""
        reflection.enable_server_reflection(self._service_names, self.server)
        if self.tls.enabled:
            ca, cert, key = self.tls.read()
            self._check_own_identity(cert)
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
            self.port = self.server.add_secure_port(self.address, creds)
        else:
            if not is_loopback(self.address):
                raise ValueError(
                    f"{self.name}: refusing to listen in plaintext on {self.address}; plaintext is for a literal "
                    "loopback address only. Configure tls.ca, tls.cert and tls.key (`cotune certs` makes them).")
            log.warning("%s: plaintext on %s (insecure: true): %s", self.name, self.address,
                        "callers are identified by bearer token" if self.guard.enforce
                        else "no identities, no authorization; for development on one machine only")
            self.port = self.server.add_insecure_port(self.address)
        if not self.port:
            raise OSError(f"{self.name}: could not bind {self.address}")
        self.server.start()
        if self.health_address:
            self._start_health_port()
        if self.metrics_address:
            self._start_metrics_port()
        if port_file:
            tmp = f"{port_file}.tmp"
            with open(tmp, "w") as f:
                f.write(str(self.port))
            os.replace(tmp, port_file)
        log.info("%s listening on %s (port %d, %s)", self.name, self.address, self.port,
                 "mTLS" if self.tls.enabled else "plaintext")
        return self.port

    def _start_health_port(self) -> None:
        """The plaintext health-only listener: the same servicer object as the main port (so the same status, NOT_SERVING
        while loading), no other service, not even reflection; any other method is UNIMPLEMENTED. It reveals nothing but
        the serving status, which is why it needs no certificate."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=HEALTH_WORKERS, thread_name_prefix=f"{self.name}-health"),
                             options=HEALTH_SERVER_OPTIONS, maximum_concurrent_rpcs=HEALTH_MAX_CALLS,
                             # no identities on this port: the guard only caps Watch streams and checks message limits
                             interceptors=[Guard({}, secure=False, check=self._check,
                                                 concurrency={"grpc.health.v1.Health/Watch": HEALTH_WATCHES},
                                                 metrics=self.rpc_metrics)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            port = server.add_insecure_port(self.health_address)
        except RuntimeError:  # grpc raises on a failed bind (older versions returned 0)
            port = 0
        if not port:
            self.server.stop(None)
            raise OSError(f"{self.name}: could not bind the health port {self.health_address}")
        server.start()
        self._health_server, self.health_port = server, port
        log.info("%s health port on %s (port %d, plaintext, grpc.health.v1 only)", self.name, self.health_address, port)

    def _start_metrics_port(self) -> None:
        """The plaintext HTTP metrics listener (cotune.metrics.serve: bounded threads, short timeouts). It reveals
        counters (methods, status codes, byte counts, party ids), no data; a port that cannot be bound stops the
        service with an error naming it, rather than running unobserved."""
        try:
            self._metrics = metrics.serve(self.metrics_address)
        except OSError as exc:
            self.server.stop(None)
            if self._health_server is not None:
                self._health_server.stop(None)
            raise OSError(f"{self.name}: could not bind the metrics port {self.metrics_address}: {exc}") from exc
        self.metrics_port = self._metrics.port
        log.info("%s metrics on %s (port %d, plaintext HTTP, Prometheus text format)", self.name,
                 self.metrics_address, self.metrics_port)

    def _check_own_identity(self, cert_pem: bytes) -> None:
        from cotune.security.certs import identity_of_cert

        found = identity_of_cert(cert_pem)
        if self.identity is not None and found != self.identity:
            raise ValueError(f"{self.name}: its certificate {self.tls.cert} carries identity {found or 'none'}, but this "
                             f"service is {self.identity} (make one with `cotune certs --dir DIR {self.identity}`)")

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", status)
        self.health.set(self.name, status)
        self.rpc_metrics.serving(serving)

    def stop(self, grace: float = 5.0) -> None:
        self.set_serving(False)
        self.server.stop(grace).wait()
        if self._health_server is not None:  # after the main port: probes see NOT_SERVING while calls drain
            self._health_server.stop(0).wait()
        if self._metrics is not None:  # last: a final scrape sees the drain
            self._metrics.close()
        self._stopped.set()

    def wait_for_termination_signal(self) -> None:
        """Block until SIGTERM/SIGINT, then report NOT_SERVING and drain in-flight calls."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: threading.Thread(target=self.stop, daemon=True).start())
        self._stopped.wait()


def service_host(name: str, cfg, role: str) -> ServiceHost:
    """The ServiceHost of a service config (PartyConfig, AlignmentConfig, CoordinatorConfig): its listen address,
    TLS files, accepted tokens and the identity its certificate must carry."""
    validate_security(cfg, name)  # TLS files or an explicit `insecure: true`, tokens bound to valid identities
    tokens = {token: Identity.parse(identity) for token, identity in cfg.auth.tokens.items()}
    identity = client_identity(cfg.party_id) if role == "slm" else Identity(role)
    add_private_root(cfg.workdir)  # error messages to callers never show paths under it
    return ServiceHost(name, cfg.listen, role=role, tls=tls_files(cfg), tokens=tokens, identity=identity,
                       check=check_message, health_address=cfg.health_address,
                       metrics_address=cfg.metrics_address,
                       labels=metrics.service_labels(role, getattr(cfg, "party_id", "")))
