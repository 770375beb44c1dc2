"""gRPC channel and server options: gRPC silently ignores a key it does not know, so a misspelt option is a setting
that never applies. One did: the servers' minimum interval between keepalive pings without data was set under a
name gRPC core does not have, so the servers kept gRPC's 5-minute default and answered the channels' 30 s pings
with GOAWAY "too_many_pings", failing long idle streams (a WatchRun during a long step) with UNAVAILABLE.

Every key we set must be one gRPC core knows: its names are strings in the core library this process loaded."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cotune.rpc.channel import CHANNEL_OPTIONS, SERVER_OPTIONS
from cotune.rpc.server import HEALTH_SERVER_OPTIONS


@pytest.fixture(scope="module")
def core_strings() -> bytes:
    libs = sorted((Path(grpc.__file__).parent / "_cython").glob("cygrpc*.so"))
    assert libs, "gRPC's core library (grpc/_cython/cygrpc*.so) not found"
    return libs[0].read_bytes()


@pytest.mark.parametrize("key", sorted({k for k, _ in [*CHANNEL_OPTIONS, *SERVER_OPTIONS, *HEALTH_SERVER_OPTIONS]}))
def test_every_option_key_is_one_grpc_knows(key, core_strings):
    assert key.encode() + b"\0" in core_strings, f"gRPC core has no option {key!r}: it would be ignored"


def test_servers_accept_the_channels_keepalive_pings():
    client = dict(CHANNEL_OPTIONS)
    server = dict(SERVER_OPTIONS)
    assert server["grpc.http2.min_ping_interval_without_data_ms"] < client["grpc.keepalive_time_ms"]
    assert server["grpc.keepalive_permit_without_calls"] == client["grpc.keepalive_permit_without_calls"] == 1
