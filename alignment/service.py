"""The alignment service: tokenizer registry, MinED vocabulary maps and public-set sequence alignments.

Results are cached on disk, keyed by the content hashes of their inputs and the algorithm version, so a
map is built once per tokenizer pair for the life of the cache. Builds run as long-running operations;
concurrent requests for the same result share one build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from pathlib import Path

from cotune.config import AlignmentConfig
from cotune.data import MalformedDataError, read_jsonl_bytes
from cotune.errors import InvalidInput, NotFound, Precondition, rpc_method
from cotune.rpc.operations import OperationManager, OpResult
from cotune.rpc.server import service_host
from cotune.tasks import MAX_LENGTH_RANGE
from cotune.v1 import alignment_pb2, alignment_pb2_grpc
from cotune.wire.blobs import Blob, check_sha, service_store
from cotune.workdir import WorkdirLock

log = logging.getLogger(__name__)
MEDIA_MAP = "application/safetensors+vocab-map"
MEDIA_ALIGNMENT = "application/safetensors+sequence-alignment"
MAX_BUNDLE_BYTES = 256 << 20
ALIGNMENT_METHODS = ("offsets", "dtw")


class AlignmentService:
    def __init__(self, cfg: AlignmentConfig):
        cfg.validate()
        self.cfg = cfg
        self.root = Path(cfg.workdir)
        self.workdir_lock = WorkdirLock(self.root, "alignment")
        self.store = service_store(self.root / "blobs", cfg.blob_quota_gib)
        self.index_dir = self.root / "index"
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self.ops = OperationManager(workers=max(1, cfg.workers))
        self._tokenizers: dict[str, object] = {}
        self._lock = threading.Lock()

    # -- registry ---------------------------------------------------------------------------------------------
    def register(self, ref) -> alignment_pb2.TokenizerInfo:
        from cotune.align.normalize import tokenizer_family
        from cotune.align.tokenizers import TokenizerLoadError, tokenizer_from_bundle

        blob = Blob.from_ref(ref)
        if not self.store.has(blob.sha256):
            raise Precondition(f"tokenizer bundle {blob.sha256} is not stored here; upload it with PutBlob first")
        try:
            tok = tokenizer_from_bundle(self.store.read_bytes(blob.sha256, max_bytes=MAX_BUNDLE_BYTES))
        except TokenizerLoadError as exc:
            raise InvalidInput(f"tokenizer bundle {blob.sha256[:16]}… is unreadable: {exc}") from exc
        with self._lock:
            self._tokenizers[blob.sha256] = tok
        return alignment_pb2.TokenizerInfo(tokenizer_hash=blob.sha256, vocab_size=len(tok), family=tokenizer_family(tok))

    def tokenizer(self, sha: str):
        check_sha(sha)
        with self._lock:
            tok = self._tokenizers.get(sha)
        if tok is None:
            if not self.store.has(sha):
                raise NotFound(f"tokenizer {sha[:16]}… is not registered; call RegisterTokenizer first")
            from cotune.align.tokenizers import TokenizerLoadError, tokenizer_from_bundle

            try:  # a stored blob that was never registered may be any bytes
                tok = tokenizer_from_bundle(self.store.read_bytes(sha, max_bytes=MAX_BUNDLE_BYTES))
            except TokenizerLoadError as exc:
                raise InvalidInput(f"blob {sha[:16]}… is not a readable tokenizer bundle: {exc}") from exc
            with self._lock:
                self._tokenizers[sha] = tok
        return tok

    # -- cache ------------------------------------------------------------------------------------------------
    def _index_path(self, key: str) -> Path:
        return self.index_dir / (hashlib.sha256(key.encode()).hexdigest() + ".json")

    def _cached(self, key: str) -> Blob | None:
        path = self._index_path(key)
        if path.exists():
            entry = json.loads(path.read_text())
            if self.store.has(entry["sha256"]):
                return self.store.stat(entry["sha256"])
        return None

    def _remember(self, key: str, blob: Blob) -> None:
        path = self._index_path(key)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "sha256": blob.sha256}))
        tmp.replace(path)

    def _cached_op(self, kind: str, key: str, name: str, build):
        def work(ctx):
            blob = self._cached(key)
            cached = blob is not None
            if not cached:
                blob = build(ctx)
                self._remember(key, blob)
            return OpResult(blobs={name: blob}, info={"cached": str(cached).lower(), "key": key})
        return self.ops.start(kind, work, key=key)

    # -- builds -----------------------------------------------------------------------------------------------
    def build_vocab_map(self, req):
        from cotune.align.mined import UnmappableTokenizer, build_vocab_map
        from cotune.align.vocabmap import ALGORITHM_VERSION

        src, dst = self.tokenizer(req.src_hash), self.tokenizer(req.dst_hash)
        key = f"vocab-map/{ALGORITHM_VERSION}/{req.src_hash}/{req.dst_hash}"

        def build(ctx):
            try:
                vmap = build_vocab_map(src, dst, progress=lambda done, total: ctx.progress(done, total, "mined"))
            except UnmappableTokenizer as exc:
                raise InvalidInput(f"no vocabulary map from {req.src_hash[:12]}… to {req.dst_hash[:12]}…: {exc}") from exc
            vmap = dataclasses.replace(vmap, src_hash=req.src_hash, dst_hash=req.dst_hash)
            return self.store.put_bytes(vmap.to_bytes(), MEDIA_MAP)
        return self._cached_op("vocab_map", key, "map", build)

    def build_sequence_alignment(self, req):
        from cotune.align.seqalign import align_public_set

        method = req.method or "offsets"
        if method not in ALIGNMENT_METHODS:
            raise InvalidInput(f"method must be one of {', '.join(ALIGNMENT_METHODS)}, got {method!r}")
        max_length = req.max_length
        lo, hi = MAX_LENGTH_RANGE
        if not lo <= max_length <= hi:
            raise InvalidInput(f"max_length (tokens per public sample, the run's max_length) must be in {lo}..{hi}, "
                               f"got {max_length}")
        src, dst = self.tokenizer(req.src_hash), self.tokenizer(req.dst_hash)
        sha = check_sha(req.public_set_hash)
        if not self.store.has(sha):
            raise Precondition(f"public set {sha[:16]}… is not stored here; upload its canonical JSONL with PutBlob first")
        try:
            examples = read_jsonl_bytes(self.store.read_bytes(sha), name=f"public set {sha[:16]}…")
        except MalformedDataError as exc:  # the message names the public set and the line
            raise InvalidInput(f"{exc} (a public set is JSONL of examples)") from exc
        from cotune.align.seqalign import ALGORITHM_VERSION as SEQ_VERSION

        # the algorithm's version is part of the key: a cache built by an older service is never served
        key = f"seq-align/{SEQ_VERSION}/{method}/{max_length}/{req.src_hash}/{req.dst_hash}/{sha}"

        def build(ctx):
            aligned = align_public_set(src, dst, [(e.prompt, e.response) for e in examples], max_length=max_length,
                                       method=method, public_set_hash=sha,
                                       progress=lambda done, total: ctx.progress(done, total, "align"))
            aligned = dataclasses.replace(aligned, src_hash=req.src_hash, dst_hash=req.dst_hash)
            return self.store.put_bytes(aligned.to_bytes(), MEDIA_ALIGNMENT)
        return self._cached_op("sequence_alignment", key, "alignment", build)


class AlignmentServicer(alignment_pb2_grpc.AlignmentServicer):
    def __init__(self, service: AlignmentService):
        self.service = service

    @rpc_method
    def RegisterTokenizer(self, request, context):
        return self.service.register(request.bundle)

    @rpc_method
    def BuildVocabMap(self, request, context):
        return self.service.build_vocab_map(request)

    @rpc_method
    def BuildSequenceAlignment(self, request, context):
        return self.service.build_sequence_alignment(request)


def serve(cfg: AlignmentConfig, port_file: str | None = None) -> None:
    service = AlignmentService(cfg)
    host = service_host("cotune.alignment", cfg, "alignment")
    host.add(alignment_pb2_grpc.add_AlignmentServicer_to_server, AlignmentServicer(service), alignment_pb2, "Alignment")
    host.add_blobs_and_operations(service.store, service.ops)
    host.start(port_file)
    host.set_serving(True)
    host.wait_for_termination_signal()
    service.ops.shutdown()
