"""The plaintext health port (`health_address`): grpc.health.v1 and nothing else, beside a main port that requires mTLS.

Kubernetes' grpc probes and compose healthchecks cannot present a client certificate, so a service can open a second,
plaintext listener that answers only the health service, with the same status as the main port. Checked here on a real
`cotune serve alignment` process (the one service that starts without a model) and on a ServiceHost in this process
(the NOT_SERVING -> SERVING flip, the Watch cap, shutdown), plus the config validation of the field.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cotune.config import AlignmentConfig, ConfigError, CoordinatorConfig, PartyConfig, from_dict, validate_security
from cotune.healthcheck import check
from cotune.rpc.channel import Credentials, TlsFiles, make_channel
from cotune.rpc.server import HEALTH_WATCHES, ServiceHost
from cotune.security.certs import ensure
from cotune.security.identity import ALIGNMENT, COORDINATOR

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# methods the main port serves that the health port must not: the alignment service's own, its blob store, reflection
NOT_ON_HEALTH_PORT = ("/cotune.v1.Alignment/RegisterTokenizer", "/cotune.v1.BlobStore/StatBlob",
                      "/cotune.v1.Operations/GetOperation", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call_raw(channel: grpc.Channel, method: str, timeout: float = 5.0) -> grpc.StatusCode:
    """Status of calling `method` with an empty request (raw bytes: no stubs needed for a method that is not there)."""
    if method.endswith("ServerReflectionInfo"):
        call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
        try:
            list(call(iter([b""]), timeout=timeout))
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK
    try:
        channel.unary_unary(method, request_serializer=None, response_deserializer=None)(b"", timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def health_status(address: str, timeout: float = 3.0) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return ensure(tmp_path_factory.mktemp("certs"), [ALIGNMENT, COORDINATOR])


# -- a real service process -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alignment_process(tmp_path_factory, certs):
    root = tmp_path_factory.mktemp("alignment")
    own = certs[str(ALIGNMENT)]
    main_port, health_port = free_port(), free_port()
    config = root / "alignment.yaml"
    config.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{main_port}", "health_address": f"127.0.0.1:{health_port}", "workdir": str(root / "work"),
        "tls": {"ca": str(own.ca), "cert": str(own.cert), "key": str(own.key)}}))
    log = (root / "alignment.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "cotune.cli", "serve", "alignment", "--config", str(config)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    health = f"127.0.0.1:{health_port}"
    deadline = time.monotonic() + 60
    while not check(health, timeout_s=1.0)[0]:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"alignment service did not report SERVING on its health port:\n{(root / 'alignment.log').read_text()}")
        time.sleep(0.2)
    yield proc, f"127.0.0.1:{main_port}", health
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_health_port_answers_check_in_plaintext_while_the_main_port_requires_mtls(alignment_process, certs):
    _, main, health = alignment_process
    assert health_status(health) == SERVING
    # the main port refuses plaintext and TLS without a client certificate...
    with pytest.raises(grpc.RpcError) as plain:
        health_status(main)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    ca = Path(certs[str(ALIGNMENT)].ca).read_bytes()
    anonymous = grpc.secure_channel(main, grpc.ssl_channel_credentials(root_certificates=ca),
                                    options=[("grpc.ssl_target_name_override", ALIGNMENT.dns_name)])
    with anonymous, pytest.raises(grpc.RpcError) as anon:
        health_pb2_grpc.HealthStub(anonymous).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert anon.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
    # ...and answers a caller with a valid certificate, with the same status
    coordinator = certs[str(COORDINATOR)]
    with make_channel(main, Credentials(TlsFiles(str(coordinator.ca), str(coordinator.cert), str(coordinator.key))),
                      peer=ALIGNMENT) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING


@pytest.mark.parametrize("method", NOT_ON_HEALTH_PORT)
def test_health_port_serves_no_other_service(alignment_process, method, certs):
    _, main, health = alignment_process
    with grpc.insecure_channel(health) as ch:
        assert call_raw(ch, method) == grpc.StatusCode.UNIMPLEMENTED
    # the same method exists on the main port (so UNIMPLEMENTED above is the health port's doing, not a wrong name):
    # the coordinator's certificate gets past authorization, so anything but UNIMPLEMENTED proves it is served there
    coordinator = certs[str(COORDINATOR)]
    with make_channel(main, Credentials(TlsFiles(str(coordinator.ca), str(coordinator.cert), str(coordinator.key))),
                      peer=ALIGNMENT) as ch:
        assert call_raw(ch, method) != grpc.StatusCode.UNIMPLEMENTED


def test_health_port_lists_only_health_statuses(alignment_process):
    _, _, health = alignment_process
    with grpc.insecure_channel(health) as ch:
        listed = health_pb2_grpc.HealthStub(ch).List(health_pb2.HealthListRequest(), timeout=5).statuses
    assert {name: s.status for name, s in listed.items()} == {"": SERVING, "cotune.alignment": SERVING}


def test_healthcheck_command_exit_codes(alignment_process):
    _, _, health = alignment_process
    ok = subprocess.run([sys.executable, "-m", "cotune.healthcheck", health], cwd=REPO, capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "SERVING" in ok.stdout
    down = subprocess.run([sys.executable, "-m", "cotune.healthcheck", f"127.0.0.1:{free_port()}", "--timeout", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stdout, down.stdout + down.stderr
    usage = subprocess.run([sys.executable, "-m", "cotune.healthcheck", "no-port"], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert usage.returncode == 2


# -- a ServiceHost in this process: the status follows the main port's ------------------------------------------------
def test_health_port_follows_the_service_state_and_caps_watch_streams(certs, tmp_path):
    own = certs[str(ALIGNMENT)]
    host = ServiceHost("cotune.alignment", "127.0.0.1:0", role="alignment", identity=ALIGNMENT,
                       tls=TlsFiles(str(own.ca), str(own.cert), str(own.key)), health_address="127.0.0.1:0")
    host.start()
    health = f"127.0.0.1:{host.health_port}"
    watches: list = []
    try:
        assert host.health_port and host.health_port != host.port
        assert health_status(health) == NOT_SERVING  # listening, not ready: as while a model loads
        assert check(health) == (False, "NOT_SERVING")
        host.set_serving(True)
        assert health_status(health) == SERVING
        # Watch streams are capped, and Check still answers while the cap is full
        channel = grpc.insecure_channel(health)
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(HEALTH_WATCHES):
            stream = stub.Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert next(stream).status == SERVING
            watches.append(stream)
        with pytest.raises(grpc.RpcError) as extra:
            next(stub.Watch(health_pb2.HealthCheckRequest(), timeout=10))
        assert extra.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert health_status(health) == SERVING
        # a status change reaches the open Watch streams of the health port
        host.set_serving(False)
        assert next(watches[0]).status == NOT_SERVING
    finally:
        for stream in watches:
            stream.cancel()
        host.stop(grace=0.5)
    with pytest.raises(grpc.RpcError) as gone:
        health_status(health, timeout=2)
    assert gone.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_without_health_address_there_is_no_health_port(certs):
    own = certs[str(ALIGNMENT)]
    host = ServiceHost("cotune.alignment", "127.0.0.1:0", role="alignment", identity=ALIGNMENT,
                       tls=TlsFiles(str(own.ca), str(own.cert), str(own.key)))
    host.start()
    try:
        assert host.health_port is None
    finally:
        host.stop(grace=0)


def test_health_port_that_cannot_bind_fails_the_start(certs):
    own = certs[str(ALIGNMENT)]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host = ServiceHost("cotune.alignment", "127.0.0.1:0", role="alignment", identity=ALIGNMENT,
                           tls=TlsFiles(str(own.ca), str(own.cert), str(own.key)),
                           health_address=f"127.0.0.1:{taken.getsockname()[1]}")
        with pytest.raises(OSError, match="could not bind the health port"):
            host.start()


# -- config ------------------------------------------------------------------------------------------------------------
TLS = {"ca": "ca.crt", "cert": "x.crt", "key": "x.key"}


@pytest.mark.parametrize("cls", [PartyConfig, AlignmentConfig, CoordinatorConfig])
@pytest.mark.parametrize("address", ["0.0.0.0:8081", "[::]:8081", "127.0.0.1:0", "health.example.org:9000", ""])
def test_health_address_accepted(cls, address):
    cfg = from_dict(cls, {"listen": "0.0.0.0:50051", "health_address": address, "tls": TLS})
    validate_security(cfg, "svc")
    assert cfg.health_address == address


@pytest.mark.parametrize("address, error", [
    ("8081", "expected HOST:PORT"),
    (":8081", "expected HOST:PORT"),
    ("0.0.0.0:http", "expected HOST:PORT"),
    ("0.0.0.0:70000", "expected HOST:PORT"),
    ("::1:8081", "expected HOST:PORT"),            # IPv6 needs brackets
    ("0.0.0.0:50051", "uses the port of listen"),   # the main port's
])
def test_bad_health_address_is_refused_naming_the_key(address, error):
    cfg = from_dict(AlignmentConfig, {"listen": "0.0.0.0:50051", "health_address": address, "tls": TLS})
    with pytest.raises(ConfigError, match=f"alignment: health_address.*{error}|alignment: .*{error}"):
        validate_security(cfg, "alignment")


def test_health_address_must_be_a_string():
    with pytest.raises(ConfigError, match="health_address: expected str"):
        from_dict(CoordinatorConfig, {"health_address": ["0.0.0.0:8081"]})
