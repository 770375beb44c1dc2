"""The party's gRPC service: Describe and StartTask over any ModelParty (the LLMServer and SLMClient services expose
the same two RPCs; which tasks are served is the party's own table)."""

from __future__ import annotations

from collections.abc import Callable

from cotune.errors import rpc_method
from cotune.party.base import ModelParty
from cotune.rpc.server import ServiceHost, tls_files
from cotune.v1 import party_pb2


class PartyServicer:
    """Implements LLMServer and SLMClient (identical RPCs) for one party."""

    def __init__(self, party: ModelParty):
        self.party = party

    @rpc_method
    def Describe(self, request, context):
        return self.party.describe()

    @rpc_method
    def StartTask(self, request, context):
        return self.party.start_task(request)


def serve_party(party: ModelParty, add_servicer: Callable, service_name: str, port_file: str | None = None) -> None:
    """Run `party` as the gRPC service `service_name` (registered with `add_servicer`, e.g.
    party_pb2_grpc.add_LLMServerServicer_to_server) until SIGTERM: listen at once (NOT_SERVING), load the model,
    then SERVING."""
    cfg = party.cfg
    host = ServiceHost(f"cotune.{party.role}", cfg.listen, tls=tls_files(cfg.tls), tokens=cfg.auth.tokens or None)
    host.add(add_servicer, PartyServicer(party), party_pb2, service_name)
    host.add_blobs_and_operations(party.store, party.ops)
    host.start(port_file)
    party.load()
    host.set_serving(True)
    host.wait_for_termination_signal()
    party.ops.shutdown()
