"""Inputs that cannot poison a run (parties are mutually distrustful): recomputed DualMinCE losses, vocabulary maps
that must fit both vocabularies, shards and alignments bound to the run's public set, bounded adapter uploads,
idempotency keys bound to their request, malformed results that drop their sender instead of failing the run, and
bounded task fields. Fast: no model is loaded (party handlers are validated on parties without one)."""

from __future__ import annotations

import math
import struct
import threading
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from cotune.algorithms.aggregate import UploadRejected, aggregate_uploads, fedavg, validate_upload
from cotune.algorithms.base import MalformedResult, PartyRef
from cotune.algorithms.fedmkt.selection import P_FLOOR, TeacherView, build_targets, credited_nll
from cotune.algorithms.fedmkt.shards import read_shard
from cotune.align.seqalign import SequenceAlignment
from cotune.align.vocabmap import VocabMap
from cotune.errors import AlreadyExists, InvalidInput, Precondition
from cotune.lm.logits import GoldTargets
from cotune.party.base import ModelParty
from cotune.rpc.operations import OperationManager, OpResult
from cotune.tasks import MAX_ADAPTER_ABS, MAX_EPOCHS, MAX_STEPS
from cotune.v1 import coordinator_pb2 as pb
from cotune.v1 import operations_pb2, party_pb2
from cotune.wire.blobs import BlobStore
from cotune.wire.logits_shard import encode_shard
from cotune.wire.safetensors_io import adapter_bytes
from cotune.wire.topk_types import SampleLogits
from tests.unit import test_strategies as fake

PUB, OTHER_PUB = "a" * 64, "b" * 64
SRC_TOK, DST_TOK = "5" * 64, "d" * 64


def _sample(positions, ids, probs, loss=1.0):
    return SampleLogits(positions=np.array(positions, np.int32), ids=np.array(ids, np.int32),
                        logprobs=np.log(np.array(probs, np.float32)), loss_bpb=loss)


def _gold(positions, ids, nll, response_bytes=4):
    return GoldTargets(positions=np.array(positions, np.int32), ids=np.array(ids, np.int64),
                       nll=np.array(nll, np.float64), response_bytes=response_bytes)


# == 1. DualMinCE uses losses recomputed from what each teacher sent ===================================================
def test_a_forged_loss_never_wins():
    gold = [_gold([0, 1, 2], [5, 6, 7], [2.0, 2.0, 2.0])]
    own = [_sample([0, 1, 2], [[5]] * 3, [[0.1]] * 3)]
    honest = _sample([0, 1, 2], [[5, 9], [6, 9], [7, 9]], [[0.5, 0.1]] * 3, loss=3.0)  # claims worse than it is
    forger = _sample([0, 1, 2], [[6], [7], [8]], [[0.999]] * 3, loss=-1e300)  # confidently wrong, claims -1e300
    views = [TeacherView("forger", [forger]), TeacherView("honest", [honest])]
    targets, summary = build_targets(own, gold, views, vocab_size=1000)
    assert summary["kd_from_forger"] == 0 and summary["kd_from_honest"] == 1
    assert targets[0].ids[:, 0].tolist() == [5, 6, 7]  # the honest teacher's distribution is what is distilled
    assert summary["teacher_bpb_forger"] > summary["teacher_bpb_honest"]
    _, alone = build_targets(own, gold, views[:1], vocab_size=1000)
    assert alone["kd_none"] == 1 and alone["kd_targets"] == 0  # alone it beats nobody, itself included


