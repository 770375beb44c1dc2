"""Typed run configs (cotune/algorithms/config.py and each algorithm's config.py): defaults, per-field validation,
parse_spec's one SpecError naming every problem, spec_from_dict for run-spec files, and each strategy's check() of a
run against the parties. Also holds what tests/unit/test_lora_strategies.py checked on the old flat-RunSpec API
(`strategy.validate(spec, ...)`), ported to parse_spec / strategy.check."""

from __future__ import annotations

import dataclasses
import math

import grpc
import pytest

from cotune.algorithms.config import (MAX_LENGTH_RANGE, SHARED_FIELDS, NoConfig, RunConfig, SpecError, parse_spec,
                                      spec_from_dict)
from cotune.algorithms.fedavg.config import FedAvgConfig
from cotune.algorithms.fedbiot.config import FedBiOTConfig, FedOTConfig
from cotune.algorithms.fedcollm.config import FedCoLLMConfig
from cotune.algorithms.fedmkt.config import FedMKTConfig, LLMToSLMConfig
from cotune.algorithms.registry import STRATEGIES, get_strategy
from cotune.errors import InvalidInput
from cotune.v1 import coordinator_pb2 as pb
from cotune.v1 import party_pb2

NAN, INF = float("nan"), float("inf")
TOK, OTHER_TOK, SLM_LAYOUT, LLM_LAYOUT = "t" * 64, "u" * 64, "s" * 64, "l" * 64

CONFIGS = {"fedmkt": FedMKTConfig, "llm2slm": LLMToSLMConfig, "fedcollm": FedCoLLMConfig, "fedbiot": FedBiOTConfig,
           "fedot": FedOTConfig, "fedavg": FedAvgConfig, "zero-shot": NoConfig, "standalone": NoConfig,
           "centralized": NoConfig}


def problems_of(cls, **kw) -> list[str]:
    with pytest.raises(SpecError) as err:
        cls(**kw)
    assert isinstance(err.value, InvalidInput) and err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(err.value) == "invalid run spec: " + "; ".join(err.value.problems)
    return err.value.problems


def refused(cls, field_name: str, value, *, match: str | None = None) -> str:
    (problem,) = problems_of(cls, **{field_name: value})
    name = f"{cls.section}.{field_name}" if cls.section else field_name
    assert problem.startswith(name + " "), problem
    if match:
        assert match in problem, problem
    return problem


# == defaults =========================================================================================================
def test_defaults():
    assert dataclasses.asdict(RunConfig()) == {"rounds": 1, "min_clients": None, "step_timeout_s": 1800.0,
                                               "max_public_samples": 0, "eval_max_samples": 0, "max_length": 256,
                                               "local_epochs": 1, "overlap_steps": True, "adapter_max_abs": 1e4}
    assert dataclasses.asdict(FedMKTConfig()) == {"setting": "heterogeneous", "top_k": 16, "ce_weight": 0.9,
                                                  "distill_epochs": 1, "selection": "dualmince", "logits_bits": 0,
                                                  "alignment_method": "offsets", "projection": "mined",
                                                  "skip_span_mismatch": False}
    assert dataclasses.asdict(LLMToSLMConfig()) == {**dataclasses.asdict(FedMKTConfig()), "setting": "llm_to_slm"}
    assert dataclasses.asdict(FedCoLLMConfig()) == {"kl_weight": 1.0, "distill_epochs": 1, "aggregation": "factors",
                                                    "align_tokenizers": False, "top_k": 32, "kl_direction": "forward"}
    assert dataclasses.asdict(FedBiOTConfig()) == {"adapter_layers": 2, "drop": 0.2, "pre_align_steps": 20,
                                                   "align_steps": 10, "kl_weight": 1.0, "prox_eps": 0.01,
                                                   "align_lr": None, "aggregation": "factors"}
    assert dataclasses.asdict(FedOTConfig()) == {**dataclasses.asdict(FedBiOTConfig()), "align_steps": 0}
    assert dataclasses.asdict(FedAvgConfig()) == {"aggregation": "factors"}
    assert dataclasses.asdict(NoConfig()) == {}
    assert FedMKTConfig().mutual and not LLMToSLMConfig().mutual


