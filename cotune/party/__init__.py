"""A model-holding party (LLM server or SLM client): cotune.party.core holds the model and the common tasks,
cotune.algorithms.fedcollm.server and cotune.algorithms.fedbiot.tasks the algorithm-specific ones, cotune.party.service the gRPC service."""

from cotune.party.core import Party
from cotune.party.service import PartyServicer, serve_party

__all__ = ["Party", "PartyServicer", "serve_party"]
