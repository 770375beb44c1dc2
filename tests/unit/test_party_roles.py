"""The two roles (no gRPC): each serves exactly its documented task table, a task of the other role is refused with
FAILED_PRECONDITION naming the role, targets resolve or are refused, results are typed, and cotune/party stays free
of algorithm code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.unit.lm_fixtures import TOKENIZER, needs_tokenizer, toy_examples

LLM_TASKS = {"evaluate", "get_lora", "set_lora", "public_logits", "distill", "co_distill", "compress", "align_emulator"}
SLM_TASKS = {"train_local", "evaluate", "get_lora", "set_lora", "public_logits", "distill", "load_model", "train_adapter"}
PARTY_DIR = Path(__file__).resolve().parents[2] / "cotune" / "party"


def test_cotune_party_imports_no_algorithm():
    files = sorted(PARTY_DIR.glob("*.py"))
    assert files
    offending = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            offending += [f"{path.name}:{node.lineno} {n}" for n in names
                          if n == "cotune.algorithms" or n.startswith("cotune.algorithms.")]
    assert not offending, f"cotune/party imports algorithm modules: {offending}"


_examples = toy_examples


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from cotune.align.tokenizers import load_tokenizer
    from cotune.data.tasks import write_jsonl
    from cotune.demo.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("party-roles")
    model_dir = make_tiny_model(load_tokenizer(TOKENIZER), root / "model", arch="llama", hidden=32, heads=2, layers=2)
    write_jsonl(root / "public.jsonl", _examples(4))
    write_jsonl(root / "private.jsonl", _examples(4))
    return root, model_dir


def _cfg(root, model_dir, name, *, private: bool):
    from cotune.config import DataConfig, LoraConfig, ModelConfig, PartyConfig, TrainingConfig

    return PartyConfig(
        party_id=name, workdir=str(root / name),
        model=ModelConfig(path=str(model_dir), device="cpu", dtype="fp32"),
        lora=LoraConfig(r=4, dropout=0.0),
        training=TrainingConfig(lr=5e-3, batch_size=4, max_length=32),
        data=DataConfig(public=str(root / "public.jsonl"), private=str(root / "private.jsonl") if private else ""))


def _loaded(party):
    party.load()
    return party


@pytest.fixture(scope="module")
def parties(data):
    """A loaded LLM server without private data and a loaded SLM client."""
    from llm_server.server import LLMServer
    from slm_client.client import SLMClient

    root, model_dir = data
    llm = _loaded(LLMServer(_cfg(root, model_dir, "llm", private=False)))
    slm = _loaded(SLMClient(_cfg(root, model_dir, "slm", private=True)))
    yield llm, slm
    llm.ops.shutdown()
    slm.ops.shutdown()


def _request(kind, round_=1, **fields):
    from cotune.v1 import party_pb2

    req = party_pb2.TaskRequest(ctx=party_pb2.RunContext(run_id="run", round=round_))
    task = getattr(req, kind)
    task.CopyFrom(type(task)(**fields))  # sets the oneof even when `fields` is empty
    return req


def _done(party, op):
    from cotune.v1 import operations_pb2

    done = party.ops.wait(op.id, 120)
    assert done.state == operations_pb2.OPERATION_SUCCEEDED, done.error_message
    return done


def _result(op):
    from cotune.tasks import RESULT_TYPES

    result = RESULT_TYPES[op.kind]()
    assert op.result.Unpack(result), f"{op.kind}: operation result is {op.result.type_url!r}"
    return result


@needs_tokenizer
def test_task_tables_are_the_documented_sets(data):
    from cotune.tasks import TASK_KINDS
    from llm_server.server import LLMServer
    from slm_client.client import SLMClient

    root, model_dir = data
    llm = LLMServer(_cfg(root, model_dir, "llm-tables", private=False))
    centralized = LLMServer(_cfg(root, model_dir, "llm-central", private=True))
    slm = SLMClient(_cfg(root, model_dir, "slm-tables", private=True))
    try:
        assert set(llm.tasks) == LLM_TASKS
        assert set(centralized.tasks) == LLM_TASKS | {"train_local"}
        assert set(slm.tasks) == SLM_TASKS
        assert set(llm.tasks) | set(slm.tasks) == set(TASK_KINDS)  # every task kind is served by some role
        assert (llm.role, slm.role) == ("llm", "slm")
    finally:
        for p in (llm, centralized, slm):
            p.ops.shutdown()


@needs_tokenizer
def test_a_task_of_the_other_role_is_refused_naming_the_role(parties):
    from cotune.errors import Precondition

    llm, slm = parties
    with pytest.raises(Precondition, match=r"^the LLM server does not serve train_adapter \(SLM client task\)"):
        llm.start_task(_request("train_adapter", epochs=1))
    with pytest.raises(Precondition, match="the LLM server does not serve load_model"):
        llm.start_task(_request("load_model"))
    with pytest.raises(Precondition, match="the LLM server does not serve train_local"):
        llm.start_task(_request("train_local", epochs=1))
    for kind in ("compress", "align_emulator", "co_distill"):
        with pytest.raises(Precondition, match=f"^an SLM client does not serve {kind}"):
            slm.start_task(_request(kind))


@needs_tokenizer
def test_llm_server_with_private_data_trains_locally(data):
    from llm_server.server import LLMServer

    root, model_dir = data
    llm = _loaded(LLMServer(_cfg(root, model_dir, "llm-private", private=True)))
    try:
        before = llm.describe().lora_hash
        done = _done(llm, llm.start_task(_request("train_local", epochs=1)))
        result = _result(done)
        assert result.samples == done.metrics["train_samples"] == 4
        assert result.loss_first == done.metrics["train_loss_first"]
        assert llm.describe().lora_hash != before
    finally:
        llm.ops.shutdown()


@needs_tokenizer
def test_targets_unknown_absent_and_held(parties):
    from cotune.errors import InvalidInput, Precondition

    llm, slm = parties
    for party in (llm, slm):
        with pytest.raises(InvalidInput, match="target"):
            party.start_task(_request("get_lora", target="nonsense"))
    with pytest.raises(Precondition, match="CompressTask"):
        llm.start_task(_request("get_lora", target="compressed"))
    with pytest.raises(Precondition, match="companion_slm_path"):
        llm.start_task(_request("evaluate", target="companion"))
    with pytest.raises(Precondition, match="an SLM client"):
        slm.start_task(_request("get_lora", target="companion"))
    done = _done(slm, slm.start_task(_request("get_lora", target="model")))
    assert _result(done).lora_hash == slm.describe().lora_hash
    assert _result(done).adapter == done.blobs["adapter"]


@needs_tokenizer
def test_generic_tasks_return_typed_results_and_validate_first(parties):
    import math

    from cotune.errors import InvalidInput, Precondition

    llm, slm = parties
    evaluated = _done(llm, llm.start_task(_request("evaluate")))
    result = _result(evaluated)
    assert result.public_loss == evaluated.metrics["public_loss"] and math.isnan(result.eval_accuracy)

    got = _done(llm, llm.start_task(_request("get_lora")))
    ref = slm.store.put_bytes(llm.store.read_bytes(got.blobs["adapter"].sha256), "application/safetensors+lora").ref()
    set_ = _done(slm, slm.start_task(_request("set_lora", adapter=ref)))
    assert _result(set_).lora_hash == slm.describe().lora_hash == llm.describe().lora_hash

    before = slm.describe().lora_hash
    junk = slm.store.put_bytes(b"not safetensors at all" * 4).ref()
    with pytest.raises(InvalidInput, match="adapter"):
        slm.start_task(_request("set_lora", adapter=junk))
    with pytest.raises(InvalidInput, match="epochs"):
        slm.start_task(_request("train_local", epochs=0))
    with pytest.raises(InvalidInput, match="lr"):
        slm.start_task(_request("train_local", epochs=1, lr=-1.0))
    with pytest.raises(InvalidInput, match="max_length"):
        slm.start_task(_request("public_logits", top_k=4, max_length=0))
    shard = slm.store.put_bytes(b"garbage shard bytes" * 8).ref()
    with pytest.raises(InvalidInput, match="shard from llm"):
        slm.start_task(_request("distill", teachers=[{"sender_id": "llm", "shard": shard}], selection="dualmince",
                                epochs=1, max_length=32))
    with pytest.raises(Precondition, match="compressed model"):
        slm.start_task(_request("train_adapter", epochs=1))
    assert slm.describe().lora_hash == before  # refused requests changed nothing

    logits = _done(slm, slm.start_task(_request("public_logits", top_k=4, max_length=32)))
    assert _result(logits).shard == logits.blobs["shard"]
    assert _result(logits).public_loss_bpb == logits.metrics["public_loss_bpb"]


@needs_tokenizer
def test_a_party_releases_memory_after_every_task_failed_or_not(parties, monkeypatch):
    import cotune.lm.device as device
    from cotune.lm.train import Trainer
    from cotune.v1 import operations_pb2

    calls = []
    monkeypatch.setattr(device, "release_freed_memory", lambda: calls.append(1) or True)
    llm, slm = parties
    _done(slm, slm.start_task(_request("train_local", epochs=1)))
    _done(llm, llm.start_task(_request("evaluate")))
    assert len(calls) == 2

    def fail(*_a, **_k):
        raise RuntimeError("the task's work failed")

    monkeypatch.setattr(Trainer, "train_ce", fail)
    op = slm.start_task(_request("train_local", epochs=1))
    assert slm.ops.wait(op.id, 120).state == operations_pb2.OPERATION_FAILED
    assert len(calls) == 3


@needs_tokenizer
def test_a_bf16_party_without_native_bf16_runs_its_tasks_with_fp32_products(data, parties, monkeypatch):
    """bf16 on a CPU without AMX or AVX512-BF16: the party's tasks run under Bf16MatmulInFp32 (its products widened);
    an fp32 party's do not."""
    import cotune.lm.device as device
    from cotune.config import ModelConfig
    from slm_client.client import SLMClient

    modes = []

    class Spy(device.Bf16MatmulInFp32):
        def __init__(self):
            super().__init__()
            modes.append(self)

    monkeypatch.setattr(device, "Bf16MatmulInFp32", Spy)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    root, model_dir = data
    cfg = _cfg(root, model_dir, "slm-bf16", private=True)
    cfg.model = ModelConfig(path=str(model_dir), device="cpu", dtype="bf16")
    slm = _loaded(SLMClient(cfg))
    try:
        assert slm.bf16_in_fp32
        _done(slm, slm.start_task(_request("train_local", epochs=1)))
        assert len(modes) == 1 and modes[0].widened > 0
    finally:
        slm.ops.shutdown()
    fp32 = parties[1]
    assert not fp32.bf16_in_fp32
    _done(fp32, fp32.start_task(_request("evaluate")))
    assert len(modes) == 1
