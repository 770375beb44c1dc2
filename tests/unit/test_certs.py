"""Development certificates (cotune.security.certs, `cotune certs`) and the mTLS identity checks they enable."""

from __future__ import annotations

import argparse
import json
import stat
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cotune.security import certs, certs_cli
from cotune.security.identity import Identity

LLM, CLIENT1, ADMIN = Identity.parse("llm"), Identity.parse("client/client-1"), Identity.parse("operator/admin")


def _cert(files: certs.CertFiles) -> x509.Certificate:
    return x509.load_pem_x509_certificate(files.cert.read_bytes())


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_issue_carries_identity(tmp_path):
    ca_cert, ca_key = certs.make_ca(tmp_path)
    assert _mode(ca_key) == 0o600
    files = certs.issue(tmp_path, CLIENT1)
    assert (files.cert.name, files.key.name, files.ca) == ("client-client-1.crt", "client-client-1.key", ca_cert)
    assert _mode(files.key) == 0o600
    cert = _cert(files)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "client/client-1"
    assert certs.san_strings(cert) == ["client-1.client.id.cotune", "localhost", "127.0.0.1"]
    assert certs.identity_of_cert(files.cert.read_bytes()) == CLIENT1
    assert certs.problems(files, CLIENT1) == []
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(certs.CertError, match="already exists"):
        certs.make_ca(tmp_path)
    with pytest.raises(certs.CertError, match="reserved identity domain"):
        certs.issue(tmp_path, LLM, hosts=["llm.id.cotune"])


def test_issue_without_ca(tmp_path):
    with pytest.raises(certs.CertError, match="no CA"):
        certs.issue(tmp_path, LLM)


def test_ensure_is_idempotent_and_renews(tmp_path):
    first = certs.ensure(tmp_path, ["llm", CLIENT1])
    assert set(first) == {"llm", "client/client-1"}
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert certs.ensure(tmp_path, [LLM, CLIENT1]) == first
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    # expiring within 7 days: reissued; the other one and the CA stay
    now = datetime.now(timezone.utc)
    certs.issue(tmp_path, LLM, not_before=now - timedelta(days=1), not_after=now + timedelta(days=2))
    certs.ensure(tmp_path, [LLM, CLIENT1])
    assert _cert(first["llm"]).not_valid_after_utc > now + timedelta(days=100)
    assert first["client/client-1"].cert.read_bytes() == before["client-client-1.crt"]
    assert (tmp_path / "ca.crt").read_bytes() == before["ca.crt"]

    # a new host is missing from the SANs: reissued with it
    certs.ensure(tmp_path, [LLM], hosts=("localhost", "127.0.0.1", "10.1.2.3"))
    assert "10.1.2.3" in certs.san_strings(_cert(first["llm"]))


def test_ensure_reissues_cert_of_another_ca(tmp_path):
    other = tmp_path / "other"
    certs.make_ca(other)
    foreign = certs.issue(other, LLM)
    mine = tmp_path / "mine"
    certs.make_ca(mine)
    (mine / "llm.crt").write_bytes(foreign.cert.read_bytes())
    (mine / "llm.key").write_bytes(foreign.key.read_bytes())
    assert certs.problems(certs.cert_files(mine, LLM), LLM) == ["not signed by the current CA"]
    files = certs.ensure(mine, [LLM])["llm"]
    assert files.cert.read_bytes() != foreign.cert.read_bytes()
    _cert(files).verify_directly_issued_by(x509.load_pem_x509_certificate((mine / "ca.crt").read_bytes()))


def test_ensure_concurrent(tmp_path):
    # flock locks belong to open file descriptions, so threads contend just as processes would
    ids = ["coordinator", "llm", "alignment", "client/c1", "client/c2"]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: certs.ensure(tmp_path / "certs", ids), range(6)))
    assert all(r == results[0] for r in results)
    for files in results[0].values():
        assert certs.problems(files, Identity.parse(files.cert.stem.replace("-", "/", 1))) == []


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="cotune")
    certs_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["certs", *argv])
    return args.fn(args)


