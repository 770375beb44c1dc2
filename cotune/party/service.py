"""The party's gRPC service: Describe and StartTask over any ModelParty (the LLMServer and SLMClient services expose
the same two RPCs; which tasks are served is the party's own table)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence

from cotune.errors import rpc_method
from cotune.party.base import ModelParty
from cotune.rpc.server import ServiceHost, service_host
from cotune.v1 import party_pb2

log = logging.getLogger(__name__)


class PartyServicer:
    """Implements LLMServer and SLMClient (identical RPCs) for one party."""

    def __init__(self, party: ModelParty):
        self.party = party

    @rpc_method
    def Describe(self, request, context):
        return self.party.describe(request.run_id)

    @rpc_method
    def StartTask(self, request, context):
        return self.party.start_task(request)


def party_host(party: ModelParty, add_servicer: Callable, service_name: str) -> ServiceHost:
    """The (not yet started) ServiceHost of one party: its own listen address, TLS, tokens and authorization table,
    its service, blob store and operations."""
    host = service_host(f"cotune.{party.role}", party.cfg, party.role)
    host.add(add_servicer, PartyServicer(party), party_pb2, service_name)
    host.add_blobs_and_operations(party.store, party.ops)
    return host


def serve_party(party: ModelParty, add_servicer: Callable, service_name: str, port_file: str | None = None) -> None:
    """Run `party` as the gRPC service `service_name` (registered with `add_servicer`, e.g.
    party_pb2_grpc.add_LLMServerServicer_to_server) until SIGTERM: listen at once (NOT_SERVING), load the model,
    then SERVING. One party is the one-element case of serve_parties."""
    serve_parties([party], add_servicer, service_name, [port_file])


class _Stopped(BaseException):
    """Raised by the signal handler while models are loading."""


def serve_parties(parties: Sequence[ModelParty], add_servicer: Callable, service_name: str,
                  port_files: Sequence[str | None]) -> None:
    """Several parties in one process (scale tests: many logical clients per process), each on its own port with its
    own ServiceHost, until SIGTERM/SIGINT stops them all. Every host listens at once (NOT_SERVING, port written to its
    port file); then the models load one after another, each host turning SERVING when its own model is loaded. A
    signal during loading abandons the load in progress and stops every host at once."""
    if len(port_files) != len(parties):
        raise ValueError(f"{len(parties)} parties but {len(port_files)} port files")
    hosts = [party_host(p, add_servicer, service_name) for p in parties]
    stop = threading.Event()
    loading = True

    def on_signal(*_):
        stop.set()
        if loading:  # abandon the model being loaded (as a single party's process dies on SIGTERM while loading)
            raise _Stopped()

    started: list[ServiceHost] = []
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            for host, port_file in zip(hosts, port_files):
                host.start(port_file)
                started.append(host)
            for i, (party, host) in enumerate(zip(parties, hosts)):
                party.load()
                host.set_serving(True)
                log.info("%s serving (%d of %d in this process)", party.cfg.party_id, i + 1, len(parties))
            loading = False
            while not stop.wait(1.0):  # a timed wait, so that the main thread runs the signal handler promptly
                pass
        except _Stopped:
            log.info("stopped while loading models")
        finally:
            loading = False
            for host in started:
                host.set_serving(False)
            stoppers = [threading.Thread(target=h.stop, daemon=True) for h in started]  # drain in parallel
            for t in stoppers:
                t.start()
            for t in stoppers:
                t.join()
            for party in parties:
                party.ops.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