def test_every_field_is_documented_and_on_the_wire():
    for cls, msg in [(RunConfig, pb.RunSpec), (FedMKTConfig, pb.FedMKTSpec), (FedCoLLMConfig, pb.FedCoLLMSpec),
                     (FedBiOTConfig, pb.FedBiOTSpec), (FedAvgConfig, pb.FedAvgSpec)]:
        wire = msg.DESCRIPTOR.fields_by_name
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            assert f.name in wire, f"{cls.__name__}.{f.name} is not a {msg.DESCRIPTOR.name} field"
        if cls is not RunConfig:  # every algorithm field is optional on the wire: unset = the default
            assert all(wire[f.name].has_presence for f in dataclasses.fields(cls))
    assert SHARED_FIELDS == tuple(f.name for f in dataclasses.fields(RunConfig))


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FedMKTConfig().top_k = 3  # type: ignore[misc]


def test_registry_config_classes():
    assert {name: cls.config_class for name, cls in STRATEGIES.items()} == CONFIGS
    assert all(cls.summary for cls in STRATEGIES.values())


# == field validation =================================================================================================
@pytest.mark.parametrize("field_name, value, match", [
    ("rounds", 0, "[1, 10000]"), ("rounds", 10_001, "got 10001"), ("rounds", -1, None),
    ("min_clients", 0, "[1, inf]"), ("min_clients", -3, None),
    ("step_timeout_s", 0.0, "(0.0,"), ("step_timeout_s", -1.0, None), ("step_timeout_s", 7 * 24 * 3600.0 + 1, None),
    ("step_timeout_s", NAN, "must be finite"), ("step_timeout_s", INF, "must be finite"),
    ("max_public_samples", -1, None), ("eval_max_samples", -1, None),
    ("max_length", 0, None), ("max_length", 1, None), ("max_length", 7, "[8, 32768]"), ("max_length", 32769, None),
    ("local_epochs", 0, None), ("local_epochs", 1001, None),
])
def test_run_config_refuses(field_name, value, match):
    refused(RunConfig, field_name, value, match=match)


@pytest.mark.parametrize("field_name, value", [
    ("rounds", 1), ("rounds", 10_000), ("min_clients", 1), ("min_clients", None), ("step_timeout_s", 0.001),
    ("max_public_samples", 0), ("eval_max_samples", 0), ("max_length", 8), ("max_length", 32768), ("local_epochs", 1000),
])
def test_run_config_accepts(field_name, value):
    assert getattr(RunConfig(**{field_name: value}), field_name) == value


def test_max_length_range_is_the_alignment_services_and_the_parties():
    """max_length 1..7 is refused at StartRun, as the alignment service and the parties refuse it."""
    from alignment.service import AlignmentService
    from cotune.tasks import MAX_LENGTH_RANGE as PARTY_RANGE
    from cotune.v1 import alignment_pb2

    assert MAX_LENGTH_RANGE == PARTY_RANGE == (8, 32768)
    for n in range(1, 8):
        refused(RunConfig, "max_length", n)
        with pytest.raises(InvalidInput, match="must be in 8..32768"):
            AlignmentService.build_sequence_alignment(object(), alignment_pb2.SequenceAlignmentRequest(max_length=n))


def test_rounds_quorum():
    assert RunConfig().quorum(3) == 3
    assert RunConfig(min_clients=2).quorum(3) == 2


@pytest.mark.parametrize("field_name, value, match", [
    ("setting", "hetero", "one of heterogeneous, homogeneous, one_to_one, llm_to_slm"), ("setting", "", None),
    ("top_k", 0, "[1, 1024]"), ("top_k", 1025, None),
    ("ce_weight", -0.1, "[0.0, 1.0]"), ("ce_weight", 1.1, None), ("ce_weight", NAN, "finite"),
    ("ce_weight", INF, "finite"),
    ("distill_epochs", 0, None), ("distill_epochs", 1001, None),
    ("selection", "mince", "one of dualmince, fate_self"),
    ("logits_bits", 1, "[2, 16]"), ("logits_bits", 17, None), ("logits_bits", -1, None),
    ("alignment_method", "levenshtein", "one of offsets, dtw"),
    ("projection", "nearest", "one of mined, first_token"),
])
def test_fedmkt_refuses(field_name, value, match):
    refused(FedMKTConfig, field_name, value, match=match)


