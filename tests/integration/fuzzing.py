"""Protocol fuzzing of a running cluster: malformed and hostile messages to every RPC of every service.

Shared by tests/integration/test_fuzz.py and benchmarks/security.py.

For every RPC a host serves (enumerated from cotune.security.policy.POLICIES, so a new RPC is fuzzed without anyone
listing it) the fuzzer sends `count` messages as an identity the policy ALLOWS to call it (so the messages reach the
handlers: the operator at the coordinator, the coordinator at the parties and the alignment service). Messages go out
as raw bytes (no serializer), so encodings the generated classes could never produce reach the server. They come from
a seeded RNG (one stream per service and RPC, so a run is reproducible) and a few valid seed messages per RPC built from
the live cluster (real run ids, operation ids, blob and tokenizer hashes), so mutations reach deep into the handlers:

    random     random bytes (mostly short, sometimes KiBs)
    truncated  a valid serialized seed cut short
    bitflip    a valid serialized seed with 1-8 bits flipped
    mutated    a seed with 1-3 fields set to hostile values for their type: huge and negative integers, NaN and
               infinities, strings of control characters, bidi overrides, path traversals, up to ~1 MiB; unknown enum
               values; long repeated fields and maps; another member of a oneof
    wire       wire-level tricks: a known field with the wrong wire type, a length prefix past the end, invalid UTF-8 in
               a string, deeply nested groups, overlong varints, invalid tags, two members of one oneof
    valid      a seed as is (the success paths run under the same load)
    empty      zero bytes (the default message)

Streaming RPCs get sequences of such messages (PutBlob: 0-6 chunks, a valid upload with one chunk replaced, garbage
after a valid prefix, ...); response streams are read to their end (at most 64 messages), a health Watch to its
first message.

Each call has a deadline; every call must return by its deadline plus slack (else: a hang). A DEADLINE_EXCEEDED on a
method that is not a long poll (health Watch, WatchRun, WaitOperation) is re-sent alone with a long deadline and counts
as a hang if it times out again. INTERNAL (a handler raised on bad input) and UNKNOWN (an exception escaped a handler)
are failures; each is saved as a reproducer (JSON: the service, the RPC, the payloads in base64), replayable with
`replay`. Work the fuzz legitimately starts (runs, training tasks, alignment builds) is cancelled at once, and again
when a service is done.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from cotune.cluster import OPERATOR, LocalCluster
from cotune.rpc.channel import make_channel
from cotune.rpc.guard import CONCURRENCY
from cotune.security.identity import COORDINATOR, Identity, client_identity
from cotune.security.policy import POLICIES

CANARY = "cotune-fuzz-canary"  # file names the fuzz asks services to write to; none may appear anywhere
LONG_POLLS = ("grpc.health.v1.Health/Watch", "cotune.v1.Coordinator/WatchRun", "cotune.v1.Operations/WaitOperation")
DEADLINES = {  # seconds per call; the rest DEFAULT_DEADLINE_S
    "grpc.health.v1.Health/Watch": 2.0,
    "cotune.v1.Coordinator/WatchRun": 2.0,
    "cotune.v1.Operations/WaitOperation": 3.0,
    "cotune.v1.Coordinator/RegisterClient": 10.0,  # the coordinator dials the address for up to 5 s
    "cotune.v1.Coordinator/StartRun": 10.0,        # describes every party it names
}
DEFAULT_DEADLINE_S = 5.0
SLACK_S = 3.0           # a call returning later than its deadline + this is a hang
RECHECK_DEADLINE_S = 30.0
MAX_STREAM_RESPONSES = 64
FAILING_CODES = ("INTERNAL", "UNKNOWN")
BAD_PROBE_CODES = ("INTERNAL", "UNKNOWN", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE")
DECODE_FAILURE = "Exception deserializing request!"  # gRPC's own INTERNAL when a request does not parse
MAX_REPRODUCERS = {"decode": 2}  # per RPC and kind of failure; other kinds: DEFAULT_MAX_REPRODUCERS
DEFAULT_MAX_REPRODUCERS = 10


def role_of(service: str) -> str:
    return {"coordinator": "coordinator", "llm": "llm", "alignment": "alignment"}.get(service, "slm")


# --------------------------------------------------------------------------------------------------------------------
# the RPCs
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rpc:
    key: str                 # "cotune.v1.BlobStore/PutBlob" (the policy table's key)
    request: type
    response: type
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return "/" + self.key

    @property
    def name(self) -> str:
        return self.key.rsplit(".", 1)[-1]  # "BlobStore/PutBlob"


def _load_descriptors() -> None:
    from grpc_health.v1 import health_pb2  # noqa: F401 - registers the descriptors in the default pool
    from grpc_reflection.v1alpha import reflection_pb2  # noqa: F401

    from cotune.v1 import alignment_pb2, common_pb2, coordinator_pb2, operations_pb2, party_pb2  # noqa: F401


def rpcs_of(role: str) -> list[Rpc]:
    """Every RPC a host of `role` serves: the keys of its authorization table, with their message types."""
    _load_descriptors()
    pool = descriptor_pool.Default()
    out = []
    for key in sorted(POLICIES[role]):
        service, method = key.split("/")
        m = pool.FindServiceByName(service).FindMethodByName(method)
        cls = message_factory.GetMessageClass
        out.append(Rpc(key, cls(m.input_type), cls(m.output_type), m.client_streaming, m.server_streaming))
    return out


def caller_for(role: str, rpc_key: str) -> Identity:
    """The identity the fuzz calls as: one the policy allows (so messages reach the handler); the operator at the
    coordinator, the coordinator elsewhere."""
    allowed = POLICIES[role][rpc_key]
    preferred = ("operator", "coordinator") if role == "coordinator" else ("coordinator", "operator")
    for kind in preferred:
        if kind in allowed:
            return OPERATOR if kind == "operator" else COORDINATOR
    if "client" in allowed:
        return client_identity("client-1")
    return Identity(sorted(allowed)[0])


# --------------------------------------------------------------------------------------------------------------------
# wire format helpers
# --------------------------------------------------------------------------------------------------------------------

def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


# --------------------------------------------------------------------------------------------------------------------
# hostile values
# --------------------------------------------------------------------------------------------------------------------

I32 = [0, 1, -1, 2, 7, 8, 1024, 1025, 32768, 32769, 4096, 4097, 2**31 - 1, -2**31, -7]
I64 = I32 + [2**63 - 1, -2**63, 2**40, 64 << 30, (64 << 30) + 1, 2**53 + 1]
U32 = [0, 1, 2**32 - 1, 2**31]
U64 = [0, 1, 2**64 - 1, 2**63]
FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308, 5e-324, 1e-45, 3.4e38, 0.5, 1.0, -1.0, 1e9]
STRINGS = [
    "", " ", "a" * 65, "a" * 129, "a" * 257, "a" * 513, "\x00", "\x00abc", "\r\n2026-01-01 ERROR forged log line",
    "\x1b[31mred\x1b[0m", "\u202eevil\u202c", "\u2028", "\u2066x\u2069", "\x7f\x85\x9f", "é日本語🙂", "\t\n",
    f"../../../../../../tmp/{CANARY}", f"/tmp/{CANARY}", f"..%2f..%2ftmp%2f{CANARY}", "%s%s%n%x", "{}", '{"a":',
    "\\", "null", "*", "-1", "NaN", "0" * 64, "A" * 64, "g" * 64, "0" * 63, "0" * 65, "client-1", "client-2", "llm",
    "coordinator", "operator/admin", "127.0.0.1:1", "[::1]:1", "localhost:0", "127.0.0.1:*", "evil.example.com:443",
    "offsets", "dtw", "factors", "product", "compressed", "companion", "model", "dualmince", "heterogeneous",
    "zero-shot", "x" * 300,
]
BYTES = [b"", b"\x00", b"\xff" * 16, b"PK\x03\x04", b'{"__metadata__":{}}', b"\x08\x00\x00\x00\x00\x00\x00\x00{}"]


class ValueGen:
    def __init__(self, rng: random.Random, *, shas: Iterable[str] = ()):
        self.rng = rng
        self.shas = list(shas)

    def string(self) -> str:
        r = self.rng.random()
        if r < 0.55:
            return self.rng.choice(STRINGS)
        if r < 0.65 and self.shas:
            return self.rng.choice(self.shas)
        if r < 0.85:  # random unicode, control characters included
            n = self.rng.choice([1, 8, 64, 600])
            return "".join(chr(self.rng.choice([self.rng.randrange(0, 0x80), self.rng.randrange(0x80, 0xD800),
                                                 self.rng.randrange(0xE000, 0x110000)])) for _ in range(n))
        if r < 0.97:
            return self.rng.choice("ab\x00\n") * self.rng.choice([1000, 10_000, 70_000])
        return "y" * self.rng.randrange(64 << 10, 1 << 20)  # huge: up to ~1 MiB

    def bytes_(self) -> bytes:
        r = self.rng.random()
        if r < 0.4:
            return self.rng.choice(BYTES)
        if r < 0.9:
            return self.rng.randbytes(self.rng.choice([1, 7, 100, 4096]))
        return self.rng.randbytes(self.rng.choice([(64 << 10) + 1, 1 << 20, (1 << 20) + 1]))

    def scalar(self, f: FieldDescriptor):
        t = f.type
        if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
            return self.rng.choice(I32) if self.rng.random() < 0.8 else self.rng.randrange(-2**31, 2**31)
        if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
            return self.rng.choice(I64) if self.rng.random() < 0.8 else self.rng.randrange(-2**63, 2**63)
        if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
            return self.rng.choice(U32)
        if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
            return self.rng.choice(U64)
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return self.rng.choice(FLOATS) if self.rng.random() < 0.8 else self.rng.uniform(-1e6, 1e6)
        if t == FieldDescriptor.TYPE_BOOL:
            return self.rng.random() < 0.5
        if t == FieldDescriptor.TYPE_ENUM:  # open enums: unknown values included
            known = [v.number for v in f.enum_type.values]
            return self.rng.choice(known + [len(known), 99, -1, 2**31 - 1, -2**31])
        if t == FieldDescriptor.TYPE_STRING:
            return self.string()
        if t == FieldDescriptor.TYPE_BYTES:
            return self.bytes_()
        raise TypeError(f"no generator for field type {t}")

    def map_key(self, f: FieldDescriptor):
        if f.type == FieldDescriptor.TYPE_STRING:
            return self.string()[:200] if self.rng.random() < 0.9 else "k" * 129
        return self.scalar(f)


def _is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def _repeated(f: FieldDescriptor) -> bool:
    return f.is_repeated


# --------------------------------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------------------------------

STRATEGIES = {"random": 0.14, "truncated": 0.1, "bitflip": 0.14, "mutated": 0.42, "wire": 0.1, "valid": 0.06,
              "empty": 0.04}


class MessageFuzzer:
    """Hostile serialized messages of one type from a seeded RNG and a few valid seeds."""

    def __init__(self, rng: random.Random, *, shas: Iterable[str] = ()):
        self.rng = rng
        self.values = ValueGen(rng, shas=shas)

    def strategy(self) -> str:
        return self.rng.choices(list(STRATEGIES), weights=list(STRATEGIES.values()))[0]

    def payload(self, cls: type, seeds: list[Message], strategy: str | None = None) -> tuple[str, bytes]:
        strategy = strategy or self.strategy()
        seed = self.rng.choice(seeds) if seeds else cls()
        valid = seed.SerializeToString()
        if strategy == "random":
            n = self.rng.choice([1, 2, 3, 5, 8, 16, 32, 64, 100, 256, 1024, 4096])
            return strategy, self.rng.randbytes(n)
        if strategy == "truncated":
            if len(valid) < 2:
                return strategy, valid + self.rng.randbytes(self.rng.randrange(1, 4))[:1]
            return strategy, valid[: self.rng.randrange(1, len(valid))]
        if strategy == "bitflip":
            data = bytearray(valid or b"\x00")
            for _ in range(self.rng.randrange(1, 9)):
                i = self.rng.randrange(len(data) * 8)
                data[i // 8] ^= 1 << (i % 8)
            return strategy, bytes(data)
        if strategy == "mutated":
            msg = cls()
            msg.CopyFrom(seed)
            for _ in range(self.rng.randrange(1, 4)):
                self.mutate(msg, 0)
            return strategy, msg.SerializeToString()
        if strategy == "wire":
            return strategy, self.wire_trick(cls, valid)
        if strategy == "valid":
            return strategy, valid
        return "empty", b""

    # -- field mutation ----------------------------------------------------------------------------------------------
    def mutate(self, msg: Message, depth: int) -> None:
        fields = msg.DESCRIPTOR.fields
        if not fields:
            return
        f = self.rng.choice(fields)
        try:
            self._mutate_field(msg, f, depth)
        except (ValueError, TypeError, OverflowError):  # a value the Python API refuses to hold: skip it
            pass

    def _mutate_field(self, msg: Message, f: FieldDescriptor, depth: int) -> None:
        r = self.rng.random()
        if _is_map(f):
            m = getattr(msg, f.name)
            if r < 0.1:
                msg.ClearField(f.name)
                return
            key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            for _ in range(self.rng.choice([1, 3, 33, 4097])):
                key = self.values.map_key(key_f)
                if value_f.type == FieldDescriptor.TYPE_MESSAGE:
                    sub = m[key]
                    if depth < 4 and self.rng.random() < 0.3:
                        self.mutate(sub, depth + 1)
                else:
                    m[key] = self.values.scalar(value_f) if self.rng.random() < 0.3 else _short(self.values, value_f)
            return
        if _repeated(f):
            seq = getattr(msg, f.name)
            if r < 0.15:
                msg.ClearField(f.name)
                return
            n = self.rng.choice([1, 2, 5, 100, 4097, 10_001])
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                n = min(n, 5000)
                for _ in range(n):
                    sub = seq.add()
                    if n <= 5 and depth < 4:
                        self.mutate(sub, depth + 1)
            elif n > 5:  # long: short values, so the message stays within the 4 MiB limit
                seq.extend(_short(self.values, f) for _ in range(n))
            else:
                seq.extend(self.values.scalar(f) for _ in range(n))
            return
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            sub = getattr(msg, f.name)
            if f.message_type.full_name == "google.protobuf.Any":
                sub.type_url = self.values.string()[:300]
                sub.value = self.values.bytes_()
            elif r < 0.15:
                msg.ClearField(f.name)
            elif r < 0.3 or depth >= 4:
                sub.SetInParent()  # present, all defaults (selects a oneof member)
            else:
                self.mutate(sub, depth + 1)
            return
        setattr(msg, f.name, self.values.scalar(f))

    # -- wire tricks -------------------------------------------------------------------------------------------------
    def wire_trick(self, cls: type, valid: bytes) -> bytes:
        fields = list(cls.DESCRIPTOR.fields)
        number = self.rng.choice(fields).number if fields else self.rng.randrange(1, 20)
        trick = self.rng.randrange(10)
        if trick == 0:  # a known field with the wrong wire type
            wt = self.rng.choice([0, 1, 2, 5])
            body = {0: varint(self.rng.randrange(2**64)), 1: self.rng.randbytes(8), 5: self.rng.randbytes(4),
                    2: varint(3) + b"abc"}[wt]
            return valid + tag(number, wt) + body
        if trick == 1:  # a length prefix far beyond the end
            return valid + tag(number, 2) + varint(self.rng.choice([2**31, 2**32 + 5, 2**63, 1000])) + b"xyz"
        if trick == 2:  # invalid UTF-8 in a string field
            strings = [f.number for f in fields if f.type == FieldDescriptor.TYPE_STRING]
            bad = self.rng.choice([b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"a\x80b", b"\xf4\x90\x80\x80"])
            return valid + length_delimited(self.rng.choice(strings) if strings else number, bad)
        if trick == 3:  # deeply nested groups (an unknown field)
            depth = self.rng.choice([10, 99, 101, 1000, 20_000])
            n = self.rng.randrange(100, 1000)
            return valid + tag(n, 3) * depth + tag(n, 4) * depth
        if trick == 4:  # overlong varint (11 bytes)
            return valid + tag(number, 0) + b"\xff" * 10 + b"\x01"
        if trick == 5:  # invalid tags: field number 0, or beyond 2**29 - 1
            return valid + self.rng.choice([b"\x00\x01", b"\x02\x00", varint((2**29) << 3),
                                            varint(((2**29) << 3) | 2) + b"\x00"])
        if trick == 6:  # two members of one oneof (legal on the wire: the last one wins), or the seed twice
            oneofs = [o for o in cls.DESCRIPTOR.oneofs if len(o.fields) > 1]
            if oneofs:
                members = self.rng.sample(list(oneofs[0].fields), 2)
                out = valid
                for f in members:
                    m = cls()
                    getattr(m, f.name).SetInParent() if f.type == FieldDescriptor.TYPE_MESSAGE else setattr(
                        m, f.name, self.values.scalar(f))
                    out += m.SerializeToString()
                return out
            return valid + valid
        if trick == 7:  # unknown fields of every wire type
            out = valid
            for _ in range(self.rng.randrange(1, 50)):
                n = self.rng.randrange(100, 100_000)
                out += self.rng.choice([tag(n, 0) + varint(self.rng.randrange(2**64)),
                                        tag(n, 1) + self.rng.randbytes(8),
                                        length_delimited(n, self.rng.randbytes(self.rng.randrange(64))),
                                        tag(n, 5) + self.rng.randbytes(4)])
            return out
        if trick == 8:  # a sub-message field whose body is garbage
            subs = [f.number for f in fields if f.type == FieldDescriptor.TYPE_MESSAGE]
            return valid + length_delimited(self.rng.choice(subs) if subs else number,
                                            self.rng.randbytes(self.rng.randrange(1, 64)))
        # nested length-delimited of the same sub-message field, deep
        subs = [f for f in fields if f.type == FieldDescriptor.TYPE_MESSAGE]
        if not subs:
            return valid + self.rng.randbytes(16)
        f = self.rng.choice(subs)
        inner = b""
        for _ in range(self.rng.choice([5, 50, 200])):
            inner = length_delimited(f.number, inner)
        return valid + inner

    # -- streams -----------------------------------------------------------------------------------------------------
    def stream(self, cls: type, seeds: list[list[Message]]) -> tuple[str, list[bytes]]:
        """A request stream: a valid sequence with elements replaced, a valid prefix then garbage, or fuzz only."""
        flat = [m for seq in seeds for m in seq]
        base = [m.SerializeToString() for m in self.rng.choice(seeds)] if seeds else []
        r = self.rng.random()
        if r < 0.05:
            return "stream:empty", []
        if r < 0.1 and base:
            return "stream:valid", base
        if r < 0.45 and base:
            out = list(base)
            for _ in range(self.rng.randrange(1, 3)):
                strategy, data = self.payload(cls, flat)
                out[self.rng.randrange(len(out))] = data
            return "stream:replaced", out
        if r < 0.7 and base:
            k = self.rng.randrange(len(base) + 1)
            extra = [self.payload(cls, flat)[1] for _ in range(self.rng.randrange(1, 4))]
            return "stream:prefix+fuzz", base[:k] + extra
        return "stream:fuzz", [self.payload(cls, flat)[1] for _ in range(self.rng.randrange(1, 7))]


def _short(values: ValueGen, f: FieldDescriptor):
    if f.type == FieldDescriptor.TYPE_STRING:
        return values.rng.choice(["a", "client-1", "\x00", "ü", "0" * 64, "x" * 20])
    if f.type == FieldDescriptor.TYPE_BYTES:
        return b"\x00"
    return values.scalar(f)


# --------------------------------------------------------------------------------------------------------------------
# seeds from the live cluster
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class Seeds:
    """Valid messages per RPC key (for a request stream: sequences of messages), and hashes worth reusing."""

    by_rpc: dict[str, list] = field(default_factory=dict)
    shas: list[str] = field(default_factory=list)


def _wait_op(ops_stub, op, timeout_s: float = 120.0):
    from cotune.v1 import operations_pb2

    deadline = time.monotonic() + timeout_s
    while op.state not in (3, 4, 5) and time.monotonic() < deadline:
        op = ops_stub.WaitOperation(operations_pb2.WaitOperationRequest(id=op.id, timeout_s=2.0), timeout=15)
    return op


def _seed_blob(store_dir: Path, rng: random.Random, size: int):
    from cotune.wire.blobs import BlobStore

    store = BlobStore(store_dir)
    return store, store.put_bytes(rng.randbytes(size), "application/octet-stream")


def _blob_seeds(seeds: Seeds, sha: str, size: int, rng: random.Random) -> None:
    from cotune.v1 import common_pb2
    from cotune.wire.blobs import sha256_hex

    data = rng.randbytes(2500)  # a fresh blob: its valid upload in three chunks
    new_sha = sha256_hex(data)
    cuts = [0, 1000, 2000, 2500]
    upload = [common_pb2.Chunk(sha256=new_sha, offset=a, data=data[a:b], total_size=len(data),
                               media_type="application/octet-stream") for a, b in zip(cuts, cuts[1:])]
    seeds.by_rpc["cotune.v1.BlobStore/PutBlob"] = [
        upload, [common_pb2.Chunk(sha256=sha, offset=0, data=b"", total_size=size)]]
    seeds.by_rpc["cotune.v1.BlobStore/GetBlob"] = [common_pb2.GetBlobRequest(sha256=sha, offset=o)
                                                   for o in (0, 1000, size)]
    seeds.by_rpc["cotune.v1.BlobStore/StatBlob"] = [common_pb2.StatBlobRequest(sha256=s) for s in (sha, new_sha)]
    seeds.shas += [sha, new_sha]


def _common_seeds(seeds: Seeds, service_name: str) -> None:
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2 as rpb

    seeds.by_rpc["grpc.health.v1.Health/Check"] = [health_pb2.HealthCheckRequest(service=s)
                                                   for s in ("", f"cotune.{service_name}", "no.such.Service")]
    seeds.by_rpc["grpc.health.v1.Health/Watch"] = list(seeds.by_rpc["grpc.health.v1.Health/Check"])
    seeds.by_rpc["grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"] = [
        [rpb.ServerReflectionRequest(list_services="*")],
        [rpb.ServerReflectionRequest(file_containing_symbol="cotune.v1.RunSpec"),
         rpb.ServerReflectionRequest(file_by_filename="cotune/v1/common.proto")],
        [rpb.ServerReflectionRequest(all_extension_numbers_of_type="google.protobuf.Any"),
         rpb.ServerReflectionRequest(file_containing_extension=rpb.ExtensionRequest(
             containing_type="cotune.v1.Chunk", extension_number=5))],
    ]


def _ops_seeds(seeds: Seeds, op_id: str) -> None:
    from cotune.v1 import operations_pb2

    seeds.by_rpc["cotune.v1.Operations/GetOperation"] = [operations_pb2.OperationId(id=op_id)]
    seeds.by_rpc["cotune.v1.Operations/WaitOperation"] = [operations_pb2.WaitOperationRequest(id=op_id, timeout_s=1.0)]
    seeds.by_rpc["cotune.v1.Operations/CancelOperation"] = [operations_pb2.OperationId(id=op_id)]
    seeds.shas.append(op_id)


def build_seeds(cluster: LocalCluster, workdir: Path, *, services: Iterable[str],
                rng_seed: int = 0) -> dict[str, Seeds]:
    """Valid seed messages for every RPC of `services`, made against the live cluster: a seed blob pushed into each
    store, a finished operation at each party and the alignment service, a finished run at the coordinator."""
    from cotune.demo import wait_for_clients
    from cotune.v1 import alignment_pb2, alignment_pb2_grpc, common_pb2_grpc, operations_pb2_grpc, party_pb2
    from cotune.v1 import coordinator_pb2 as cpb
    from cotune.wire.blobs import pull_blob, push_blob

    rng = random.Random(f"seeds:{rng_seed}")
    local, blob = _seed_blob(workdir / "seed-blobs", rng, 64 << 10)
    out: dict[str, Seeds] = {}
    services = list(services)
    client_names = [n for n, s in cluster.services.items() if s.kind == "slm"]
    infos = {}
    for name in services:
        seeds = out[name] = Seeds()
        _common_seeds(seeds, name)
        role = role_of(name)
        identity = caller_for(role, "cotune.v1.BlobStore/PutBlob")
        channel = make_channel(cluster.services[name].address, cluster.credentials(identity),
                               peer=cluster.identity_of(name))
        try:
            push_blob(common_pb2_grpc.BlobStoreStub(channel), local, blob.sha256)
            _blob_seeds(seeds, blob.sha256, blob.size, rng)
            if role in ("llm", "slm"):
                party = cluster.party_client(name)
                try:
                    info = infos[name] = party.describe()
                    task = party_pb2.TaskRequest(ctx=party_pb2.RunContext(run_id="fuzz-seed", task_key="seed"),
                                                 evaluate=party_pb2.EvaluateTask(max_samples=1))
                    op = _wait_op(party.ops, party.start(task))
                finally:
                    party.close()
                _ops_seeds(seeds, op.id)
                seeds.shas += [info.public_set_hash, info.tokenizer_hash, info.lora_hash, info.lora_layout_hash]
                seeds.by_rpc.update(_party_seeds(info, blob))
            elif role == "alignment":
                # a tokenizer (client-1's) and the public set, uploaded and registered: builds of gpt2 -> gpt2 are quick
                source = cluster.party_client(client_names[0])
                info = source.describe()
                store = local
                pull_blob(source.blobs, store, info.tokenizer_bundle.sha256)
                pull_blob(source.blobs, store, info.public_set.sha256)
                source.close()
                blobs = common_pb2_grpc.BlobStoreStub(channel)
                push_blob(blobs, store, info.tokenizer_bundle.sha256)
                push_blob(blobs, store, info.public_set.sha256)
                stub = alignment_pb2_grpc.AlignmentStub(channel)
                tok = stub.RegisterTokenizer(alignment_pb2.RegisterTokenizerRequest(bundle=info.tokenizer_bundle),
                                             timeout=120).tokenizer_hash
                op = stub.BuildVocabMap(alignment_pb2.VocabMapRequest(src_hash=tok, dst_hash=tok), timeout=30)
                op = _wait_op(operations_pb2_grpc.OperationsStub(channel), op)
                _ops_seeds(seeds, op.id)
                public = info.public_set.sha256
                seeds.shas += [tok, public]
                seeds.by_rpc["cotune.v1.Alignment/RegisterTokenizer"] = [
                    alignment_pb2.RegisterTokenizerRequest(bundle=info.tokenizer_bundle),
                    alignment_pb2.RegisterTokenizerRequest(bundle=blob.ref())]
                seeds.by_rpc["cotune.v1.Alignment/BuildVocabMap"] = [
                    alignment_pb2.VocabMapRequest(src_hash=tok, dst_hash=tok)]
                seeds.by_rpc["cotune.v1.Alignment/BuildSequenceAlignment"] = [
                    alignment_pb2.SequenceAlignmentRequest(src_hash=tok, dst_hash=tok, public_set_hash=public,
                                                           method=m, max_length=96) for m in ("offsets", "dtw")]
            else:  # the coordinator: a finished run to look at
                coordinator = cluster.coordinator_client()
                try:
                    wait_for_clients(coordinator, len(client_names), timeout_s=120)
                    run = coordinator.start_run(cpb.RunSpec(name="fuzz-seed", algorithm="zero-shot", rounds=1,
                                                            max_length=32, eval_max_samples=1, max_public_samples=1))
                    coordinator.cancel_run(run.run_id)
                    deadline = time.monotonic() + 120
                    while coordinator.get_run(run.run_id).state not in (3, 4, 5) and time.monotonic() < deadline:
                        time.sleep(0.2)
                finally:
                    coordinator.close()
                seeds.shas.append(run.run_id)
                seeds.by_rpc.update(_coordinator_seeds(cluster, run.run_id, client_names))
        finally:
            channel.close()
    return out


def _party_seeds(info, blob) -> dict[str, list]:
    from cotune.v1 import common_pb2
    from cotune.v1 import party_pb2 as p

    ref = blob.ref()
    missing = common_pb2.BlobRef(sha256="ab" * 32, size=10)
    tasks = [
        p.TaskRequest(train_local=p.TrainLocalTask(epochs=1, max_samples=1)),
        p.TaskRequest(public_logits=p.PublicLogitsTask(top_k=8, max_samples=1, max_length=32)),
        p.TaskRequest(distill=p.DistillTask(teachers=[p.TeacherShard(sender_id="llm", shard=ref)], ce_weight=0.5,
                                            epochs=1, selection="dualmince", max_samples=1, max_length=32)),
        p.TaskRequest(evaluate=p.EvaluateTask(max_samples=1)),
        p.TaskRequest(set_lora=p.SetLoraTask(adapter=ref)),
        p.TaskRequest(get_lora=p.GetLoraTask(tag=True)),
        p.TaskRequest(co_distill=p.CoDistillTask(slm_adapter=ref, kl_weight=1.0, epochs=1, max_samples=1,
                                                 max_length=32, top_k=8)),
        p.TaskRequest(compress=p.CompressTask(adapter_layers=1, drop=0.5)),
        p.TaskRequest(align_emulator=p.AlignEmulatorTask(adapter=missing, steps=0, max_length=32)),
        p.TaskRequest(load_model=p.LoadModelTask(model=ref)),
        p.TaskRequest(train_adapter=p.TrainAdapterTask(epochs=1, prox_eps=0.1, max_samples=1)),
    ]
    for i, t in enumerate(tasks):
        t.ctx.CopyFrom(p.RunContext(run_id="fuzz", round=0, task_key=f"t{i}" if i % 2 else "",
                                    public_set_hash=info.public_set_hash if i % 3 else ""))
    service = "LLMServer" if info.role == "llm" else "SLMClient"
    return {f"cotune.v1.{service}/Describe": [p.DescribeRequest()], f"cotune.v1.{service}/StartTask": tasks}


def _coordinator_seeds(cluster: LocalCluster, run_id: str, clients: list[str]) -> dict[str, list]:
    from cotune.v1 import coordinator_pb2 as c

    first = clients[0]
    return {
        "cotune.v1.Coordinator/RegisterClient": [
            c.RegisterClientRequest(client=c.ClientDescriptor(client_id=first, address=cluster.services[first].address,
                                                              labels={"zone": "a"})),
            c.RegisterClientRequest(client=c.ClientDescriptor(client_id="fuzz-new", address="127.0.0.1:1"))],
        "cotune.v1.Coordinator/DeregisterClient": [c.DeregisterClientRequest(client_id=n)
                                                   for n in ("fuzz-nobody", clients[-1])],
        "cotune.v1.Coordinator/ListClients": [c.ListClientsRequest()],
        "cotune.v1.Coordinator/StartRun": [
            c.StartRunRequest(spec=c.RunSpec(name="fuzz", algorithm="zero-shot", rounds=1, max_length=32,
                                             eval_max_samples=1, max_public_samples=1)),
            c.StartRunRequest(spec=c.RunSpec(name="fuzz", algorithm="fedmkt", rounds=1, clients=[first, first],
                                             max_length=32, fedmkt=c.FedMKTSpec(top_k=8, ce_weight=0.5))),
            c.StartRunRequest(spec=c.RunSpec(name="fuzz", algorithm="fedbiot", rounds=1, min_clients=5,
                                             fedbiot=c.FedBiOTSpec(drop=0.5, adapter_layers=1))),
            c.StartRunRequest(spec=c.RunSpec(name="fuzz", algorithm="fedavg", step_timeout_s=1.0,
                                             fedavg=c.FedAvgSpec(aggregation="factors")))],
        "cotune.v1.Coordinator/GetRun": [c.GetRunRequest(run_id=run_id)],
        "cotune.v1.Coordinator/WatchRun": [c.WatchRunRequest(run_id=run_id, after_seq=s) for s in (0, 1)],
        "cotune.v1.Coordinator/CancelRun": [c.CancelRunRequest(run_id=run_id)],
        "cotune.v1.Coordinator/ListRuns": [c.ListRunsRequest(limit=n) for n in (0, 5)],
    }


# --------------------------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class RpcStats:
    service: str
    rpc: str
    caller: str = ""
    calls: int = 0
    messages: int = 0          # request messages sent (a stream's elements each count)
    codes: Counter = field(default_factory=Counter)
    hangs: int = 0
    crashes: int = 0
    slow_rechecked: int = 0    # DEADLINE_EXCEEDED on a non-long-poll method, re-sent alone and answered in time
    log_bytes: int = 0         # the service's log growth while this RPC was fuzzed
    seconds: float = 0.0
    max_latency_s: float = 0.0
    started: int = 0           # runs or operations the fuzz started (and cancelled)
    decode_internal: int = 0   # INTERNAL from gRPC itself: a request that does not parse ("Exception deserializing")
    edge: int = 0              # refused by the guard before the handler ran (its messages start with the method)
    samples: dict = field(default_factory=dict)  # code -> one status message seen

    @property
    def failing(self) -> int:
        return sum(self.codes[c] for c in FAILING_CODES)

    def as_dict(self) -> dict:
        return {"service": self.service, "rpc": self.rpc, "caller": self.caller, "calls": self.calls,
                "messages": self.messages, "codes": dict(sorted(self.codes.items())), "hangs": self.hangs,
                "crashes": self.crashes, "internal": self.failing, "decode_internal": self.decode_internal,
                "refused_at_edge": self.edge,
                "slow_rechecked": self.slow_rechecked,
                "log_bytes": self.log_bytes, "log_bytes_per_message": round(self.log_bytes / max(1, self.messages), 1),
                "seconds": round(self.seconds, 2), "max_latency_s": round(self.max_latency_s, 2),
                "started_and_cancelled": self.started, "samples": self.samples}


@dataclass
class Outcome:
    code: str
    seconds: float
    details: str = ""
    responses: list = field(default_factory=list)


class Fuzzer:
    """Fuzz the RPCs of a running LocalCluster's services (see the module doc)."""

    def __init__(self, cluster: LocalCluster, seeds: dict[str, Seeds], *, count: int = 200, seed: int = 0,
                 workers: int = 8, repro_dir: Path | None = None, log=print):
        self.cluster = cluster
        self.seeds = seeds
        self.count = count
        self.seed = seed
        self.workers = workers
        self.repro_dir = repro_dir
        self.log = log
        self.reproducers: list[str] = []
        self._channels: dict[tuple[str, Identity], grpc.Channel] = {}
        self._lock = threading.Lock()
        self.started_ops: dict[str, set[str]] = {}
        self.started_runs: set[str] = set()

    def channel(self, service: str, identity: Identity) -> grpc.Channel:
        key = (service, identity)
        with self._lock:
            if key not in self._channels:
                self._channels[key] = make_channel(self.cluster.services[service].address,
                                                   self.cluster.credentials(identity),
                                                   peer=self.cluster.identity_of(service))
            return self._channels[key]

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    # -- one call ------------------------------------------------------------------------------------------------
    def call(self, service: str, rpc: Rpc, payloads, identity: Identity, deadline: float) -> Outcome:
        ch = self.channel(service, identity)
        started = time.monotonic()
        responses: list[bytes] = []
        try:
            if rpc.client_streaming and rpc.server_streaming:
                call = ch.stream_stream(rpc.path)(iter(payloads), timeout=deadline)
                responses = self._drain(call, rpc)
            elif rpc.client_streaming:
                responses = [ch.stream_unary(rpc.path)(iter(payloads), timeout=deadline)]
            elif rpc.server_streaming:
                call = ch.unary_stream(rpc.path)(payloads, timeout=deadline)
                responses = self._drain(call, rpc)
            else:
                responses = [ch.unary_unary(rpc.path)(payloads, timeout=deadline)]
            return Outcome("OK", time.monotonic() - started, responses=responses)
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() is not None else "UNKNOWN"
            return Outcome(code, time.monotonic() - started, (exc.details() or "")[:300], responses)

    @staticmethod
    def _drain(call, rpc: Rpc) -> list[bytes]:
        out = []
        for response in call:
            out.append(response)
            if rpc.key == "grpc.health.v1.Health/Watch" or len(out) >= MAX_STREAM_RESPONSES:
                call.cancel()  # a Watch streams until the status changes: its first answer is what counts
                break
        return out

    # -- cleanup of work the fuzz started --------------------------------------------------------------------------
    def _cancel_started(self, service: str, rpc: Rpc, outcome: Outcome) -> int:
        if outcome.code != "OK" or not outcome.responses:
            return 0
        from cotune.v1 import coordinator_pb2, operations_pb2

        method = rpc.key.rsplit("/", 1)[1]
        try:
            if method in ("StartTask", "BuildVocabMap", "BuildSequenceAlignment"):
                op = operations_pb2.Operation.FromString(outcome.responses[0])
                if op.state in (3, 4, 5):
                    return 0
                with self._lock:
                    self.started_ops.setdefault(service, set()).add(op.id)
                self.channel(service, COORDINATOR).unary_unary(
                    "/cotune.v1.Operations/CancelOperation")(operations_pb2.OperationId(id=op.id).SerializeToString(),
                                                             timeout=10)
                return 1
            if method == "StartRun":
                run = coordinator_pb2.Run.FromString(outcome.responses[0])
                with self._lock:
                    self.started_runs.add(run.run_id)
                self.channel(service, OPERATOR).unary_unary("/cotune.v1.Coordinator/CancelRun")(
                    coordinator_pb2.CancelRunRequest(run_id=run.run_id).SerializeToString(), timeout=10)
                return 1
        except grpc.RpcError as exc:
            self.log(f"  note: could not cancel work started by {rpc.name} on {service}: {exc.code().name}")
        return 0

    def cleanup(self, service: str) -> dict:
        """Cancel whatever fuzzed calls started on `service` (again), every unfinished run at the coordinator, and
        register the configured clients again if a fuzzed DeregisterClient removed them."""
        from cotune.v1 import coordinator_pb2, operations_pb2

        cancelled = 0
        for op_id in sorted(self.started_ops.get(service, ())):
            try:
                self.channel(service, COORDINATOR).unary_unary("/cotune.v1.Operations/CancelOperation")(
                    operations_pb2.OperationId(id=op_id).SerializeToString(), timeout=10)
                cancelled += 1
            except grpc.RpcError:
                pass
        reregistered = []
        if role_of(service) == "coordinator":
            client = self.cluster.coordinator_client()
            try:
                for run in client.list_runs(limit=10_000):
                    if run.state not in (coordinator_pb2.RUN_SUCCEEDED, coordinator_pb2.RUN_FAILED,
                                         coordinator_pb2.RUN_CANCELLED):
                        client.cancel_run(run.run_id)
                        cancelled += 1
                registered = {r.client.client_id: r.client.address for r in client.list_clients()}
                for name, svc in self.cluster.services.items():
                    if svc.kind == "slm" and registered.get(name) != svc.address:
                        for holder, address in registered.items():  # a fuzzed registration holding its address
                            if address == svc.address and holder != name:
                                client.deregister_client(holder)
                        client.register_client(name, svc.address)
                        reregistered.append(name)
                for holder in set(registered) - set(self.cluster.services):
                    client.deregister_client(holder)  # clients the fuzz registered
            finally:
                client.close()
        return {"cancelled": cancelled, "reregistered": reregistered}

    # -- one RPC ------------------------------------------------------------------------------------------------------
    def fuzz_rpc(self, service: str, rpc: Rpc) -> RpcStats:
        role = role_of(service)
        identity = caller_for(role, rpc.key)
        stats = RpcStats(service, rpc.name, str(identity))
        seeds = self.seeds[service].by_rpc.get(rpc.key, [])
        rng = random.Random(f"{self.seed}:{service}:{rpc.key}")
        fuzzer = MessageFuzzer(rng, shas=self.seeds[service].shas)
        cases = []
        for _ in range(self.count):
            if rpc.client_streaming:
                cases.append(fuzzer.stream(rpc.request, seeds))
            else:
                cases.append(fuzzer.payload(rpc.request, seeds))
        deadline = DEADLINES.get(rpc.key, DEFAULT_DEADLINE_S)
        workers = max(1, min(self.workers, CONCURRENCY.get(rpc.key, self.workers)))
        log_path = self.cluster.services[service].log_path
        log_before = _size(log_path)
        t0 = time.monotonic()

        def one(case):
            strategy, payloads = case
            outcome = self.call(service, rpc, payloads, identity, deadline)
            started = self._cancel_started(service, rpc, outcome)
            return strategy, payloads, outcome, started

        timed_out = []
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for strategy, payloads, outcome, started in pool.map(one, cases):
                stats.calls += 1
                stats.messages += len(payloads) if rpc.client_streaming else 1
                stats.codes[outcome.code] += 1
                stats.started += started
                stats.max_latency_s = max(stats.max_latency_s, outcome.seconds)
                stats.samples.setdefault(outcome.code, outcome.details[:160])
                stats.edge += outcome.code != "OK" and outcome.details.startswith(rpc.key + ":")
                if outcome.seconds > deadline + SLACK_S:
                    stats.hangs += 1
                    self._save(service, rpc, identity, strategy, payloads, outcome, "hang")
                if outcome.code in FAILING_CODES:
                    decode = outcome.code == "INTERNAL" and outcome.details == DECODE_FAILURE
                    stats.decode_internal += decode
                    if not decode:
                        stats.samples.setdefault(f"{outcome.code}/handler", outcome.details[:160])
                    self._save(service, rpc, identity, strategy, payloads, outcome,
                               "decode" if decode else outcome.code.lower())
                if outcome.code == "DEADLINE_EXCEEDED" and rpc.key not in LONG_POLLS:
                    timed_out.append((strategy, payloads))
        for strategy, payloads in timed_out[:20]:  # alone, with time to spare: still no answer is a hang
            outcome = self.call(service, rpc, payloads, identity, RECHECK_DEADLINE_S)
            self._cancel_started(service, rpc, outcome)
            if outcome.code == "DEADLINE_EXCEEDED":
                stats.hangs += 1
                self._save(service, rpc, identity, strategy, payloads, outcome, "hang")
            else:
                stats.slow_rechecked += 1
        stats.hangs += max(0, len(timed_out) - 20)  # not rechecked: counted as hangs, to be looked at
        stats.seconds = time.monotonic() - t0
        stats.log_bytes = _size(log_path) - log_before
        process = self.cluster.services[service].process
        if process is not None and process.poll() is not None:
            stats.crashes += 1
        return stats

    def probe(self, service: str, *, settle_s: float = 15.0) -> dict[str, str]:
        """After the fuzz: one valid seed to every RPC of `service`; the code each answers. A service still serving
        answers none with BAD_PROBE_CODES (a leaked worker or concurrency slot shows as RESOURCE_EXHAUSTED or
        DEADLINE_EXCEEDED). RESOURCE_EXHAUSTED is retried for `settle_s` while long polls the fuzz left end."""
        out = {}
        for rpc in rpcs_of(role_of(service)):
            seeds = self.seeds[service].by_rpc.get(rpc.key, [])
            seed = seeds[0] if seeds else ([rpc.request()] if rpc.client_streaming else rpc.request())
            payloads = [m.SerializeToString() for m in seed] if rpc.client_streaming else seed.SerializeToString()
            identity = caller_for(role_of(service), rpc.key)
            deadline = time.monotonic() + settle_s
            while True:
                outcome = self.call(service, rpc, payloads, identity, DEADLINES.get(rpc.key, DEFAULT_DEADLINE_S) + 5)
                if outcome.code != "RESOURCE_EXHAUSTED" or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            self._cancel_started(service, rpc, outcome)
            out[rpc.name] = outcome.code
        return out

    def fuzz_service(self, service: str) -> list[RpcStats]:
        out = []
        for rpc in rpcs_of(role_of(service)):
            stats = self.fuzz_rpc(service, rpc)
            out.append(stats)
            self.log(f"  {service:12s} {rpc.name:42s} {stats.calls:5d} calls {stats.seconds:6.1f}s "
                     f"{dict(stats.codes)}")
            if stats.crashes:
                self.log(f"  {service} died while {rpc.name} was fuzzed; stopping its fuzz")
                break
        return out

    def _save(self, service: str, rpc: Rpc, identity: Identity, strategy: str, payloads, outcome: Outcome,
              what: str) -> None:
        if self.repro_dir is None:
            return
        with self._lock:
            prefix = f"/{service}--{rpc.name.replace('/', '.')}--{what}-"
            mine = [p for p in self.reproducers if prefix in p]
            if len(mine) >= MAX_REPRODUCERS.get(what, DEFAULT_MAX_REPRODUCERS):
                return
            self.repro_dir.mkdir(parents=True, exist_ok=True)
            path = self.repro_dir / f"{service}--{rpc.name.replace('/', '.')}--{what}-{len(mine)}.json"
            self.reproducers.append(str(path))
        items = payloads if isinstance(payloads, list) else [payloads]
        path.write_text(json.dumps({
            "service": service, "rpc": rpc.key, "caller": str(identity), "strategy": strategy, "what": what,
            "stream": rpc.client_streaming, "code": outcome.code, "details": outcome.details,
            "seconds": round(outcome.seconds, 3), "payloads_b64": [base64.b64encode(p).decode() for p in items]},
            indent=1))


