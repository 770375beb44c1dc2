"""An SLM client's gRPC service (cotune.v1.SLMClient)."""

from __future__ import annotations

from cotune.config import PartyConfig
from cotune.party.service import serve_party
from cotune.v1 import party_pb2_grpc
from slm_client.client import SLMClient


def serve(cfg: PartyConfig, port_file: str | None = None) -> None:
    serve_party(SLMClient(cfg), party_pb2_grpc.add_SLMClientServicer_to_server, "SLMClient", port_file)
