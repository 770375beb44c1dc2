"""centralized: the NON-FEDERATED reference, an upper bound on what pooling the data would give: exactly one SLM
client, which holds the union of every client's private shard (the deployment puts it there; `cotune demo
--algorithm centralized` builds it), trains on it every round; the LLM server also trains on its private data when it
holds any (the demo gives it the same union). Every round record says it is not federated."""

from __future__ import annotations

from cotune.algorithms.base import Driver, PartyRef
from cotune.algorithms.standalone.strategy import Standalone


class Centralized(Standalone):
    """Standalone's loop on different data: the one client holds the union (and the LLM server trains if it holds
    private data), and every round record says so."""

    name = "centralized"
    summary = "NON-FEDERATED reference: one party trains on the union of the private shards"
    LABEL = ("centralized: NON-FEDERATED reference - one party trains on the union of the private shards; "
             "no privacy boundary holds in this run")

    def check(self, config, run, llm, clients) -> list[str]:
        if len(clients) != 1:
            return [f"centralized is the non-federated reference: select exactly one client (clients), the one holding "
                    f"the union of the private shards; got {len(clients)}: {', '.join(sorted(clients))}"]
        (cid, info), = clients.items()
        return [] if info.private_set_size else [f"centralized: client {cid} holds no private data to train on"]

    def trainees(self, d: Driver) -> list[PartyRef]:
        return [*([d.llm] if d.llm.info.private_set_size else []), *d.clients]

    def label(self, d: Driver, rnd: int) -> None:
        d.note(rnd, self.LABEL, kind="info")
