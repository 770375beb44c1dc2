"""Every strategy driven by an in-memory FakeDriver: the round sequence, who gets what, quorum and drops, and config
values reaching the task messages. No processes, no gRPC, no torch: the fake answers each task kind with a plausible
typed result and keeps an artifact store, so the real aggregation (steps.collect_and_aggregate) runs on real
safetensors adapter bytes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from google.protobuf.message import Message

from cotune.algorithms.aggregate import fedavg, parse_adapter
from cotune.algorithms.base import MalformedResult, PartyRef, StepOutcome, TaskOutcome
from cotune.algorithms.config import RunConfig, parse_spec, spec_from_dict
from cotune.algorithms.registry import get_strategy
from cotune.errors import Precondition, RpcError
from cotune.tasks import RESULT_TYPES, request_blobs, result_problems
from cotune.v1 import common_pb2, party_pb2
from cotune.wire.media import MEDIA_ADAPTER
from cotune.wire.logits_shard import encode_shard
from cotune.wire.safetensors_io import LORA_FORMAT, adapter_bytes, dumps
from cotune.wire.topk_types import SampleLogits

LLM_TOK, SLM_TOK, OTHER_TOK = "a" * 64, "b" * 64, "c" * 64
LAYOUT = "l" * 64
RUN_ID = "run-test"
KEYS = ("base_model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight")
SHAPES = {KEYS[0]: (2, 3), KEYS[1]: (3, 2)}
SAMPLES = {"c1": 10, "c2": 30, "c3": 20, "llm": 50}


def _state(seed: float) -> dict[str, np.ndarray]:
    return {k: (np.arange(np.prod(s), dtype=np.float32).reshape(s) * 0.01 + np.float32(seed)) for k, s in SHAPES.items()}


class FakeDriver:
    """The Driver protocol in memory. Records every task as (round, step, party, kind, request); answers each kind
    with a typed result; keeps sha256 -> bytes; records metrics, notes, artifacts, steps and events. `fail[(party,
    kind)] = message` makes that party's task of that kind raise Precondition (optionally only in round `r`:
    key (party, kind, r)); `corrupt[party] = how` makes its tagged adapter upload (or its logits shard) malformed."""

    def __init__(self, llm: PartyRef, clients: list[PartyRef], run: RunConfig):
        self.run_id = RUN_ID
        self.run = run
        self.llm = llm
        self.clients = clients
        self.public_set_hash = "p" * 64
        self.store: dict[str, bytes] = {}
        self.media: dict[str, str] = {}
        self.tasks: list[tuple[int, str, str, str, Message]] = []
        self.overlapped: list[list[set]] = []  # per concurrently() call: the (party, kind) tasks of each branch
        self.keys: set[str] = set()
        self.metrics: dict[tuple[int, str], dict[str, float]] = {}
        self.notes: list[tuple[int, str, str, str]] = []
        self.dropped: dict[int, list[str]] = {}
        self.artifacts: dict[int, dict[str, str]] = {}
        self.steps: list[tuple[int, str]] = []
        self.events: list[tuple[str, int, str, str]] = []
        self.local: dict[str, dict] = {}
        self.alignments: list[tuple[str, str, str, dict]] = []
        self.fail: dict[tuple, str] = {}
        self.corrupt: dict[str, str] = {}
        self.shards: dict[tuple[str, int], str] = {}  # (party, round) -> the sha of the shard its public_logits made
        self.cast: set[str] = set()  # parties whose set_lora reports another hash (dtype cast)
        # what each party holds: (party_id, target) -> LoRA state
        parties = [llm, *clients]
        self.state: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        for i, p in enumerate(parties):
            self.state[(p.party_id, "")] = _state(i)
        self.state[(llm.party_id, "companion")] = _state(0.5)
        self.state[(llm.party_id, "compressed")] = _state(0.25)

    # -- artifacts -------------------------------------------------------------------------------------------------
    def put_artifact(self, data: bytes, media_type: str) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.store[sha] = bytes(data)
        self.media[sha] = media_type
        return sha

    def read_artifact(self, sha: str) -> bytes:
        return self.store[sha]

    def ref(self, sha: str) -> common_pb2.BlobRef:
        assert sha in self.store, f"ref to {sha[:12]}… which the artifact store does not hold"
        return common_pb2.BlobRef(sha256=sha, size=len(self.store[sha]), media_type=self.media[sha])

    # -- records ---------------------------------------------------------------------------------------------------
    def set_step(self, round: int, step: str) -> None:
        self.steps.append((round, step))

    def record_metrics(self, round: int, party_id: str, metrics: dict[str, float]) -> None:
        self.metrics.setdefault((round, party_id), {}).update({k: float(v) for k, v in metrics.items()})

    def record_artifact(self, round: int, name: str, sha: str) -> None:
        self.artifacts.setdefault(round, {})[name] = sha

    def note(self, round: int, message: str, *, dropped: str = "", kind: str = "warning", step: str = "") -> None:
        self.notes.append((round, message, dropped, kind))
        if dropped and dropped not in self.dropped.setdefault(round, []):
            self.dropped[round].append(dropped)

    def emit(self, kind: str, *, round: int = 0, step: str = "", message: str = "") -> None:
        self.events.append((kind, round, step, message))

    def check_cancelled(self) -> None:
        pass

    def concurrently(self, *fns):
        """In order, one after another: the sequence tests see is the order a strategy lists the branches. Each
        call's branches are recorded as the (party, kind) of the tasks each ran, in `overlapped`."""
        results, branches = [], []
        for fn in fns:
            before = len(self.tasks)
            results.append(fn())
            branches.append({(p, k) for _, _, p, k, _ in self.tasks[before:]})
        self.overlapped.append(branches)
        return results

    # -- steps -----------------------------------------------------------------------------------------------------
    def local_step(self, key: str, fn: Callable[[], dict]) -> dict:
        if key not in self.local:
            self.local[key] = fn()
        return self.local[key]

    def on_parties(self, parties: Sequence[PartyRef], round: int, step: str, fn: Callable[[PartyRef], Any], *,
                   quorum: int | None = None) -> StepOutcome:
        """As RunDriver.on_parties: a failing party is dropped with a note; Precondition below quorum."""
        outcome = StepOutcome()
        if not parties:
            return outcome
        for p in parties:
            try:
                outcome.ok[p.party_id] = fn(p)
            except (RpcError, OSError) as exc:
                outcome.failed[p.party_id] = str(exc)
                self.note(round, f"{step}: {p.party_id} dropped from round {round}: {exc}", dropped=p.party_id)
        needed = len(parties) if quorum is None else quorum
        if len(outcome.ok) < needed:
            raise Precondition(f"round {round} {step}: only {len(outcome.ok)} of {len(parties)} parties succeeded, "
                               f"quorum is {needed}: " + "; ".join(f"{k}: {v}" for k, v in outcome.failed.items()))
        return outcome

    def vocab_map(self, src: PartyRef, dst: PartyRef) -> str:
        key = f"r0/vocab_map/{src.info.tokenizer_hash}/{dst.info.tokenizer_hash}"

        def build():
            self.alignments.append(("vocab_map", src.party_id, dst.party_id, {}))
            return {"sha": self.put_artifact(f"vmap {src.info.tokenizer_hash}->{dst.info.tokenizer_hash}".encode(),
                                             "application/x-cotune-vocab-map")}
        return self.local_step(key, build)["sha"]

    def sequence_alignment(self, src: PartyRef, dst: PartyRef, *, method: str, max_length: int) -> str:
        key = f"r0/seq_alignment/{method}/{max_length}/{src.info.tokenizer_hash}/{dst.info.tokenizer_hash}"

        def build():
            self.alignments.append(("seq_alignment", src.party_id, dst.party_id,
                                    {"method": method, "max_length": max_length}))
            return {"sha": self.put_artifact(
                f"align {method} {max_length} {src.info.tokenizer_hash}->{dst.info.tokenizer_hash}".encode(),
                "application/x-cotune-seq-alignment")}
        return self.local_step(key, build)["sha"]

    # -- tasks -----------------------------------------------------------------------------------------------------
    def task(self, party: PartyRef, round: int, step: str, **task: Message) -> TaskOutcome:
        (kind, body), = task.items()
        key = f"r{round}/{step}/{party.party_id}"
        # the real driver stores each step's result under this key: a repeated key would silently replay
        assert key not in self.keys, f"task key {key} used twice (the real driver would replay the first result)"
        self.keys.add(key)
        request = party_pb2.TaskRequest(ctx=party_pb2.RunContext(run_id=self.run_id, round=round, task_key=key,
                                                                 public_set_hash=self.public_set_hash),
                                        **{kind: body})
        for name, ref in request_blobs(request):  # what the real driver would push: it must be in the store
            assert ref.sha256 in self.store, f"{key}: {name} names {ref.sha256[:12]}…, not in the artifact store"
        copy = type(body)()
        copy.CopyFrom(body)
        self.tasks.append((round, step, party.party_id, kind, copy))
        why = self.fail.get((party.party_id, kind, round)) or self.fail.get((party.party_id, kind))
        if why:
            raise Precondition(why)
        result, metrics = getattr(self, f"_{kind}")(party, round, body, key)
        assert isinstance(result, RESULT_TYPES[kind])
        problems = result_problems(kind, result)  # as RunDriver.task checks every result before returning it
        if problems:
            raise MalformedResult(party, round, step, "; ".join(problems))
        return TaskOutcome(result, metrics)

    def _adapter(self, state) -> str:
        return self.put_artifact(adapter_bytes(state), MEDIA_ADAPTER)

    def _train(self, party, round, body, key):
        pid = party.party_id
        self.state[(pid, "")] = {k: v + np.float32(0.1 * (1 + list(SAMPLES).index(pid)))
                                 for k, v in self.state[(pid, "")].items()}
        return party_pb2.TrainLocalResult(samples=SAMPLES[pid], loss_first=2.0, loss_last=1.5), {"train_loss_last": 1.5}

    _train_local = _train
    _train_adapter = _train

    def _public_logits(self, party, round, body, key):
        """A real (tiny) shard, as the party would make it: `corrupt[party]` = "loss" forges a negative loss, "stripped"
        drops its public_set_hash, "shard" sends bytes that are no shard, "no_shard" names none, "ids" uses the last id
        of the vocabulary it describes."""
        info, how = party.info, self.corrupt.get(party.party_id)
        n = min(body.max_samples, info.public_set_size) if body.max_samples else info.public_set_size
        loss = -1e300 if how == "loss" else 1.0 + 0.125 * round
        ids = np.array([[0, 1], [2, info.vocab_size - 1 if how == "ids" else 3]], np.int32)
        samples = [SampleLogits(positions=np.array([1, 2], np.int32), ids=ids,
                                logprobs=np.log(np.full((2, 2), 0.25, np.float32)), loss_bpb=loss) for _ in range(n)]
        meta = {"party_id": info.party_id, "tokenizer_hash": info.tokenizer_hash,
                "public_set_hash": "" if how == "stripped" else self.public_set_hash}
        data = b"not a shard" if how == "shard" else encode_shard(samples, vocab_size=info.vocab_size, metadata=meta)
        sha = self.put_artifact(data, "application/x-cotune-topk-shard")
        self.shards[(party.party_id, round)] = sha
        ref = common_pb2.BlobRef() if how == "no_shard" else self.ref(sha)
        return party_pb2.PublicLogitsResult(shard=ref, public_loss_bpb=1.25), {"public_loss_bpb": 1.25}

    def _distill(self, party, round, body, key):
        return party_pb2.DistillResult(kd_before=2.0, kd_after=1.0), {"distill_kd_after": 1.0}

    def _evaluate(self, party, round, body, key):
        return party_pb2.EvaluateResult(public_loss=1.0, eval_accuracy=0.5), {"eval_accuracy": 0.5}

    def _set_lora(self, party, round, body, key):
        state, _ = parse_adapter(self.store[body.adapter.sha256])
        self.state[(party.party_id, "")] = state
        lora_hash = body.adapter.sha256 if party.party_id not in self.cast else "f" * 64
        return party_pb2.SetLoraResult(lora_hash=lora_hash), {}

    def _get_lora(self, party, round, body, key):
        state = self.state[(party.party_id, body.target)]
        canonical = adapter_bytes(state)
        if not body.tag:
            sha = self._adapter(state)
        else:
            tags = {"cotune.run_id": self.run_id, "cotune.round": str(round), "cotune.task_key": key,
                    "cotune.party_id": party.party_id, "cotune.target": body.target or "model"}
            how = self.corrupt.get(party.party_id)
            if how == "round":
                tags["cotune.round"] = str(round - 1)
            if how == "nan":
                state = {k: np.full_like(v, np.nan) for k, v in state.items()}
            if how == "huge":
                state = {k: np.full_like(v, 1e30) for k, v in state.items()}
            data = dumps(state, {"format": LORA_FORMAT, "keys": json.dumps(len(state)), **tags})
            if how == "garbage":
                data = b"not safetensors"
            sha = self.put_artifact(data, MEDIA_ADAPTER)
        return party_pb2.GetLoraResult(adapter=self.ref(sha), lora_hash=hashlib.sha256(canonical).hexdigest()), {}

    def _co_distill(self, party, round, body, key):
        received = body.slm_adapter.sha256
        state, _ = parse_adapter(self.store[received])
        distilled = {k: v * np.float32(0.5) for k, v in state.items()}
        if self.corrupt.get(party.party_id) == "huge":
            distilled = {k: np.full_like(v, 1e30) for k, v in state.items()}
        self.state[(party.party_id, "companion")] = distilled
        sha = self._adapter(distilled)
        return (party_pb2.CoDistillResult(slm_adapter=self.ref(sha), received_lora_hash=received, llm_lora_hash="h" * 64,
                                          llm_kl_before=3.0, llm_kl_after=2.0), {"co_distill_loss": 1.0})

    def _compress(self, party, round, body, key):
        sha = self.put_artifact(f"archive {body.adapter_layers} {body.drop}".encode(), "application/x-tar")
        return (party_pb2.CompressResult(model=self.ref(sha), layer_map=[0, 2, 3], original_layers=4,
                                         adapter_layers=body.adapter_layers), {"compress_s": 1.0})

    def _load_model(self, party, round, body, key):
        return party_pb2.LoadModelResult(model=body.model.sha256, lora_hash="", lora_layout_hash=LAYOUT), {}

    def _align_emulator(self, party, round, body, key):
        if body.HasField("adapter"):
            state, _ = parse_adapter(self.store[body.adapter.sha256])
            self.state[(party.party_id, "compressed")] = {k: v + np.float32(0.01 * body.steps) for k, v in state.items()}
        return party_pb2.AlignEmulatorResult(lora_hash="e" * 64, full_lora_hash="g" * 64), {"align_loss": 0.5}

    # -- views -----------------------------------------------------------------------------------------------------
    def sequence(self) -> list[tuple[int, str, str, str]]:
        return [(r, s, p, k) for r, s, p, k, _ in self.tasks]

    def phases(self) -> list[tuple[int, str, str, frozenset]]:
        """Consecutive tasks of one (round, step, kind) merged: their parties as a set (parallel steps)."""
        out: list[tuple[int, str, str, set]] = []
        for r, s, p, k, _ in self.tasks:
            if out and out[-1][:3] == (r, s, k):
                out[-1][3].add(p)
            else:
                out.append((r, s, k, {p}))
        return [(r, s, k, frozenset(ps)) for r, s, k, ps in out]

    def requests(self, kind: str, *, party: str | None = None, round: int | None = None, step: str | None = None):
        return [m for r, s, p, k, m in self.tasks
                if k == kind and (party is None or p == party) and (round is None or r == round)
                and (step is None or s == step)]

    def one(self, kind: str, **kw):
        found = self.requests(kind, **kw)
        assert len(found) == 1, f"expected one {kind} {kw}, got {len(found)}"
        return found[0]


