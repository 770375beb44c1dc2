"""Content-addressed blob storage on disk and resumable chunked transfer over gRPC.

Every service has one `BlobStore`. A blob is identified by the sha256 of its bytes; it is published only
after the whole content has been received and its hash verified, so a reader never sees a partial or
corrupt blob and the same content sent to many receivers is stored once. Transfers move chunks of at most
1 MiB, in order; an interrupted transfer resumes from the last byte the receiver confirmed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from cotune.rpc.errors import InvalidInput, NotFound, Precondition, rpc_method
from cotune.v1 import common_pb2, common_pb2_grpc

CHUNK_SIZE = 1 << 20
DEFAULT_MAX_BLOB_BYTES = 64 << 30
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not _SHA_RE.match(sha):
        raise InvalidInput(f"blob id must be 64 lowercase hex characters (a sha256), got {sha!r:.80}")
    return sha


@dataclass(frozen=True)
class Blob:
    sha256: str
    size: int
    media_type: str = ""

    def ref(self) -> common_pb2.BlobRef:
        return common_pb2.BlobRef(sha256=self.sha256, size=self.size, media_type=self.media_type)

    @classmethod
    def from_ref(cls, ref: common_pb2.BlobRef) -> "Blob":
        return cls(check_sha(ref.sha256), int(ref.size), ref.media_type)


class BlobStore:
    def __init__(self, root: str | Path, *, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES):
        self.root = Path(root)
        self.max_blob_bytes = max_blob_bytes
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "partial").mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- paths and locks -------------------------------------------------------------------------------------
    def path(self, sha: str) -> Path:
        check_sha(sha)
        return self.root / "objects" / sha[:2] / sha

    def _partial(self, sha: str) -> Path:
        return self.root / "partial" / f"{sha}.part"

    def _meta_path(self, sha: str) -> Path:
        return self.root / "partial" / f"{sha}.json"

    def _lock(self, sha: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(sha, threading.Lock())

    # -- complete blobs --------------------------------------------------------------------------------------
    def has(self, sha: str) -> bool:
        return self.path(sha).exists()

    def stat(self, sha: str) -> Blob:
        path = self.path(sha)
        if not path.exists():
            raise NotFound(f"no blob {sha} in this store")
        media = path.with_suffix(".type")
        return Blob(sha, path.stat().st_size, media.read_text() if media.exists() else "")

    def put_bytes(self, data: bytes, media_type: str = "") -> Blob:
        sha = sha256_hex(data)
        with self._lock(sha):
            path = self.path(sha)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
                tmp.write_bytes(data)
                if media_type:
                    path.with_suffix(".type").write_text(media_type)
                os.replace(tmp, path)
        return Blob(sha, len(data), media_type)

    def read_bytes(self, sha: str, *, max_bytes: int | None = None) -> bytes:
        blob = self.stat(sha)
        if max_bytes is not None and blob.size > max_bytes:
            raise InvalidInput(f"blob {sha} is {blob.size} bytes, more than the {max_bytes} allowed here")
        return self.path(sha).read_bytes()

    def iter_chunks(self, sha: str, offset: int = 0, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        blob = self.stat(sha)
        if offset < 0 or offset > blob.size:
            raise InvalidInput(f"offset {offset} is outside blob {sha} of {blob.size} bytes")
        with open(self.path(sha), "rb") as f:
            f.seek(offset)
            while chunk := f.read(chunk_size):
                yield chunk

    # -- partial (resumable) writes --------------------------------------------------------------------------
    def received(self, sha: str) -> int:
        if self.has(sha):
            return self.stat(sha).size
        part = self._partial(check_sha(sha))
        return part.stat().st_size if part.exists() else 0

    def write_chunk(self, sha: str, offset: int, data: bytes, total_size: int, media_type: str = "") -> Blob | None:
        """Append one chunk at `offset` (which must equal what is already received). Returns the Blob once the
        last chunk has arrived and the hash verified; raises InvalidInput (and discards the partial) on a
        hash mismatch."""
        check_sha(sha)
        if len(data) > CHUNK_SIZE:
            raise InvalidInput(f"chunk of {len(data)} bytes exceeds the {CHUNK_SIZE}-byte chunk limit")
        if total_size < 0 or total_size > self.max_blob_bytes:
            raise InvalidInput(f"blob size {total_size} is outside 0..{self.max_blob_bytes}")
        with self._lock(sha):
            if self.has(sha):
                return self.stat(sha)
            part = self._partial(sha)
            meta_path = self._meta_path(sha)
            have = part.stat().st_size if part.exists() else 0
            if have and meta_path.exists():
                meta = json.loads(meta_path.read_text())
                if meta["total_size"] != total_size:
                    raise InvalidInput(f"blob {sha}: total size {total_size} differs from the {meta['total_size']} of the transfer in progress")
            if offset != have:
                raise Precondition(f"blob {sha}: chunk offset {offset} but {have} bytes are confirmed; resume from {have}")
            if offset + len(data) > total_size:
                raise InvalidInput(f"blob {sha}: chunk ends at {offset + len(data)}, beyond the declared size {total_size}")
            if not have:
                meta_path.write_text(json.dumps({"total_size": total_size, "media_type": media_type, "started": time.time()}))
            with open(part, "ab") as f:
                f.write(data)
            if offset + len(data) < total_size:
                return None
            return self._publish(sha, part, meta_path)

    def _publish(self, sha: str, part: Path, meta_path: Path) -> Blob:
        digest = hashlib.sha256()
        with open(part, "rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                digest.update(chunk)
        if digest.hexdigest() != sha:
            part.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            raise InvalidInput(f"blob content hashes to {digest.hexdigest()}, not the declared {sha}; nothing was stored")
        media_type = json.loads(meta_path.read_text()).get("media_type", "") if meta_path.exists() else ""
        path = self.path(sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        if media_type:
            path.with_suffix(".type").write_text(media_type)
        os.replace(part, path)
        meta_path.unlink(missing_ok=True)
        return Blob(sha, path.stat().st_size, media_type)


# ---------------------------------------------------------------------------------------------------------------
# gRPC service and client helpers


class BlobStoreServicer(common_pb2_grpc.BlobStoreServicer):
    def __init__(self, store: BlobStore):
        self.store = store

    def _status(self, sha: str) -> common_pb2.BlobStatus:
        if self.store.has(sha):
            blob = self.store.stat(sha)
            return common_pb2.BlobStatus(sha256=sha, complete=True, size=blob.size, received=blob.size, media_type=blob.media_type)
        return common_pb2.BlobStatus(sha256=sha, complete=False, received=self.store.received(sha))

    @rpc_method
    def PutBlob(self, request_iterator, context):
        sha = None
        for chunk in request_iterator:
            if sha is None:
                sha = check_sha(chunk.sha256)
            elif chunk.sha256 != sha:
                raise InvalidInput("all chunks of one PutBlob stream must carry the same sha256")
            if self.store.write_chunk(sha, chunk.offset, chunk.data, chunk.total_size, chunk.media_type) is not None:
                break
        if sha is None:
            raise InvalidInput("PutBlob stream carried no chunks")
        return self._status(sha)

    @rpc_method
    def GetBlob(self, request, context):
        sha = check_sha(request.sha256)
        blob = self.store.stat(sha)
        offset = request.offset
        for data in self.store.iter_chunks(sha, offset):
            yield common_pb2.Chunk(sha256=sha, offset=offset, data=data, total_size=blob.size, media_type=blob.media_type)
            offset += len(data)

    @rpc_method
    def StatBlob(self, request, context):
        return self._status(check_sha(request.sha256))


def _chunk_stream(source: BlobStore, blob: Blob, offset: int, counter: list[int]) -> Iterator[common_pb2.Chunk]:
    for data in source.iter_chunks(blob.sha256, offset):
        yield common_pb2.Chunk(sha256=blob.sha256, offset=offset, data=data, total_size=blob.size, media_type=blob.media_type)
        offset += len(data)
        counter[0] += len(data)


_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
              grpc.StatusCode.FAILED_PRECONDITION)


def push_blob(stub: common_pb2_grpc.BlobStoreStub, source: BlobStore, sha: str, *, timeout: float = 600.0,
              attempts: int = 5) -> int:
    """Make sure the remote store holds blob `sha` from `source`, resuming from the remote's confirmed offset.
    Returns the bytes sent (0 when the remote already had it)."""
    blob = source.stat(sha)
    sent = [0]
    for attempt in range(attempts):
        try:
            status = stub.StatBlob(common_pb2.StatBlobRequest(sha256=sha), timeout=30)
            if not status.complete:
                status = stub.PutBlob(_chunk_stream(source, blob, status.received, sent), timeout=timeout)
            if status.complete:
                return sent[0]
        except grpc.RpcError as exc:
            if exc.code() not in _RESUMABLE or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise Precondition(f"blob {sha} could not be delivered after {attempts} attempts")


def pull_blob(stub: common_pb2_grpc.BlobStoreStub, dest: BlobStore, sha: str, *, timeout: float = 600.0,
              attempts: int = 5) -> int:
    """Fetch blob `sha` from a remote store into `dest`, resuming from what `dest` already has. Returns bytes received."""
    check_sha(sha)
    received = 0
    for attempt in range(attempts):
        if dest.has(sha):
            return received
        try:
            offset = dest.received(sha)
            for chunk in stub.GetBlob(common_pb2.GetBlobRequest(sha256=sha, offset=offset), timeout=timeout):
                if chunk.sha256 != sha:
                    raise InvalidInput(f"remote sent chunks of blob {chunk.sha256!r:.70} when {sha} was asked for")
                dest.write_chunk(sha, chunk.offset, chunk.data, chunk.total_size, chunk.media_type)
                received += len(chunk.data)
            if dest.has(sha):
                return received
        except grpc.RpcError as exc:
            if exc.code() not in _RESUMABLE or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise Precondition(f"blob {sha} could not be fetched after {attempts} attempts")