def test_the_gold_token_outside_the_top_k_is_credited_at_most_a_uniform_share():
    V = 1000
    # gold in the row: its probability as sent (not renormalised over the top-k)
    assert credited_nll([[3, 4]], [[0.2, 0.1]], [0.7], [4], V)[0] == pytest.approx(-math.log(0.1))
    # gold outside: the uniform share of the unsent mass over the V - k unsent ids, capped by the smallest sent
    assert credited_nll([[3, 4]], [[0.2, 0.1]], [0.7], [9], V)[0] == pytest.approx(-math.log(0.7 / 998))
    assert credited_nll([[3, 4]], [[0.6, 1e-6]], [0.4], [9], V)[0] == pytest.approx(-math.log(1e-6))
    # withholding never pays: whatever a row without gold holds, it scores no better than a uniform guess
    rng = np.random.default_rng(0)
    for k in (1, 4, 16):
        probs = rng.dirichlet(np.ones(k + 1), size=64)[:, :k]
        ids = np.stack([rng.choice(np.arange(1, V), size=k, replace=False) for _ in range(64)])
        nll = credited_nll(ids, probs, 1 - probs.sum(axis=1), np.zeros(64, np.int64), V)
        assert (nll >= math.log(V - k) - 1e-9).all()
    # a row that gave gold nothing and kept no mass is charged a large, finite loss
    assert credited_nll([[3]], [[1.0]], [0.0], [9], V)[0] == pytest.approx(-math.log(P_FLOOR))


def test_a_teacher_is_scored_only_where_it_spoke_and_distilled_only_at_the_receivers_targets():
    gold = [_gold([3, 4, 5], [1, 2, 3], [1.0, 1.0, 1.0])]
    own = [_sample([3, 4, 5], [[0]] * 3, [[0.1]] * 3)]
    # rows at 1 (a prompt position, not a target) and 4 only: elsewhere it scores as the receiver does
    partial = TeacherView("t", [_sample([1, 4], [[7], [2]], [[0.9], [0.9]])])
    loss = partial.loss(0, gold[0], 100)
    assert loss == pytest.approx((1.0 + 1.0 - math.log(0.9)) / math.log(2) / 4)
    targets, summary = build_targets(own, gold, [partial], vocab_size=100)
    assert summary["kd_from_t"] == 1 and targets[0].positions.tolist() == [4]


# == shards: non-finite, negative, another public set / tokenizer / vocabulary / sender ===============================
def _shard(n=2, *, loss=1.0, meta=None, vocab=50):
    samples = [_sample([1, 2], [[0, 1], [2, 3]], [[0.5, 0.25]] * 2, loss) for _ in range(n)]
    base = {"party_id": "c1", "tokenizer_hash": SRC_TOK, "public_set_hash": PUB}
    return encode_shard(samples, vocab_size=vocab, metadata={**base, **(meta or {})})


def _with_loss(data: bytes, value: float) -> bytes:
    """The shard with sample 0's loss overwritten (the encoder refuses non-finite losses; an attacker need not)."""
    from cotune.wire.logits_shard import _HEAD

    meta_len = struct.unpack_from("<I", data, 20)[0]
    off = _HEAD.size + meta_len + 4  # header, metadata, sample 0's position count
    body = bytearray(data[:-4])
    body[off:off + 8] = struct.pack("<d", value)
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


def _read(data, **kw):
    args = dict(where="shard from c1", public_set_hash=PUB, n_samples=2, tokenizer_hash=SRC_TOK)
    return read_shard(data, **{**args, **kw})


def test_shard_checks():
    samples, meta, vocab = _read(_shard(), vocab_size=50, party_id="c1")
    assert len(samples) == 2 and vocab == 50
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(InvalidInput, match="NaN or Inf"):
            _read(_with_loss(_shard(), bad))
    with pytest.raises(InvalidInput, match="not a loss"):
        _read(_shard(loss=-1e300))
    with pytest.raises(InvalidInput, match="names no public set"):
        _read(_shard(meta={"public_set_hash": ""}))
    with pytest.raises(InvalidInput, match=f"public set {OTHER_PUB[:12]}…, but the run uses {PUB[:12]}…"):
        _read(_shard(meta={"public_set_hash": OTHER_PUB}))
    with pytest.raises(InvalidInput, match="tokenizer"):
        _read(_shard(), tokenizer_hash=DST_TOK)
    with pytest.raises(InvalidInput, match="declares a vocabulary of 50 ids, the sender describes 60"):
        _read(_shard(), vocab_size=60)
    with pytest.raises(InvalidInput, match="names sender 'c1', expected 'c2'"):
        _read(_shard(), party_id="c2")
    with pytest.raises(InvalidInput, match="holds 1 samples, expected 2"):
        _read(_shard(n=1))