# -- parties ---------------------------------------------------------------------------------------------------------
PUBLIC = {"public_set_size": 3, "vocab_size": 100}  # what every fake party describes: its shards must agree


def _llm(*, tok=LLM_TOK, companion_tok: str | None = SLM_TOK, layers=8, private=0) -> PartyRef:
    info = party_pb2.PartyInfo(party_id="llm", role="llm", model_name="big", tokenizer_hash=tok, lora_layout_hash="L" * 64,
                               num_layers=layers, private_set_size=private, ready=True, **PUBLIC)
    if companion_tok is not None:
        info.companion.CopyFrom(party_pb2.CompanionInfo(model_name="small", tokenizer_hash=companion_tok,
                                                        lora_layout_hash=LAYOUT))
    return PartyRef("llm", "llm", info)


def _client(pid: str, tok: str = SLM_TOK) -> PartyRef:
    return PartyRef(pid, "slm", party_pb2.PartyInfo(party_id=pid, role="slm", model_name="small", tokenizer_hash=tok,
                                                    lora_layout_hash=LAYOUT, private_set_size=100, ready=True, **PUBLIC))


def _run(algorithm: str, llm: PartyRef, clients: list[PartyRef], *, section: dict | None = None, **shared):
    """Parse a spec as StartRun does (spec_from_dict -> parse_spec -> check), build a FakeDriver, execute; returns
    (driver, algorithm config). A failing execute propagates; the driver is attached to the exception."""
    d, strategy, config = _prepare(algorithm, llm, clients, section=section, **shared)
    strategy.execute(d, config)
    return d, config


