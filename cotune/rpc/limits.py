"""Size limits on every message a service receives, checked at the edge before any handler sees it.

`check_message(msg)` walks a protobuf message (nested messages, repeated fields, maps and oneofs; a
`google.protobuf.Any` is left alone) and raises InvalidInput naming the field path and the limit it broke. The server
interceptor calls it on every unary request and every streamed chunk, so handlers can take sizes for granted and
nothing unbounded reaches logs, tables or error messages. Limits are per field: the defaults below, and an override
table keyed by "Message.field" for fields that legitimately need more (or deserve less). Legitimate use stays far
below every limit; they exist to refuse garbage cheaply.
"""

from __future__ import annotations

import re

from google.protobuf.descriptor import FieldDescriptor

from cotune.errors import InvalidInput, clip

# -- the limits -------------------------------------------------------------------------------------------------------
CHARS = 512          # characters of a string (each element of a repeated string, each map value)
BYTES = 64 << 10     # bytes of a bytes field
ITEMS = 4096         # elements of a repeated field, entries of a map
KEY_CHARS = 128      # characters of a map key
MAX_DEPTH = 16       # nested messages below the top-level one
ID = 128             # ids and content hashes: uuids, DNS-label names, sha256 hex (64) all fit with room to spare
MANY = 100_000       # response collections that grow with clients x rounds (only if a response is ever checked)
TEXT = 64 << 10      # free text written by services (errors, notes): control characters allowed

# "Message.field" -> overrides of the defaults: chars, bytes (None = bounded only by the message size), items, key
# (map key chars), text (True: free text, control characters allowed; otherwise \t and \n are the only ones).
OVERRIDES: dict[str, dict] = {
    # requests
    "Chunk.data": {"bytes": None},                  # blob chunks: the store enforces its 1 MiB chunk limit itself
    "Tensor.data": {"bytes": None},                 # dense tensors are as large as the message size allows
    "RunSpec.clients": {"items": 10_000, "chars": ID},  # a run may name every client; 10k clients is the scale target
    "ClientDescriptor.labels": {"items": 32, "key": 63, "chars": 256},  # labels as in Kubernetes: few, short keys
    "ClientDescriptor.address": {"chars": 300},     # host:port: a DNS name is at most 253 characters
    **{f: {"chars": ID} for f in (                  # ids and hashes
        "ClientDescriptor.client_id", "RunContext.run_id", "RunContext.public_set_hash", "RunSpec.public_set_hash",
        "GetRunRequest.run_id", "WatchRunRequest.run_id", "CancelRunRequest.run_id", "OperationId.id",
        "WaitOperationRequest.id", "TeacherShard.sender_id", "BlobRef.sha256", "Chunk.sha256", "GetBlobRequest.sha256",
        "StatBlobRequest.sha256", "VocabMapRequest.src_hash", "VocabMapRequest.dst_hash",
        "SequenceAlignmentRequest.src_hash", "SequenceAlignmentRequest.dst_hash",
        "SequenceAlignmentRequest.public_set_hash")},
    # responses: larger collections and free text
    **{f: {"items": MANY} for f in ("ListClientsResponse.clients", "RoundRecord.parties", "RoundRecord.dropped",
                                    "RoundRecord.artifacts", "Run.rounds", "ListRunsResponse.runs")},
    **{f: {"chars": TEXT, "text": True} for f in ("Run.error", "RunEvent.message", "Progress.message",
                                                  "Operation.error_message", "Operation.info")},
    "RoundRecord.notes": {"items": MANY, "chars": TEXT, "text": True},  # one note per dropped client and round
}

# Control characters refused outside free text: C0 but \t and \n, DEL, C1, line/paragraph separators and the bidi
# overrides and isolates (they would reorder or forge log lines and table cells).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

# -- the checker ------------------------------------------------------------------------------------------------------
_STR, _BYTES, _MSG, _ANY, _SCALAR = range(5)


class _Rule:
    __slots__ = ("bytes", "chars", "items", "key", "kind", "map", "name", "repeated", "text")

    def __init__(self, field: FieldDescriptor):
        over = OVERRIDES.get(f"{field.containing_type.name}.{field.name}", {})
        self.name = field.name
        self.repeated = field.is_repeated
        self.map = field.message_type is not None and field.message_type.GetOptions().map_entry
        value = field.message_type.fields_by_name["value"] if self.map else field
        self.kind = _kind(value)
        self.chars = over.get("chars", CHARS)
        self.bytes = over.get("bytes", BYTES)
        self.items = over.get("items", ITEMS)
        self.key = over.get("key", KEY_CHARS)
        self.text = over.get("text", False)