@pytest.mark.parametrize("field_name, value", [
    ("setting", "homogeneous"), ("setting", "one_to_one"), ("setting", "llm_to_slm"), ("top_k", 1), ("top_k", 1024),
    ("ce_weight", 0.0), ("ce_weight", 1.0), ("selection", "fate_self"), ("logits_bits", 0), ("logits_bits", 2),
    ("logits_bits", 16), ("alignment_method", "dtw"), ("distill_epochs", 1000), ("projection", "first_token"),
    ("skip_span_mismatch", True),
])
def test_fedmkt_accepts(field_name, value):
    assert getattr(FedMKTConfig(**{field_name: value}), field_name) == value


@pytest.mark.parametrize("field_name, value, match", [
    ("kl_weight", -1.0, "[0.0, 1000000.0]"), ("kl_weight", NAN, "finite"), ("kl_weight", INF, "finite"),
    ("kl_weight", 1e7, None), ("distill_epochs", 0, None), ("aggregation", "mean", "one of factors, product"),
    ("top_k", 0, None), ("top_k", 1025, None), ("kl_direction", "backward", "one of forward, reverse"),
])
def test_fedcollm_refuses(field_name, value, match):
    refused(FedCoLLMConfig, field_name, value, match=match)


@pytest.mark.parametrize("field_name, value, match", [
    ("adapter_layers", 0, "[1, 1024]"), ("adapter_layers", 1025, None),
    ("drop", 0.0, "(0, 1)"), ("drop", 1.0, "(0, 1)"), ("drop", -0.5, None), ("drop", NAN, "(0, 1)"),
    ("pre_align_steps", -1, None), ("align_steps", -1, None),
    ("kl_weight", -0.5, None), ("kl_weight", NAN, "finite"),
    ("prox_eps", -0.01, None), ("prox_eps", NAN, "finite"), ("prox_eps", INF, "finite"),
    ("align_lr", 0.0, "(0.0, 1.0]"), ("align_lr", -1e-4, None), ("align_lr", 1.5, None), ("align_lr", NAN, "finite"),
    ("aggregation", "median", "one of factors, product"),
])
def test_fedbiot_refuses(field_name, value, match):
    refused(FedBiOTConfig, field_name, value, match=match)
    if field_name != "align_steps":
        refused(FedOTConfig, field_name, value, match=match)


def test_fedavg_refuses_an_unknown_aggregation():
    refused(FedAvgConfig, "aggregation", "mean", match="one of factors, product")
    assert FedAvgConfig(aggregation="product").aggregation == "product"


def test_zeros_that_are_now_allowed():
    assert FedMKTConfig(ce_weight=0).ce_weight == 0
    assert FedMKTConfig(logits_bits=0).logits_bits == 0
    assert FedCoLLMConfig(kl_weight=0).kl_weight == 0
    c = FedBiOTConfig(kl_weight=0, prox_eps=0, pre_align_steps=0, align_steps=0)
    assert (c.kl_weight, c.prox_eps, c.pre_align_steps, c.align_steps) == (0, 0, 0, 0)
    assert FedOTConfig(pre_align_steps=0, kl_weight=0, prox_eps=0).pre_align_steps == 0
    r = RunConfig(max_public_samples=0, eval_max_samples=0)
    assert (r.max_public_samples, r.eval_max_samples) == (0, 0)


def test_every_problem_of_a_config_is_listed():
    problems = problems_of(FedBiOTConfig, adapter_layers=0, drop=2.0, kl_weight=-1.0, prox_eps=NAN,
                           aggregation="mean")
    assert [p.split(" ")[0] for p in problems] == ["fedbiot.adapter_layers", "fedbiot.drop", "fedbiot.kl_weight",
                                                   "fedbiot.prox_eps", "fedbiot.aggregation"]


def test_fedot_refuses_realignment():
    (p,) = problems_of(FedOTConfig, align_steps=5)
    assert p.startswith("fedbiot.align_steps: fedot never re-aligns") and "got 5" in p
    assert FedOTConfig(align_steps=0).align_steps == 0
    assert FedBiOTConfig(align_steps=5).align_steps == 5


