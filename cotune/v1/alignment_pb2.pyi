from cotune.v1 import common_pb2 as _common_pb2
from cotune.v1 import operations_pb2 as _operations_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterTokenizerRequest(_message.Message):
    __slots__ = ("bundle",)
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    bundle: _common_pb2.BlobRef
    def __init__(self, bundle: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ...) -> None: ...

class TokenizerInfo(_message.Message):
    __slots__ = ("tokenizer_hash", "vocab_size", "family")
    TOKENIZER_HASH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    tokenizer_hash: str
    vocab_size: int
    family: str
    def __init__(self, tokenizer_hash: _Optional[str] = ..., vocab_size: _Optional[int] = ..., family: _Optional[str] = ...) -> None: ...

class VocabMapRequest(_message.Message):
    __slots__ = ("src_hash", "dst_hash")
    SRC_HASH_FIELD_NUMBER: _ClassVar[int]
    DST_HASH_FIELD_NUMBER: _ClassVar[int]
    src_hash: str
    dst_hash: str
    def __init__(self, src_hash: _Optional[str] = ..., dst_hash: _Optional[str] = ...) -> None: ...

class SequenceAlignmentRequest(_message.Message):
    __slots__ = ("src_hash", "dst_hash", "public_set_hash", "method", "max_length")
    SRC_HASH_FIELD_NUMBER: _ClassVar[int]
    DST_HASH_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_SET_HASH_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    src_hash: str
    dst_hash: str
    public_set_hash: str
    method: str
    max_length: int
    def __init__(self, src_hash: _Optional[str] = ..., dst_hash: _Optional[str] = ..., public_set_hash: _Optional[str] = ..., method: _Optional[str] = ..., max_length: _Optional[int] = ...) -> None: ...
