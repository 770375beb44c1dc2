"""The party's gRPC service: LLMServer and SLMClient expose the same two RPCs over one Party."""

from __future__ import annotations

from cotune.config import PartyConfig
from cotune.party.core import Party
from cotune.errors import rpc_method
from cotune.rpc.server import ServiceHost, tls_files
from cotune.v1 import party_pb2, party_pb2_grpc

class PartyServicer:
    """Implements both LLMServer and SLMClient (identical RPCs)."""

    def __init__(self, party: Party):
        self.party = party

    @rpc_method
    def Describe(self, request, context):
        return self.party.describe()

    @rpc_method
    def StartTask(self, request, context):
        return self.party.start_task(request)


def serve_party(cfg: PartyConfig, role: str, port_file: str | None = None) -> None:
    """Run a party service until SIGTERM: listen at once (NOT_SERVING), load the model, then SERVING."""
    party = Party(cfg, role)
    host = ServiceHost(f"cotune.{role}", cfg.listen, tls=tls_files(cfg.tls), tokens=cfg.auth.tokens or None)
    add = party_pb2_grpc.add_LLMServerServicer_to_server if role == "llm" else party_pb2_grpc.add_SLMClientServicer_to_server
    host.add(add, PartyServicer(party), party_pb2, "LLMServer" if role == "llm" else "SLMClient")
    host.add_blobs_and_operations(party.store, party.ops)
    host.start(port_file)
    party.load()
    host.set_serving(True)
    host.wait_for_termination_signal()
    party.ops.shutdown()