def _prepare(algorithm: str, llm: PartyRef, clients: list[PartyRef], *, section: dict | None = None, **shared):
    strategy = get_strategy(algorithm)
    data: dict[str, Any] = {"algorithm": algorithm, "rounds": 2, **shared}
    if section is not None:
        data[strategy.config_class.section] = section
    run, config = parse_spec(spec_from_dict(data), strategy.config_class)
    problems = strategy.check(config, run, llm.info, {c.party_id: c.info for c in clients})
    assert problems == [], problems
    return FakeDriver(llm, clients, run), strategy, config


def _expect_failure(algorithm, llm, clients, *, setup: Callable[[FakeDriver], None], section=None, **shared):
    d, strategy, config = _prepare(algorithm, llm, clients, section=section, **shared)
    setup(d)
    with pytest.raises(Precondition) as err:
        strategy.execute(d, config)
    return d, err.value


def P(*ids: str) -> frozenset:
    return frozenset(ids)


ALL3 = P("llm", "c1", "c2")
CLIENTS = P("c1", "c2")


# == the round sequences ==============================================================================================
def test_fedmkt_heterogeneous_round_sequence():
    d, _ = _run("fedmkt", _llm(), [_client("c1", SLM_TOK), _client("c2", OTHER_TOK)])
    expected = [(0, "evaluate", "evaluate", ALL3)]
    for r in (1, 2):
        expected += [
            (r, "train_local", "train_local", CLIENTS),
            (r, "public_logits", "public_logits", CLIENTS),
            (r, "distill", "distill", P("llm")),
            (r, "public_logits", "public_logits", P("llm")),
            (r, "distill", "distill", CLIENTS),
            (r, "evaluate", "evaluate", ALL3),
        ]
    assert d.phases() == expected
    # alignment built once per run, both directions for each client on another tokenizer, before round 0's evaluation
    assert sorted((k, s, t) for k, s, t, _ in d.alignments) == sorted(
        (k, s, t) for k in ("vocab_map", "seq_alignment") for s, t in
        [("c1", "llm"), ("llm", "c1"), ("c2", "llm"), ("llm", "c2")])
    assert d.steps[:2] == [(0, "align"), (0, "evaluate")]
    assert [e for e in d.events if e[0] == "metrics"] == [("metrics", 1, "", "round 1 complete"),
                                                          ("metrics", 2, "", "round 2 complete")]