def test_cli(tmp_path, capsys):
    d = str(tmp_path / "certs")
    assert _cli("--dir", d, "coordinator", "llm", "client/client-1", "--host", "llm=llm.org-a.example",
                "--host", "10.0.0.5") == 0
    out = capsys.readouterr().out
    assert "created CA" in out and out.count("issued") == 3
    llm = certs.cert_files(d, LLM)
    assert certs.san_strings(_cert(llm)) == ["llm.id.cotune", "localhost", "127.0.0.1", "10.0.0.5", "llm.org-a.example"]
    assert "llm.org-a.example" not in certs.san_strings(_cert(certs.cert_files(d, Identity("coordinator"))))

    old = llm.cert.read_bytes()
    assert _cli("--dir", d, "llm") == 0
    assert "kept" in capsys.readouterr().out and llm.cert.read_bytes() == old
    assert _cli("--dir", d, "llm", "--force") == 0
    assert "issued" in capsys.readouterr().out and llm.cert.read_bytes() != old

    assert _cli("--dir", d, "--show") == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == ["client/client-1", "coordinator", "llm"]

    assert _cli("--dir", d, "client/Bad_Name") == 2
    assert "client names must be" in capsys.readouterr().err
    assert _cli("--dir", d, "llm", "--host", "alignment=x.example") == 2
    assert _cli("--dir", d) == 2


# -- mTLS over loopback ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    files = certs.ensure(root / "ca", [LLM, CLIENT1, ADMIN])
    now = datetime.now(timezone.utc)
    expired = certs.issue(root / "ca", Identity("client", "old"), not_before=now - timedelta(days=30),
                          not_after=now - timedelta(days=1))
    foreign = certs.ensure(root / "other", [CLIENT1])["client/client-1"]
    return {"ca": (root / "ca" / "ca.crt").read_bytes(), "expired": expired, "foreign": foreign, **files}


def _whoami(request, context):
    auth = context.auth_context()
    return json.dumps({k: [v.decode() for v in vs] for k, vs in auth.items() if k != "x509_pem_cert"}).encode()


@pytest.fixture(scope="module")
def llm_server(pki):
    server = grpc.server(ThreadPoolExecutor(4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Whoami", {"Who": grpc.unary_unary_rpc_method_handler(_whoami)})])
    llm = pki["llm"]
    creds = grpc.ssl_server_credentials([(llm.key.read_bytes(), llm.cert.read_bytes())],
                                        root_certificates=pki["ca"], require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    yield port
    server.stop(None)


def _call(pki, port, client: certs.CertFiles, override: str | None, method: str = "health"):
    creds = grpc.ssl_channel_credentials(pki["ca"], client.key.read_bytes(), client.cert.read_bytes())
    options = [("grpc.ssl_target_name_override", override)] if override else []
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        if method == "health":
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        return json.loads(channel.unary_unary("/test.Whoami/Who")(b"", timeout=5))


SERVING = health_pb2.HealthCheckResponse.SERVING


def test_mtls_right_server_identity(pki, llm_server):  # (a)
    assert _call(pki, llm_server, pki["client/client-1"], LLM.dns_name) == SERVING


def test_mtls_wrong_server_identity_fails(pki, llm_server):  # (b)
    with pytest.raises(grpc.RpcError) as err:
        _call(pki, llm_server, pki["client/client-1"], CLIENT1.dns_name)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("which", ["foreign", "expired"])
def test_mtls_refuses_bad_client_cert(pki, llm_server, which):  # (c), (d)
    with pytest.raises(grpc.RpcError) as err:
        _call(pki, llm_server, pki[which], LLM.dns_name)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_server_reads_caller_identity(pki, llm_server):  # (e)
    auth = _call(pki, llm_server, pki["operator/admin"], LLM.dns_name, method="who")
    sans = auth["x509_subject_alternative_name"]
    assert "admin.operator.id.cotune" in sans
    assert {i for i in map(Identity.from_dns_name, sans) if i} == {ADMIN}


def test_mtls_ip_without_override(pki, llm_server):  # (f)
    assert _call(pki, llm_server, pki["client/client-1"], None) == SERVING
