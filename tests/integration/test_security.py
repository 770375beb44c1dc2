"""The security suite against a secure local cluster of real processes (mTLS, identities in certificates, the guard's
authorization table), plus identity-bound tokens and the start-up refusals on standalone alignment services.

The matrix test calls EVERY RPC of every service (the method list comes from cotune.security.policy.POLICIES, the same
table the services enforce, so nothing is missed) as every kind of caller: anonymous (TLS without a client
certificate), a certificate from another CA, an expired certificate from the right CA, and a valid certificate of each
identity kind. Requests are minimal and harmless (an empty TaskRequest, GetBlob of a random sha, CancelRun of an
unknown id): the point is the verdict, not success. The resulting table (service x method x caller -> status code) is
printed, and written as JSON to $COTUNE_SECURITY_TABLE when set.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2  # noqa: F401 - registers grpc.health.v1 in the default descriptor pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cotune.cluster import OPERATOR, wait_healthy
from cotune.rpc.channel import CHANNEL_OPTIONS, Credentials, TlsFiles, is_loopback, make_channel
from cotune.security.certs import CA_CERT, CA_KEY, cert_files, ensure, issue, make_ca
from cotune.security.identity import ALIGNMENT, COORDINATOR, KINDS, LLM, Identity, client_identity
from cotune.security.policy import POLICIES
from cotune.v1 import alignment_pb2, coordinator_pb2, party_pb2  # noqa: F401 - register cotune.v1 descriptors

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# the services of the cluster under test and the role (authorization table) each serves
SERVICES = {"coordinator": "coordinator", "llm": "llm", "client-1": "slm", "alignment": "alignment"}
# one valid identity of each kind (client-2 stands for "some client": it is not the service's own identity anywhere)
IDENTITIES = {"coordinator": COORDINATOR, "llm": LLM, "alignment": ALIGNMENT, "client": client_identity("client-2"),
              "operator": OPERATOR}
BAD_CALLERS = ("anonymous", "other-ca", "expired", "not-yet-valid")
TLS_REFUSALS = ("UNAVAILABLE", "UNAUTHENTICATED")
CALL_TIMEOUT_S = 10.0
GUARD_DENIAL = "may not call this method"  # the guard's PERMISSION_DENIED message (handlers' own refusals differ)
NO_SUCH = "no-such-id"


# -- generic calls --------------------------------------------------------------------------------------------------
def _method_descriptor(key: str):
    service, method = key.split("/")
    return descriptor_pool.Default().FindServiceByName(service).methods_by_name[method]


def _message(descriptor, **fields):
    return message_factory.GetMessageClass(descriptor)(**fields)


def request_for(key: str):
    """A minimal, harmless request for method `key`: a message, or a list of messages for client-streaming methods."""
    md = _method_descriptor(key)
    name = key.rsplit("/", 1)[1]
    fields: dict = {}
    if key.endswith("Coordinator/DeregisterClient"):
        fields = {"client_id": "ghost"}  # no such client: nothing is removed
    elif key.endswith(("Coordinator/GetRun", "Coordinator/WatchRun", "Coordinator/CancelRun")):
        fields = {"run_id": NO_SUCH}
    elif key.endswith(("BlobStore/GetBlob", "BlobStore/StatBlob")):
        fields = {"sha256": secrets.token_hex(32)}
    elif key.endswith(("Operations/GetOperation", "Operations/CancelOperation")):
        fields = {"id": NO_SUCH}
    elif key.endswith("Operations/WaitOperation"):
        fields = {"id": NO_SUCH, "timeout_s": 0.1}
    elif key.endswith("ServerReflectionInfo"):
        fields = {"list_services": ""}
    msg = _message(md.input_type, **fields)
    if md.client_streaming:
        # PutBlob: an empty stream (nothing is stored); reflection: one list_services request
        return [] if name == "PutBlob" else [msg]
    return msg


def invoke(channel: grpc.Channel, key: str, request, timeout: float = CALL_TIMEOUT_S) -> tuple[str, str]:
    """Call `key` generically; returns (status code name or 'OK', details). Streaming responses: the first message
    (or the end of the stream) decides, then the call is cancelled."""
    md = _method_descriptor(key)
    path = "/" + key
    out_cls = message_factory.GetMessageClass(md.output_type)
    in_ser = message_factory.GetMessageClass(md.input_type).SerializeToString
    kind = ("stream" if md.client_streaming else "unary") + "_" + ("stream" if md.server_streaming else "unary")
    multi = getattr(channel, kind)(path, request_serializer=in_ser, response_deserializer=out_cls.FromString)
    try:
        if md.server_streaming:
            responses = multi(iter(request) if md.client_streaming else request, timeout=timeout)
            try:
                next(responses, None)
            finally:
                responses.cancel()
            code = responses.code()
            # a stream we cancelled after its first message answered: the server let us in
            if code in (None, grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                return "OK", ""
            return code.name, responses.details() or ""
        multi(iter(request) if md.client_streaming else request, timeout=timeout)
        return "OK", ""
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""


def _tls_channel(address: str, peer: Identity, ca: bytes, cert: bytes | None = None, key: bytes | None = None):
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS + [("grpc.ssl_target_name_override", peer.dns_name)])


def _cert_with_sans(ca_dir: Path, out_dir: Path, name: str, dns_names: list[str]) -> tuple[bytes, bytes]:
    """A certificate signed by the CA in `ca_dir` carrying exactly `dns_names` (no `cotune certs` rules applied):
    for callers whose certificate is valid but names no, or several, identities."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns_names]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out_dir.mkdir(parents=True, exist_ok=True)
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