def test_llm2slm_refuses_another_setting():
    for setting in ("heterogeneous", "homogeneous", "one_to_one"):
        (p,) = problems_of(LLMToSLMConfig, setting=setting)
        assert p.startswith("fedmkt.setting: llm2slm is FedMKT's llm_to_slm setting") and repr(setting) in p
    # a setting that is not a setting at all: both problems
    assert len(problems_of(LLMToSLMConfig, setting="bogus")) == 2


# == parse_spec =======================================================================================================
def test_parse_spec_unset_fields_take_the_defaults():
    run, algo = parse_spec(pb.RunSpec(algorithm="fedbiot", rounds=3), FedBiOTConfig)
    assert run == RunConfig(rounds=3) and algo == FedBiOTConfig()
    run, algo = parse_spec(pb.RunSpec(algorithm="fedbiot", rounds=3, fedbiot=pb.FedBiOTSpec()), FedBiOTConfig)
    assert algo == FedBiOTConfig()
    run, algo = parse_spec(pb.RunSpec(algorithm="zero-shot", rounds=1), NoConfig)
    assert algo == NoConfig()


def test_parse_spec_carries_zero_values():
    spec = pb.RunSpec(algorithm="fedbiot", rounds=2, max_public_samples=0,
                      fedbiot=pb.FedBiOTSpec(kl_weight=0, prox_eps=0, pre_align_steps=0, align_steps=0, align_lr=0.5))
    _, algo = parse_spec(spec, FedBiOTConfig)
    assert (algo.kl_weight, algo.prox_eps, algo.pre_align_steps, algo.align_steps, algo.align_lr) == (0, 0, 0, 0, 0.5)
    _, algo = parse_spec(pb.RunSpec(algorithm="fedmkt", rounds=1, fedmkt=pb.FedMKTSpec(ce_weight=0)), FedMKTConfig)
    assert algo.ce_weight == 0
    _, algo = parse_spec(pb.RunSpec(algorithm="fedcollm", rounds=1, fedcollm=pb.FedCoLLMSpec(kl_weight=0)),
                         FedCoLLMConfig)
    assert algo.kl_weight == 0
    run, _ = parse_spec(pb.RunSpec(algorithm="fedavg", rounds=1, min_clients=2, step_timeout_s=5.5), FedAvgConfig)
    assert (run.min_clients, run.step_timeout_s) == (2, 5.5)


def test_parse_spec_names_every_problem_of_both_sections_at_once():
    spec = pb.RunSpec(algorithm="fedmkt", rounds=0, max_length=4, min_clients=0,
                      fedmkt=pb.FedMKTSpec(top_k=0, ce_weight=1.5, selection="best", alignment_method="x"))
    with pytest.raises(SpecError) as err:
        parse_spec(spec, FedMKTConfig)
    names = [p.split(" ")[0] for p in err.value.problems]
    assert names == ["rounds", "min_clients", "max_length", "fedmkt.top_k", "fedmkt.ce_weight", "fedmkt.selection",
                     "fedmkt.alignment_method"]
    for name in names:
        assert name in str(err.value)


def test_parse_spec_refuses_another_algorithms_section():
    with pytest.raises(SpecError) as err:
        parse_spec(pb.RunSpec(algorithm="fedmkt", rounds=1, fedbiot=pb.FedBiOTSpec()), FedMKTConfig)
    (p,) = err.value.problems
    assert "fedmkt" in p and "`fedbiot`" in p and "takes `fedmkt` settings" in p
    with pytest.raises(SpecError, match="algorithm standalone takes no settings of its own, but the spec sets `fedavg`"):
        parse_spec(pb.RunSpec(algorithm="standalone", rounds=1, fedavg=pb.FedAvgSpec()), NoConfig)
    # combined with the shared section's problems
    with pytest.raises(SpecError) as err:
        parse_spec(pb.RunSpec(algorithm="fedavg", rounds=0, fedcollm=pb.FedCoLLMSpec(kl_weight=-1)), FedAvgConfig)
    assert len(err.value.problems) == 2 and err.value.problems[0].startswith("rounds")
    assert "`fedcollm`" in err.value.problems[1] and "fedavg" in err.value.problems[1]