def _kind(field: FieldDescriptor) -> int:
    if field.type == FieldDescriptor.TYPE_STRING:
        return _STR
    if field.type == FieldDescriptor.TYPE_BYTES:
        return _BYTES
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _ANY if field.message_type.full_name == "google.protobuf.Any" else _MSG
    return _SCALAR


_RULES: dict[FieldDescriptor, _Rule] = {}


def check_message(msg, *, where: str = "") -> None:
    """Raise InvalidInput if any field of `msg` breaks its limit; the message names the field path and the limit."""
    try:
        _walk(msg, "", 0)
    except InvalidInput as exc:
        if where:
            raise InvalidInput(f"{where}: {exc}") from None
        raise


def _str(s: str, path: str, rule: _Rule, limit: int) -> None:
    if len(s) > limit:
        raise InvalidInput(f"{path} is {len(s)} characters long, more than the {limit} allowed")
    if not rule.text and _CONTROL.search(s):
        raise InvalidInput(f"{path} contains a control character ({clip(s, 40)}); only tab and newline are allowed")


def _bytes(b: bytes, path: str, rule: _Rule) -> None:
    if rule.bytes is not None and len(b) > rule.bytes:
        raise InvalidInput(f"{path} is {len(b)} bytes, more than the {rule.bytes} allowed")


def _walk(msg, prefix: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InvalidInput(f"{prefix.rstrip('.') or 'the message'} nests messages more than {MAX_DEPTH} deep")
    for field, value in msg.ListFields():
        rule = _RULES.get(field)
        if rule is None:
            rule = _RULES[field] = _Rule(field)
        kind = rule.kind
        if rule.map:
            path = prefix + rule.name
            if len(value) > rule.items:
                raise InvalidInput(f"{path} has {len(value)} entries, more than the {rule.items} allowed")
            for key, item in value.items():
                if isinstance(key, str):
                    if len(key) > rule.key:
                        raise InvalidInput(f"{path} has a key of {len(key)} characters, "
                                           f"more than the {rule.key} allowed")
                    if _CONTROL.search(key):
                        raise InvalidInput(f"{path} has a key with a control character ({clip(key, 40)})")
                if kind == _STR:
                    _str(item, f"{path}[{clip(key, 40)}]", rule, rule.chars)
                elif kind == _MSG:
                    _walk(item, f"{path}[{clip(key, 40)}].", depth + 1)
                elif kind == _BYTES:
                    _bytes(item, f"{path}[{clip(key, 40)}]", rule)
        elif rule.repeated:
            if len(value) > rule.items:
                raise InvalidInput(f"{prefix}{rule.name} has {len(value)} elements, more than the {rule.items} allowed")
            if kind == _STR:  # fast path: one pass over all elements, the element is found only on failure
                if max(map(len, value)) > rule.chars or (not rule.text and _CONTROL.search("".join(value))):
                    for i, s in enumerate(value):
                        _str(s, f"{prefix}{rule.name}[{i}]", rule, rule.chars)
            elif kind == _MSG:
                for i, item in enumerate(value):
                    _walk(item, f"{prefix}{rule.name}[{i}].", depth + 1)
            elif kind == _BYTES:
                for i, b in enumerate(value):
                    _bytes(b, f"{prefix}{rule.name}[{i}]", rule)
        elif kind == _STR:
            _str(value, prefix + rule.name, rule, rule.chars)
        elif kind == _MSG:
            _walk(value, f"{prefix}{rule.name}.", depth + 1)
        elif kind == _BYTES:
            _bytes(value, prefix + rule.name, rule)


def describe_limits() -> str:
    """The limits as markdown table rows (for the README)."""
    rows = ["| field | limit |", "|---|---|",
            f"| any string | {CHARS} characters; no control characters but tab and newline |",
            f"| any bytes field | {BYTES // 1024} KiB |", f"| any repeated field or map | {ITEMS} entries |",
            f"| any map key | {KEY_CHARS} characters |", f"| message nesting | {MAX_DEPTH} levels |"]
    for name, over in OVERRIDES.items():
        parts = []
        if "items" in over:
            parts.append(f"{over['items']} entries")
        if "key" in over:
            parts.append(f"keys {over['key']} characters")
        if "chars" in over:
            parts.append(f"{over['chars']} characters" + (" (free text)" if over.get("text") else ""))
        if "bytes" in over:
            parts.append("bounded by the message size" if over["bytes"] is None else f"{over['bytes']} bytes")
        rows.append(f"| `{name}` | {', '.join(parts)} |")
    return "\n".join(rows)
