"""A model-holding party (LLM server or SLM client): cotune.party.core holds the model and the common tasks,
cotune.party.fedcollm and cotune.party.fedbiot the algorithm-specific ones, cotune.party.service the gRPC service."""

from cotune.party.core import Party
from cotune.party.service import PartyServicer, serve_party

__all__ = ["Party", "PartyServicer", "serve_party"]