# == receivers: vocab maps and sequence alignments =====================================================================
class _Receiver(ModelParty):
    """A party without a model: enough for a handler's synchronous validation (and start_task's dispatch)."""

    role, role_name = "slm", "a test party"

    def __init__(self, root, *, vocab_size=100, public=2, tasks=None, private=()):  # noqa: D107 - no model load
        self.store = BlobStore(root / "blobs")
        self.cfg = SimpleNamespace(party_id="recv", training=SimpleNamespace(lr=1e-3, batch_size=2))
        self.public, self.private = [None] * public, list(private)
        self.public_hash, self.tokenizer_hash, self.vocab_size = PUB, DST_TOK, vocab_size
        self.ops = OperationManager()
        self.tasks, self.not_served, self._states = dict(tasks or {}), {}, {}
        self._ready = threading.Event()
        self._ready.set()
        self._worker = threading.Lock()
        self.runs = SimpleNamespace(current="run", enter=lambda *a: None, stage=lambda *a: None,
                                    promote=lambda *a: None, forget_current=lambda: None)  # no model to keep per run


def _vmap(n_src=50, top=99, first=True):
    ids = np.arange(n_src, dtype=np.int32) % (top + 1)
    ids[-1] = top
    return VocabMap(ids=ids, distance=np.zeros(n_src, np.int32), first_ids=ids[::-1].copy() if first else None,
                    src_hash=SRC_TOK, dst_hash=DST_TOK)


def _alignment(public=PUB, same_span=(1, 0)):
    return SequenceAlignment(np.array([0, 1, 2], np.int64), np.array([1, 2], np.int32), np.array([3, 4], np.int32),
                             SRC_TOK, DST_TOK, public, "offsets",
                             None if same_span is None else np.array(same_span, np.uint8))


def _distill(party, *, vmap=None, align=None, shard=None, **fields):
    from cotune.algorithms.fedmkt.tasks import distill

    teacher = party_pb2.TeacherShard(sender_id="c1", shard=party.store.put_bytes(shard or _shard()).ref())
    if vmap is not None:
        teacher.vocab_map.CopyFrom(party.store.put_bytes(vmap.to_bytes()).ref())
    if align is not None:
        data = align if isinstance(align, bytes) else align.to_bytes()
        teacher.sequence_alignment.CopyFrom(party.store.put_bytes(data).ref())
    task = party_pb2.DistillTask(teachers=[teacher], selection="dualmince", epochs=1, max_length=32, ce_weight=0.5)
    for name, value in fields.items():
        setattr(task, name, value)
    return distill(party, task, party_pb2.RunContext(run_id="run", round=1))


def test_vocab_maps_must_cover_exactly_the_senders_vocabulary_and_fit_the_receivers(tmp_path):
    party = _Receiver(tmp_path)
    assert callable(_distill(party, vmap=_vmap(), align=_alignment()))  # fits: validated, work returned
    with pytest.raises(InvalidInput, match="40 source entries, but the sender's vocabulary has 50 ids") as err:
        _distill(party, vmap=_vmap(n_src=40), align=_alignment())
    assert "receiver's: 100" in str(err.value)
    with pytest.raises(InvalidInput, match="id 100, outside the receiver's vocabulary of 100 ids"):
        _distill(party, vmap=_vmap(top=100), align=_alignment())
    with pytest.raises(ValueError, match="7 source entries, but the sender's vocabulary has 8"):
        _vmap(n_src=7).check_sizes(8, 100)


