"""Spec validation of the LoRA-moving strategies (fedcollm, fedavg) and the baselines' registration."""

from __future__ import annotations

import grpc
import pytest

from cotune.errors import InvalidInput, Precondition
from cotune.v1 import coordinator_pb2 as pb
from cotune.v1 import party_pb2
from cotune.algorithms.registry import STRATEGIES, get_strategy

TOK, OTHER_TOK, SLM_LAYOUT, LLM_LAYOUT = "t" * 64, "u" * 64, "s" * 64, "l" * 64


def _llm(companion=True, companion_tok=TOK, companion_layout=SLM_LAYOUT):
    info = party_pb2.PartyInfo(party_id="llm", role="llm", tokenizer_hash=TOK, lora_layout_hash=LLM_LAYOUT, ready=True)
    if companion:
        info.companion.CopyFrom(party_pb2.CompanionInfo(model_name="slm", tokenizer_hash=companion_tok,
                                                        lora_layout_hash=companion_layout))
    return info


def _clients(*specs):
    return {f"c{i}": party_pb2.PartyInfo(party_id=f"c{i}", role="slm", tokenizer_hash=t, lora_layout_hash=lay, ready=True)
            for i, (t, lay) in enumerate(specs, 1)}


def test_every_algorithm_is_registered():
    assert set(STRATEGIES) >= {"fedmkt", "fedcollm", "fedbiot", "fedot", "zero-shot", "standalone", "fedavg", "llm2slm",
                               "centralized"}
    with pytest.raises(InvalidInput, match="unknown algorithm"):
        get_strategy("fedbiot-typo")


def test_fedcollm_accepts_a_consistent_setup():
    get_strategy("fedcollm").validate(pb.RunSpec(rounds=1), _llm(), _clients((TOK, SLM_LAYOUT), (TOK, SLM_LAYOUT)))


def test_fedcollm_needs_a_companion_slm_on_the_llm_server():
    with pytest.raises(Precondition, match="model.companion_slm_path") as err:
        get_strategy("fedcollm").validate(pb.RunSpec(rounds=1), _llm(companion=False), _clients((TOK, SLM_LAYOUT)))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_fedcollm_across_tokenizers_needs_align_tokenizers():
    # clients that differ from each other can never average adapters
    with pytest.raises(InvalidInput, match="share one tokenizer"):
        get_strategy("fedcollm").validate(pb.RunSpec(rounds=1), _llm(), _clients((TOK, SLM_LAYOUT), (OTHER_TOK, SLM_LAYOUT)))
    # an SLM on another tokenizer than the LLM: only with align_tokenizers
    with pytest.raises(InvalidInput, match="align_tokenizers"):
        get_strategy("fedcollm").validate(pb.RunSpec(rounds=1), _llm(companion_tok=OTHER_TOK), _clients((OTHER_TOK, SLM_LAYOUT)))
    get_strategy("fedcollm").validate(pb.RunSpec(rounds=1, align_tokenizers=True), _llm(companion_tok=OTHER_TOK),
                                      _clients((OTHER_TOK, SLM_LAYOUT)))


def test_fedcollm_and_fedavg_need_one_lora_layout():
    with pytest.raises(InvalidInput, match="one LoRA layout"):
        get_strategy("fedcollm").validate(pb.RunSpec(rounds=1), _llm(), _clients((TOK, SLM_LAYOUT), (TOK, "x" * 64)))
    with pytest.raises(InvalidInput, match="one LoRA layout"):
        get_strategy("fedavg").validate(pb.RunSpec(rounds=1), _llm(), _clients((TOK, SLM_LAYOUT), (TOK, "x" * 64)))
    get_strategy("fedavg").validate(pb.RunSpec(rounds=1), _llm(companion=False), _clients((OTHER_TOK, "x" * 64), (OTHER_TOK, "x" * 64)))


def test_fedcollm_spec_fields_are_checked():
    clients = _clients((TOK, SLM_LAYOUT))
    with pytest.raises(InvalidInput, match="aggregation must be"):
        get_strategy("fedcollm").validate(pb.RunSpec(rounds=1, aggregation="mean"), _llm(), clients)
    with pytest.raises(InvalidInput, match="kd_weight"):
        get_strategy("fedcollm").validate(pb.RunSpec(rounds=1, kd_weight=-1), _llm(), clients)
    get_strategy("fedcollm").validate(pb.RunSpec(rounds=1, aggregation="product", kd_weight=5), _llm(), clients)


def test_llm2slm_is_fedmkt_with_the_llm_frozen():
    spec = pb.RunSpec(rounds=1)
    get_strategy("llm2slm").validate(spec, _llm(), _clients((OTHER_TOK, SLM_LAYOUT)))
    assert spec.setting == "llm_to_slm"
    with pytest.raises(InvalidInput, match="llm_to_slm"):
        get_strategy("llm2slm").validate(pb.RunSpec(rounds=1, setting="homogeneous"), _llm(), _clients((TOK, SLM_LAYOUT)))