def replay(cluster: LocalCluster, reproducer: str | Path, *, deadline: float = RECHECK_DEADLINE_S) -> Outcome:
    """Send a saved reproducer again to the same service of `cluster` (as the same caller)."""
    case = json.loads(Path(reproducer).read_text())
    role = role_of(case["service"])
    rpc = next(r for r in rpcs_of(role) if r.key == case["rpc"])
    payloads = [base64.b64decode(p) for p in case["payloads_b64"]]
    fuzzer = Fuzzer(cluster, {}, count=0)
    try:
        return fuzzer.call(case["service"], rpc, payloads if case["stream"] else payloads[0],
                           Identity.parse(case["caller"]), deadline)
    finally:
        fuzzer.close()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# --------------------------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------------------------

def health(cluster: LocalCluster, service: str, *, timeout: float = 10.0) -> str:
    """The service's grpc.health.v1 status over its normal transport (mTLS as the operator), or the error code."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = make_channel(cluster.services[service].address, cluster.credentials(), peer=cluster.identity_of(service))
    try:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    except grpc.RpcError as exc:
        return exc.code().name
    finally:
        channel.close()


def snapshot(root: Path) -> set[str]:
    """Every file and directory under `root` (paths relative to it)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            out.add(os.path.normpath(os.path.join(rel, name)))
    return out


