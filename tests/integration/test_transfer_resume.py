"""Blob transfers that survive a killed process: real OS processes over loopback gRPC, SIGKILL mid-stream, resume.

The sender (push) or the serving process (pull) is SIGKILLed while a multi-chunk blob is streaming; a new process
(or the restarted server) resumes from the receiver's last confirmed offset, sending at most the remaining bytes
plus one chunk, and the stored blob's sha256 matches. Also: a corrupt upload from a real process stores nothing, and
the store's put/get/resume paths never hold more than a few chunks in memory whatever the blob size.
"""

from __future__ import annotations

import hashlib
import threading
import time
import tracemalloc

import grpc
import pytest

from cotune.rpc.channel import make_channel
from cotune.v1 import common_pb2, common_pb2_grpc
from cotune.wire.blobs import CHUNK_SIZE, BlobStore, pull_blob, push_blob
from tests.integration.blob_server import (
    BlobServer,
    client_result,
    read_progress,
    start_client,
)

pytestmark = pytest.mark.integration

BLOB_MIB = 40
SIZE = BLOB_MIB * CHUNK_SIZE + 12345  # multi-chunk, last chunk partial
DELAY = 0.01  # seconds per chunk on the side that gets killed: ~0.4 s of streaming, killed half way


def _random_chunks(size: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    left = size
    while left:
        n = min(CHUNK_SIZE, left)
        yield rng.bytes(n)
        left -= n


def _file_sha256(path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(CHUNK_SIZE)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(memoryview(buf)[:n])
    return digest.hexdigest()


def _partial_size(root, sha: str) -> int:
    try:
        return (root / "partial" / f"{sha}.part").stat().st_size
    except FileNotFoundError:
        return 0


def _wait_until(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def _settled_received(stub, sha: str) -> int:
    """The receiver's confirmed offset once it stops moving (a killed peer's last chunk may still be landing)."""
    last, since = -1, time.monotonic()
    while time.monotonic() - since < 0.3:
        now = stub.StatBlob(common_pb2.StatBlobRequest(sha256=sha), timeout=10).received
        if now != last:
            last, since = now, time.monotonic()
        time.sleep(0.02)
    return last


@pytest.fixture
def source(tmp_path):
    store = BlobStore(tmp_path / "sender")
    blob = store.put_stream(_random_chunks(SIZE, seed=4))
    return store, blob


def test_push_resumes_after_the_sending_process_is_killed(tmp_path, source):
    src, blob = source
    server = BlobServer(tmp_path / "receiver")
    channel = make_channel(server.address)
    stub = common_pb2_grpc.BlobStoreStub(channel)
    try:
        first = start_client("push", src.root, server.address, blob.sha256, chunk_delay=DELAY,
                             progress_file=tmp_path / "first.progress")
        _wait_until(lambda: _partial_size(server.root, blob.sha256) >= SIZE // 2 or first.poll() is not None,
                    what="half the blob at the receiver")
        first.kill()  # SIGKILL mid-stream
        first.wait()
        assert first.returncode == -9, "the first sender finished before it could be killed"
        confirmed = _settled_received(stub, blob.sha256)
        handed = read_progress(tmp_path / "first.progress")
        assert SIZE // 2 <= confirmed < SIZE
        assert handed >= confirmed  # what the killed sender had handed to gRPC; the rest was in flight

        resumed = client_result(start_client("push", src.root, server.address, blob.sha256), timeout=120)
        assert resumed["start_offset"] == confirmed  # resumed from the receiver's confirmed offset
        assert resumed["bytes"] == SIZE - confirmed
        assert resumed["bytes"] <= (SIZE - confirmed) + CHUNK_SIZE

        status = stub.StatBlob(common_pb2.StatBlobRequest(sha256=blob.sha256), timeout=10)
        assert status.complete and status.size == SIZE
        receiver = BlobStore(server.root)
        assert _file_sha256(receiver.path(blob.sha256)) == blob.sha256
        assert not list((server.root / "partial").iterdir())  # nothing partial left behind
        # the same blob again (another sender, many receivers): stored once, nothing resent
        again = client_result(start_client("push", src.root, server.address, blob.sha256), timeout=60)
        assert again["bytes"] == 0
    finally:
        channel.close()
        server.stop()


def test_pull_resumes_after_the_serving_process_is_killed_and_restarted(tmp_path, source):
    src, blob = source
    server = BlobServer(src.root, chunk_delay=DELAY)  # serves the sender's store, slowly
    dest = BlobStore(tmp_path / "puller")
    errors: list[BaseException] = []

    def pull_once(stub):
        try:
            pull_blob(stub, dest, blob.sha256, attempts=1)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors.append(exc)

    channel = make_channel(server.address)
    try:
        puller = threading.Thread(target=pull_once, args=(common_pb2_grpc.BlobStoreStub(channel),))
        puller.start()
        _wait_until(lambda: dest.received(blob.sha256) >= SIZE // 2 or not puller.is_alive(),
                    what="half the blob at the puller")
        server.kill()  # SIGKILL mid-stream
        puller.join(60)
        assert not puller.is_alive()
        assert errors and isinstance(errors[0], grpc.RpcError), errors
        assert errors[0].code() == grpc.StatusCode.UNAVAILABLE
        confirmed = dest.received(blob.sha256)
        assert SIZE // 2 <= confirmed < SIZE and not dest.has(blob.sha256)
        channel.close()

        server.restart(chunk_delay=0.0)  # same store, same port, a new process
        channel = make_channel(server.address)
        got = pull_blob(common_pb2_grpc.BlobStoreStub(channel), dest, blob.sha256)
        assert got == SIZE - confirmed  # resumed from the receiver's own offset
        assert got <= (SIZE - confirmed) + CHUNK_SIZE
        assert dest.has(blob.sha256) and _file_sha256(dest.path(blob.sha256)) == blob.sha256
        assert not list((dest.root / "partial").iterdir())
    finally:
        channel.close()
        server.stop()


def test_one_pull_call_rides_out_a_server_restart(tmp_path, source):
    """The retries inside pull_blob resume by themselves once the killed server is back on its port."""
    src, blob = source
    server = BlobServer(src.root, chunk_delay=DELAY)
    dest = BlobStore(tmp_path / "puller")
    result: dict = {}

    def pull(stub):
        try:
            result["bytes"] = pull_blob(stub, dest, blob.sha256, attempts=8)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            result["error"] = exc

    channel = make_channel(server.address)
    try:
        puller = threading.Thread(target=pull, args=(common_pb2_grpc.BlobStoreStub(channel),))
        puller.start()
        _wait_until(lambda: dest.received(blob.sha256) >= SIZE // 2 or not puller.is_alive(),
                    what="half the blob at the puller")
        server.kill()
        confirmed = dest.received(blob.sha256)
        server.restart(chunk_delay=0.0)
        puller.join(60)
        assert "error" not in result, result
        assert result["bytes"] == SIZE  # every byte arrived once: the second stream started at the confirmed offset
        assert SIZE // 2 <= confirmed < SIZE
        assert _file_sha256(dest.path(blob.sha256)) == blob.sha256
    finally:
        channel.close()
        server.stop()


def test_corrupt_upload_from_a_real_process_is_rejected_with_nothing_stored(tmp_path):
    server = BlobServer(tmp_path / "receiver")
    channel = make_channel(server.address)
    stub = common_pb2_grpc.BlobStoreStub(channel)
    try:
        data = bytearray(b"".join(_random_chunks(3 * CHUNK_SIZE + 7, seed=5)))
        declared = hashlib.sha256(data).hexdigest()
        data[-1] ^= 0xFF  # one flipped bit pattern in the last chunk
        chunks = [common_pb2.Chunk(sha256=declared, offset=o, data=bytes(data[o:o + CHUNK_SIZE]), total_size=len(data))
                  for o in range(0, len(data), CHUNK_SIZE)]
        with pytest.raises(grpc.RpcError) as err:
            stub.PutBlob(iter(chunks), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "nothing was stored" in err.value.details()
        status = stub.StatBlob(common_pb2.StatBlobRequest(sha256=declared), timeout=10)
        assert not status.complete and status.received == 0
        assert not list((server.root / "partial").iterdir())
        assert not list((server.root / "objects").rglob("*"))
        # the receiver is not poisoned: the right bytes under the same id go through afterwards
        data[-1] ^= 0xFF
        good = BlobStore(tmp_path / "sender")
        assert good.put_bytes(bytes(data)).sha256 == declared
        assert push_blob(stub, good, declared) == len(data)
        assert _file_sha256(BlobStore(server.root).path(declared)) == declared
    finally:
        channel.close()
        server.stop()


def test_store_paths_hold_a_few_chunks_at_most(tmp_path):
    """put_stream, write_chunk (with a resume after a 'restart'), iter_chunks: the peak of Python allocations stays
    at a few chunks for a 64 MiB blob (the whole blob is never in memory)."""
    n_chunks = 64
    tracemalloc.start()
    try:
        src = BlobStore(tmp_path / "a")
        blob = src.put_stream(_random_chunks(n_chunks * CHUNK_SIZE, seed=6))
        dst = BlobStore(tmp_path / "b")
        for i, chunk in enumerate(src.iter_chunks(blob.sha256)):
            if i == n_chunks // 2:
                dst = BlobStore(tmp_path / "b")  # a restarted receiver: the running hash is rebuilt from disk
            dst.write_chunk(blob.sha256, i * CHUNK_SIZE, chunk, blob.size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert dst.has(blob.sha256) and _file_sha256(dst.path(blob.sha256)) == blob.sha256
    assert peak < 6 * CHUNK_SIZE, f"peak {peak / CHUNK_SIZE:.1f} MiB of Python allocations for a 64 MiB blob"
