"""What tests/integration/test_multi_host.py does on one of its "hosts": a short-lived process started on that host
(in its network namespace, or with its loopback address as the source), acting with that host's certificate.

    python -m tests.integration.multi_host_probe '<JSON request>'

The request names an action and its arguments; the answer is one JSON line on stdout (the last line):

    wait      {targets: [{address, peer}], tls, timeout_s}   -> {"serving": [address...]} once every target is SERVING
    calls     {calls: [{address, peer, method}], tls}        -> {"results": [[code, details], ...]} (generic requests)
    tls_name  {address, server_name, tls}                    -> {"code", "details"}: a health check whose TLS
                                                                verification checks `server_name` (null: the host in
                                                                `address`, as any TLS client dialling it would)
    register  {coordinator, client_id, address, tls}         -> {"code", "details"}
    run       {coordinator, spec, tls}                       -> {"code", "run": {state, error, rounds}}

`tls` is {ca, cert, key} (paths); `peer` an identity ("llm", "client/client-1", ...) that the server's certificate
must carry, as every cotune caller pins it.
"""

from __future__ import annotations

import json
import sys
import time

import grpc


def _creds(tls: dict):
    from cotune.rpc.channel import Credentials, TlsFiles

    return Credentials(TlsFiles(tls["ca"], tls["cert"], tls["key"]))


def _peer(text: str):
    from cotune.security.identity import Identity

    return Identity.parse(text)


def wait(targets: list[dict], tls: dict, timeout_s: float) -> dict:
    from cotune.cluster import wait_healthy

    deadline = time.monotonic() + timeout_s
    for t in targets:
        wait_healthy(t["address"], timeout_s=max(1.0, deadline - time.monotonic()), service=t["peer"],
                     creds=_creds(tls), peer=_peer(t["peer"]))
    return {"serving": [t["address"] for t in targets]}


def calls(calls: list[dict], tls: dict) -> dict:
    from cotune.rpc.channel import make_channel
    from tests.integration.test_security import invoke, request_for

    results = []
    for item in calls:
        channel = make_channel(item["address"], _creds(tls), peer=_peer(item["peer"]))
        try:
            results.append(list(invoke(channel, item["method"], request_for(item["method"]))))
        finally:
            channel.close()
    return {"results": results}


def tls_name(address: str, server_name: str | None, tls: dict) -> dict:
    """A health check over mTLS where TLS verifies the server's certificate against `server_name` (or, when None, the
    host part of `address`, as gRPC does by default): whether the certificate carries that host name or address."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cotune.rpc.channel import CHANNEL_OPTIONS

    ca, cert, key = (open(tls[k], "rb").read() for k in ("ca", "cert", "key"))
    options = CHANNEL_OPTIONS + ([("grpc.ssl_target_name_override", server_name)] if server_name else [])
    channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert), options=options)
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return {"code": "OK", "details": ""}
    except grpc.RpcError as exc:
        return {"code": exc.code().name, "details": exc.details() or ""}
    finally:
        channel.close()


def register(coordinator: str, client_id: str, address: str, tls: dict) -> dict:
    from cotune.rpc.clients import CoordinatorClient

    client = CoordinatorClient(coordinator, creds=_creds(tls))
    try:
        rec = client.register_client(client_id, address)
        return {"code": "OK", "details": f"{rec.client.client_id} at {rec.client.address}"}
    except grpc.RpcError as exc:
        return {"code": exc.code().name, "details": exc.details() or ""}
    finally:
        client.close()


def run(coordinator: str, spec: dict, tls: dict) -> dict:
    from google.protobuf import json_format

    from cotune.rpc.clients import CoordinatorClient
    from cotune.v1 import coordinator_pb2 as pb
    from cotune.watch import watch_run

    client = CoordinatorClient(coordinator, creds=_creds(tls))
    try:
        started = client.start_run(json_format.ParseDict(spec, pb.RunSpec()))
        done = watch_run(client, started.run_id, quiet=True)
    except grpc.RpcError as exc:
        return {"code": exc.code().name, "details": exc.details() or ""}
    finally:
        client.close()
    rounds = {str(r.round): {"parties": {p.party_id: dict(p.metrics) for p in r.parties},
                             "bytes_sent": dict(r.bytes_sent), "bytes_received": dict(r.bytes_received)}
              for r in done.rounds}
    return {"code": "OK", "run": {"run_id": done.run_id, "state": pb.RunState.Name(done.state), "error": done.error,
                                  "rounds": rounds}}


def main(argv: list[str]) -> int:
    request = json.loads(argv[0])
    action = request.pop("action")
    out = {"wait": wait, "calls": calls, "tls_name": tls_name, "register": register, "run": run}[action](**request)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
