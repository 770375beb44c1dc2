"""Request limits (cotune/rpc/limits.py): every limit kind refuses with InvalidInput naming the field path and the
limit; realistic requests pass, fast."""

from __future__ import annotations

import timeit

import pytest
from google.protobuf import any_pb2

from cotune.errors import InvalidInput
from cotune.rpc.limits import CHARS, ITEMS, MAX_DEPTH, check_message, describe_limits
from cotune.v1 import common_pb2, coordinator_pb2, operations_pb2, party_pb2

SHA = "ab" * 32


def _run_spec(clients: int = 50) -> coordinator_pb2.StartRunRequest:
    spec = coordinator_pb2.RunSpec(name="fedmkt-demo", algorithm="fedmkt", rounds=3,
                                   clients=[f"client-{i}" for i in range(clients)], public_set_hash=SHA,
                                   min_clients=2, step_timeout_s=1800, max_length=256,
                                   fedmkt=coordinator_pb2.FedMKTSpec(setting="heterogeneous", top_k=16, ce_weight=0.5,
                                                                     selection="dualmince", alignment_method="offsets"))
    return coordinator_pb2.StartRunRequest(spec=spec)


def _task() -> party_pb2.TaskRequest:
    ctx = party_pb2.RunContext(run_id="run-0123456789abcdef", round=2, task_key="r2/distill/client-3",
                               public_set_hash=SHA)
    teachers = [party_pb2.TeacherShard(sender_id=f"client-{i}", shard=common_pb2.BlobRef(sha256=SHA, size=1 << 20,
                media_type="application/x-cotune-topk-shard"), vocab_map=common_pb2.BlobRef(sha256=SHA, size=4096))
                for i in range(4)]
    return party_pb2.TaskRequest(ctx=ctx, distill=party_pb2.DistillTask(teachers=teachers, ce_weight=0.5, epochs=1,
                                                                        selection="dualmince", max_length=256))


def _register(**labels) -> coordinator_pb2.RegisterClientRequest:
    return coordinator_pb2.RegisterClientRequest(client=coordinator_pb2.ClientDescriptor(
        client_id="client-7", address="slm-7.example.org:50061", labels=labels or {"site": "eu-west", "gpu": "a100"}))


def test_realistic_requests_pass_and_are_fast():
    big = _run_spec(10_000)
    cases = {"StartRun (50 clients)": _run_spec(), "StartRun (10k clients)": big, "TaskRequest (distill)": _task(),
             "RegisterClient": _register(), "Chunk (1 MiB)": common_pb2.Chunk(sha256=SHA, data=b"x" * (1 << 20),
                                                                               total_size=5 << 20)}
    for name, msg in cases.items():
        check_message(msg)
        n = 20 if msg is big else 2000
        per_call = timeit.timeit(lambda m=msg: check_message(m), number=n) / n
        print(f"check_message {name}: {per_call * 1e6:.1f} µs")


@pytest.mark.parametrize(("msg", "match"), [
    (coordinator_pb2.StartRunRequest(spec=coordinator_pb2.RunSpec(name="n" * (CHARS + 1))),
     rf"spec\.name is {CHARS + 1} characters long, more than the {CHARS} allowed"),
    (party_pb2.TaskRequest(ctx=party_pb2.RunContext(run_id="r" * 129)), r"ctx\.run_id is 129 characters.*128 allowed"),
    (common_pb2.StatBlobRequest(sha256="a" * 1000), r"sha256 is 1000 characters"),
    (_run_spec(10_001), r"spec\.clients has 10001 elements, more than the 10000 allowed"),
    (coordinator_pb2.StartRunRequest(spec=coordinator_pb2.RunSpec(clients=["ok", "x" * 200])),
     r"spec\.clients\[1\] is 200 characters"),
    (_register(**{f"k{i}": "v" for i in range(33)}), r"client\.labels has 33 entries, more than the 32 allowed"),
    (_register(**{"k" * 64: "v"}), r"client\.labels has a key of 64 characters, more than the 63 allowed"),
    (_register(site="v" * 257), r"client\.labels\['site'\] is 257 characters long, more than the 256 allowed"),
    (party_pb2.TaskRequest(ctx=party_pb2.RunContext(task_key="r1/\x1b[2Jstep")), r"ctx\.task_key contains a control"),
    (_register(site="eu\rwest"), r"client\.labels\['site'\] contains a control character"),
    (_register(**{"a\x00": "v"}), r"client\.labels has a key with a control character"),
    (coordinator_pb2.StartRunRequest(spec=coordinator_pb2.RunSpec(clients=["a", "b\u202ec"])),
     r"spec\.clients\[1\] contains a control character"),
    (common_pb2.Tensor(shape=list(range(ITEMS + 1))), rf"shape has {ITEMS + 1} elements"),
    (party_pb2.TaskRequest(distill=party_pb2.DistillTask(teachers=[party_pb2.TeacherShard(
        shard=common_pb2.BlobRef(media_type="m" * 600))])), r"distill\.teachers\[0\]\.shard\.media_type is 600"),
])
def test_each_limit_names_the_field_path(msg, match):
    with pytest.raises(InvalidInput, match=match):
        check_message(msg)


def test_bytes_limit_spares_blob_chunks_and_any_is_left_alone():
    check_message(common_pb2.Chunk(sha256=SHA, data=b"x" * (2 << 20)))  # the store bounds chunks itself
    op = operations_pb2.Operation(id="op-1", result=any_pb2.Any(type_url="x", value=b"y" * (1 << 20)))
    check_message(op)
    check_message(operations_pb2.Operation(error_message="Traceback\r\n\x1b[31m" + "e" * 5000))  # free text


def test_bytes_limit_applies_elsewhere(monkeypatch):
    from cotune.rpc import limits

    monkeypatch.setitem(limits.OVERRIDES, "Tensor.data", {"bytes": 16})
    monkeypatch.setattr(limits, "_RULES", {})
    with pytest.raises(InvalidInput, match=r"data is 17 bytes, more than the 16 allowed"):
        check_message(common_pb2.Tensor(data=b"x" * 17))


def test_nesting_depth_is_bounded(monkeypatch):
    from cotune.rpc import limits

    check_message(_task())
    monkeypatch.setattr(limits, "MAX_DEPTH", 2)  # the protos nest 3 deep at most; a recursive one could go deeper
    with pytest.raises(InvalidInput, match=r"distill\.teachers\[0\]\.shard nests messages more than 2 deep"):
        check_message(_task())
    assert MAX_DEPTH == 16


def test_where_prefixes_the_message_and_describe_lists_overrides():
    with pytest.raises(InvalidInput, match=r"^StartRun: spec\.name"):
        check_message(coordinator_pb2.StartRunRequest(spec=coordinator_pb2.RunSpec(name="\x07")), where="StartRun")
    rows = describe_limits()
    assert "| `RunSpec.clients` | 10000 entries, 128 characters |" in rows
    assert "`ClientDescriptor.labels` | 32 entries, keys 63 characters, 256 characters" in rows
