"""The alignment service as a real process: registry, cached and de-duplicated builds, clear errors."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
import yaml

from cotune.align.tokenizers import load_tokenizer, tokenizer_bundle_bytes
from cotune.cluster import wait_healthy
from cotune.data import canonical_jsonl_bytes, load_task
from cotune.rpc.clients import AlignmentClient
from cotune.wire.blobs import BlobStore

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("alignment")
    config = root / "alignment.yaml"
    config.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "workdir": str(root / "work"), "workers": 2, "insecure": True}))
    port_file = root / "port"
    log = open(root / "log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cotune.cli", "serve", "alignment", "--config", str(config),
                             "--port-file", str(port_file)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not port_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    address = f"127.0.0.1:{port_file.read_text().strip()}"
    wait_healthy(address, timeout_s=60, process=proc)
    client = AlignmentClient(address)
    store = BlobStore(root / "local")
    yield client, store, shared_data
    client.close()
    proc.terminate()
    proc.wait(timeout=30)


def _register(client, store, tok):
    blob = store.put_bytes(tokenizer_bundle_bytes(tok))
    client.push(store, blob.sha256)
    return client.register_tokenizer(blob.ref())


def test_concurrent_requests_share_one_build_and_results_are_cached(service):
    from cotune.align.mined import build_vocab_map
    from cotune.align.vocabmap import VocabMap

    client, store, shared = service
    src = load_tokenizer(shared / "tokenizers" / "gpt2" / "gpt2.vocab")
    dst = load_tokenizer(shared / "tokenizers" / "mistral-7b-hf" / "tokenizer.json")
    s, d = _register(client, store, src), _register(client, store, dst)
    assert s.vocab_size == 50257 and s.family
    first = client.build_vocab_map(s.tokenizer_hash, d.tokenizer_hash)
    second = client.build_vocab_map(s.tokenizer_hash, d.tokenizer_hash)
    assert first.id == second.id  # the second request joins the build in flight
    done = client.wait(first, timeout_s=300)
    assert done.info["cached"] == "false"
    again = client.wait(client.build_vocab_map(s.tokenizer_hash, d.tokenizer_hash), timeout_s=60)
    assert again.blobs["map"].sha256 == done.blobs["map"].sha256
    client.pull(store, done.blobs["map"].sha256)
    served = VocabMap.from_bytes(store.read_bytes(done.blobs["map"].sha256))
    local = build_vocab_map(src, dst)
    assert (served.ids == local.ids).all() and (served.distance == local.distance).all()
    assert served.src_hash == s.tokenizer_hash and served.dst_hash == d.tokenizer_hash


def test_sequence_alignment_needs_the_public_set_uploaded(service):
    from cotune.align.seqalign import SequenceAlignment

    client, store, shared = service
    src = load_tokenizer(shared / "tokenizers" / "gpt2" / "gpt2.vocab")
    dst = load_tokenizer(shared / "tokenizers" / "mistral-7b-hf" / "tokenizer.json")
    s, d = _register(client, store, src), _register(client, store, dst)
    public = store.put_bytes(canonical_jsonl_bytes(load_task("arc_easy", "validation", data_dir=shared, limit=20)))
    with pytest.raises(grpc.RpcError) as err:
        client.build_sequence_alignment(s.tokenizer_hash, d.tokenizer_hash, public.sha256, max_length=128)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "PutBlob" in err.value.details()
    client.push(store, public.sha256)
    op = client.wait(client.build_sequence_alignment(s.tokenizer_hash, d.tokenizer_hash, public.sha256, max_length=128),
                     timeout_s=120)
    client.pull(store, op.blobs["alignment"].sha256)
    aligned = SequenceAlignment.from_bytes(store.read_bytes(op.blobs["alignment"].sha256))
    assert aligned.num_samples == 20 and len(aligned.src_pos) > 0


def test_unreadable_bundle_and_unknown_tokenizer_get_clear_errors(service):
    client, store, _ = service
    garbage = store.put_bytes(b"this is not a tokenizer")
    client.push(store, garbage.sha256)
    with pytest.raises(grpc.RpcError) as err:
        client.register_tokenizer(garbage.ref())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unreadable" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.build_vocab_map("0" * 64, "1" * 64)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "RegisterTokenizer" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.build_vocab_map("not-a-hash", "1" * 64)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