def test_llm2slm_round_sequence_sends_no_llm_distill():
    for algorithm, section in (("llm2slm", None), ("fedmkt", {"setting": "llm_to_slm"})):
        d, config = _run(algorithm, _llm(), [_client("c1"), _client("c2", OTHER_TOK)], section=section)
        assert config.setting == "llm_to_slm" and not config.mutual
        expected = [(0, "evaluate", "evaluate", ALL3)]
        for r in (1, 2):
            expected += [
                (r, "train_local", "train_local", CLIENTS),
                (r, "public_logits", "public_logits", P("llm")),
                (r, "distill", "distill", CLIENTS),
                (r, "evaluate", "evaluate", ALL3),
            ]
        assert d.phases() == expected, algorithm
        assert d.requests("distill", party="llm") == []
        assert [p for _, _, p, k in d.sequence() if k == "public_logits"] == ["llm", "llm"]


def _fedcollm_sequence(with_maps: bool):
    expected = [(0, "get_companion_lora", "get_lora", P("llm")),
                (0, "set_lora", "set_lora", CLIENTS),
                (0, "evaluate", "evaluate", ALL3)]
    for r in (1, 2):
        expected += [
            (r, "train_local", "train_local", CLIENTS),
            (r, "get_lora", "get_lora", CLIENTS),
            (r, "co_distill", "co_distill", P("llm")),
            (r, "set_lora", "set_lora", CLIENTS),
            (r, "evaluate", "evaluate", ALL3),
        ]
    return expected


def test_fedcollm_one_tokenizer_round_sequence():
    d, _ = _run("fedcollm", _llm(tok=SLM_TOK, companion_tok=SLM_TOK), [_client("c1"), _client("c2")])
    assert d.phases() == _fedcollm_sequence(False)
    assert d.alignments == []
    assert (0, "vocab_maps") not in d.steps
    assert d.steps.index((1, "get_lora")) < d.steps.index((1, "aggregate")) < d.steps.index((1, "co_distill"))


def test_fedcollm_align_tokenizers_round_sequence():
    d, _ = _run("fedcollm", _llm(tok=LLM_TOK, companion_tok=SLM_TOK), [_client("c1"), _client("c2")],
                section={"align_tokenizers": True})
    assert d.phases() == _fedcollm_sequence(True)
    # MinED maps both ways, built once per run in round 0 (the first client holds the SLM's tokenizer)
    assert sorted((k, s, t) for k, s, t, _ in d.alignments) == [("vocab_map", "c1", "llm"), ("vocab_map", "llm", "c1")]
    assert d.steps[0] == (0, "vocab_maps")


def _fedbiot_sequence():
    expected = [(0, "compress", "compress", P("llm")),
                (0, "load_model", "load_model", CLIENTS),
                (0, "align_emulator", "align_emulator", P("llm")),
                (0, "get_compressed_lora", "get_lora", P("llm")),
                (0, "set_lora", "set_lora", CLIENTS),
                (0, "evaluate", "evaluate", ALL3),
                (0, "evaluate_compressed", "evaluate", P("llm"))]
    for r in (1, 2):
        expected += [
            (r, "train_local", "train_adapter", CLIENTS),
            (r, "get_lora", "get_lora", CLIENTS),
            (r, "align_emulator", "align_emulator", P("llm")),
            (r, "get_compressed_lora", "get_lora", P("llm")),
            (r, "set_lora", "set_lora", CLIENTS),
            (r, "evaluate", "evaluate", ALL3),
            (r, "evaluate_compressed", "evaluate", P("llm")),
        ]
    return expected


@pytest.mark.parametrize("algorithm", ["fedbiot", "fedot"])
def test_fedbiot_and_fedot_round_sequence(algorithm):
    d, _ = _run(algorithm, _llm(), [_client("c1"), _client("c2")])
    assert d.phases() == _fedbiot_sequence()
    # the emulator + adapter evaluation is recorded under llm/emulator, the adapter-in-full-model under llm
    assert d.metrics[(1, "llm/emulator")] == {"eval_accuracy": 0.5}
    assert "eval_accuracy" in d.metrics[(1, "llm")]
    assert [n for n in d.notes if n[3] == "info"][0][1].startswith(f"{algorithm}: compressed the LLM into 3 of 4")


def test_fedavg_round_sequence():
    d, _ = _run("fedavg", _llm(companion_tok=None), [_client("c1"), _client("c2")])
    expected = [(0, "get_lora", "get_lora", P("c1")),
                (0, "set_lora", "set_lora", CLIENTS),
                (0, "evaluate", "evaluate", CLIENTS)]
    for r in (1, 2):
        expected += [
            (r, "train_local", "train_local", CLIENTS),
            (r, "get_lora", "get_lora", CLIENTS),
            (r, "set_lora", "set_lora", CLIENTS),
            (r, "evaluate", "evaluate", CLIENTS),
        ]
    assert d.phases() == expected
    assert all(p != "llm" for _, _, p, _ in d.sequence())  # no LLM involvement
    assert d.one("get_lora", round=0).tag is False  # the initial adapter is untagged; uploads are tagged
    assert all(m.tag for m in d.requests("get_lora", round=1))


def test_zero_shot_evaluates_once():
    d, _ = _run("zero-shot", _llm(), [_client("c1"), _client("c2")])
    assert d.phases() == [(0, "evaluate", "evaluate", ALL3)]
    assert [n[1] for n in d.notes] == ["zero-shot: evaluation only; rounds is ignored"]
    d, _ = _run("zero-shot", _llm(), [_client("c1")], rounds=1)
    assert d.notes == []


def test_standalone_round_sequence():
    d, _ = _run("standalone", _llm(), [_client("c1"), _client("c2")])
    expected = [(0, "evaluate", "evaluate", ALL3)]
    for r in (1, 2):
        expected += [(r, "train_local", "train_local", CLIENTS), (r, "evaluate", "evaluate", CLIENTS)]
    assert d.phases() == expected
    assert {m.epochs for m in d.requests("train_local")} == {1}
    assert all(n == [] for n in d.dropped.values())