# -- the matrix -----------------------------------------------------------------------------------------------------
def served_methods(channel: grpc.Channel) -> set[str]:
    """Every method of every service the host behind `channel` reports through reflection."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    try:
        names = [s.name for s in next(responses).list_services_response.service]
    finally:
        responses.cancel()
    pool = descriptor_pool.Default()
    return {f"{name}/{m.name}" for name in names for m in pool.FindServiceByName(name).methods}


def table_rows(served: dict[str, set[str]]) -> list[tuple[str, str, frozenset]]:
    """(service name, method key, allowed identity kinds) for every RPC of every service under test: the table's
    methods, and any other the host serves (no rule: the guard must refuse everyone)."""
    return [(name, key, POLICIES[role].get(key, frozenset())) for name, role in SERVICES.items()
            for key in sorted(set(POLICIES[role]) | served[name])]


@pytest.fixture(scope="module")
def bad_certs(cluster, tmp_path_factory):
    """PEM (cert, key) of callers that must be refused at the TLS layer: another CA's `coordinator`, and an expired and
    a not-yet-valid `coordinator` from the cluster's own CA (issued with a copy of it, so the cluster's certificates
    stay as they are)."""
    root = tmp_path_factory.mktemp("bad-certs")
    other = root / "other-ca"
    make_ca(other)
    rogue = issue(other, COORDINATOR)
    same = root / "same-ca"
    same.mkdir()
    for name in (CA_CERT, CA_KEY):
        shutil.copy2(cluster.certs_dir / name, same / name)
    now = datetime.now(timezone.utc)
    out = {"other-ca": (rogue.cert.read_bytes(), rogue.key.read_bytes())}
    for caller, start in (("expired", now - timedelta(days=10)), ("not-yet-valid", now + timedelta(days=10))):
        files = issue(same, COORDINATOR, not_before=start, not_after=start + timedelta(days=1))
        out[caller] = (files.cert.read_bytes(), files.key.read_bytes())
    return out


def test_every_rpc_of_every_service_by_every_caller(cluster, bad_certs):
    addresses = cluster.addresses()
    ca = (cluster.certs_dir / CA_CERT).read_bytes()
    channels = {}
    for name in SERVICES:
        for kind, identity in IDENTITIES.items():
            channels[name, kind] = make_channel(addresses[name], cluster.credentials(identity),
                                                peer=cluster.identity_of(name))
    table: list[dict] = []
    failures: list[str] = []
    started = time.monotonic()
    try:
        served = {name: served_methods(channels[name, "operator"]) for name in SERVICES}
        for name, key, allowed in table_rows(served):
            peer = cluster.identity_of(name)
            row = {"service": name, "method": key, "allowed": sorted(allowed), "codes": {}, "details": {}}
            for caller in BAD_CALLERS:
                cert, pkey = bad_certs.get(caller, (None, None))
                channel = _tls_channel(addresses[name], peer, ca, cert, pkey)  # fresh: each verdict is a handshake
                try:
                    code, details = invoke(channel, key, request_for(key), timeout=5.0)
                finally:
                    channel.close()
                row["codes"][caller], row["details"][caller] = code, details[:160]
                if code not in TLS_REFUSALS:
                    failures.append(f"{name} {key} as {caller}: {code} {details[:200]}")
            for kind, identity in IDENTITIES.items():
                code, details = invoke(channels[name, kind], key, request_for(key))
                row["codes"][kind], row["details"][kind] = code, details[:160]
                if kind in allowed:
                    refused = code in ("UNAUTHENTICATED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                                       "INTERNAL", "UNKNOWN") or (code == "PERMISSION_DENIED" and GUARD_DENIAL in details)
                    if refused:
                        failures.append(f"{name} {key} as allowed {identity}: {code} {details[:200]}")
                elif code != "PERMISSION_DENIED" or str(identity) not in details or key not in details \
                        or GUARD_DENIAL not in details:
                    failures.append(f"{name} {key} as {identity} (not allowed): {code} {details[:200]}")
            table.append(row)
    finally:
        for channel in channels.values():
            channel.close()
    elapsed = time.monotonic() - started
    _print_table(table, elapsed)
    out = os.environ.get("COTUNE_SECURITY_TABLE")
    if out:
        Path(out).write_text(json.dumps({"callers": list(BAD_CALLERS) + list(IDENTITIES),
                                         "identities": {k: str(v) for k, v in IDENTITIES.items()},
                                         "rows": table, "seconds": round(elapsed, 1)}, indent=2))
    assert len(table) >= sum(len(POLICIES[role]) for role in SERVICES.values())
    unruled = sorted({r["method"] for r in table if not r["allowed"]})
    if unruled:
        print(f"served without a rule (refused to everyone by the guard): {', '.join(unruled)}")
    assert not failures, "\n".join(failures)


SHORT = {"OK": "ok", "UNAVAILABLE": "UNAVAIL", "UNAUTHENTICATED": "UNAUTH", "PERMISSION_DENIED": "DENIED",
         "INVALID_ARGUMENT": "INVALID", "NOT_FOUND": "NOTFOUND", "FAILED_PRECONDITION": "PRECOND",
         "ALREADY_EXISTS": "EXISTS", "DEADLINE_EXCEEDED": "DEADLINE", "RESOURCE_EXHAUSTED": "EXHAUST",
         "UNIMPLEMENTED": "UNIMPL"}


def _print_table(table: list[dict], elapsed: float) -> None:
    callers = list(BAD_CALLERS) + list(IDENTITIES)
    width = max(len(r["service"]) + len(r["method"]) + 1 for r in table)
    widths = {c: max(11, len(c)) for c in callers}
    head = f"{'service method':{width}} | " + " | ".join(f"{c:{widths[c]}s}" for c in callers)
    print(f"\n== security matrix: {len(table)} methods x {len(callers)} callers in {elapsed:.1f}s "
          f"(client = {IDENTITIES['client']}, operator = {IDENTITIES['operator']}; * = allowed by the table; "
          "DENIED = the guard's PERMISSION_DENIED, DENIED(h) = the handler's)")
    print(head)
    print("-" * len(head))
    for r in table:
        cells = []
        for c in callers:
            code = SHORT.get(r["codes"][c], r["codes"][c])
            if code == "DENIED" and GUARD_DENIAL not in r["details"][c]:
                code = "DENIED(h)"  # by the handler (a client may act only for itself), not by the guard's table
            cells.append(f"{code + ('*' if c in r['allowed'] else ''):{widths[c]}s}")
        print(f"{r['service'] + ' ' + r['method']:{width}} | " + " | ".join(cells))
    # which code the TLS-layer refusals came back as (gRPC reports a failed handshake as UNAVAILABLE)
    for caller in BAD_CALLERS:
        codes = sorted({r["codes"][caller] for r in table})
        sample = next((r["details"][caller] for r in table if r["details"][caller]), "")
        print(f"{caller}: {', '.join(codes)} (e.g. {sample[:120]!r})")


# -- certificates the guard itself must refuse ----------------------------------------------------------------------
def test_a_valid_certificate_without_one_cotune_identity_is_unauthenticated(cluster, tmp_path):
    """Right CA, valid dates, but no id.cotune SAN, or two identities: TLS lets it through, the guard must not."""
    ca = (cluster.certs_dir / CA_CERT).read_bytes()
    address = cluster.addresses()["coordinator"]
    cases = {"none": ["localhost"], "several": [COORDINATOR.dns_name, OPERATOR.dns_name]}
    for case, sans in cases.items():
        cert, key = _cert_with_sans(cluster.certs_dir, tmp_path, f"intruder-{case}", sans)
        channel = _tls_channel(address, COORDINATOR, ca, cert, key)
        try:
            for method in ("cotune.v1.Coordinator/ListRuns", "grpc.health.v1.Health/Check"):
                code, details = invoke(channel, method, request_for(method))
                assert code == "UNAUTHENTICATED", (case, method, code, details)
                assert method in details and ("no Cotune identity" in details if case == "none" else "several" in details)
        finally:
            channel.close()


def test_the_caller_pins_the_server_identity(cluster):
    """A caller that means the coordinator but dials the LLM's address is refused by its own TLS check."""
    channel = make_channel(cluster.addresses()["llm"], cluster.credentials(), peer=COORDINATOR)
    try:
        code, _ = invoke(channel, "grpc.health.v1.Health/Check", request_for("grpc.health.v1.Health/Check"))
    finally:
        channel.close()
    assert code == "UNAVAILABLE"