def test_projection_options_are_checked_against_the_blobs(tmp_path):
    party = _Receiver(tmp_path)
    assert callable(_distill(party, vmap=_vmap(), align=_alignment(), projection="first_token",
                             skip_span_mismatch=True))
    with pytest.raises(InvalidInput, match="projection must be one of mined, first_token"):
        _distill(party, vmap=_vmap(), align=_alignment(), projection="nearest")
    with pytest.raises(InvalidInput, match="no first-token table"):  # a version-1 map
        _distill(party, vmap=_vmap(first=False), align=_alignment(), projection="first_token")
    assert callable(_distill(party, vmap=_vmap(first=False), align=_alignment()))  # mined needs no more
    # an alignment without same-span flags predates the current encode_pair truncation: its positions may be stale
    with pytest.raises(InvalidInput, match="older alignment service"):
        _distill(party, vmap=_vmap(), align=_alignment(same_span=None))


def test_alignments_and_shards_must_name_the_runs_public_set(tmp_path):
    party = _Receiver(tmp_path)
    with pytest.raises(InvalidInput, match=f"sequence alignment .*{OTHER_PUB[:12]}…, but the run uses {PUB[:12]}…"):
        _distill(party, vmap=_vmap(), align=_alignment(OTHER_PUB))
    empty = _alignment("").to_bytes()
    with pytest.raises(ValueError, match="names no public set"):
        SequenceAlignment.from_bytes(empty)
    with pytest.raises(InvalidInput, match="sequence alignment for shard from c1.*names no public set"):
        _distill(party, vmap=_vmap(), align=empty)
    with pytest.raises(InvalidInput, match="shard from c1 names no public set"):
        _distill(party, vmap=_vmap(), align=_alignment(), shard=_shard(meta={"public_set_hash": ""}))
    with pytest.raises(InvalidInput, match="not a loss"):
        _distill(party, vmap=_vmap(), align=_alignment(), shard=_shard(loss=-1e300))


# == 4. adapter uploads are bounded before averaging ===================================================================
def test_a_huge_upload_is_rejected_and_the_others_averaged():
    ref = {"a.lora_A.weight": np.zeros((2, 3), np.float32), "a.lora_B.weight": np.zeros((3, 2), np.float32)}
    honest = {k: np.full_like(v, 0.5) for k, v in ref.items()}
    huge = {k: np.full_like(v, 1e30) for k, v in ref.items()}
    result = aggregate_uploads({"c1": adapter_bytes(honest), "c2": adapter_bytes(huge)}, {"c1": 1.0, "c2": 1e9}, ref)
    assert set(result.accepted) == {"c1"} and "magnitude 1e+30, beyond the bound 10000" in result.rejected["c2"]
    assert all(np.array_equal(result.state[k], fedavg([honest], [1.0])[k]) for k in ref)
    validate_upload({k: np.full_like(v, MAX_ADAPTER_ABS) for k, v in ref.items()}, ref)  # the bound itself is fine
    with pytest.raises(UploadRejected, match="beyond the bound 0.25"):
        validate_upload(honest, ref, max_abs=0.25)  # the bound is a parameter


@pytest.mark.parametrize("algorithm", ["fedcollm", "fedavg", "fedbiot"])
def test_a_huge_upload_drops_its_client_and_the_run_goes_on(algorithm):
    llm, clients = fake._parties_for(algorithm)
    d, strategy, config = fake._prepare(algorithm, llm, clients, min_clients=1)
    d.corrupt["c2"] = "huge"
    strategy.execute(d, config)
    for r in (1, 2):
        (note,) = [n for n in d.notes if n[0] == r and n[2] == "c2"]
        assert "upload rejected" in note[1] and "magnitude 1e+30" in note[1]
        fake._check_aggregate(d, r, ["c1"])


def test_the_bound_comes_from_the_run_spec():
    llm, clients = fake._parties_for("fedavg")
    d, strategy, config = fake._prepare("fedavg", llm, clients, min_clients=1, adapter_max_abs=1e31)
    d.corrupt["c2"] = "huge"  # 1e30 values: within this run's bound
    strategy.execute(d, config)
    assert not [n for n in d.notes if n[2] == "c2"], d.notes


