import hashlib
import os
import time
from concurrent import futures

import grpc
import pytest

from cotune.errors import InvalidInput, Precondition, ResourceExhausted
from cotune.v1 import common_pb2, common_pb2_grpc
from cotune.wire.blobs import CHUNK_SIZE, BlobStore, BlobStoreServicer, pull_blob, push_blob


def test_put_and_read_is_content_addressed(tmp_path):
    store = BlobStore(tmp_path)
    a = store.put_bytes(b"hello", "text/plain")
    b = store.put_bytes(b"hello")
    assert a.sha256 == b.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert store.read_bytes(a.sha256) == b"hello"
    assert len(list((tmp_path / "objects").rglob("*" + a.sha256))) == 1  # stored once


def test_chunked_write_resumes_and_verifies(tmp_path):
    store = BlobStore(tmp_path)
    data = os.urandom(CHUNK_SIZE * 2 + 123)
    sha = hashlib.sha256(data).hexdigest()
    assert store.write_chunk(sha, 0, data[:CHUNK_SIZE], len(data)) is None
    assert store.received(sha) == CHUNK_SIZE
    with pytest.raises(Precondition, match=f"resume from {CHUNK_SIZE}"):
        store.write_chunk(sha, 0, data[:CHUNK_SIZE], len(data))  # a replayed chunk is refused, not duplicated
    store.write_chunk(sha, CHUNK_SIZE, data[CHUNK_SIZE : 2 * CHUNK_SIZE], len(data))
    blob = store.write_chunk(sha, 2 * CHUNK_SIZE, data[2 * CHUNK_SIZE :], len(data))
    assert blob is not None and store.read_bytes(sha) == data


def test_hash_mismatch_stores_nothing(tmp_path):
    store = BlobStore(tmp_path)
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(InvalidInput, match="nothing was stored"):
        store.write_chunk(wrong, 0, b"payload", 7)
    assert not store.has(wrong) and store.received(wrong) == 0


def test_oversized_chunk_and_bad_ids_are_rejected(tmp_path):
    store = BlobStore(tmp_path)
    with pytest.raises(InvalidInput):
        store.write_chunk("0" * 64, 0, b"x" * (CHUNK_SIZE + 1), CHUNK_SIZE + 1)
    with pytest.raises(InvalidInput, match="sha256"):
        store.has("../../etc/passwd")


@pytest.fixture
def remote_store(tmp_path):
    yield from _serve(BlobStore(tmp_path / "remote"))