@pytest.mark.parametrize("llm_private", [0, 500])
def test_centralized_round_sequence(llm_private):
    d, _ = _run("centralized", _llm(private=llm_private), [_client("c1")])
    trainees = P("llm", "c1") if llm_private else P("c1")
    expected = [(0, "evaluate", "evaluate", P("llm", "c1"))]
    for r in (1, 2):
        expected += [(r, "train_local", "train_local", trainees), (r, "evaluate", "evaluate", trainees)]
    assert d.phases() == expected
    # every round record says it is not federated
    labels = [(r, kind) for r, msg, _, kind in d.notes if "NON-FEDERATED" in msg]
    assert labels == [(0, "info"), (1, "info"), (2, "info")]


# == who gets what =====================================================================================================
def test_fedmkt_teachers_and_alignment_links():
    llm = _llm()
    c_same, c_other = _client("c1", LLM_TOK), _client("c2", OTHER_TOK)
    d, _ = _run("fedmkt", llm, [c_same, c_other], section={"alignment_method": "dtw"}, max_length=128)
    # only the client on another tokenizer gets links, both ways, at the run's max_length and alignment method
    assert {(k, s, t) for k, s, t, _ in d.alignments} == {("vocab_map", "c2", "llm"), ("vocab_map", "llm", "c2"),
                                                         ("seq_alignment", "c2", "llm"), ("seq_alignment", "llm", "c2")}
    assert all(kw == {"method": "dtw", "max_length": 128} for k, _, _, kw in d.alignments if k == "seq_alignment")
    pairs = {("c2", "llm"): (OTHER_TOK, LLM_TOK), ("llm", "c2"): (LLM_TOK, OTHER_TOK)}
    vm = {pair: d.local[f"r0/vocab_map/{a}/{b}"]["sha"] for pair, (a, b) in pairs.items()}
    sa = {pair: d.local[f"r0/seq_alignment/dtw/128/{a}/{b}"]["sha"] for pair, (a, b) in pairs.items()}
    for r in (1, 2):
        shards = {p: d.one("public_logits", party=p, round=r) for p in ("c1", "c2", "llm")}
        assert all(m.max_length == 128 for m in shards.values())
        llm_distill = d.one("distill", party="llm", round=r)
        teachers = {t.sender_id: t for t in llm_distill.teachers}
        assert set(teachers) == {"c1", "c2"}  # one teacher per active client
        assert not teachers["c1"].HasField("vocab_map") and not teachers["c1"].HasField("sequence_alignment")
        assert teachers["c2"].vocab_map.sha256 == vm[("c2", "llm")]
        assert teachers["c2"].sequence_alignment.sha256 == sa[("c2", "llm")]
        for pid, t in teachers.items():  # each teacher's shard is that client's public logits of this round
            assert t.shard.sha256 == d.shards[(pid, r)]
        for pid in ("c1", "c2"):
            (t,) = d.one("distill", party=pid, round=r).teachers
            assert t.sender_id == "llm" and t.shard.sha256 == d.shards[("llm", r)]
            if pid == "c1":
                assert not t.HasField("vocab_map") and not t.HasField("sequence_alignment")
            else:
                assert t.vocab_map.sha256 == vm[("llm", "c2")]
                assert t.sequence_alignment.sha256 == sa[("llm", "c2")]
        assert d.metrics[(r, "c1")]["public_loss_bpb"] == 1.25


def test_fedmkt_heterogeneous_two_foreign_tokenizers_each_get_their_links():
    d, _ = _run("fedmkt", _llm(), [_client("c1", SLM_TOK), _client("c2", OTHER_TOK)])
    teachers = {t.sender_id: t for t in d.one("distill", party="llm", round=1).teachers}
    assert teachers["c1"].vocab_map.sha256 != teachers["c2"].vocab_map.sha256
    assert all(t.HasField("vocab_map") and t.HasField("sequence_alignment") for t in teachers.values())
    for pid in ("c1", "c2"):
        (t,) = d.one("distill", party=pid, round=2).teachers
        assert t.HasField("vocab_map") and t.HasField("sequence_alignment")
    # the default alignment method and the run's default max_length
    assert {tuple(sorted(kw.items())) for k, _, _, kw in d.alignments if k == "seq_alignment"} == {
        (("max_length", 256), ("method", "offsets"))}


def test_fedmkt_task_fields_come_from_the_config():
    d, _ = _run("fedmkt", _llm(), [_client("c1"), _client("c2", OTHER_TOK)],
                section={"top_k": 8, "ce_weight": 0.3, "distill_epochs": 3, "selection": "fate_self", "logits_bits": 4},
                max_public_samples=64, max_length=64, local_epochs=2)
    for m in d.requests("public_logits"):
        assert (m.top_k, m.bits, m.max_samples, m.max_length) == (8, 4, 64, 64)
    for m in d.requests("distill"):
        assert (m.ce_weight, m.epochs, m.selection, m.max_samples, m.max_length) == (
            pytest.approx(0.3), 3, "fate_self", 64, 64)
        assert not m.HasField("lr") and not m.HasField("batch_size")
    assert {m.epochs for m in d.requests("train_local")} == {2}
    for m in d.requests("distill"):  # the defaults: the paper's MinED projection, every aligned position
        assert (m.projection, m.skip_span_mismatch) == ("mined", False)


def test_fedmkt_projection_options_reach_every_distill_task():
    d, _ = _run("fedmkt", _llm(), [_client("c1"), _client("c2", OTHER_TOK)],
                section={"projection": "first_token", "skip_span_mismatch": True})
    assert d.requests("distill") and all((m.projection, m.skip_span_mismatch) == ("first_token", True)
                                         for m in d.requests("distill"))


def test_llm2slm_clients_distil_from_the_llm_shard():
    d, _ = _run("llm2slm", _llm(), [_client("c1", LLM_TOK), _client("c2")])
    for r in (1, 2):
        for pid in ("c1", "c2"):
            (t,) = d.one("distill", party=pid, round=r).teachers
            assert t.sender_id == "llm" and t.shard.sha256 == d.shards[("llm", r)]
            assert t.HasField("vocab_map") == (pid == "c2")


def _uploads(d: FakeDriver, r: int, pids) -> dict[str, dict[str, np.ndarray]]:
    return {p: parse_adapter(d.store[d.artifacts[r][f"upload/{p}"]])[0] for p in pids}


def _check_aggregate(d: FakeDriver, r: int, pids, mode="factors"):
    ups = _uploads(d, r, pids)
    expected = fedavg([ups[p] for p in sorted(pids)], [SAMPLES[p] for p in sorted(pids)], mode=mode)
    assert d.store[d.artifacts[r]["aggregate"]] == adapter_bytes(expected)
    for p in pids:
        assert d.metrics[(r, p)]["fedavg_weight"] == SAMPLES[p]


