"""FedCoLLM's co-distillation step on the LLM server (no gRPC) when the companion SLM's tokenizer differs from the LLM's:
the maps are required, checked for direction, and then used."""

from __future__ import annotations

import pytest

from tests.unit.alignment_fixtures import tokenizer


def _llm_server(root, llm_tok: str, slm_tok: str, party_id: str):
    """A tiny LLM server holding a companion SLM (its tokenizer may differ from the LLM's), loaded."""
    from cotune.config import DataConfig, LoraConfig, ModelConfig, PartyConfig, TrainingConfig
    from cotune.data import load_task, write_jsonl
    from cotune.demo.tiny import make_tiny_model
    from llm_server.server import LLMServer

    llm_dir = make_tiny_model(tokenizer(llm_tok), root / "llm", hidden=64, layers=2, seed=1)
    slm_dir = make_tiny_model(tokenizer(slm_tok), root / "slm", hidden=32, layers=1, seed=2)
    write_jsonl(root / "public.jsonl", load_task("arc_easy", "train", limit=8))
    cfg = PartyConfig(party_id=party_id, workdir=str(root / "llm-work"),
                      model=ModelConfig(path=str(llm_dir), device="cpu", dtype="fp32", companion_slm_path=str(slm_dir)),
                      lora=LoraConfig(r=4, dropout=0.0), companion_lora=LoraConfig(r=4, dropout=0.0),
                      training=TrainingConfig(lr=1e-2, batch_size=4, max_length=64),
                      data=DataConfig(public=str(root / "public.jsonl")))
    party = LLMServer(cfg)
    party.load()
    return party


@pytest.fixture(scope="module")
def llm_party(tmp_path_factory):
    party = _llm_server(tmp_path_factory.mktemp("fedcollm-party"), "mistral-hf", "gpt2", "llm")
    yield party
    party.ops.shutdown()


def _request(party, **fields):
    from cotune.algorithms.fedcollm.server import companion_of
    from cotune.v1 import party_pb2
    from cotune.wire.media import MEDIA_ADAPTER

    adapter = party.store.put_bytes(party.lora_bytes(companion_of(party).model), MEDIA_ADAPTER)
    return party_pb2.TaskRequest(ctx=party_pb2.RunContext(run_id="run", round=1),
                                 co_distill=party_pb2.CoDistillTask(slm_adapter=adapter.ref(), kl_weight=5.0, top_k=8,
                                                                    epochs=1, max_length=64, **fields))


def test_cross_tokenizer_co_distill_needs_both_maps_the_right_way_round(llm_party):
    from cotune.algorithms.fedcollm.server import companion_of
    from cotune.align.mined import build_vocab_map
    from cotune.errors import InvalidInput
    from cotune.v1 import operations_pb2, party_pb2

    party = llm_party
    companion = companion_of(party)
    assert companion.tokenizer_hash != party.tokenizer_hash
    before = (party.describe().lora_hash, party.describe().companion.lora_hash)
    with pytest.raises(InvalidInput, match="llm_to_slm_map and slm_to_llm_map"):
        party.start_task(_request(party))
    l2s = party.store.put_bytes(build_vocab_map(party.tokenizer, companion.tokenizer).to_bytes()).ref()
    s2l = party.store.put_bytes(build_vocab_map(companion.tokenizer, party.tokenizer).to_bytes()).ref()
    with pytest.raises(InvalidInput, match="expected"):
        party.start_task(_request(party, llm_to_slm_map=s2l, slm_to_llm_map=l2s))
    assert (party.describe().lora_hash, party.describe().companion.lora_hash) == before  # refusals changed nothing

    op = party.start_task(_request(party, llm_to_slm_map=l2s, slm_to_llm_map=s2l))
    done = party.ops.wait(op.id, 120)
    assert done.state == operations_pb2.OPERATION_SUCCEEDED, done.error_message
    m = done.metrics
    assert m["codistill_positions"] > 0 and 0 < m["codistill_aligned_fraction"] <= 1
    result = party_pb2.CoDistillResult()
    assert done.result.Unpack(result)
    assert result.slm_adapter.sha256 != before[1] and party.describe().lora_hash != before[0]  # both sides trained
    assert result.slm_adapter == done.blobs["slm_adapter"] and result.llm_lora_hash == party.describe().lora_hash
    # the LLM's own distillation term (forward: KL(g̃‖f)) is llm_kl, as with one tokenizer
    assert (result.llm_kl_before, result.llm_kl_after) == (m["codistill_llm_kl_before"], m["codistill_llm_kl_after"])
    assert m["codistill_truncated_samples"] == 0


@pytest.fixture(scope="module")
def same_tokenizer_party(tmp_path_factory):
    party = _llm_server(tmp_path_factory.mktemp("fedcollm-party-same"), "gpt2", "gpt2", "llm-same")
    yield party
    party.ops.shutdown()


def test_one_tokenizer_co_distill_reports_the_llm_kl_and_takes_kl_weight_as_given(same_tokenizer_party, monkeypatch):
    import cotune.algorithms.fedcollm.losses as losses
    from cotune.algorithms.fedcollm.server import companion_of
    from cotune.errors import InvalidInput
    from cotune.v1 import operations_pb2, party_pb2

    party = same_tokenizer_party
    assert companion_of(party).tokenizer_hash == party.tokenizer_hash
    info = party.describe()
    assert info.companion.tokenizer_hash == info.tokenizer_hash and info.companion.lora_hash
    with pytest.raises(InvalidInput, match="kl_weight"):
        party.start_task(_with(party, kl_weight=-1.0))

    with pytest.raises(InvalidInput, match="kl_direction"):
        party.start_task(_with(party, kl_direction="backward"))

    seen = []
    real = losses.co_distill

    def spy(*args, **kwargs):
        seen.append((kwargs["lam"], kwargs["direction"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "co_distill", spy)
    done = party.ops.wait(party.start_task(_with(party, kl_weight=0.0)).id, 120)
    assert done.state == operations_pb2.OPERATION_SUCCEEDED, done.error_message
    assert seen == [(0.0, "forward")]  # 0 = CE only, passed through as given; unset direction = forward
    result = party_pb2.CoDistillResult()
    assert done.result.Unpack(result)
    m = done.metrics
    assert (result.llm_kl_before, result.llm_kl_after) == (m["codistill_llm_kl_before"], m["codistill_llm_kl_after"])
    assert result.slm_adapter == done.blobs["slm_adapter"]


def _with(party, **fields):
    request = _request(party)
    for name, value in fields.items():
        setattr(request.co_distill, name, value)
    return request
