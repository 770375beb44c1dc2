"""The authorization table against the generated service descriptors: every RPC each role serves has exactly one
rule, no rule names a method that does not exist, and the guard's concurrency caps leave room for quick calls."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from cotune.rpc import guard
from cotune.security.identity import KINDS
from cotune.security.policy import POLICIES, method_key
from cotune.v1 import alignment_pb2, common_pb2, coordinator_pb2, operations_pb2, party_pb2

# what each role's host serves (coordinator/service.py, cotune/party/service.py, alignment/service.py, and the
# health and reflection services every ServiceHost adds)
OPEN = [(health_pb2, "Health"), (reflection_pb2, "ServerReflection")]
SERVED = {
    "coordinator": [(coordinator_pb2, "Coordinator"), (common_pb2, "BlobStore")] + OPEN,
    "llm": [(party_pb2, "LLMServer"), (common_pb2, "BlobStore"), (operations_pb2, "Operations")] + OPEN,
    "slm": [(party_pb2, "SLMClient"), (common_pb2, "BlobStore"), (operations_pb2, "Operations")] + OPEN,
    "alignment": [(alignment_pb2, "Alignment"), (common_pb2, "BlobStore"), (operations_pb2, "Operations")] + OPEN,
}
ALL_MODULES = [coordinator_pb2, common_pb2, operations_pb2, party_pb2, alignment_pb2, health_pb2, reflection_pb2]


def _methods(module, service: str) -> set[str]:
    svc = module.DESCRIPTOR.services_by_name[service]
    return {f"{svc.full_name}/{m.name}" for m in svc.methods}


def _served(role: str) -> set[str]:
    return set().union(*(_methods(module, service) for module, service in SERVED[role]))


def _every_method() -> set[str]:
    out: set[str] = set()
    for module in ALL_MODULES:
        for name in module.DESCRIPTOR.services_by_name:
            out |= _methods(module, name)
    return out


def test_every_role_has_a_table():
    assert set(POLICIES) == set(SERVED)


# grpcio-health-checking's descriptor has Health/List; without a rule the guard would refuse it to everyone
HEALTH_LIST = "grpc.health.v1.Health/List"


@pytest.mark.parametrize("role", sorted(SERVED))
def test_every_served_method_has_a_rule(role):
    missing = _served(role) - set(POLICIES[role])
    assert not missing, f"{role}: no authorization rule for {sorted(missing)}"


@pytest.mark.parametrize("role", sorted(SERVED))
def test_health_list_has_a_rule(role):  # health and reflection are added outside ServiceHost.add's rule check
    assert HEALTH_LIST in POLICIES[role]


@pytest.mark.parametrize("role", sorted(SERVED))
def test_no_rule_for_a_method_the_role_does_not_serve(role):
    extra = set(POLICIES[role]) - _served(role)
    assert not extra, f"{role}: rules for methods it does not serve (or that do not exist): {sorted(extra)}"
    assert set(POLICIES[role]) <= _every_method()


@pytest.mark.parametrize("role", sorted(SERVED))
def test_rules_name_known_identity_kinds_and_are_not_empty(role):
    for method, kinds in POLICIES[role].items():
        assert isinstance(kinds, frozenset) and kinds, f"{role} {method}: empty rule"
        assert kinds <= set(KINDS), f"{role} {method}: unknown kinds {sorted(kinds - set(KINDS))}"


def test_the_decided_rules():
    """The table's intent, spelled out for the methods where a mistake would matter most."""
    coord = POLICIES["coordinator"]
    assert coord["cotune.v1.Coordinator/StartRun"] == {"operator"}
    assert coord["cotune.v1.Coordinator/RegisterClient"] == {"operator", "client"}
    assert coord["cotune.v1.Coordinator/DeregisterClient"] == {"operator", "client"}
    assert coord["cotune.v1.BlobStore/GetBlob"] == {"operator"}
    for role, service in (("llm", "LLMServer"), ("slm", "SLMClient")):
        assert POLICIES[role][f"cotune.v1.{service}/StartTask"] == {"coordinator"}
        assert POLICIES[role][f"cotune.v1.{service}/Describe"] == {"coordinator", "operator"}
        assert POLICIES[role]["cotune.v1.BlobStore/PutBlob"] == {"coordinator"}
    for method, kinds in POLICIES["alignment"].items():
        if not method.startswith("grpc."):
            assert kinds == {"coordinator"}, method
    for role in POLICIES:  # health and reflection: anyone with a valid certificate
        assert POLICIES[role]["grpc.health.v1.Health/Check"] == set(KINDS)


def test_method_key():
    assert method_key("/cotune.v1.Coordinator/StartRun") == "cotune.v1.Coordinator/StartRun"


def test_concurrency_caps_leave_workers_for_quick_calls():
    assert sum(guard.CONCURRENCY.values()) < guard.WORKERS - 8, (sum(guard.CONCURRENCY.values()), guard.WORKERS)
    assert all(isinstance(n, int) and n >= 1 for n in guard.CONCURRENCY.values())
    served = set().union(*(_served(role) for role in SERVED))
    assert set(guard.CONCURRENCY) <= served, sorted(set(guard.CONCURRENCY) - served)
    # the long-held methods all have a cap
    for method in ("cotune.v1.BlobStore/PutBlob", "cotune.v1.BlobStore/GetBlob", "cotune.v1.Operations/WaitOperation",
                   "cotune.v1.Coordinator/WatchRun", "cotune.v1.Coordinator/RegisterClient",
                   "grpc.health.v1.Health/Watch"):
        assert method in guard.CONCURRENCY, method