@pytest.mark.parametrize("kl_weight", [0.0, 0.25, 2.0])
def test_fedcollm_co_distill_carries_the_aggregate_and_kl_weight(kl_weight):
    d, _ = _run("fedcollm", _llm(tok=SLM_TOK), [_client("c1"), _client("c2")],
                section={"kl_weight": kl_weight, "distill_epochs": 2, "top_k": 7}, max_public_samples=5, max_length=32)
    init = d.artifacts[0]["init"]
    assert d.store[init] == adapter_bytes(_state(0.5))  # round 0 takes θ⁰ from the LLM server's SLM copy
    assert d.one("get_lora", round=0).target == "companion"
    assert {m.adapter.sha256 for m in d.requests("set_lora", round=0)} == {init}
    for r in (1, 2):
        _check_aggregate(d, r, ["c1", "c2"])
        cd = d.one("co_distill", round=r)
        assert cd.slm_adapter.sha256 == d.artifacts[r]["aggregate"]
        assert cd.kl_weight == kl_weight
        assert (cd.epochs, cd.max_samples, cd.max_length, cd.top_k) == (2, 5, 32, 7)
        assert not cd.HasField("llm_to_slm_map") and not cd.HasField("slm_to_llm_map")
        # the distilled θ (not the aggregate) is broadcast
        distilled = d.artifacts[r]["distilled"]
        assert distilled != d.artifacts[r]["aggregate"]
        assert {m.adapter.sha256 for m in d.requests("set_lora", round=r)} == {distilled}
        assert d.artifacts[r]["broadcast"] == distilled
        assert all(m.tag and m.target == "" for m in d.requests("get_lora", round=r))
        assert d.metrics[(r, "llm")]["distill_kd_before"] == 3.0 and d.metrics[(r, "llm")]["distill_kd_after"] == 2.0
    assert [n for n in d.notes] == []  # the server loaded the aggregate as sent; no drops


@pytest.mark.parametrize("section, want", [({}, "forward"), ({"kl_direction": "reverse"}, "reverse")])
def test_fedcollm_co_distill_carries_the_kl_direction(section, want):
    d, _ = _run("fedcollm", _llm(tok=SLM_TOK), [_client("c1"), _client("c2")], section=section)
    assert {m.kl_direction for m in d.requests("co_distill")} == {want}


def test_fedcollm_aggregation_mode_product():
    d, _ = _run("fedcollm", _llm(tok=SLM_TOK), [_client("c1"), _client("c2")], section={"aggregation": "product"})
    _check_aggregate(d, 1, ["c1", "c2"], mode="product")


def test_fedcollm_align_tokenizers_sends_the_maps():
    d, _ = _run("fedcollm", _llm(tok=LLM_TOK), [_client("c1"), _client("c2")], section={"align_tokenizers": True})
    l2s = d.local[f"r0/vocab_map/{LLM_TOK}/{SLM_TOK}"]["sha"]
    s2l = d.local[f"r0/vocab_map/{SLM_TOK}/{LLM_TOK}"]["sha"]
    for r in (1, 2):
        cd = d.one("co_distill", round=r)
        assert cd.llm_to_slm_map.sha256 == l2s and cd.slm_to_llm_map.sha256 == s2l
        assert cd.top_k == 32  # the default


def test_fedbiot_task_fields():
    d, _ = _run("fedbiot", _llm(layers=12), [_client("c1"), _client("c2")],
                section={"adapter_layers": 3, "drop": 0.5, "pre_align_steps": 7, "align_steps": 4, "kl_weight": 0.5,
                         "prox_eps": 0.2, "aggregation": "product"}, max_public_samples=9, max_length=48, local_epochs=2)
    c = d.one("compress")
    assert (c.adapter_layers, c.drop) == (3, 0.5)
    archive = d.artifacts[0]["model"]
    assert {m.model.sha256 for m in d.requests("load_model")} == {archive}
    a0 = d.one("align_emulator", round=0)
    assert a0.steps == 7 and not a0.HasField("adapter")
    assert (a0.kl_weight, a0.max_samples, a0.max_length) == (0.5, 9, 48)
    assert not a0.HasField("lr")  # align_lr unset: the server's training.lr
    for r in (1, 2):
        a = d.one("align_emulator", round=r)
        assert a.steps == 4 and a.adapter.sha256 == d.artifacts[r]["aggregate"] and not a.HasField("lr")
        _check_aggregate(d, r, ["c1", "c2"], mode="product")
        for m in d.requests("train_adapter", round=r):
            assert (m.epochs, m.prox_eps) == (2, pytest.approx(0.2))
        assert d.requests("train_local", round=r) == []
        # the server's compressed LoRA (taken after alignment) is what clients get
        assert d.one("get_lora", party="llm", round=r).target == "compressed"
        assert {m.adapter.sha256 for m in d.requests("set_lora", round=r)} == {d.artifacts[r]["aligned"]}
    # round 1's uploads are validated against the adapter broadcast in round 0
    assert d.artifacts[0]["aligned"] == d.artifacts[0]["broadcast"]


@pytest.mark.parametrize("align_lr", [1e-5, 0.5])
def test_fedbiot_align_lr_is_sent_when_given(align_lr):
    d, _ = _run("fedbiot", _llm(), [_client("c1")], section={"align_lr": align_lr})
    assert [m.lr for m in d.requests("align_emulator")] == [pytest.approx(align_lr)] * 3
    assert all(m.HasField("lr") for m in d.requests("align_emulator"))


def test_fedot_never_realigns_after_round_zero():
    d, config = _run("fedot", _llm(), [_client("c1"), _client("c2")], section={"pre_align_steps": 5})
    assert config.align_steps == 0
    assert d.one("align_emulator", round=0).steps == 5
    for r in (1, 2):  # the aggregate is still plugged into the full model, with 0 alignment steps
        a = d.one("align_emulator", round=r)
        assert a.steps == 0 and a.adapter.sha256 == d.artifacts[r]["aggregate"]
    # fedbiot with the same settings re-aligns with its default S = 10
    d, _ = _run("fedbiot", _llm(), [_client("c1"), _client("c2")], section={"pre_align_steps": 5})
    assert [d.one("align_emulator", round=r).steps for r in (0, 1, 2)] == [5, 10, 10]


def test_fedavg_broadcasts_the_aggregate():
    d, _ = _run("fedavg", _llm(companion_tok=None), [_client("c1"), _client("c2")])
    init = d.artifacts[0]["init"]
    assert d.store[init] == adapter_bytes(_state(1))  # the first client's adapter
    assert {m.adapter.sha256 for m in d.requests("set_lora", round=0)} == {init}
    for r in (1, 2):
        _check_aggregate(d, r, ["c1", "c2"])
        assert {m.adapter.sha256 for m in d.requests("set_lora", round=r)} == {d.artifacts[r]["aggregate"]}