# == 5. idempotency keys are bound to their request ====================================================================
def test_an_operation_key_is_bound_to_its_kind_and_request():
    ops = OperationManager()
    try:
        first = ops.start("evaluate", lambda op: OpResult(), key="run/1/r1/evaluate/c1", fingerprint="f1")
        assert ops.start("evaluate", lambda op: OpResult(), key="run/1/r1/evaluate/c1", fingerprint="f1").id == first.id
        with pytest.raises(AlreadyExists, match="'run/1/r1/evaluate/c1' is already bound to a different request"):
            ops.start("evaluate", lambda op: OpResult(), key="run/1/r1/evaluate/c1", fingerprint="f2")
        with pytest.raises(AlreadyExists, match="already bound to a evaluate task"):
            ops.start("distill", lambda op: OpResult(), key="run/1/r1/evaluate/c1", fingerprint="f1")
        plain = ops.start("vocab_map", lambda op: OpResult(), key="vocab-map/x")  # no fingerprint: as before
        assert ops.start("vocab_map", lambda op: OpResult(), key="vocab-map/x").id == plain.id
    finally:
        ops.shutdown()


def test_a_party_refuses_another_request_under_a_step_key(tmp_path):
    party = _Receiver(tmp_path, tasks={"evaluate": lambda p, task, ctx: (lambda op: OpResult())})

    def request(max_samples, key="r1/evaluate/c1"):
        return party_pb2.TaskRequest(ctx=party_pb2.RunContext(run_id="run", round=1, task_key=key),
                                     evaluate=party_pb2.EvaluateTask(max_samples=max_samples))
    try:
        op = party.start_task(request(3))
        assert party.start_task(request(3)).id == op.id  # a retry re-attaches
        with pytest.raises(AlreadyExists, match="run/1/r1/evaluate/c1"):
            party.start_task(request(4))
        assert party.start_task(request(4, key="r1/evaluate/c1-again")).id != op.id
    finally:
        party.ops.shutdown()


# == 6. malformed results drop their sender (a client) or fail the run naming the LLM server =========================
@pytest.mark.parametrize("how,why", [("loss", "not a loss"), ("stripped", "names no public set"),
                                     ("shard", "cannot be read"), ("no_shard", "names no shard")])
def test_a_malformed_shard_drops_its_client(how, why):
    d, strategy, config = fake._prepare("fedmkt", fake._llm(), [fake._client("c1"), fake._client("c2")], min_clients=1)
    d.corrupt["c2"] = how
    strategy.execute(d, config)
    for r in (1, 2):
        assert d.dropped[r] == ["c2"]
        (note,) = [n for n in d.notes if n[0] == r and n[2] == "c2"]
        assert note[1].startswith(f"public_logits: c2 dropped from round {r}: c2 answered step public_logits of "
                                  f"round {r} with a malformed result: ") and why in note[1], note[1]
        assert [t.sender_id for t in d.one("distill", party="llm", round=r).teachers] == ["c1"]


def test_a_shard_beyond_the_llms_vocabulary_drops_its_client():
    c2 = fake._client("c2")
    c2.info.vocab_size = 1000  # describes a larger vocabulary than the LLM's (100), and uses it
    d, strategy, config = fake._prepare("fedmkt", fake._llm(tok=fake.SLM_TOK), [fake._client("c1"), c2], min_clients=1)
    d.corrupt["c2"] = "ids"
    strategy.execute(d, config)
    (note,) = [n for n in d.notes if n[0] == 1 and n[2] == "c2"]
    assert "its shard holds token id 999, beyond the LLM's vocabulary of 100" in note[1]


def test_a_malformed_llm_result_fails_the_run_naming_the_llm_server_and_step():
    d, err = fake._expect_failure("fedmkt", fake._llm(), [fake._client("c1"), fake._client("c2")], min_clients=1,
                                  setup=lambda d: d.corrupt.__setitem__("llm", "loss"))
    assert str(err).startswith("the LLM server (llm) answered step public_logits of round 1 with a malformed result")