def allowed_roots(cluster: LocalCluster) -> list[Path]:
    """Where services may write: each one's workdir and model cache (from its config), and the logs."""
    import yaml

    roots = [cluster.workdir / "logs"]
    for svc in cluster.services.values():
        cfg = yaml.safe_load(svc.config_path.read_text())
        if cfg.get("workdir"):
            roots.append(Path(cfg["workdir"]).resolve())
        cache = (cfg.get("model") or {}).get("cache_dir")
        if cache:
            roots.append(Path(cache).resolve())
    return roots


_SHA_LIKE = re.compile(r"[0-9a-f]{64}")


def tmp_entries() -> set[str]:
    """Top-level names in /tmp that look like blob hashes or the fuzz's canary."""
    try:
        names = os.listdir("/tmp")
    except OSError:
        return set()
    return {n for n in names if _SHA_LIKE.search(n) or CANARY in n}


def stray_files(root: Path, before: set[str], after: set[str], allowed: list[Path]) -> list[str]:
    """Paths that appeared under `root` outside every allowed root."""
    stray = []
    for rel in sorted(after - before):
        path = (root / rel).resolve()
        if not any(path == a or a in path.parents for a in allowed):
            stray.append(str(path))
    return stray


# --------------------------------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------------------------------

CODE_ORDER = ["OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "PERMISSION_DENIED", "ALREADY_EXISTS",
              "RESOURCE_EXHAUSTED", "OUT_OF_RANGE", "UNAUTHENTICATED", "UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED",
              "UNIMPLEMENTED", "ABORTED", "DATA_LOSS", "INTERNAL", "UNKNOWN"]