# -- client registration --------------------------------------------------------------------------------------------
def _registered(cluster) -> dict[str, str]:
    client = cluster.coordinator_client()
    try:
        return {r.client.client_id: r.client.address for r in client.list_clients()}
    finally:
        client.close()


def _register(cluster, identity: Identity, client_id: str, address: str) -> tuple[str, str]:
    client = cluster.coordinator_client(identity)
    try:
        client.register_client(client_id, address)
        return "OK", ""
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    finally:
        client.close()


def test_a_client_registers_only_itself(cluster, coordinator):
    addresses = cluster.addresses()
    before = _registered(cluster)
    assert before == {"client-1": addresses["client-1"], "client-2": addresses["client-2"]}
    me = client_identity("client-1")
    # re-pointing another client
    code, details = _register(cluster, me, "client-2", addresses["client-1"])
    assert code == "PERMISSION_DENIED" and "client/client-1" in details and "only itself" in details, (code, details)
    # nor may it remove one
    client = cluster.coordinator_client(me)
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.deregister_client("client-2")
    finally:
        client.close()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "only itself" in err.value.details()
    # registering itself at an address another client holds
    code, details = _register(cluster, me, "client-1", addresses["client-2"])
    assert code in ("ALREADY_EXISTS", "PERMISSION_DENIED", "FAILED_PRECONDITION"), (code, details)
    print(f"\nclient-1 registering itself at client-2's address: {code}: {details[:160]}")
    # registering itself at the LLM's address (not held by a client): the service there is not client/client-1
    code, details = _register(cluster, me, "client-1", addresses["llm"])
    assert code == "FAILED_PRECONDITION" and "client/client-1" in details, (code, details)
    # an address outside client_addresses
    code, details = _register(cluster, me, "client-1", "10.0.0.1:50051")
    assert code == "PERMISSION_DENIED" and "client_addresses" in details, (code, details)
    # and re-registering itself where it is works
    assert _register(cluster, me, "client-1", addresses["client-1"])[0] == "OK"
    assert _registered(cluster) == before