@pytest.mark.parametrize("algorithm, section", [("fedmkt", "fedmkt"), ("llm2slm", "fedmkt"), ("fedbiot", "fedbiot"),
                                                ("fedot", "fedbiot"), ("fedcollm", "fedcollm"), ("fedavg", "fedavg")])
def test_each_algorithm_takes_its_section(algorithm, section):
    cls = CONFIGS[algorithm]
    spec = spec_from_dict({"algorithm": algorithm, "rounds": 1, section: {}})
    assert parse_spec(spec, cls)[1] == cls()
    for other in {"fedmkt", "fedbiot", "fedcollm", "fedavg"} - {section}:
        with pytest.raises(SpecError, match=f"takes `{section}` settings, but the spec sets `{other}`"):
            parse_spec(spec_from_dict({"algorithm": algorithm, "rounds": 1, other: {}}), cls)


def test_parse_spec_fedot_and_llm2slm():
    with pytest.raises(SpecError, match="fedot never re-aligns"):
        parse_spec(pb.RunSpec(algorithm="fedot", rounds=1, fedbiot=pb.FedBiOTSpec(align_steps=3)), FedOTConfig)
    _, algo = parse_spec(pb.RunSpec(algorithm="fedot", rounds=1, fedbiot=pb.FedBiOTSpec(align_steps=0)), FedOTConfig)
    assert algo.align_steps == 0
    with pytest.raises(SpecError, match="llm2slm is FedMKT's llm_to_slm setting"):
        parse_spec(pb.RunSpec(algorithm="llm2slm", rounds=1, fedmkt=pb.FedMKTSpec(setting="homogeneous")), LLMToSLMConfig)
    _, algo = parse_spec(pb.RunSpec(algorithm="llm2slm", rounds=1, fedmkt=pb.FedMKTSpec(setting="llm_to_slm")),
                         LLMToSLMConfig)
    assert algo.setting == "llm_to_slm"


def test_parse_spec_unset_rounds_takes_the_documented_default():
    """BUG: RunConfig documents rounds = 1 as its default (and `cotune algorithms` prints `rounds = 1`), but RunSpec's
    `rounds` is a plain int32, not proto3 `optional`: a spec that leaves it out (e.g. a zero-shot spec file with just
    `algorithm: zero-shot`) carries 0 and is refused with "rounds must be in [1, 10000], got 0"."""
    run, _ = parse_spec(spec_from_dict({"algorithm": "zero-shot"}), NoConfig)
    assert run.rounds == 1


# == spec_from_dict ===================================================================================================
def test_spec_from_dict_reads_snake_case():
    spec = spec_from_dict({"name": "x", "algorithm": "fedbiot", "rounds": 3, "clients": ["c1", "c2"], "min_clients": 1,
                           "step_timeout_s": 60, "max_length": 128, "local_epochs": 2,
                           "fedbiot": {"adapter_layers": 3, "drop": 0.4, "kl_weight": 0, "prox_eps": 0,
                                       "align_lr": 1e-4, "aggregation": "product"}})
    assert spec.WhichOneof("config") == "fedbiot"
    assert spec.HasField("min_clients") and not spec.HasField("eval_max_samples")
    assert spec.fedbiot.HasField("kl_weight") and spec.fedbiot.kl_weight == 0
    assert not spec.fedbiot.HasField("pre_align_steps")
    run, algo = parse_spec(spec, FedBiOTConfig)
    assert run == RunConfig(rounds=3, min_clients=1, step_timeout_s=60.0, max_length=128, local_epochs=2)
    assert algo == FedBiOTConfig(adapter_layers=3, drop=0.4, kl_weight=0.0, prox_eps=0.0, align_lr=1e-4,
                                 aggregation="product")
    spec = spec_from_dict({"algorithm": "fedcollm", "rounds": 1, "fedcollm": {"align_tokenizers": True, "top_k": 8}})
    assert parse_spec(spec, FedCoLLMConfig)[1] == FedCoLLMConfig(align_tokenizers=True, top_k=8)


