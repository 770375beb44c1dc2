"""An SLM client's gRPC service (cotune.v1.SLMClient); one process may host several logical clients."""

from __future__ import annotations

from collections.abc import Sequence

from cotune.config import ConfigError, PartyConfig
from cotune.party.service import serve_parties
from cotune.v1 import party_pb2_grpc
from slm_client.client import SLMClient


def port_files_for(port_file: str | None, count: int) -> list[str | None]:
    """Where each of `count` co-hosted clients writes its port: one client writes `port_file` itself; with several,
    client i (0-based, in config order) writes `<port_file>.<i>`."""
    if count == 1:
        return [port_file]
    return [f"{port_file}.{i}" if port_file else None for i in range(count)]


def serve(cfg: PartyConfig | Sequence[PartyConfig], port_file: str | None = None) -> None:
    """Serve one SLM client, or several in this process (a list of configs: each its own SLMClient, party_id, workdir,
    model, data and port; see serve_parties), until SIGTERM."""
    cfgs = [cfg] if isinstance(cfg, PartyConfig) else list(cfg)
    if not cfgs:
        raise ConfigError("no SLM client config")
    ids = [c.party_id for c in cfgs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"the configs hosted by one process need distinct party_id values: {ids}")
    workdirs = [c.workdir for c in cfgs]
    if len(set(workdirs)) != len(workdirs):
        raise ConfigError(f"the configs hosted by one process need distinct workdirs: {workdirs}")
    clients = [SLMClient(c) for c in cfgs]  # validates every config and reads every data set before listening
    serve_parties(clients, party_pb2_grpc.add_SLMClientServicer_to_server, "SLMClient",
                  port_files_for(port_file, len(clients)))
