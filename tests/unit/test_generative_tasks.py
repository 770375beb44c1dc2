"""Generative tasks (GSM8K, DialogSum): loading against the official sizes and known rows, their splits, the
truncation of a long dialogue, the scorers (GSM8K final-number exact match, ROUGE-L against Google's rouge-score),
the party's `evaluation` config section, and a party scoring a free-form eval set by generation."""

from __future__ import annotations

import json
import math

import pytest

from cotune.data import MalformedDataError, load_task, shared_data_dir, split_task
from cotune.data.tasks import (
    TASKS,
    GenerationSpec,
    available_splits,
    evaluation_config_for_task,
    federated_splits,
    pool_and_eval_split,
)
from cotune.lm.scoring import gsm8k_answer, gsm8k_exact_match, normalize_number, rouge_l, score_generations


def _shared():
    d = shared_data_dir()
    return d if d is not None and (d / "datasets").is_dir() else None


needs_data = pytest.mark.skipif(_shared() is None, reason="shared data not found: set COTUNE_SHARED_DATA")

# official sizes (SOURCES.md: GSM8K 7,473 / 1,319; DialogSum dev 500, test 500; its train split is not shared)
EXPECTED = {("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319, ("dialogsum", "validation"): 500,
            ("dialogsum", "test"): 500}


# ------------------------------------------------------------------------------------------------------ the registry


def test_registry_entries_and_evaluation_sections():
    for name in ("gsm8k", "dialogsum"):
        spec = TASKS[name]
        assert {(name, s): n for s, n in spec.official_sizes.items()} == {k: v for k, v in EXPECTED.items()
                                                                          if k[0] == name}
        assert isinstance(spec.generation, GenerationSpec) and spec.fixed_choices is None
    assert evaluation_config_for_task("gsm8k") == {"metric": "exact_match", "max_new_tokens": 256,
                                                   "stop": ["\n\n", "\nQuestion:"]}
    assert evaluation_config_for_task("dialogsum") == {"metric": "rouge_l", "max_new_tokens": 96,
                                                       "stop": ["\n\n", "\nDialogue:", "\n#Person"]}
    assert all(evaluation_config_for_task(t) == {"metric": ""} for t, s in TASKS.items() if s.generation is None)
    with pytest.raises(ValueError, match="unknown task"):
        evaluation_config_for_task("mmlu")
    with pytest.raises(ValueError, match="metric"):
        GenerationSpec(metric="bleu", max_new_tokens=8)
    with pytest.raises(ValueError, match="stop"):
        GenerationSpec(metric="rouge_l", max_new_tokens=8, stop=("",))


def test_every_evaluation_section_is_a_valid_party_config():
    from cotune.config import EvaluationConfig, from_dict

    for name in TASKS:
        cfg = from_dict(EvaluationConfig, evaluation_config_for_task(name), "evaluation")
        cfg.validate()
        gen = TASKS[name].generation
        assert cfg.metric == (gen.metric if gen else "")
        if gen:
            assert (cfg.max_new_tokens, tuple(cfg.stop)) == (gen.max_new_tokens, gen.stop)


def test_pool_and_eval_splits():
    assert federated_splits("arc_easy") == ("train", "validation")
    assert federated_splits("gsm8k") == ("train", "test")
    assert federated_splits("dialogsum") == ("validation", "test")
    assert federated_splits("sciq") == ("validation", None)
    assert pool_and_eval_split(["validation"]) == ("validation", None)
    assert pool_and_eval_split(["train", "test"]) == ("train", "test")


# ------------------------------------------------------------------------------------------------------ the files


@needs_data
@pytest.mark.parametrize("task,split", sorted(EXPECTED))
def test_split_loads_with_the_official_count_as_free_form_items(task, split):
    exs = load_task(task, split)
    assert len(exs) == EXPECTED[(task, split)]
    assert split in available_splits(task)
    for ex in exs:
        assert ex.choices == () and ex.label == -1
        assert ex.response.startswith(" ") and ex.response.strip() == ex.response[1:]
        if task == "gsm8k":
            assert ex.prompt.startswith("Question: ") and ex.prompt.endswith("\nAnswer:")
            assert "\n#### " in ex.response and gsm8k_answer(ex.response) is not None
        else:
            assert ex.prompt.startswith("Dialogue:\n#Person1#: ") and ex.prompt.endswith("\nSummary:")
            assert ex.prompt.count("\nSummary:") == 1
    assert len({ex.prompt for ex in exs}) >= len(exs) - 5  # a few duplicated questions/dialogues at most


@needs_data
def test_known_rows():
    ex = load_task("gsm8k", "train")[0]
    assert ex.prompt == ("Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                         "clips in May. How many clips did Natalia sell altogether in April and May?\nAnswer:")
    assert ex.response == (" Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
                           "clips altogether in April and May.\n#### 72")
    test = load_task("gsm8k", "test")
    assert test[0].prompt.startswith("Question: Janet\u2019s ducks lay 16 eggs per day.")
    assert gsm8k_answer(test[0].response) == "18"

    dev = load_task("dialogsum", "validation")[0]
    assert dev.prompt.startswith("Dialogue:\n#Person1#: Hello, how are you doing today?\n#Person2#: I ' Ve been")
    assert dev.prompt.endswith("#Person2#: Thank you for your help, doctor.\nSummary:")
    assert dev.response == (" #Person2# has trouble breathing. The doctor asks #Person2# about it and will send "
                            "#Person2# to a pulmonary specialist.")
    test = load_task("dialogsum", "test")[0]  # three references: summary1 is the response
    assert test.prompt.startswith("Dialogue:\n#Person1#: Ms. Dawson, I need you to take a dictation for me.")
    assert test.response == (" Ms. Dawson helps #Person1# to write a memo to inform every employee that they have to "
                             "change the communication method and should not use Instant Messaging anymore.")


@needs_data
def test_every_gsm8k_reference_matches_itself_and_its_gold_number():
    rows = [json.loads(line) for line in (_shared() / "datasets/gsm8k/test.jsonl").open()]
    exs = load_task("gsm8k", "test")
    assert score_generations("exact_match", [e.response for e in exs], [e.response for e in exs]) == [1.0] * len(exs)
    for row, ex in zip(rows, exs):
        gold = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert gsm8k_answer(ex.response) == normalize_number(gold) == str(int(gold))
        # the chain of thought alone (no '####') ends with the same number in most solutions: the fallback works
    without = [gsm8k_answer(ex.response.split("####")[0]) == gsm8k_answer(ex.response) for ex in exs]
    assert sum(without) / len(without) > 0.9


@needs_data
def test_split_task_cuts_pool_and_eval_from_the_right_splits():
    fs = split_task("gsm8k", 4, seed=0, per_part=10, eval_limit=7)
    assert fs.sizes == {"public": 10, "clients": [10] * 4, "eval": 7}
    assert fs.eval == load_task("gsm8k", "test")[:7]
    train = set(load_task("gsm8k", "train"))
    assert all(e in train for part in [fs.public, *fs.clients] for e in part)
    fs = split_task("dialogsum", 4, seed=0)  # no train split: pool = dev (500 = 5 x 100), eval = test
    assert fs.sizes == {"public": 100, "clients": [100] * 4, "eval": 500}
    assert fs.eval == load_task("dialogsum", "test")
    fs = split_task("dialogsum", 4, seed=0, eval_split="dev", eval_limit=50)  # the pool itself: cut from it
    assert fs.sizes == {"public": 83, "clients": [83] * 4, "eval": 50}
    prompts = [e.prompt for part in [fs.public, *fs.clients, fs.eval] for e in part]
    assert len(set(prompts)) == len(prompts)
    assert split_task("sciq", 4, seed=0, eval_limit=100).sizes == {"public": 166, "clients": [166] * 4, "eval": 100}


@needs_data
@pytest.mark.parametrize("name", ["gpt2", "llama2"])
def test_a_long_dialogue_is_cut_from_its_end_keeping_the_summary_line(name):
    from cotune.align.tokenizers import encode_pair, encode_pairs
    from cotune.data.example import passage_end
    from tests.unit.alignment_fixtures import tokenizer

    tok = tokenizer(name)
    exs = load_task("dialogsum", "test")
    for ex in exs[:50]:
        end = passage_end(ex.prompt)
        assert ex.prompt[end:] == "\nSummary:" and ex.prompt[:end].startswith("Dialogue:\n")
    pairs = encode_pairs(tok, [(e.prompt, e.response) for e in exs], 128)
    cut = [(e, p) for e, p in zip(exs, pairs) if p.truncated]
    assert len(cut) > 200  # most dialogues are longer than 128 tokens
    for ex, p in cut:
        text = tok.decode(list(p.ids), skip_special_tokens=True)
        assert len(p.ids) == 128
        assert text.endswith("\nSummary:" + ex.response), text[-120:]  # the summary line and the response, whole
        kept = text[: text.rindex("\nSummary:")].lstrip()
        assert kept.startswith("Dialogue:\n#Person1#:") and ex.prompt.startswith(kept)  # the dialogue keeps its start
    # the prompt alone (what generation conditions on) keeps the summary line too
    gen = encode_pair(tok, cut[0][0].prompt, "", 64)
    assert tok.decode(list(gen.ids), skip_special_tokens=True).endswith("\nSummary:") and len(gen.ids) == 64


def test_malformed_rows_name_the_file_and_line(tmp_path):
    ds = tmp_path / "datasets"
    (ds / "gsm8k").mkdir(parents=True)
    (ds / "dialogsum").mkdir(parents=True)
    good = {"question": "1+1?", "answer": "1+1=2\n#### 2"}
    (ds / "gsm8k/train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"question": "q", "answer": "2"}) + "\n")
    with pytest.raises(MalformedDataError, match=r"train\.jsonl:2: gsm8k: answer does not end with"):
        load_task("gsm8k", "train", data_dir=tmp_path)
    (ds / "gsm8k/test.jsonl").write_text(json.dumps(good) + "\n")
    assert load_task("gsm8k", "test", data_dir=tmp_path)[0].response == " 1+1=2\n#### 2"
    (ds / "dialogsum/dialogsum.dev.jsonl").write_text(json.dumps({"dialogue": "#Person1#: hi", "topic": "x"}) + "\n")
    with pytest.raises(MalformedDataError, match=r"dialogsum\.dev\.jsonl:1: dialogsum: missing field 'summary1'"):
        load_task("dialogsum", "validation", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------------------ the scorers


@pytest.mark.parametrize("text,want", [
    ("18", "18"), ("18.0", "18"), ("18.", "18"), ("$1,080", "1080"), ("1,080.50", "1080.5"), ("-3", "-3"),
    ("$-3.50", "-3.5"), ("-$3", "-3"), (".5", "0.5"), ("0.50", "0.5"), ("-0", "0"), ("007", "7"), ("1e5", None),
    ("abc", None), ("", None), ("100000000000000000000", "100000000000000000000"),
])
def test_normalize_number(text, want):
    assert normalize_number(text) == want


def test_gsm8k_answer_and_exact_match():
    assert gsm8k_answer(" She pays 5*3 = <<5*3=15>>15.\n#### 15") == "15"
    assert gsm8k_answer("so the answer is 1,234 dollars. #### $1,234.00\nQuestion: 7") == "1234"  # first after ####
    assert gsm8k_answer("#### 5 #### 6") == "5"
    assert gsm8k_answer("2 apples and 3 pears make 5.") == "5"  # no '####': the last number
    assert gsm8k_answer("the total is $18.00.") == "18"
    assert gsm8k_answer("no number at all") is None and gsm8k_answer("#### none") is None
    ref = " 3 + 15 = 18\n#### 18"
    for pred, want in [(" 18", 1.0), ("#### 18.0", 1.0), (" $18", 1.0), ("It is 18.", 1.0), ("#### 17", 0.0),
                       ("18 eggs, so #### 81", 0.0), ("", 0.0), ("1 8", 0.0), ("180", 0.0), ("#### -18", 0.0)]:
        assert gsm8k_exact_match(pred, ref) == want, pred
    with pytest.raises(ValueError, match="no final number"):
        gsm8k_exact_match("18", "no number")


def test_rouge_l_known_values():
    # hand-computed: LCS('the cat sat on the mat', 'the cat was on the mat') = 'the cat on the mat' = 5 of 6 tokens
    assert rouge_l("the cat sat on the mat", "the cat was on the mat") == pytest.approx(5 / 6)
    # 'a b c d' vs 'a c e': LCS 'a c' = 2; P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l("A, B; C!", "a b c") == 1.0  # lower-cased, punctuation dropped
    assert rouge_l("the dogs were running", "the dog runs") == pytest.approx(2 * (3 / 4) * 1 / (3 / 4 + 1))  # stems
    assert rouge_l("", "a b") == 0.0 and rouge_l("x y", "a b") == 0.0


def test_rouge_l_agrees_with_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [
        ("#Person1# and #Person2# talk about the weather.", "#Person2# tells #Person1# that it will rain tomorrow."),
        ("Ms. Dawson takes a memo.", "Ms. Dawson helps #Person1# to write a memo to inform every employee."),
        ("Bob buys a car from Alice", "Alice sells her old car to Bob for 500 dollars"),
    ]
    got = score_generations("rouge_l", [p for p, _ in pairs], [r for _, r in pairs])
    assert got == [scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs]
    assert all(0 < g < 1 for g in got)
    with pytest.raises(ValueError, match="metric"):
        score_generations("bleu", ["a"], ["a"])
    with pytest.raises(ValueError, match="predictions"):
        score_generations("rouge_l", ["a"], [])


# ------------------------------------------------------------------------------------------------------ configuration


def test_evaluation_config_is_validated_with_clear_errors():
    from cotune.config import ConfigError, EvaluationConfig, from_dict

    ok = from_dict(EvaluationConfig, {"metric": "rouge_l", "max_new_tokens": 32, "stop": ["\n\n"]}, "evaluation")
    ok.validate()
    assert ok.stop == ["\n\n"]
    EvaluationConfig().validate()  # multiple choice by default
    for fields, match in [({"metric": "bleu"}, "evaluation.metric must be"),
                          ({"metric": "exact_match", "max_new_tokens": 0}, "max_new_tokens must be in"),
                          ({"metric": "exact_match", "stop": ["a", ""]}, r"evaluation\.stop\[1\] is empty"),
                          ({"stop": ["\n"]}, "evaluation.stop is set but evaluation.metric is not"),
                          ({"mc_scoring": "nope"}, "mc_scoring must be shared_prompt or per_choice")]:
        with pytest.raises(ConfigError, match=match):
            from_dict(EvaluationConfig, fields, "evaluation").validate()
    with pytest.raises(ConfigError, match="evaluation.stop"):
        from_dict(EvaluationConfig, {"stop": "\n"}, "evaluation")  # a list is required


# ------------------------------------------------------------------------------------------------------ a party


@pytest.fixture(scope="module")
def gsm8k_party(tmp_path_factory):
    from cotune.align.tokenizers import load_tokenizer
    from cotune.data.example import Example
    from cotune.data.tasks import write_jsonl
    from cotune.demo.tiny import make_tiny_model
    from tests.unit.lm_fixtures import TOKENIZER

    if not TOKENIZER.exists():
        pytest.skip(f"shared tokenizer data not found at {TOKENIZER}")
    root = tmp_path_factory.mktemp("generative-party")
    model_dir = make_tiny_model(load_tokenizer(TOKENIZER), root / "model", arch="llama", hidden=32, heads=2, layers=2)
    items = [Example(f"Question: what is {i} + {i}?\nAnswer:", f" {i} + {i} = {2 * i}\n#### {2 * i}") for i in range(5)]
    write_jsonl(root / "public.jsonl", items[:3])
    write_jsonl(root / "private.jsonl", items[:3])
    write_jsonl(root / "eval.jsonl", items)
    return root, model_dir


def _client(root, model_dir, name, evaluation: dict):
    from cotune.config import (DataConfig, EvaluationConfig, LoraConfig, ModelConfig, PartyConfig, TrainingConfig,
                               from_dict)
    from slm_client.client import SLMClient

    cfg = PartyConfig(
        party_id=name, workdir=str(root / name), model=ModelConfig(path=str(model_dir), device="cpu", dtype="fp32"),
        lora=LoraConfig(r=4, dropout=0.0), training=TrainingConfig(lr=5e-3, batch_size=2, max_length=32),
        data=DataConfig(public=str(root / "public.jsonl"), private=str(root / "private.jsonl"),
                        eval=str(root / "eval.jsonl")),
        evaluation=from_dict(EvaluationConfig, evaluation, "evaluation"))
    cfg.validate("slm")
    party = SLMClient(cfg)
    party.load()
    return party


def test_a_party_scores_a_free_form_eval_set_by_generation(gsm8k_party):
    from cotune.errors import Precondition
    from tests.unit.test_party_roles import _done, _request, _result

    root, model_dir = gsm8k_party
    party = _client(root, model_dir, "gen", {"metric": "exact_match", "max_new_tokens": 4, "stop": ["\n\n"]})
    try:
        done = _done(party, party.start_task(_request("evaluate")))
        m, result = dict(done.metrics), _result(done)
        assert m["eval_n"] == 5 and 0 < m["eval_generated_tokens"] <= 5 * 4 and 0 <= m["eval_stopped"] <= 5
        assert 0.0 <= m["eval_exact_match"] <= 1.0 and m["eval_accuracy"] == m["eval_exact_match"]
        assert result.eval_accuracy == m["eval_exact_match"] and math.isfinite(m["public_loss"])
        assert "eval_rouge_l" not in m and "eval_accuracy_norm" not in m
        done = _done(party, party.start_task(_request("evaluate", max_samples=2)))
        assert done.metrics["eval_n"] == 2
    finally:
        party.ops.shutdown()
    party = _client(root, model_dir, "rouge", {"metric": "rouge_l", "max_new_tokens": 3})
    try:
        m = dict(_done(party, party.start_task(_request("evaluate"))).metrics)
        assert 0.0 <= m["eval_rouge_l"] <= 1.0 and m["eval_generated_tokens"] == 15 and m["eval_stopped"] == 0
    finally:
        party.ops.shutdown()
    party = _client(root, model_dir, "unscored", {})
    try:  # a free-form eval set and no metric: refused up front, naming the fix
        with pytest.raises(Precondition, match="evaluation.metric is not set.*exact_match"):
            party.start_task(_request("evaluate"))
    finally:
        party.ops.shutdown()
