"""Who may call what: the authorization table of every service, one declared rule per RPC.

A rule is the set of identity kinds (cotune.security.identity) allowed to call the method. The table lists every
method of every service a host serves; a host refuses to start if one it serves has no rule (tests/unit/
test_policy.py checks the table against the generated service descriptors), so a new RPC is closed until someone
decides who may call it. Finer checks that depend on the request (a client may register only itself) live in the
handler, which reads the caller with cotune.rpc.guard.caller().

    operators    the run API and client administration (the coordinator's service and artifact store); may Describe
                 a party
    coordinator  the parties' and the alignment service's tasks, blobs and operations
    client/<id>  RegisterClient / DeregisterClient at the coordinator, for itself only
    anyone with a valid certificate: health checks and reflection
"""

from __future__ import annotations

from cotune.security.identity import KINDS

ANY = frozenset(KINDS)
OPERATOR = frozenset({"operator"})
COORDINATOR = frozenset({"coordinator"})

_OPEN = {  # served by every host
    "grpc.health.v1.Health/Check": ANY,
    "grpc.health.v1.Health/Watch": ANY,
    "grpc.health.v1.Health/List": ANY,
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ANY,
}


def _service(name: str, methods: dict[str, frozenset]) -> dict[str, frozenset]:
    return {f"cotune.v1.{name}/{method}": kinds for method, kinds in methods.items()}


def _blobs_and_operations(kinds: frozenset, *, operations: bool = True) -> dict[str, frozenset]:
    table = _service("BlobStore", {"PutBlob": kinds, "GetBlob": kinds, "StatBlob": kinds})
    if operations:
        table |= _service("Operations", {"GetOperation": kinds, "WaitOperation": kinds, "CancelOperation": kinds})
    return table


def _party(service: str) -> dict[str, frozenset]:
    return _service(service, {"Describe": COORDINATOR | OPERATOR, "StartTask": COORDINATOR})


POLICIES: dict[str, dict[str, frozenset]] = {
    "coordinator": _OPEN | _service("Coordinator", {
        "RegisterClient": OPERATOR | {"client"},    # a client: itself only (coordinator.service checks)
        "DeregisterClient": OPERATOR | {"client"},  # likewise
        "ListClients": OPERATOR,
        "StartRun": OPERATOR,
        "GetRun": OPERATOR,
        "WatchRun": OPERATOR,
        "CancelRun": OPERATOR,
        "ResumeRun": OPERATOR,
        "ExportRun": OPERATOR,                      # runs tasks on the parties; the adapters land in the artifact store
        "ListRuns": OPERATOR,
    }) | _blobs_and_operations(OPERATOR, operations=False),  # the artifact store: adapters, shards of every run
    "llm": _OPEN | _party("LLMServer") | _blobs_and_operations(COORDINATOR),
    "slm": _OPEN | _party("SLMClient") | _blobs_and_operations(COORDINATOR),
    "alignment": _OPEN | _service("Alignment", {
        "RegisterTokenizer": COORDINATOR, "BuildVocabMap": COORDINATOR, "BuildSequenceAlignment": COORDINATOR,
    }) | _blobs_and_operations(COORDINATOR),
}


def method_key(full_method: str) -> str:
    """'/cotune.v1.Coordinator/StartRun' -> 'cotune.v1.Coordinator/StartRun' (the table's key)."""
    return full_method.lstrip("/")
