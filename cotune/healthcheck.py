"""`python -m cotune.healthcheck ADDRESS`: exit 0 when the grpc.health.v1 service at ADDRESS answers SERVING.

For container healthchecks (deploy/compose): ADDRESS is a service's plaintext health port (`health_address` in its
config), which needs no client certificate. Exit codes: 0 SERVING; 1 anything else (NOT_SERVING while the model loads,
UNKNOWN, unreachable, timed out); 2 bad usage. One line on stdout says what was seen. Imports only grpc, so it starts
in a fraction of a second however often the healthcheck runs.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, *, service: str = "", timeout_s: float = 3.0) -> tuple[bool, str]:
    """(serving, what was seen) for one Check call to `address` in plaintext."""
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                            timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            return False, f"{getattr(code, 'name', 'ERROR')}: {exc.details() if hasattr(exc, 'details') else exc}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cotune.healthcheck",
                                     description="Exit 0 when the grpc.health.v1 service at ADDRESS (a plaintext "
                                                 "health port) reports SERVING, 1 otherwise.")
    parser.add_argument("address", metavar="ADDRESS", help="HOST:PORT of the health port, e.g. 127.0.0.1:8081")
    parser.add_argument("--service", default="", help="the health service name to check (default: the server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    args = parser.parse_args(argv)
    if ":" not in args.address or args.timeout <= 0:
        parser.error("ADDRESS must be HOST:PORT and --timeout positive")
    serving, seen = check(args.address, service=args.service, timeout_s=args.timeout)
    print(f"{args.address}: {seen}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