def _serve(store):
    server = grpc.server(futures.ThreadPoolExecutor(4))
    common_pb2_grpc.add_BlobStoreServicer_to_server(BlobStoreServicer(store), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield store, common_pb2_grpc.BlobStoreStub(channel)
    channel.close()
    server.stop(0)


def test_push_and_pull_over_grpc(tmp_path, remote_store):
    remote, stub = remote_store
    local = BlobStore(tmp_path / "local")
    data = os.urandom(CHUNK_SIZE * 3 + 5)
    blob = local.put_bytes(data)
    assert push_blob(stub, local, blob.sha256) == len(data)
    assert push_blob(stub, local, blob.sha256) == 0  # already there: nothing resent
    assert remote.read_bytes(blob.sha256) == data
    other = BlobStore(tmp_path / "other")
    assert pull_blob(stub, other, blob.sha256) == len(data)
    assert other.read_bytes(blob.sha256) == data


def test_push_resumes_from_confirmed_offset(tmp_path, remote_store):
    remote, stub = remote_store
    local = BlobStore(tmp_path / "local")
    data = os.urandom(CHUNK_SIZE * 3)
    blob = local.put_bytes(data)
    remote.write_chunk(blob.sha256, 0, data[:CHUNK_SIZE], len(data))  # an earlier transfer broke after one chunk
    assert push_blob(stub, local, blob.sha256) == 2 * CHUNK_SIZE
    assert remote.read_bytes(blob.sha256) == data


def test_put_blob_with_wrong_hash_is_invalid_argument(remote_store):
    remote, stub = remote_store
    wrong = hashlib.sha256(b"declared").hexdigest()
    chunk = common_pb2.Chunk(sha256=wrong, offset=0, data=b"actual", total_size=6)
    with pytest.raises(grpc.RpcError) as err:
        stub.PutBlob(iter([chunk]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not stub.StatBlob(common_pb2.StatBlobRequest(sha256=wrong)).complete
    assert remote.received(wrong) == 0


def test_serialized_artifacts_are_byte_identical_across_calls():
    # safetensors' own writer orders __metadata__ by hash map: bytes (and content ids) would change per call
    import numpy as np
    import torch

    from cotune.align.seqalign import SequenceAlignment
    from cotune.lm.lora import lora_from_bytes, lora_to_bytes

    sd = {"b.lora_B.weight": torch.zeros(4, 2), "a.lora_A.weight": torch.randn(2, 4)}
    assert len({lora_to_bytes(sd) for _ in range(20)}) == 1
    assert torch.equal(lora_from_bytes(lora_to_bytes(sd))["a.lora_A.weight"], sd["a.lora_A.weight"])
    aligned = SequenceAlignment(np.array([0, 2], np.int64), np.array([1, 2], np.int32), np.array([3, 4], np.int32),
                                "s" * 64, "d" * 64, "p" * 64, "offsets")
    assert len({aligned.to_bytes() for _ in range(20)}) == 1
    assert SequenceAlignment.from_bytes(aligned.to_bytes()).pairs(0)[1].tolist() == [3, 4]


def test_push_counts_every_byte_of_a_single_chunk_blob(tmp_path, remote_store):
    # the receiver completes the blob on the last chunk and returns; bytes must be counted before the yield
    remote, stub = remote_store
    local = BlobStore(tmp_path / "local")
    blob = local.put_bytes(os.urandom(1000))
    assert push_blob(stub, local, blob.sha256) == 1000


def _files(root) -> list[str]:
    return sorted(p.name for p in (root / "partial").iterdir())


def test_stale_partials_expire_on_a_later_write(tmp_path):
    store = BlobStore(tmp_path, partial_ttl_s=0.2)
    stale, fresh = os.urandom(CHUNK_SIZE + 1), os.urandom(CHUNK_SIZE + 2)
    stale_sha, fresh_sha = hashlib.sha256(stale).hexdigest(), hashlib.sha256(fresh).hexdigest()
    store.write_chunk(stale_sha, 0, stale[:CHUNK_SIZE], len(stale))
    (tmp_path / "partial" / "stream-1-2-3.tmp").write_bytes(b"left by a crashed put_stream")
    old = time.time() - 10
    for name in (f"{stale_sha}.part", f"{stale_sha}.json", "stream-1-2-3.tmp"):
        os.utime(tmp_path / "partial" / name, (old, old))
    store = BlobStore(tmp_path, partial_ttl_s=0.2)  # a restart: the scan accounts for what is on disk
    assert store.usage() == len(stale) + len(b"left by a crashed put_stream")
    store.write_chunk(fresh_sha, 0, fresh[:CHUNK_SIZE], len(fresh))  # the write's sweep removes the stale ones
    assert _files(tmp_path) == [f"{fresh_sha}.json", f"{fresh_sha}.part"]
    assert store.received(stale_sha) == 0 and store.usage() == len(fresh)
    time.sleep(0.25)
    assert store.put_bytes(b"other") and _files(tmp_path) == []  # the fresh partial went stale in turn
    assert store.usage() == len(b"other")
    with pytest.raises(Precondition, match="resume from 0"):  # a sender coming back after the TTL starts over
        store.write_chunk(fresh_sha, CHUNK_SIZE, fresh[CHUNK_SIZE:], len(fresh))


def test_sweeps_run_at_most_once_a_minute(tmp_path):
    store = BlobStore(tmp_path, partial_ttl_s=3600)
    assert store.sweep() == 0  # the first write's sweep
    (tmp_path / "partial" / "stream-1-2-3.tmp").write_bytes(b"x")
    os.utime(tmp_path / "partial" / "stream-1-2-3.tmp", (0, 0))
    assert store.sweep() == 0 and store.sweep(force=True) == 1


def test_quota_refuses_a_write_and_changes_nothing(tmp_path):
    store = BlobStore(tmp_path, quota_bytes=3 * CHUNK_SIZE)
    store.put_bytes(os.urandom(CHUNK_SIZE))
    big = os.urandom(2 * CHUNK_SIZE + 1)
    sha = hashlib.sha256(big).hexdigest()
    refusal = r"2\.00 MiB more .* quota of 3\.00 MiB \(1\.00 MiB in use\).*blob_quota_gib"
    with pytest.raises(ResourceExhausted, match=refusal) as err:
        store.write_chunk(sha, 0, big[:CHUNK_SIZE], len(big))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _files(tmp_path) == [] and store.received(sha) == 0 and store.usage() == CHUNK_SIZE
    with pytest.raises(ResourceExhausted):
        store.put_stream(iter([big[:CHUNK_SIZE], big[CHUNK_SIZE:]]))
    with pytest.raises(ResourceExhausted):
        store.put_bytes(big)
    assert _files(tmp_path) == [] and store.usage() == CHUNK_SIZE
    assert store.put_bytes(big[:CHUNK_SIZE]) and store.usage() == 2 * CHUNK_SIZE  # what fits is still stored


def test_a_resumed_upload_within_the_quota_completes(tmp_path):
    store = BlobStore(tmp_path, quota_bytes=3 * CHUNK_SIZE)
    store.put_bytes(os.urandom(CHUNK_SIZE))
    data = os.urandom(2 * CHUNK_SIZE)
    sha = hashlib.sha256(data).hexdigest()
    store.write_chunk(sha, 0, data[:CHUNK_SIZE], len(data))
    assert store.usage() == 3 * CHUNK_SIZE  # the partial's whole declared size is reserved
    with pytest.raises(ResourceExhausted):
        store.put_bytes(b"one more byte")
    store = BlobStore(tmp_path, quota_bytes=3 * CHUNK_SIZE)  # restarted: the reservation is rebuilt from disk
    assert store.usage() == 3 * CHUNK_SIZE
    assert store.write_chunk(sha, CHUNK_SIZE, data[CHUNK_SIZE:], len(data)) is not None
    assert store.read_bytes(sha) == data and store.usage() == 3 * CHUNK_SIZE and _files(tmp_path) == []


def test_put_blob_is_refused_up_front_beyond_the_quota_or_size_limit(tmp_path):
    remote = BlobStore(tmp_path / "remote", quota_bytes=CHUNK_SIZE, max_blob_bytes=4 * CHUNK_SIZE)
    local = BlobStore(tmp_path / "local")
    blob = local.put_bytes(os.urandom(2 * CHUNK_SIZE))
    for _, stub in _serve(remote):
        with pytest.raises(grpc.RpcError) as err:
            push_blob(stub, local, blob.sha256)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "blob_quota_gib" in err.value.details()
        chunk = common_pb2.Chunk(sha256=blob.sha256, offset=0, data=b"x", total_size=5 * CHUNK_SIZE)
        with pytest.raises(grpc.RpcError) as err:
            stub.PutBlob(iter([chunk]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        small = local.put_bytes(b"fits")
        assert push_blob(stub, local, small.sha256) == 4
    assert _files(tmp_path / "remote") == [] and remote.usage() == 4