def test_broadcast_notes_a_client_holding_another_hash():
    d, strategy, config = _prepare("fedavg", _llm(companion_tok=None), [_client("c1"), _client("c2")])
    d.cast.add("c2")
    strategy.execute(d, config)
    cast = [n for n in d.notes if "dtype cast" in n[1]]
    assert [(r, dropped) for r, _, dropped, _ in cast] == [(0, ""), (1, ""), (2, "")]
    assert all("c2" in msg for _, msg, _, _ in cast)


# == quorum and drops ==================================================================================================
ROUND_ALGORITHMS = ["fedmkt", "llm2slm", "fedcollm", "fedbiot", "fedot", "fedavg", "standalone"]


def _train_kind(algorithm):
    return "train_adapter" if algorithm in ("fedbiot", "fedot") else "train_local"


def _parties_for(algorithm):
    llm = _llm(tok=SLM_TOK) if algorithm == "fedcollm" else _llm()
    return llm, [_client("c1"), _client("c2", OTHER_TOK if algorithm in ("fedmkt", "llm2slm") else SLM_TOK)]


@pytest.mark.parametrize("algorithm", ROUND_ALGORITHMS)
def test_a_failing_client_is_dropped_when_quorum_allows(algorithm):
    llm, clients = _parties_for(algorithm)
    kind = _train_kind(algorithm)
    d, strategy, config = _prepare(algorithm, llm, clients, min_clients=1)
    d.fail[("c2", kind, 1)] = "out of memory"
    strategy.execute(d, config)
    assert d.dropped[1] == ["c2"]
    (note,) = [n for n in d.notes if n[2] == "c2"]
    assert note[0] == 1 and "train_local: c2 dropped from round 1: out of memory" in note[1]
    # c2 takes no part in the rest of round 1's exchange
    train_at = next(i for i, t in enumerate(d.tasks) if t[0] == 1 and t[3] == kind and t[2] == "c2")
    later = [(s, k) for r, s, p, k, _ in d.tasks[train_at + 1:] if r == 1 and p == "c2"]
    exchange = {"public_logits", "distill", "get_lora", "co_distill"}
    assert not [x for x in later if x[1] in exchange], later
    if algorithm in ("fedmkt", "llm2slm", "standalone"):  # these drop it for the whole round, evaluation included
        assert later == []
    else:  # adapter algorithms broadcast the round's result to every client (re-sync), then evaluate everyone
        assert later == [("set_lora", "set_lora"), ("evaluate", "evaluate")]
    if algorithm in ("fedcollm", "fedbiot", "fedot", "fedavg"):
        assert "upload/c2" not in d.artifacts[1] and "upload/c1" in d.artifacts[1]
        _check_aggregate(d, 1, ["c1"])
    if algorithm == "fedmkt":
        assert [t.sender_id for t in d.one("distill", party="llm", round=1).teachers] == ["c1"]
    # round 2 runs with both again
    assert {p for r, _, p, k in d.sequence() if r == 2 and k == kind} == {"c1", "c2"}
    assert 2 not in d.dropped


@pytest.mark.parametrize("algorithm", ROUND_ALGORITHMS)
def test_a_failing_client_fails_the_run_under_the_default_quorum(algorithm):
    llm, clients = _parties_for(algorithm)
    d, err = _expect_failure(algorithm, llm, clients,
                             setup=lambda d: d.fail.__setitem__(("c2", _train_kind(algorithm), 1), "out of memory"))
    assert "round 1 train_local" in str(err) and "quorum is 2" in str(err) and "c2: out of memory" in str(err)
    assert not [t for t in d.tasks if t[0] == 2]  # nothing of round 2 ran
    assert d.dropped[1] == ["c2"]


def test_fedmkt_drops_a_client_failing_public_logits():
    d, strategy, config = _prepare("fedmkt", _llm(), [_client("c1"), _client("c2")], min_clients=1)
    d.fail[("c1", "public_logits", 1)] = "boom"
    strategy.execute(d, config)
    assert d.dropped[1] == ["c1"]
    # no shard from c1: the LLM distils from c2 alone; c1 gets no distill and no evaluation this round
    assert [t.sender_id for t in d.one("distill", party="llm", round=1).teachers] == ["c2"]
    assert d.requests("distill", party="c1", round=1) == []
    assert {p for r, s, p, k in d.sequence() if r == 1 and k == "evaluate"} == {"llm", "c2"}
    assert {p for r, s, p, k in d.sequence() if r == 2 and k == "distill"} == {"llm", "c1", "c2"}


def test_fedmkt_client_failing_distill_is_not_evaluated_in_that_round():
    """BUG (minor): FedMKT drops a client that fails train_local or public_logits from the rest of the round, but
    the result of the client_distill step (`out.ok`) does not narrow `active`: a client that failed its distill is
    noted as dropped from the round (round record `dropped`), yet still evaluated, so the round record carries eval
    metrics for a dropped party, measured on a model that missed the round's distillation."""
    d, strategy, config = _prepare("fedmkt", _llm(), [_client("c1"), _client("c2")], min_clients=1)
    d.fail[("c1", "distill", 1)] = "boom"
    strategy.execute(d, config)
    assert d.dropped[1] == ["c1"]
    assert {p for r, s, p, k in d.sequence() if r == 1 and k == "evaluate"} == {"llm", "c2"}


@pytest.mark.parametrize("how", ["round", "nan", "garbage"])
@pytest.mark.parametrize("algorithm", ["fedcollm", "fedavg", "fedbiot"])
def test_a_malformed_upload_is_dropped_at_aggregation(algorithm, how):
    llm, clients = _parties_for(algorithm)
    d, strategy, config = _prepare(algorithm, llm, clients, min_clients=1)
    d.corrupt["c2"] = how
    strategy.execute(d, config)
    for r in (1, 2):
        assert d.dropped[r] == ["c2"]
        (note,) = [n for n in d.notes if n[0] == r and n[2] == "c2"]
        assert note[1].startswith(f"aggregate: c2 dropped from round {r}: upload rejected: ")
        assert {"round": "tagged round='", "nan": "NaN", "garbage": "not a valid safetensors"}[how] in note[1]
        _check_aggregate(d, r, ["c1"])
        assert "fedavg_weight" not in d.metrics.get((r, "c2"), {})
        assert d.artifacts[r]["upload/c2"]  # what it sent is still kept for audit