def test_a_bad_adapter_from_the_llm_server_fails_the_run_naming_it():
    _, err = fake._expect_failure("fedcollm", fake._llm(tok=fake.SLM_TOK), [fake._client("c1"), fake._client("c2")],
                                  setup=lambda d: d.corrupt.__setitem__("llm", "huge"))
    assert str(err).startswith("the LLM server (llm) answered step co_distill of round 1 with a malformed result: "
                               "its adapter") and "magnitude 1e+30" in str(err)


def test_a_client_claiming_more_samples_than_it_holds_is_dropped():
    c2 = fake._client("c2")
    c2.info.private_set_size = 5  # SAMPLES["c2"] = 30 trained on
    d, strategy, config = fake._prepare("fedavg", fake._llm(companion_tok=None), [fake._client("c1"), c2], min_clients=1)
    strategy.execute(d, config)
    (note,) = [n for n in d.notes if n[0] == 1 and n[2] == "c2"]
    assert "reports 30 training samples, but described 5 private samples" in note[1]
    fake._check_aggregate(d, 1, ["c1"])


class _Stub:
    """A PartyClient answering every task with `answer(request) -> Operation`."""

    def __init__(self, answer):
        self.answer = answer

    def push(self, store, sha):
        return 0

    def pull(self, store, sha):
        return 0

    def run_task(self, request, *, timeout_s, on_progress=None, should_stop=None):
        return self.answer(request)


def _op(result=None, *, type_url="", value=b""):
    op = operations_pb2.Operation(id="op", state=operations_pb2.OPERATION_SUCCEEDED)
    if result is not None:
        op.result.Pack(result)
    if type_url:
        op.result.type_url, op.result.value = type_url, value
    return op


@pytest.fixture
def driver(tmp_path):
    """A RunDriver whose parties answer whatever `answers[party_id]` returns."""
    from coordinator.driver import RunDriver
    from coordinator.store import StateStore
    from cotune.algorithms.config import RunConfig

    answers = {}
    refs = {pid: PartyRef(pid, "llm" if pid == "llm" else "slm", party_pb2.PartyInfo(party_id=pid))
            for pid in ("llm", "c1", "c2")}
    stubs = {pid: _Stub(lambda req, pid=pid: answers[pid](req)) for pid in refs}
    d = RunDriver(run=pb.Run(run_id="run", spec=pb.RunSpec(public_set_hash=PUB)), config=RunConfig(),
                  store=StateStore(tmp_path / "state.db"), artifacts=BlobStore(tmp_path / "artifacts"),
                  llm=(refs["llm"], stubs["llm"]), clients=[(refs[p], stubs[p]) for p in ("c1", "c2")],
                  alignment=None, cancel_event=threading.Event())
    return d, refs, answers


def test_the_driver_drops_a_client_whose_result_is_malformed(driver):
    d, refs, answers = driver
    ok = party_pb2.PublicLogitsResult(public_loss_bpb=1.0)  # well typed, but names no shard
    answers["c1"] = lambda req: _op(party_pb2.EvaluateResult())  # the wrong type
    answers["c2"] = lambda req: _op(ok)
    task = party_pb2.PublicLogitsTask(top_k=4, max_length=32)
    out = d.on_parties([refs["c1"], refs["c2"]], 1, "public_logits",
                       lambda p: d.task(p, 1, "public_logits", public_logits=task), quorum=0)
    assert out.ok == {}
    assert "expected cotune.v1.PublicLogitsResult" in out.failed["c1"]
    assert "it names no shard (a public_logits result must return one)" in out.failed["c2"]
    rec = d.round_record(1)
    assert sorted(rec.dropped) == ["c1", "c2"] and len(rec.notes) == 2
    # bytes that do not parse as the result type they claim to be
    answers["c1"] = lambda req: _op(type_url="type.googleapis.com/cotune.v1.PublicLogitsResult", value=b"\xff\xff")
    out = d.on_parties([refs["c1"]], 2, "public_logits",
                       lambda p: d.task(p, 2, "public_logits", public_logits=task), quorum=0)
    assert "does not parse" in out.failed["c1"]
    # the LLM server is not dropped: the error names it and the step
    answers["llm"] = lambda req: _op(ok)
    with pytest.raises(MalformedResult, match=r"^the LLM server \(llm\) answered step llm_logits of round 1 .*no shard"):
        d.task(refs["llm"], 1, "llm_logits", public_logits=task)


