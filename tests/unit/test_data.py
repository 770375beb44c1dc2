"""Dataset layer: task loaders on the shared files, templates, federated split, JSONL and content hashes."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cotune.data import (
    TASKS,
    Example,
    FederatedSplit,
    MalformedDataError,
    available_splits,
    canonical_jsonl_bytes,
    dataset_hash,
    federated_split,
    load_task,
    read_jsonl,
    read_jsonl_bytes,
    require_shared_data,
    seeded_permutation,
    shared_data_dir,
    split_task,
    write_jsonl,
)
from cotune.data import paths as paths_mod

REPO = Path(__file__).resolve().parents[2]


def _shared() -> Path | None:
    d = shared_data_dir()
    return d if d is not None and (d / "datasets").is_dir() else None


SHARED = _shared()
needs_data = pytest.mark.skipif(
    SHARED is None,
    reason="shared data not found: set COTUNE_SHARED_DATA or place shared/ (with data/datasets) beside the checkout",
)

# Official sizes (SOURCES.md) of every labeled split the shared files hold.
EXPECTED = {
    ("arc_easy", "train"): 2251,
    ("arc_easy", "validation"): 570,
    ("arc_easy", "test"): 2376,
    ("arc_challenge", "train"): 1119,
    ("arc_challenge", "validation"): 299,
    ("arc_challenge", "test"): 1172,
    ("boolq", "train"): 9427,
    ("boolq", "validation"): 3270,
    ("rte", "train"): 2490,
    ("rte", "validation"): 277,
    ("commonsense_qa", "train"): 9741,
    ("commonsense_qa", "validation"): 1221,
    ("openbookqa", "train"): 4957,
    ("openbookqa", "validation"): 500,
    ("openbookqa", "test"): 500,
    ("sciq", "validation"): 1000,
}


def _ex(i: int, text: str = "") -> Example:
    return Example(prompt=f"Question: q{i}{text}\nAnswer:", response=" a", choices=(" a", " b"), label=0)


# ---------------------------------------------------------------------------------------------- real shared files


def test_registry_matches_expected_sizes():
    assert set(TASKS) == {"arc_easy", "arc_challenge", "boolq", "rte", "commonsense_qa", "openbookqa", "sciq",
                          "gsm8k", "dialogsum"}  # the generative two: tests/unit/test_generative_tasks.py
    mc = {t: spec for t, spec in TASKS.items() if spec.generation is None}
    assert {(t, s): n for t, spec in mc.items() for s, n in spec.official_sizes.items()} == EXPECTED


@needs_data
@pytest.mark.parametrize("task,split", sorted(EXPECTED))
def test_split_loads_with_official_count_and_consistent_examples(task, split):
    exs = load_task(task, split)
    assert len(exs) == EXPECTED[(task, split)]
    assert split in available_splits(task)
    fixed = TASKS[task].fixed_choices
    for ex in exs:
        assert 0 <= ex.label < len(ex.choices)
        assert ex.response == ex.choices[ex.label]
        assert len(ex.choices) >= 2
        assert all(c.startswith(" ") and c.strip() and c == " " + c.strip() for c in ex.choices)
        assert ex.prompt.endswith("\nAnswer:") and "\nAnswer:" not in ex.prompt[:-8]
        if fixed is not None:
            assert ex.choices == fixed
        else:
            assert "Question: " in ex.prompt


@needs_data
def test_available_splits():
    assert available_splits("arc_easy") == ["train", "validation", "test"]
    assert available_splits("boolq") == ["train", "validation"]
    assert available_splits("rte") == ["train", "validation"]  # the unlabeled test is not offered
    assert available_splits("sciq") == ["validation"]
    assert available_splits("arc_easy", data_dir=SHARED) == available_splits("arc_easy", data_dir=SHARED / "datasets")


@needs_data
def test_known_samples():
    ex = load_task("arc_easy", "train")[0]
    assert ex.prompt == "Question: Which factor will most likely cause a person to develop a fever?\nAnswer:"
    assert ex.response == " a bacterial population in the bloodstream" and ex.label == 1 and len(ex.choices) == 4

    # OLMo request-doc format (train/test) and HF format (validation) give the same template
    ex = load_task("arc_challenge", "train")[0]
    assert ex.prompt == (
        "Question: George wants to warm his hands quickly by rubbing them. Which skin surface will produce the "
        "most heat?\nAnswer:"
    )
    assert ex.choices == (" dry palms", " wet palms", " palms covered with oil", " palms covered with lotion")
    assert ex.label == 0
    ex = load_task("arc_challenge", "validation")[0]
    assert ex.prompt.startswith("Question: Juan and LaKeisha roll") and ex.response == " Record the details of the investigation."

    # ARC numeric answer keys ('1'..'4') map to the right index
    num = [e for e in load_task("arc_easy", "train") if len(e.choices) == 3]
    assert len(num) == 6

    ex = load_task("boolq", "train")[0]  # query 'Persian language -- Persian (...' : the title is dropped
    assert ex.prompt.startswith("Persian (/ˈpɜːrʒən, -ʃən/), also known by its endonym Farsi")
    assert ex.prompt.endswith("Aramaic alphabet.\nQuestion: do iran and afghanistan speak the same language?\nAnswer:")
    assert ex.choices == (" no", " yes") and ex.response == " yes"
    ex = load_task("boolq", "validation")[0]
    assert ex.prompt.startswith("All biomass goes through at least some of these steps")
    assert ex.prompt.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert ex.response == " no"  # answer: false

    rte = load_task("rte", "train")
    assert rte[0].prompt == (
        "No Weapons of Mass Destruction Found in Iraq Yet.\n"
        "Question: Weapons of Mass Destruction Found in Iraq. True or False?\nAnswer:"
    )
    assert rte[0].response == " False" and rte[0].label == 1  # not_entailment
    assert rte[1].response == " True" and rte[1].label == 0  # entailment

    ex = load_task("commonsense_qa", "train")[0]
    assert ex.prompt.startswith("Question: The sanctions against the school were a punishing blow")
    assert ex.choices == (" ignore", " enforce", " authoritarian", " yell at", " avoid") and ex.label == 0
    ex = load_task("commonsense_qa", "validation")[0]
    assert ex.response == " bank" and len(ex.choices) == 5

    obqa = load_task("openbookqa", "validation")[0]
    assert obqa.prompt == (
        "Question: Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they are "
        "known as\nAnswer:"
    )
    assert obqa.choices == (" Deep sea animals", " fish", " Long Sea Fish", " Far Sea Animals") and obqa.label == 0
    # The release TSV's one row with five options '(A)..(D)..(D)' and answer B
    odd = [e for e in load_task("openbookqa", "train") if len(e.choices) != 4]
    assert len(odd) == 1 and odd[0].prompt == "Question: A learned behavior\nAnswer:"
    assert odd[0].response == " seals clapping to the delight of an audience"

    sciq = load_task("sciq", "validation")
    assert sciq[0].prompt == "Question: Who proposed the theory of evolution by natural selection?\nAnswer:"
    assert sciq[0].response == " darwin"
    assert sorted(sciq[0].choices) == sorted([" darwin", " Linnaeus", " shaw", " Scopes"])
    with_support = [e for e in sciq if not e.prompt.startswith("Question: ")]
    assert len(with_support) == 887
    assert with_support[0].prompt.startswith("A frameshift mutation is a deletion or insertion")
    assert "\nQuestion: " in with_support[0].prompt


@needs_data
def test_label_distributions_are_plausible():
    # gold position of SciQ is spread over all four slots; BoolQ train is ~62% yes (official)
    counts = collections.Counter(e.label for e in load_task("sciq", "validation"))
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 200
    boolq = load_task("boolq", "train")
    assert abs(sum(e.label for e in boolq) / len(boolq) - 0.623) < 0.01
    rte = load_task("rte", "validation")
    assert sum(e.label == 0 for e in rte) == 146  # entailment -> True


@needs_data
def test_alternative_sources_agree():
    assert load_task("arc_easy", "validation") == load_task(
        "arc_easy", "validation", source="arc_easy_hf/validation.jsonl"
    )
    assert load_task("openbookqa", "validation") == load_task(
        "openbookqa", "validation", source="openbookqa_hf/validation.jsonl"
    )
    sg = load_task("rte", "validation")
    glue = load_task("rte", "validation", source="rte_glue/validation.jsonl")
    assert [e.label for e in sg] == [e.label for e in glue]  # GLUE 0/1 and SuperGLUE strings map alike
    assert sum(a == b for a, b in zip(sg, glue)) == 271  # the rest differ only in quote normalisation


@needs_data
def test_limit_is_a_prefix():
    full = load_task("boolq", "validation")
    assert load_task("boolq", "validation", limit=7) == full[:7]
    assert load_task("boolq", "dev", limit=0) == []


@needs_data
def test_unlabeled_and_unknown_splits_are_clear_errors():
    with pytest.raises(ValueError, match="no labels"):
        load_task("rte", "test")
    with pytest.raises(ValueError, match="no split 'test'"):
        load_task("boolq", "test")
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        load_task("mmlu")
    with pytest.raises(ValueError, match="unknown source"):
        load_task("rte", "validation", source="rte_glue/train.jsonl")
    with pytest.raises(ValueError, match="limit"):
        load_task("rte", "validation", limit=-1)


@needs_data
def test_dataset_hash_is_stable_across_processes():
    pub = split_task("arc_easy", 4, seed=3).public
    here = {"validation": dataset_hash(load_task("arc_easy", "validation")), "public": dataset_hash(pub)}
    code = (
        "import json; from cotune.data import dataset_hash, load_task, split_task;"
        "print(json.dumps({'validation': dataset_hash(load_task('arc_easy', 'validation')),"
        "'public': dataset_hash(split_task('arc_easy', 4, seed=3).public)}))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", COTUNE_SHARED_DATA=str(SHARED))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == here


@needs_data
def test_split_task_protocol():
    fs = split_task("arc_challenge", 4, seed=0)
    assert len(fs.public) == 1119 // 5 and all(len(c) == 1119 // 5 for c in fs.clients)
    assert fs.eval == load_task("arc_challenge", "validation")
    fs = split_task("sciq", 4, seed=0, eval_limit=100)  # no train split: all cut from validation
    assert fs.sizes == {"public": 166, "clients": [166] * 4, "eval": 100}
    prompts = [e.prompt for part in [fs.public, *fs.clients, fs.eval] for e in part]
    assert len(set(prompts)) == len(prompts)


# ---------------------------------------------------------------------------------------------- synthetic files


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_formats_in_a_private_data_dir(tmp_path):
    root = tmp_path / "data"
    ds = root / "datasets"
    _write_lines(
        ds / "arc_challenge/train.jsonl",
        [json.dumps({"id": "x", "query": "Question: 2+2?\nAnswer:", "choices": ["3", "4"], "gold": 1})],
    )
    (ds / "arc_easy").mkdir(parents=True)
    (ds / "arc_easy/test.json").write_text(
        json.dumps([{"id": "y", "question": "Pick", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "3"}]),
        encoding="utf-8",
    )
    _write_lines(
        ds / "openbookqa/Main/train.tsv",
        ["ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key", "1-1\tSun is\t(A) hot (B) cold (C) wet (D) blue\tx\tA"],
    )
    _write_lines(
        ds / "boolq/train.jsonl",
        [json.dumps({"idx": 0, "query": "T -- P a -- b.\nQuestion: is it?\nAnswer:", "choices": ["yes", "no"], "gold": 1})],
    )
    _write_lines(ds / "rte_glue/validation.jsonl", [json.dumps({"sentence1": "A.", "sentence2": "B.", "label": 0, "idx": 0})])
    _write_lines(ds / "sciq/validation.jsonl", [json.dumps({"question": "Q?", "correct_answer": "c", "distractor1": "d1", "distractor2": "d2", "distractor3": "d3", "support": " S. "})])

    assert load_task("arc_challenge", data_dir=root) == [Example("Question: 2+2?\nAnswer:", " 4", (" 3", " 4"), 1)]
    assert load_task("arc_easy", "test", data_dir=ds)[0].response == " c"  # data_dir may be datasets/ itself
    assert load_task("openbookqa", data_dir=root)[0] == Example("Question: Sun is\nAnswer:", " hot", (" hot", " cold", " wet", " blue"), 0)
    assert load_task("boolq", data_dir=root)[0] == Example("P a -- b.\nQuestion: is it?\nAnswer:", " no", (" no", " yes"), 0)
    assert load_task("rte", "validation", data_dir=root)[0] == Example("A.\nQuestion: B. True or False?\nAnswer:", " True", (" True", " False"), 0)
    sciq = load_task("sciq", "validation", data_dir=root)[0]
    assert sciq.prompt == "S.\nQuestion: Q?\nAnswer:" and sciq.response == " c" and sorted(sciq.choices) == [" c", " d1", " d2", " d3"]
    assert available_splits("rte", data_dir=root) == ["validation"]
    with pytest.raises(FileNotFoundError, match="no data file found"):
        load_task("rte", "train", data_dir=root)


@pytest.mark.parametrize(
    "rel,lines,match",
    [
        ("rte_superglue/train.jsonl", ['{"premise": "a", "hypothesis": "b", "label": "entailment"}', "{not json"], r"train\.jsonl:2: invalid JSON"),
        ("rte_superglue/train.jsonl", ['{"premise": "a", "hypothesis": "b", "label": "maybe"}'], r"train\.jsonl:1: rte: label"),
        ("rte_superglue/train.jsonl", ['{"premise": "a", "label": "entailment"}'], r"train\.jsonl:1: rte: missing field 'hypothesis'"),
        ("arc_challenge/train.jsonl", ["", '{"query": "Q?", "choices": ["a", "b"], "gold": 0}'], r"train\.jsonl:2: .*Question: \.\.\."),
        ("arc_challenge/train.jsonl", ['{"query": "Question: q\\nAnswer:", "choices": ["a", "b"], "gold": 2}'], r"train\.jsonl:1: .*out of range"),
        ("arc_challenge/validation.jsonl", ['{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}'], r"validation\.jsonl:1: .*answer key 'C'"),
        ("arc_challenge/validation.jsonl", ['["a list"]'], r"validation\.jsonl:1: expected a JSON object"),
        ("openbookqa/Main/train.tsv", ["ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key", "1\tq\t(A) a (B) b\tx"], r"train\.tsv:2: expected 5"),
        ("boolq/train.jsonl", ['{"query": "P\\nQuestion: q?\\nAnswer:", "choices": ["yes", "no"], "gold": 0}'], r"train\.jsonl:1: .*title"),
        ("commonsense_qa/train.jsonl", ['{"query": "Question: q\\nAnswer:", "choices": ["a", " "], "gold": 0}'], r"train\.jsonl:1: .*empty choice 1"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, rel, lines, match):
    _write_lines(tmp_path / "datasets" / rel, lines)
    task = rel.split("/")[0].replace("_superglue", "")
    split = "validation" if "validation" in rel else "train"
    with pytest.raises(MalformedDataError, match=match) as err:
        load_task(task, split, data_dir=tmp_path)
    assert isinstance(err.value, ValueError)


# ---------------------------------------------------------------------------------------------- paths


def test_shared_data_dir_env_and_walk_up(tmp_path, monkeypatch):
    monkeypatch.setenv(paths_mod.ENV_VAR, str(tmp_path / "nowhere"))
    assert shared_data_dir() == (tmp_path / "nowhere").resolve()
    with pytest.raises(FileNotFoundError, match="COTUNE_SHARED_DATA"):
        require_shared_data()
    monkeypatch.delenv(paths_mod.ENV_VAR)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    deep = tmp_path / "checkout" / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert shared_data_dir() == (tmp_path / "shared" / "data").resolve()
    assert require_shared_data() == shared_data_dir()


def test_missing_shared_data_is_actionable(tmp_path, monkeypatch):
    monkeypatch.delenv(paths_mod.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths_mod, "__file__", str(tmp_path / "pkg" / "paths.py"))
    assert shared_data_dir() is None
    with pytest.raises(FileNotFoundError, match="COTUNE_SHARED_DATA.*beside the repository checkout"):
        require_shared_data()
    with pytest.raises(FileNotFoundError):
        load_task("arc_easy")
    assert available_splits("arc_easy") == []


# ---------------------------------------------------------------------------------------------- split


def test_federated_split_sizes_disjoint_deterministic():
    exs = [_ex(i) for i in range(103)]
    ev = [_ex(1000 + i) for i in range(10)]
    fs = federated_split(exs, 4, seed=7, eval_examples=ev)
    assert isinstance(fs, FederatedSplit) and fs.num_clients == 4
    assert len(fs.public) == 20 and [len(c) for c in fs.clients] == [20] * 4 and fs.eval == ev
    ids = [e.prompt for part in [fs.public, *fs.clients] for e in part]
    assert len(set(ids)) == 100 and set(ids) <= {e.prompt for e in exs}
    assert federated_split(exs, 4, seed=7, eval_examples=ev) == fs
    other = federated_split(exs, 4, seed=8, eval_examples=ev)
    assert other.public != fs.public
    assert federated_split(exs, 4, seed=7, eval_examples=ev, per_part=5).public == fs.public[:5]  # prefix-stable
    # shuffled: the public part is not simply the head of the input
    assert fs.public != exs[:20]


def test_federated_split_cuts_eval_from_the_rest():
    exs = [_ex(i) for i in range(60)]
    fs = federated_split(exs, 4, seed=0)  # 60 // (4 + 2) = 10 per part, eval = the 10 left
    assert fs.sizes == {"public": 10, "clients": [10] * 4, "eval": 10}
    assert len({e.prompt for part in [fs.public, *fs.clients, fs.eval] for e in part}) == 60
    fs = federated_split(exs, 2, seed=0, per_part=8, eval_size=5)
    assert fs.sizes == {"public": 8, "clients": [8, 8], "eval": 5}


def test_federated_split_errors():
    exs = [_ex(i) for i in range(10)]
    with pytest.raises(ValueError, match="need 15, have 10"):
        federated_split(exs, 4, per_part=3, eval_examples=exs[:1])
    with pytest.raises(ValueError, match="eval"):
        federated_split(exs, 4, per_part=2)  # nothing left for eval
    with pytest.raises(ValueError, match="have 3, need at least 6"):
        federated_split(exs[:3], 4)
    with pytest.raises(ValueError, match="num_clients"):
        federated_split(exs, 0)
    with pytest.raises(ValueError, match="per_part"):
        federated_split(exs, 1, per_part=0)
    with pytest.raises(ValueError, match="empty"):
        federated_split(exs, 1, eval_examples=[])


def test_seeded_permutation_is_pinned():
    assert sorted(seeded_permutation(50, 1)) == list(range(50))
    assert seeded_permutation(8, 0) == seeded_permutation(8, 0)
    assert seeded_permutation(8, 0) != seeded_permutation(8, 1)
    # pinned: must never change, or public sets (and their hashes) silently change between versions
    assert seeded_permutation(8, 0) == PINNED_PERMUTATION


PINNED_PERMUTATION = [2, 3, 5, 6, 1, 0, 4, 7]


# ---------------------------------------------------------------------------------------------- JSONL and hashes


def test_jsonl_round_trip_and_hash(tmp_path):
    exs = [
        Example("Frage: Wie heißt die Hauptstadt?\nAnswer:", " Paris", (" Paris", " Lyon"), 0),
        Example("free-form", " 日本語 \"quoted\" \\ text\n"),
    ]
    path = tmp_path / "sub" / "public.jsonl"
    h = write_jsonl(path, exs)
    raw = path.read_bytes()
    assert raw == canonical_jsonl_bytes(exs) and raw.endswith(b"\n") and raw.count(b"\n") == 2
    assert "heißt".encode() in raw and "日本語".encode() in raw  # UTF-8, not \u escapes
    assert h == dataset_hash(exs) == hashlib.sha256(raw).hexdigest()
    assert read_jsonl(path) == exs
    assert read_jsonl_bytes(raw) == exs
    with pytest.raises(MalformedDataError, match=r"blob:2: invalid JSON"):
        read_jsonl_bytes(raw[:-5] + b"\n", name="blob")
    assert raw.split(b"\n")[0] == (
        b'{"choices":[" Paris"," Lyon"],"label":0,"prompt":"Frage: Wie hei\xc3\x9ft die Hauptstadt?\\nAnswer:",'
        b'"response":" Paris"}'
    )
    assert dataset_hash(exs) == PINNED_HASH
    assert dataset_hash(exs) != dataset_hash(exs[::-1]) and dataset_hash([]) == hashlib.sha256(b"").hexdigest()


PINNED_HASH = "1c6f472a3303ace823de1fef934bda58eb3af71559f1b5c3d53e809e38a3ede0"


def test_read_jsonl_errors(tmp_path):
    p = _write_lines(tmp_path / "x.jsonl", [json.dumps(_ex(0).to_json()), "", '{"prompt": "p"}'])
    with pytest.raises(MalformedDataError, match=r"x\.jsonl:3: .*'response'"):
        read_jsonl(p)
    p = _write_lines(tmp_path / "y.jsonl", ['{"prompt": "p", "response": "r", "choices": [" a"], "label": 3}'])
    with pytest.raises(MalformedDataError, match=r"y\.jsonl:1: label 3 out of range"):
        read_jsonl(p)
    p = _write_lines(tmp_path / "z.jsonl", ["{oops"])
    with pytest.raises(MalformedDataError, match=r"z\.jsonl:1: invalid JSON"):
        read_jsonl(p)
    with pytest.raises(TypeError):
        canonical_jsonl_bytes([{"prompt": "p"}])