@pytest.mark.parametrize("data, message", [
    ({"minClients": 1}, "minClients: run-spec keys are snake_case; write `min_clients`"),
    ({"stepTimeoutS": 1}, "write `step_timeout_s`"),
    ({"fedmkt": {"topK": 4}}, "fedmkt.topK: run-spec keys are snake_case; write `fedmkt.top_k`"),
    ({"fedbiot": {"adapterLayers": 4}}, "write `fedbiot.adapter_layers`"),
    ({"fedcollm": {"klWeight": 0}}, "write `fedcollm.kl_weight`"),
])
def test_spec_from_dict_refuses_camel_case(data, message):
    with pytest.raises(SpecError) as err:
        spec_from_dict({"algorithm": "fedmkt", "rounds": 1, **data})
    (p,) = err.value.problems
    assert p == message or message in p


@pytest.mark.parametrize("data, new", [
    ({"lam": 0.5}, "fedmkt.ce_weight"), ({"kd_weight": 1}, "fedcollm.kl_weight"), ({"kdWeight": 1}, "fedcollm.kl_weight"),
    ({"top_k": 4}, "fedmkt.top_k"), ({"setting": "homogeneous"}, "fedmkt.setting"),
    ({"selection": "dualmince"}, "fedmkt.selection"), ({"logits_bits": 8}, "fedmkt.logits_bits"),
    ({"alignment_method": "dtw"}, "fedmkt.alignment_method"), ({"aggregation": "product"}, "fedavg.aggregation"),
    ({"align_tokenizers": True}, "fedcollm.align_tokenizers"), ({"distill_epochs": 2}, "fedmkt.distill_epochs"),
    ({"fedbiot": {"beta": 0.5}}, "fedbiot.kl_weight"),
])
def test_spec_from_dict_names_where_a_moved_setting_went(data, new):
    with pytest.raises(SpecError) as err:
        spec_from_dict({"algorithm": "fedmkt", "rounds": 1, **data})
    (p,) = err.value.problems
    assert "this setting moved; write `" in p and new in p


def test_spec_from_dict_refuses_unknown_keys_and_bad_values():
    with pytest.raises(SpecError) as err:
        spec_from_dict({"algorithm": "fedmkt", "roundz": 1, "fedmkt": {"topk": 3}, "fedbiot": {"nope": 1}})
    assert [p.split(":")[0] for p in err.value.problems] == ["roundz", "fedmkt.topk", "fedbiot.nope"]
    assert "unknown key; known:" in err.value.problems[0] and "rounds" in err.value.problems[0]
    assert "top_k" in err.value.problems[1]
    with pytest.raises(SpecError, match="my.yaml"):
        spec_from_dict({"algorithm": "fedmkt", "rounds": "two"}, where="my.yaml")
    with pytest.raises(SpecError, match="expected a mapping"):
        spec_from_dict(["algorithm", "fedmkt"])  # type: ignore[arg-type]
    with pytest.raises(SpecError):  # two algorithm sections
        spec_from_dict({"algorithm": "fedmkt", "rounds": 1, "fedmkt": {}, "fedbiot": {}})


# == strategy.check against the parties ===============================================================================
def _llm(companion=True, companion_tok=TOK, companion_layout=SLM_LAYOUT, tok=TOK, layers=24):
    info = party_pb2.PartyInfo(party_id="llm", role="llm", model_name="big", tokenizer_hash=tok,
                               lora_layout_hash=LLM_LAYOUT, num_layers=layers, ready=True)
    if companion:
        info.companion.CopyFrom(party_pb2.CompanionInfo(model_name="slm", tokenizer_hash=companion_tok,
                                                        lora_layout_hash=companion_layout))
    return info


def _clients(*specs, private=100):
    return {f"c{i}": party_pb2.PartyInfo(party_id=f"c{i}", role="slm", tokenizer_hash=t, lora_layout_hash=lay,
                                         private_set_size=private, ready=True)
            for i, (t, lay) in enumerate(specs, 1)}


def check(algorithm: str, llm, clients, section: dict | None = None) -> list[str]:
    strategy = get_strategy(algorithm)
    data = {"algorithm": algorithm, "rounds": 1}
    if section is not None:
        data[strategy.config_class.section] = section
    run, config = parse_spec(spec_from_dict(data), strategy.config_class)
    return strategy.check(config, run, llm, clients)