def test_the_coordinator_checks_a_vocab_map_against_both_parties_descriptions(driver):
    d, refs, _ = driver
    src, dst = refs["c1"], refs["llm"]
    for ref, tok, size in ((src, SRC_TOK, 50), (dst, DST_TOK, 100)):
        ref.info.tokenizer_hash, ref.info.vocab_size = tok, size
        ref.info.tokenizer_bundle.CopyFrom(d.artifacts.put_bytes(tok.encode()).ref())
    built = d.artifacts.put_bytes(_vmap(n_src=40).to_bytes())

    class Alignment(_Stub):
        def register_tokenizer(self, ref):
            pass

        def build_vocab_map(self, src_hash, dst_hash):
            return _op()

        def wait(self, op, *, timeout_s, on_progress=None):
            op.blobs["map"].CopyFrom(built.ref())
            return op

    d.alignment = Alignment(None)
    with pytest.raises(Precondition, match="vocab map c1 → llm .*40 source entries, but the sender's vocabulary has 50"):
        d.vocab_map(src, dst)


# == 7. every numeric task field is bounded ============================================================================
def test_task_numbers_are_bounded(tmp_path):
    from cotune.algorithms.fedbiot.client import STATE as FEDBIOT, CompressedLayers, train_adapter
    from cotune.algorithms.fedcollm.server import STATE as FEDCOLLM, co_distill
    from cotune.party.tasks import train_local

    party = _Receiver(tmp_path, private=[None] * 4)
    ctx = party_pb2.RunContext(run_id="run", round=1)
    with pytest.raises(InvalidInput, match=r"epochs must be in \[1, 1000\], got 2147483647"):
        train_local(party, party_pb2.TrainLocalTask(epochs=2**31 - 1), ctx)
    assert callable(train_local(party, party_pb2.TrainLocalTask(epochs=MAX_EPOCHS), ctx))
    for fields, match in ((dict(lr=2.0), "lr must be in"), (dict(lr=float("nan")), "lr must be in"),
                          (dict(batch_size=10**6), "batch_size must be in")):
        with pytest.raises(InvalidInput, match=match):
            train_local(party, party_pb2.TrainLocalTask(epochs=1, **fields), ctx)
    for fields, match in ((dict(ce_weight=1.5), "ce_weight"), (dict(ce_weight=float("nan")), "ce_weight"),
                          (dict(epochs=MAX_EPOCHS + 1), "epochs"), (dict(lr=0.0), "lr")):
        with pytest.raises(InvalidInput, match=match):
            _distill(party, **fields)
    party.set_state(FEDBIOT, CompressedLayers({0: 0}, 1))
    with pytest.raises(InvalidInput, match="prox_eps"):
        train_adapter(party, party_pb2.TrainAdapterTask(epochs=1, prox_eps=float("inf")), ctx)
    party.set_state(FEDCOLLM, object())
    with pytest.raises(InvalidInput, match="kl_weight"):
        co_distill(party, party_pb2.CoDistillTask(epochs=1, kl_weight=1e9, max_length=32), ctx)
    assert ModelParty.steps(MAX_STEPS) == MAX_STEPS
    with pytest.raises(InvalidInput, match="steps"):
        ModelParty.steps(MAX_STEPS + 1)
    with pytest.raises(InvalidInput, match="top_k"):
        ModelParty.top_k(0)
