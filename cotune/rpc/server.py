"""Server bootstrap shared by every service: limits, TLS, bearer-token auth, health, reflection, shutdown."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cotune.rpc.channel import CHANNEL_OPTIONS, TlsFiles, is_loopback

log = logging.getLogger(__name__)

_UNAUTHENTICATED_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class _TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without a configured bearer token (health and reflection stay open)."""

    def __init__(self, tokens: dict[str, str]):
        self._tokens = tokens

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token (metadata 'authorization: Bearer <token>')")

        self._deny = deny

    def intercept_service(self, continuation, details):
        if details.method.startswith(_UNAUTHENTICATED_METHODS):
            return continuation(details)
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and value.startswith("Bearer ") and value[7:] in self._tokens:
                return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(lambda it, ctx: self._deny(None, ctx))
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(lambda it, ctx: self._deny(None, ctx))
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(lambda req, ctx: self._deny(req, ctx))
        return grpc.unary_unary_rpc_method_handler(self._deny)


def tls_files(cfg) -> TlsFiles:
    return TlsFiles(cfg.ca, cfg.cert, cfg.key)


class ServiceHost:
    """One gRPC server process: register servicers, start NOT_SERVING, flip to SERVING when ready."""

    def __init__(self, name: str, address: str, *, tls: TlsFiles | None = None, tokens: dict[str, str] | None = None,
                 max_workers: int = 32):
        self.name = name
        self.address = address
        self.tls = tls or TlsFiles()
        interceptors = [_TokenAuthInterceptor(tokens)] if tokens else []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name),
                                  options=CHANNEL_OPTIONS, interceptors=interceptors)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        self.port: int | None = None
        self._stopped = threading.Event()
        self.set_serving(False)

    def add(self, add_fn, servicer, descriptor_module, service_name: str) -> None:
        """Register `servicer` with its generated `add_XServicer_to_server` function."""
        add_fn(servicer, self.server)
        self._service_names.append(descriptor_module.DESCRIPTOR.services_by_name[service_name].full_name)

    def add_blobs_and_operations(self, store, operations) -> None:
        """Every service serves its blob store and its long-running operations."""
        from cotune.rpc.operations import OperationsServicer
        from cotune.v1 import common_pb2, common_pb2_grpc, operations_pb2, operations_pb2_grpc
        from cotune.wire.blobs import BlobStoreServicer

        self.add(common_pb2_grpc.add_BlobStoreServicer_to_server, BlobStoreServicer(store), common_pb2, "BlobStore")
        if operations is not None:
            self.add(operations_pb2_grpc.add_OperationsServicer_to_server, OperationsServicer(operations), operations_pb2, "Operations")

    def start(self, port_file: str | None = None) -> int:
        """Bind and start; with `port_file`, write the bound port there (how the cluster launcher finds it)."""
        reflection.enable_server_reflection(self._service_names, self.server)
        if self.tls.enabled:
            ca, cert, key = self.tls.read()
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
            self.port = self.server.add_secure_port(self.address, creds)
        else:
            if not is_loopback(self.address):
                raise ValueError(
                    f"{self.name}: refusing to listen in plaintext on {self.address}; plaintext is for loopback only. "
                    "Configure tls.ca, tls.cert and tls.key to listen on other interfaces."
                )
            self.port = self.server.add_insecure_port(self.address)
        if not self.port:
            raise OSError(f"{self.name}: could not bind {self.address}")
        self.server.start()
        if port_file:
            tmp = f"{port_file}.tmp"
            with open(tmp, "w") as f:
                f.write(str(self.port))
            os.replace(tmp, port_file)
        log.info("%s listening on %s (port %d)", self.name, self.address, self.port)
        return self.port

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", status)
        self.health.set(self.name, status)

    def stop(self, grace: float = 5.0) -> None:
        self.set_serving(False)
        self.server.stop(grace).wait()
        self._stopped.set()

    def wait_for_termination_signal(self) -> None:
        """Block until SIGTERM/SIGINT, then report NOT_SERVING and drain in-flight calls."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: threading.Thread(target=self.stop, daemon=True).start())
        self._stopped.wait()
