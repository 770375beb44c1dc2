"""The LLM server's gRPC service (cotune.v1.LLMServer)."""

from __future__ import annotations

from cotune.config import PartyConfig
from cotune.party.service import serve_party
from cotune.v1 import party_pb2_grpc
from llm_server.server import LLMServer


def serve(cfg: PartyConfig, port_file: str | None = None) -> None:
    serve_party(LLMServer(cfg), party_pb2_grpc.add_LLMServerServicer_to_server, "LLMServer", port_file)
