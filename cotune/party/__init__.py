"""What every model-holding party shares (LLM server and SLM clients alike), and nothing algorithm-specific:
cotune.party.base (ModelParty: model, data, blob store, operations, describe, task dispatch through the role's task
table), cotune.party.tasks (the generic tasks: train_local, evaluate, get_lora, set_lora), cotune.party.service (the
gRPC servicer). The roles are llm_server.server.LLMServer and slm_client.client.SLMClient; the algorithms' tasks are
in cotune.algorithms.<name>."""

from cotune.party.base import ModelParty, Target
from cotune.party.service import PartyServicer, serve_party

__all__ = ["ModelParty", "PartyServicer", "Target", "serve_party"]
