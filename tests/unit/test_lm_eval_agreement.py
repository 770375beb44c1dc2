"""benchmarks/lm_eval_agreement.py without lm-evaluation-harness: the task files it hands lm-eval carry the exact
context / continuation strings Cotune scores, and its comparison arithmetic (argmax, char vs byte normalisation)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cotune.data import load_task, shared_data_dir
from cotune.data.example import Example

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("lm_eval_agreement_bench", REPO / "benchmarks" / "lm_eval_agreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()

EXAMPLES = [
    Example(prompt="Question: Which is a gas?\nAnswer:", response=" oxygen", choices=(" iron", " oxygen", " salt"),
            label=1),
    # a passage with quotes, tabs, a backslash and non-ASCII text; a choice with a non-ASCII character
    Example(prompt='Caf\u00e9 "na\u00efve" \\ tab\there\nQuestion: is it?\nAnswer:', response=" yes",
            choices=(" no", " yes"), label=1),
    Example(prompt="Question: Temperature unit?\nAnswer:", response=" \u00b0C", choices=(" \u00b0C", " kg"), label=0),
]


def test_task_files_round_trip_the_exact_strings(tmp_path):
    name, yaml_path, jsonl = bench.write_task_files(tmp_path, "arc_easy", EXAMPLES)
    assert name == "cotune_agree_arc_easy" and yaml_path.name == f"{name}.yaml"
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(EXAMPLES)
    for i, (row, ex) in enumerate(zip(rows, EXAMPLES)):
        assert row == {"idx": i, "prompt": ex.prompt, "choices": list(ex.choices), "label": ex.label}
    cfg = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    assert cfg["task"] == name and cfg["output_type"] == "multiple_choice"
    # lm-eval builds context = doc[doc_to_text], continuation = target_delimiter + choice
    assert (cfg["doc_to_text"], cfg["doc_to_choice"], cfg["doc_to_target"]) == ("prompt", "choices", "label")
    assert cfg["target_delimiter"] == "" and cfg["num_fewshot"] == 0
    assert cfg["dataset_path"] == "json"
    assert Path(cfg["dataset_kwargs"]["data_files"][cfg["test_split"]]) == jsonl.resolve()
    assert {m["metric"] for m in cfg["metric_list"]} == {"acc", "acc_norm", "acc_bytes"}
    for row, ex in zip(rows, EXAMPLES):
        built = [(row[cfg["doc_to_text"]], cfg["target_delimiter"] + c) for c in row[cfg["doc_to_choice"]]]
        assert built == bench.expected_requests(ex) == [(ex.prompt, c) for c in ex.choices]


def test_predictions_normalise_by_characters_and_by_bytes():
    # choice 0 ' °C' is 3 characters but 4 bytes, ' kgs' 4 of each: per character -1.1 < -1.05 (choice 1 wins),
    # per byte -0.825 > -1.05 (choice 0 wins)
    lls = [np.array([-3.3, -4.2])]
    ex = [Example(prompt="p", response=" \u00b0C", choices=(" \u00b0C", " kgs"), label=0)]
    p = bench.predictions(lls, ex)
    assert p["acc"][0] == 0 and p["acc_chars"][0] == 1 and p["acc_bytes"][0] == 0
    assert bench.non_ascii_choice_items(EXAMPLES) == 1
    cmp = bench.compare(lls, [np.array([-3.3, -4.2])], ex)
    assert cmp["agreement_acc"] == 1.0
    assert cmp["agreement_acc_norm"] == 0.0  # Cotune's byte norm against lm-eval's character norm part here
    assert cmp["max_abs_dll"] == 0.0


def test_compare_counts_disagreements_and_deltas():
    ex = EXAMPLES[:2]
    a = [np.array([-5.0, -1.0, -2.0]), np.array([-0.70, -0.69])]
    b = [np.array([-5.0, -1.5, -1.2]), np.array([-0.70, -0.69])]
    cmp = bench.compare(a, b, ex)
    assert cmp["disagree_acc"] == [0] and cmp["agreement_acc"] == 0.5
    assert cmp["max_abs_dll"] == pytest.approx(0.8)
    assert cmp["median_abs_dll"] == pytest.approx(0.0)
    assert bench.margin(np.array([-1.0, -1.25, -3.0])) == pytest.approx(0.25)
    assert bench.accuracy(bench.predictions(a, ex)["acc"], ex) == 1.0


@pytest.mark.skipif(shared_data_dir() is None or not (shared_data_dir() / "datasets").is_dir(),
                    reason="shared data not found")
@pytest.mark.parametrize("task", sorted(bench.TASK_LIMITS))
def test_real_items_need_no_target_delimiter(task):
    """target_delimiter "" is right: every choice brings its one leading space, and no prompt ends in whitespace (so
    lm-eval's _encode_pair, which moves a context's trailing spaces into the continuation, changes nothing)."""
    examples = load_task(task, "validation", limit=50)
    for ex in examples:
        assert ex.prompt == ex.prompt.rstrip()
        assert all(c.startswith(" ") and not c[1:2].isspace() for c in ex.choices)