def table(stats: list[RpcStats]) -> str:
    """A markdown table: service x RPC -> calls, messages, status codes, crashes, hangs, log bytes per message."""
    lines = ["| service | RPC | caller | calls | msgs | codes | refused at edge | INTERNAL/UNKNOWN (decode) | crashes "
             "| hangs | deadline (re-sent ok) "
             "| log B/msg | s |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in stats:
        codes = ", ".join(f"{c} {s.codes[c]}" for c in sorted(s.codes, key=lambda c: (CODE_ORDER + [c]).index(c)))
        d = s.as_dict()
        lines.append(f"| {s.service} | {s.rpc} | {s.caller} | {s.calls} | {s.messages} | {codes} | {s.edge} "
                     f"| {s.failing} ({s.decode_internal}) "
                     f"| {s.crashes} | {s.hangs} | {s.codes['DEADLINE_EXCEEDED']} ({s.slow_rechecked}) "
                     f"| {d['log_bytes_per_message']} | {s.seconds:.1f} |")
    return "\n".join(lines)


def summary(stats: list[RpcStats]) -> dict:
    """Per service: RPCs, calls, messages, crashes, hangs, INTERNAL/UNKNOWN, codes, log bytes per message."""
    out: dict[str, dict] = {}
    for s in stats:
        row = out.setdefault(s.service, {"rpcs": 0, "calls": 0, "messages": 0, "crashes": 0, "hangs": 0, "internal": 0,
                                         "decode_internal": 0, "codes": Counter(), "log_bytes": 0, "seconds": 0.0})
        row["rpcs"] += 1
        row["calls"] += s.calls
        row["messages"] += s.messages
        row["crashes"] += s.crashes
        row["hangs"] += s.hangs
        row["internal"] += s.failing
        row["decode_internal"] += s.decode_internal
        row["refused_at_edge"] = row.get("refused_at_edge", 0) + s.edge
        row["codes"].update(s.codes)
        row["log_bytes"] += s.log_bytes
        row["seconds"] += s.seconds
    for row in out.values():
        row["codes"] = dict(sorted(row["codes"].items()))
        row["refusals"] = {c: n for c, n in row["codes"].items() if c != "OK"}
        row["log_bytes_per_message"] = round(row["log_bytes"] / max(1, row["messages"]), 1)
        row["seconds"] = round(row["seconds"], 1)
    return out