def test_the_operator_reaches_everything_it_should(cluster, coordinator):
    op = cluster.coordinator_client()
    try:
        assert {r.client.client_id for r in op.list_clients()} == {"client-1", "client-2"}
        op.list_runs()
        with pytest.raises(grpc.RpcError) as err:
            op.get_run("no-such-run")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:  # authorized: the spec itself is what is refused
            op.start_run(coordinator_pb2.RunSpec(algorithm="fedavg", rounds=-1))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            op.cancel_run("no-such-run")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        op.close()
    for name in ("llm", "client-1"):  # and may Describe a party
        party = cluster.party_client(name, identity=OPERATOR)
        try:
            assert party.describe().party_id in (name, "llm")
        finally:
            party.close()


def _cli(cluster, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COTUNE_COORDINATOR", "COTUNE_TLS_", "COTUNE_TOKEN"))}
    return subprocess.run([sys.executable, "-m", "cotune.cli", "clients", "--cluster-dir", str(cluster.workdir), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)


def test_remove_pin_and_restore_a_client_through_the_cli(cluster, coordinator):
    """Runs last in this module and leaves the registry as it found it."""
    addresses = cluster.addresses()
    security = json.loads((cluster.workdir / "cluster.json").read_text())["_security"]
    assert security["mode"] == "mtls" and security["cert"] == str(cert_files(cluster.certs_dir, OPERATOR).cert)
    # while client-2 holds its address, nobody can move client-1 there
    code, details = _register(cluster, OPERATOR, "client-1", addresses["client-2"])
    assert code == "ALREADY_EXISTS" and "client-2" in details, (code, details)
    removed = _cli(cluster, "remove", "client-2")
    assert removed.returncode == 0, removed.stderr
    assert "removed client-2" in removed.stdout
    try:
        assert set(_registered(cluster)) == {"client-1"}
        # the address is free now, but the service there holds client-2's certificate: the coordinator's TLS check
        # (it dials expecting client/client-1) refuses it, and nothing changes
        code, details = _register(cluster, OPERATOR, "client-1", addresses["client-2"])
        assert code == "FAILED_PRECONDITION" and "client/client-1" in details, (code, details)
        print(f"\noperator re-pointing client-1 at client-2's address: {code}: {details[:200]}")
        # likewise at the LLM's address
        code, details = _register(cluster, OPERATOR, "client-1", addresses["llm"])
        assert code == "FAILED_PRECONDITION", (code, details)
        assert _registered(cluster) == {"client-1": addresses["client-1"]}
    finally:
        restored = _cli(cluster, "register", "client-2", addresses["client-2"])
    assert restored.returncode == 0, restored.stderr
    assert "client-2" in restored.stdout
    assert _registered(cluster) == {"client-1": addresses["client-1"], "client-2": addresses["client-2"]}


# -- tokens and start-up refusals on standalone alignment services --------------------------------------------------
def _serve_alignment(root: Path, config: dict) -> tuple[subprocess.Popen, Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "alignment.yaml"
    cfg.write_text(yaml.safe_dump(dict(config, workdir=str(root / "work"))))
    port_file, log_path = root / "port", root / "log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cotune.cli", "serve", "alignment", "--config", str(cfg),
                                 "--port-file", str(port_file)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return proc, port_file, log_path


def _await_port(proc, port_file: Path, log_path: Path) -> str:
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert proc.poll() is None, log_path.read_text()[-2000:]
        assert time.monotonic() < deadline, "no port file"
        time.sleep(0.1)
    return f"127.0.0.1:{port_file.read_text().strip()}"


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


TOKEN_A, TOKEN_B = secrets.token_hex(16), secrets.token_hex(16)  # bound to coordinator, client/client-1
TOKENS = {TOKEN_A: "coordinator", TOKEN_B: "client/client-1"}
BUILD = "cotune.v1.Alignment/BuildVocabMap"
REGISTER = "cotune.v1.Alignment/RegisterTokenizer"


def _alignment_call(address: str, creds: Credentials, method: str = BUILD) -> tuple[str, str]:
    channel = make_channel(address, creds, peer=ALIGNMENT)
    try:
        return invoke(channel, method, request_for(method))
    finally:
        channel.close()


def test_tokens_are_bound_to_the_certificate_identity(tmp_path):
    certs = tmp_path / "certs"
    files = ensure(certs, [COORDINATOR, ALIGNMENT, client_identity("client-1")])
    own = files["alignment"]
    proc, port_file, log_path = _serve_alignment(tmp_path / "svc", {
        "listen": "127.0.0.1:0", "tls": {"ca": str(own.ca), "cert": str(own.cert), "key": str(own.key)},
        "auth": {"tokens": TOKENS}})
    try:
        address = _await_port(proc, port_file, log_path)

        def creds(identity: str, token: str | None) -> Credentials:
            f = files[identity]
            return Credentials(TlsFiles(str(f.ca), str(f.cert), str(f.key)), {"alignment": token} if token else {})

        wait_healthy(address, timeout_s=60, process=proc, log_path=log_path, creds=creds("coordinator", TOKEN_A),
                     peer=ALIGNMENT)
        verdicts = {}
        for label, who, token in (("coordinator cert + its token", "coordinator", TOKEN_A),
                                  ("coordinator cert, no token", "coordinator", None),
                                  ("coordinator cert + client-1's token", "coordinator", TOKEN_B),
                                  ("coordinator cert + unknown token", "coordinator", secrets.token_hex(16)),
                                  ("client-1 cert + its token", "client/client-1", TOKEN_B)):
            verdicts[label] = _alignment_call(address, creds(who, token), REGISTER)
        print("\nmTLS + tokens:", {k: v[0] for k, v in verdicts.items()})
        assert verdicts["coordinator cert + its token"][0] == "INVALID_ARGUMENT", verdicts  # authorized; empty request
        assert verdicts["coordinator cert, no token"][0] == "INVALID_ARGUMENT", verdicts  # tokens are optional beside mTLS
        code, details = verdicts["coordinator cert + client-1's token"]
        assert code == "UNAUTHENTICATED" and "client/client-1" in details and "coordinator" in details, details
        code, details = verdicts["coordinator cert + unknown token"]
        assert code == "UNAUTHENTICATED" and "unknown bearer token" in details, details
        code, details = verdicts["client-1 cert + its token"]
        assert code == "PERMISSION_DENIED" and "client/client-1" in details and REGISTER in details, details
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def insecure_with_tokens(tmp_path_factory):
    """A standalone alignment service in plaintext on loopback (`insecure: true`) whose callers identify themselves
    with the tokens in TOKENS; yields its address."""
    proc, port_file, log_path = _serve_alignment(tmp_path_factory.mktemp("insecure-tokens"), {
        "listen": "127.0.0.1:0", "insecure": True, "auth": {"tokens": TOKENS}})
    try:
        address = _await_port(proc, port_file, log_path)
        wait_healthy(address, timeout_s=60, process=proc, log_path=log_path,
                     creds=Credentials(peer_tokens={"alignment": TOKEN_A}), peer=ALIGNMENT)
        yield address
    finally:
        _stop(proc)


def test_tokens_identify_callers_on_an_insecure_loopback_host(insecure_with_tokens):
    address = insecure_with_tokens
    as_coordinator = _alignment_call(address, Credentials(peer_tokens={"alignment": TOKEN_A}))
    as_client = _alignment_call(address, Credentials(peer_tokens={"alignment": TOKEN_B}))
    anonymous = _alignment_call(address, Credentials())
    unknown = _alignment_call(address, Credentials(peer_tokens={"alignment": secrets.token_hex(16)}))
    health_anonymous = _alignment_call(address, Credentials(), "grpc.health.v1.Health/Check")
    print("\ninsecure + tokens:", {"coordinator token": as_coordinator[0], "client token": as_client[0],
                                   "no token": anonymous[0], "unknown token": unknown[0],
                                   "health, no token": health_anonymous[0]})
    assert as_coordinator[0] == "INVALID_ARGUMENT", as_coordinator  # authorized; the empty request is refused
    assert as_client[0] == "PERMISSION_DENIED" and "client/client-1" in as_client[1] and BUILD in as_client[1]
    assert anonymous[0] == "UNAUTHENTICATED" and "bearer token is required" in anonymous[1], anonymous
    assert unknown[0] == "UNAUTHENTICATED" and "unknown bearer token" in unknown[1], unknown
    assert health_anonymous[0] == "UNAUTHENTICATED", health_anonymous


@pytest.mark.parametrize("method", [
    "grpc.health.v1.Health/Check", "grpc.health.v1.Health/Watch", "cotune.v1.BlobStore/PutBlob",
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
], ids=["unary-unary", "unary-stream", "stream-unary", "stream-stream"])
def test_a_token_channel_carries_its_token_on_every_call_shape(insecure_with_tokens, method):
    code, details = _alignment_call(insecure_with_tokens, Credentials(peer_tokens={"alignment": TOKEN_A}), method)
    assert code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"), (code, details)


@pytest.mark.parametrize("config, message", [
    ({"listen": "127.0.0.1:0"}, "no TLS configured"),
    ({"listen": "0.0.0.0:0", "insecure": True}, "refusing to listen in plaintext"),
], ids=["neither-tls-nor-insecure", "insecure-on-all-interfaces"])
def test_a_service_refuses_to_start_unsafely(tmp_path, config, message):
    proc, port_file, log_path = _serve_alignment(tmp_path / "svc", config)
    try:
        proc.wait(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode != 0
    assert not port_file.exists()
    assert message in log_path.read_text(), log_path.read_text()[-2000:]


def test_is_loopback_takes_literal_addresses_only():
    assert not is_loopback("127.evil.example.com:50051")
    assert not is_loopback("localhost:50051")
    assert not is_loopback("0.0.0.0:50051")
    assert is_loopback("127.0.0.1:50051") and is_loopback("[::1]:50051") and is_loopback("127.5.6.7:1")


def test_identity_kinds_cover_the_table():
    assert set(IDENTITIES) == set(KINDS)