@pytest.mark.parametrize("algorithm", ["fedcollm", "fedavg", "fedbiot"])
def test_a_malformed_upload_fails_the_run_under_the_default_quorum(algorithm):
    llm, clients = _parties_for(algorithm)
    d, err = _expect_failure(algorithm, llm, clients, setup=lambda d: d.corrupt.__setitem__("c2", "round"))
    assert str(err).startswith("round 1 aggregation: only 1 valid upload(s), 2 needed")
    assert "c2: adapter is tagged round='0'" in str(err)
    assert not [t for t in d.tasks if t[0] == 1 and t[3] in ("co_distill", "align_emulator", "set_lora")]


def test_an_llm_failure_fails_the_run():
    for algorithm, kind in (("fedmkt", "distill"), ("fedcollm", "co_distill"), ("fedbiot", "align_emulator")):
        llm, clients = _parties_for(algorithm)
        _, err = _expect_failure(algorithm, llm, clients, min_clients=1,
                                 setup=lambda d: d.fail.__setitem__(("llm", kind, 1), "server down"))
        assert "server down" in str(err)


def test_evaluation_failures_never_fail_the_run():
    d, strategy, config = _prepare("standalone", _llm(), [_client("c1"), _client("c2")])
    d.fail[("c2", "evaluate")] = "eval crashed"
    strategy.execute(d, config)  # evaluation has quorum 1
    assert d.dropped == {0: ["c2"], 1: ["c2"], 2: ["c2"]}


def test_fedbiot_client_failing_load_model_takes_no_further_part_in_round_0():
    """BUG: a client that failed load_model (dropped, quorum allowing) does not hold the compressed model, yet FedBiOT
    still sends it the round-0 set_lora of the compressed LoRA and evaluates it (its uncompressed model, reported as
    if it were emulator + adapter), because the strategy broadcasts to and evaluates `d.clients`, not the clients that
    loaded the archive."""
    d, strategy, config = _prepare("fedbiot", _llm(), [_client("c1"), _client("c2")], min_clients=1)
    d.fail[("c2", "load_model")] = "disk full"
    strategy.execute(d, config)
    assert d.dropped[0] == ["c2"]
    round0_after = [(s, k) for r, s, p, k in d.sequence() if r == 0 and p == "c2" and k != "load_model"]
    assert round0_after == [], f"c2 failed load_model but still got {round0_after} in round 0"


def test_centralized_default_quorum_requires_the_client():
    """BUG: centralized trains [llm, client] when the LLM server holds private data, with the quorum of
    `run.quorum(len(d.clients))` = 1 when min_clients is unset ("every selected client"). The one client failing
    train_local is then dropped while the LLM's success meets the quorum, so the non-federated reference silently
    continues without the client it exists for."""
    d, strategy, config = _prepare("centralized", _llm(private=500), [_client("c1")])
    d.fail[("c1", "train_local", 1)] = "out of memory"
    with pytest.raises(Precondition, match="round 1 train_local"):
        strategy.execute(d, config)


# == values the old "0 = default" made impossible arrive as 0 ============================================================
def test_zero_values_reach_the_tasks():
    d, config = _run("fedmkt", _llm(), [_client("c1"), _client("c2")], section={"ce_weight": 0})
    assert config.ce_weight == 0.0
    assert {m.ce_weight for m in d.requests("distill")} == {0.0}

    d, config = _run("fedcollm", _llm(tok=SLM_TOK), [_client("c1")], section={"kl_weight": 0})
    assert config.kl_weight == 0.0
    assert [m.kl_weight for m in d.requests("co_distill")] == [0.0, 0.0]

    d, config = _run("fedbiot", _llm(), [_client("c1")],
                     section={"prox_eps": 0, "kl_weight": 0, "pre_align_steps": 0, "align_steps": 0})
    assert (config.prox_eps, config.kl_weight, config.pre_align_steps, config.align_steps) == (0, 0, 0, 0)
    assert [m.prox_eps for m in d.requests("train_adapter")] == [0.0, 0.0]
    assert [(m.kl_weight, m.steps) for m in d.requests("align_emulator")] == [(0.0, 0)] * 3


def test_defaults_reach_the_tasks():
    d, _ = _run("fedmkt", _llm(), [_client("c1")])
    assert {(m.ce_weight, m.epochs, m.selection) for m in d.requests("distill")} == {(0.9, 1, "dualmince")}
    assert {(m.top_k, m.bits, m.max_length, m.max_samples) for m in d.requests("public_logits")} == {(16, 0, 256, 0)}
    d, _ = _run("fedbiot", _llm(), [_client("c1")])
    assert [m.prox_eps for m in d.requests("train_adapter")] == [0.01, 0.01]
    assert [(m.steps, m.kl_weight) for m in d.requests("align_emulator")] == [(20, 1.0), (10, 1.0), (10, 1.0)]
    assert (d.one("compress").adapter_layers, d.one("compress").drop) == (2, pytest.approx(0.2))
    d, _ = _run("fedcollm", _llm(tok=SLM_TOK), [_client("c1")])
    assert {(m.kl_weight, m.epochs, m.top_k) for m in d.requests("co_distill")} == {(1.0, 1, 32)}
    d, _ = _run("standalone", _llm(), [_client("c1")], eval_max_samples=3)
    assert {m.max_samples for m in d.requests("evaluate")} == {3}


# -- overlap of independent steps ------------------------------------------------------------------------------------
def test_fedmkt_evaluates_the_llm_while_the_clients_distil():
    d, _ = _run("fedmkt", _llm(), [_client("c1", LLM_TOK), _client("c2", LLM_TOK)])
    assert d.overlapped == [[{("c1", "distill"), ("c2", "distill")}, {("llm", "evaluate")}]] * 2
    d, _ = _run("fedmkt", _llm(), [_client("c1", LLM_TOK), _client("c2", LLM_TOK)], overlap_steps=False)
    # the reference order: clients distil, then everyone is evaluated in one step
    evaluate_steps = [(r, p) for r, s, p, k in d.sequence() if k == "evaluate"]
    assert evaluate_steps == [(0, "llm"), (0, "c1"), (0, "c2"), (1, "llm"), (1, "c1"), (1, "c2"),
                              (2, "llm"), (2, "c1"), (2, "c2")]


def test_llm2slm_computes_the_frozen_llms_logits_while_the_clients_train():
    d, _ = _run("llm2slm", _llm(), [_client("c1", LLM_TOK), _client("c2", LLM_TOK)])
    first = d.overlapped[0]
    assert first[0] == {("c1", "train_local"), ("c2", "train_local")} and first[1] == {("llm", "public_logits")}
