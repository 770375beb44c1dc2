"""Which failures a service client retries by itself (cotune.rpc.clients): an operator's or a service's client rides
out a service that is briefly unreachable; a run driver's client (retry_unavailable=False) reports it at once, because
the driver waits for restarts itself with fresh channels and the client registry. Both still retry a service that is
only busy (RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import grpc
import pytest

from cotune.rpc.clients import PartyClient
from cotune.v1 import party_pb2


class _Refused(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return self._code.name


class _Flaky:
    """A stub method failing with `code` `failures` times, then answering."""

    def __init__(self, code, failures):
        self.code, self.failures, self.calls = code, failures, 0

    def __call__(self, request, timeout=None):
        self.calls += 1
        if self.calls <= self.failures:
            raise _Refused(self.code)
        return party_pb2.PartyInfo(party_id="p")


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr("cotune.rpc.channel.time.sleep", lambda s: None)


def _client(retry_unavailable, method):
    client = PartyClient("127.0.0.1:1", role="llm", retry_unavailable=retry_unavailable)
    client.stub = type("Stub", (), {"Describe": method})()
    return client


def test_an_ordinary_client_retries_an_unreachable_service():
    method = _Flaky(grpc.StatusCode.UNAVAILABLE, 2)
    client = _client(True, method)
    try:
        assert client.describe().party_id == "p" and method.calls == 3
    finally:
        client.close()


def test_a_run_drivers_client_reports_an_unreachable_service_at_once():
    method = _Flaky(grpc.StatusCode.UNAVAILABLE, 2)
    client = _client(False, method)
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.describe()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and method.calls == 1
    finally:
        client.close()


def test_a_run_drivers_client_still_retries_a_busy_service():
    method = _Flaky(grpc.StatusCode.RESOURCE_EXHAUSTED, 2)
    client = _client(False, method)
    try:
        assert client.describe().party_id == "p" and method.calls == 3
    finally:
        client.close()