def test_every_algorithm_is_registered():
    assert set(STRATEGIES) == {"fedmkt", "fedcollm", "fedbiot", "fedot", "zero-shot", "standalone", "fedavg", "llm2slm",
                               "centralized"}
    with pytest.raises(InvalidInput, match="unknown algorithm") as err:
        get_strategy("fedbiot-typo")
    assert "fedbiot" in str(err.value)  # names what is available


@pytest.mark.parametrize("algorithm", sorted(STRATEGIES))
def test_every_strategy_accepts_a_consistent_setup(algorithm):
    clients = _clients((TOK, SLM_LAYOUT)) if algorithm == "centralized" else _clients((TOK, SLM_LAYOUT), (TOK, SLM_LAYOUT))
    section = {"setting": "homogeneous"} if algorithm == "fedmkt" else None
    assert check(algorithm, _llm(), clients, section) == []


def test_fedcollm_needs_a_companion_slm_on_the_llm_server():
    for llm in (_llm(companion=False), _llm(companion_tok="")):
        (p,) = check("fedcollm", llm, _clients((TOK, SLM_LAYOUT)))
        assert "model.companion_slm_path" in p


def test_fedcollm_clients_need_one_tokenizer():
    # clients that differ from each other (or from the server's SLM copy) can never average adapters
    (p,) = check("fedcollm", _llm(), _clients((TOK, SLM_LAYOUT), (OTHER_TOK, SLM_LAYOUT)))
    assert "share one tokenizer" in p and "c1=" in p and "c2=" in p and "llm server's SLM copy" in p
    (p,) = check("fedcollm", _llm(), _clients((OTHER_TOK, SLM_LAYOUT), (OTHER_TOK, SLM_LAYOUT)))
    assert "share one tokenizer" in p


def test_fedcollm_across_tokenizers_needs_align_tokenizers():
    llm = _llm(companion_tok=OTHER_TOK)
    clients = _clients((OTHER_TOK, SLM_LAYOUT))
    (p,) = check("fedcollm", llm, clients)
    assert "align_tokenizers" in p and "different tokenizers" in p
    assert check("fedcollm", llm, clients, {"align_tokenizers": True}) == []
    assert check("fedcollm", llm, clients, {"align_tokenizers": False}) == [p]
    # align_tokenizers lets the LLM differ, never the clients among themselves
    problems = check("fedcollm", llm, _clients((OTHER_TOK, SLM_LAYOUT), (TOK, SLM_LAYOUT)), {"align_tokenizers": True})
    assert len(problems) == 1 and "share one tokenizer" in problems[0]


@pytest.mark.parametrize("algorithm", ["fedcollm", "fedavg"])
def test_fedcollm_and_fedavg_need_one_lora_layout(algorithm):
    (p,) = check(algorithm, _llm(), _clients((TOK, SLM_LAYOUT), (TOK, "x" * 64)))
    assert "one LoRA layout" in p
    (p,) = check(algorithm, _llm(), _clients((TOK, ""), (TOK, "")))  # a client reporting no layout
    assert "one LoRA layout" in p and "unknown" in p


def test_fedcollm_companion_layout_must_match_the_clients():
    (p,) = check("fedcollm", _llm(companion_layout="z" * 64), _clients((TOK, SLM_LAYOUT)))
    assert "one LoRA layout" in p


def test_fedavg_needs_no_llm_and_reports_both_problems():
    # no companion, clients on another tokenizer than the LLM: fine, as long as they agree among themselves
    assert check("fedavg", _llm(companion=False), _clients((OTHER_TOK, "x" * 64), (OTHER_TOK, "x" * 64))) == []
    problems = check("fedavg", _llm(), _clients((TOK, SLM_LAYOUT), (OTHER_TOK, "x" * 64)))
    assert len(problems) == 2 and "share one tokenizer" in problems[0] and "one LoRA layout" in problems[1]


@pytest.mark.parametrize("algorithm", ["fedbiot", "fedot"])
def test_fedbiot_checks_the_compression_plan(algorithm):
    clients = _clients((TOK, SLM_LAYOUT))
    assert check(algorithm, _llm(layers=24), clients, {"adapter_layers": 23}) == []
    for n in (24, 30):
        (p,) = check(algorithm, _llm(layers=24), clients, {"adapter_layers": n})
        assert f"adapter_layers={n}" in p and "24 layers" in p and "must be smaller" in p
    (p,) = check(algorithm, _llm(layers=0), clients)
    assert "reports no decoder layer count" in p and "big" in p
    (p,) = check(algorithm, _llm(), _clients((TOK, SLM_LAYOUT), (TOK, SLM_LAYOUT), private=0))
    assert p.startswith(f"{algorithm}: client(s) c1, c2 hold no private data")
    # no plan problem and no data problem: both reported together
    assert len(check(algorithm, _llm(layers=0), _clients((TOK, SLM_LAYOUT), private=0))) == 2


def test_centralized_needs_exactly_one_client_with_data():
    (p,) = check("centralized", _llm(), _clients((TOK, SLM_LAYOUT), (TOK, SLM_LAYOUT)))
    assert "exactly one client" in p and "got 2: c1, c2" in p
    (p,) = check("centralized", _llm(), _clients((TOK, SLM_LAYOUT), private=0))
    assert "c1 holds no private data" in p


def test_fedmkt_settings_against_the_clients():
    two = _clients((TOK, SLM_LAYOUT), (OTHER_TOK, SLM_LAYOUT))
    assert check("fedmkt", _llm(), two) == []  # heterogeneous: any tokenizers
    (p,) = check("fedmkt", _llm(), two, {"setting": "one_to_one"})
    assert "one_to_one needs exactly one client" in p and "selects 2" in p
    assert check("fedmkt", _llm(), _clients((OTHER_TOK, SLM_LAYOUT)), {"setting": "one_to_one"}) == []
    (p,) = check("fedmkt", _llm(), two, {"setting": "homogeneous"})
    assert "homogeneous needs every client to share one tokenizer" in p and "c1=" in p and "c2=" in p
    # homogeneous: the clients agree; the LLM may differ
    assert check("fedmkt", _llm(), _clients((OTHER_TOK, SLM_LAYOUT), (OTHER_TOK, SLM_LAYOUT)),
                 {"setting": "homogeneous"}) == []


def test_llm2slm_is_fedmkt_with_the_llm_frozen():
    _, config = parse_spec(spec_from_dict({"algorithm": "llm2slm", "rounds": 1}), LLMToSLMConfig)
    assert config.setting == "llm_to_slm" and not config.mutual
    assert get_strategy("llm2slm").check(config, RunConfig(), _llm(), _clients((OTHER_TOK, SLM_LAYOUT))) == []
    with pytest.raises(SpecError, match="llm_to_slm"):
        parse_spec(spec_from_dict({"algorithm": "llm2slm", "rounds": 1, "fedmkt": {"setting": "homogeneous"}}),
                   LLMToSLMConfig)


@pytest.mark.parametrize("algorithm", ["zero-shot", "standalone"])
def test_baselines_take_any_parties(algorithm):
    assert check(algorithm, _llm(companion=False),
                 _clients((TOK, SLM_LAYOUT), (OTHER_TOK, "x" * 64), (OTHER_TOK, ""))) == []


def test_fedcollm_spec_fields_are_checked():
    """What the old test_lora_strategies checked on flat RunSpec fields (aggregation=, kd_weight=), on fedcollm's."""
    with pytest.raises(SpecError, match="fedcollm.aggregation must be one of factors, product"):
        parse_spec(spec_from_dict({"algorithm": "fedcollm", "rounds": 1, "fedcollm": {"aggregation": "mean"}}),
                   FedCoLLMConfig)
    with pytest.raises(SpecError, match="fedcollm.kl_weight must be in"):
        parse_spec(spec_from_dict({"algorithm": "fedcollm", "rounds": 1, "fedcollm": {"kl_weight": -1}}),
                   FedCoLLMConfig)
    _, config = parse_spec(spec_from_dict({"algorithm": "fedcollm", "rounds": 1,
                                           "fedcollm": {"aggregation": "product", "kl_weight": 5}}), FedCoLLMConfig)
    assert (config.aggregation, config.kl_weight) == ("product", 5.0)
    assert check("fedcollm", _llm(), _clients((TOK, SLM_LAYOUT)), {"aggregation": "product", "kl_weight": 5}) == []
    assert math.isclose(config.kl_weight, 5.0)
