"""Task datasets as :class:`Example` lists, with lm-evaluation-harness style prompt templates.

A multiple-choice item has ``prompt`` (the context), ``choices`` (every candidate continuation, each starting
with a space), ``label`` (the gold index) and ``response`` (the gold continuation, ``choices[label]``), so the
same list serves for training (prompt -> response) and for log-likelihood multiple-choice evaluation. A
generative task's items are free-form (``choices=()``, ``label=-1``): trained on prompt -> response and evaluated
by generating and scoring (:class:`GenerationSpec`, :func:`evaluation_config_for_task`).

Templates:

* ARC-Easy / ARC-Challenge / CommonsenseQA / OpenBookQA: ``"Question: {question}\\nAnswer:"``,
  choices ``" {choice text}"``.
* SciQ: ``"{support}\\nQuestion: {question}\\nAnswer:"`` (the support line only when the row has one);
  four choices (the correct answer and three distractors) in a fixed per-row order derived from a sha256
  of the row, so the gold position varies but never between runs.
* BoolQ: ``"{passage}\\nQuestion: {question}?\\nAnswer:"``, choices ``(" no", " yes")``, label 1 = yes.
  The train file (OLMo request docs) carries ``"{title} -- {passage}"``; the title is removed so train
  and validation prompts share one format.
* RTE: ``"{premise}\\nQuestion: {hypothesis} True or False?\\nAnswer:"``, choices ``(" True", " False")``,
  label 0 = entailment. SuperGLUE files use the strings ``entailment``/``not_entailment``, GLUE files 0/1
  (0 = entailment); both are accepted. The SuperGLUE test split is unlabeled and is not loadable.
* GSM8K (generative): ``"Question: {question}\\nAnswer:"``, response ``" {answer}"``: the reference solution,
  its chain of thought (single newlines, calculator annotations ``<<48/2=24>>`` kept) then ``"#### {number}"``.
  Scored by exact match of the final number.
* DialogSum (generative): ``"Dialogue:\\n{dialogue}\\nSummary:"``, response ``" {summary}"``. The test file has
  three reference summaries per dialogue; the response (and the ROUGE-L reference) is ``summary1``, the one the
  Hugging Face copies of DialogSum carry.

The passage tasks (SciQ with support, BoolQ, RTE) put the passage before a ``"\\nQuestion: "`` line
(:data:`cotune.data.example.QUESTION_LINE`), DialogSum its dialogue before ``"\\nSummary:"``
(:data:`cotune.data.example.SUMMARY_LINE`); an over-long sample is truncated there, from the passage's end
(:func:`cotune.align.tokenizers.encode_pair`), so the question (summary) line and the answer survive whenever
they fit.

Splits: a task's training pool (public set and private shards) and its held-out eval split are given by
:func:`federated_splits`: ``train`` and ``validation`` (``test`` where there is no validation: GSM8K). DialogSum's
train split is not in the shared data (its file is over the snapshot limit, see SOURCES.md), so its pool is the
dev file (``validation``, 500 dialogues) and its eval the ``test`` file (500); SciQ has one split only, both are
cut from it.

Files are read from ``<shared data>/datasets/`` (see :mod:`cotune.data.paths`). Each record's format is
detected from its keys, so the HF-style files (``question``/``choices{text,label}``/``answerKey``), the OLMo
request-doc files (``query``/``choices``/``gold``) and the OpenBookQA release TSV are all handled. A row that
does not fit raises :class:`MalformedDataError` (a ValueError) naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .example import QUESTION_LINE, SUMMARY_LINE, Example
from .paths import require_shared_data, shared_data_dir

__all__ = [
    "MalformedDataError",
    "GenerationSpec",
    "TaskSpec",
    "TASKS",
    "SPLIT_ALIASES",
    "get_task",
    "evaluation_config_for_task",
    "federated_splits",
    "pool_and_eval_split",
    "load_task",
    "available_splits",
    "resolve_source",
    "datasets_root",
    "write_jsonl",
    "read_jsonl",
    "read_jsonl_bytes",
    "canonical_jsonl_bytes",
    "dataset_hash",
]


class MalformedDataError(ValueError):
    """A data file (or one of its rows) does not have the expected format."""


class _RowError(ValueError):
    """Raised by record converters; wrapped with the file and line by the loader."""


# --------------------------------------------------------------------------------------------------
# Example builders and record helpers


def _str(rec: Mapping[str, Any], key: str) -> str:
    if key not in rec:
        raise _RowError(f"missing field {key!r} (fields: {sorted(rec)})")
    value = rec[key]
    if not isinstance(value, str):
        raise _RowError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _nonempty(text: str, what: str) -> str:
    text = text.strip()
    if not text:
        raise _RowError(f"empty {what}")
    return text


def _mc_example(prompt: str, texts: Sequence[Any], label: Any) -> Example:
    """An Example from a prompt, the raw choice texts and the gold index."""
    if not isinstance(texts, (list, tuple)) or len(texts) < 2:
        raise _RowError(f"need a list of at least 2 choices, got {texts!r}")
    if isinstance(label, bool) or not isinstance(label, int):
        raise _RowError(f"gold index must be an integer, got {label!r}")
    if not 0 <= label < len(texts):
        raise _RowError(f"gold index {label} out of range for {len(texts)} choices")
    choices = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise _RowError(f"choice {i} must be a string, got {type(t).__name__}")
        choices.append(" " + _nonempty(t, f"choice {i}"))
    return Example(prompt=prompt, response=choices[label], choices=tuple(choices), label=label)


def _qa_prompt(question: str) -> str:
    return f"Question: {_nonempty(question, 'question')}\nAnswer:"


_QUERY_PREFIX = "Question: "
_QUERY_SUFFIX = "\nAnswer:"


def _question_from_query(query: str) -> str:
    """The question inside an OLMo request-doc query 'Question: {q}\\nAnswer:'."""
    if not (query.startswith(_QUERY_PREFIX) and query.endswith(_QUERY_SUFFIX)):
        raise _RowError(f"query is not of the form 'Question: ...\\nAnswer:': {query[:80]!r}")
    return query[len(_QUERY_PREFIX) : -len(_QUERY_SUFFIX)]


def _lettered_gold(labels: Sequence[Any], key: Any) -> int:
    if not isinstance(key, str):
        raise _RowError(f"answer key must be a string, got {key!r}")
    hits = [i for i, lab in enumerate(labels) if lab == key]
    if len(hits) != 1:
        raise _RowError(f"answer key {key!r} matches {len(hits)} of the choice labels {list(labels)}")
    return hits[0]


def _hf_choices(rec: Mapping[str, Any]) -> tuple[list[Any], int]:
    """(choice texts, gold index) from an HF-style record: choices {text, label} + answerKey."""
    ch = rec.get("choices")
    if not isinstance(ch, Mapping) or not isinstance(ch.get("text"), list) or not isinstance(ch.get("label"), list):
        raise _RowError("field 'choices' must be an object with lists 'text' and 'label'")
    texts, labels = ch["text"], ch["label"]
    if len(texts) != len(labels):
        raise _RowError(f"{len(texts)} choice texts but {len(labels)} choice labels")
    if "answerKey" not in rec:
        raise _RowError(f"missing field 'answerKey' (fields: {sorted(rec)})")
    return texts, _lettered_gold(labels, rec["answerKey"])


def _olmo_mc(rec: Mapping[str, Any]) -> Example:
    question = _question_from_query(_str(rec, "query"))
    if "gold" not in rec:
        raise _RowError("missing field 'gold'")
    return _mc_example(_qa_prompt(question), rec.get("choices"), rec["gold"])


# --------------------------------------------------------------------------------------------------
# Per-task record converters (format detected from the record's keys)


def _convert_qa(rec: Mapping[str, Any]) -> Example:
    """ARC / CommonsenseQA / OpenBookQA (HF jsonl/json, OLMo request docs)."""
    if "query" in rec:
        return _olmo_mc(rec)
    qkey = "question" if "question" in rec else "question_stem"
    texts, gold = _hf_choices(rec)
    return _mc_example(_qa_prompt(_str(rec, qkey)), texts, gold)


_OBQA_CHOICE_SPLIT = re.compile(r"(?:^|\s)\(([A-Z])\) ")


def _convert_openbookqa(rec: Mapping[str, Any]) -> Example:
    if "Choices" not in rec:  # HF jsonl
        return _convert_qa(rec)
    # Original OpenBookQA release TSV: ID, Question Stem, Choices '(A) x (B) y ...', Complete Question, Answer Key
    raw = _str(rec, "Choices")
    parts = _OBQA_CHOICE_SPLIT.split(raw)
    if parts[0].strip() or len(parts) < 5:
        raise _RowError(f"cannot parse choices {raw[:80]!r}")
    labels, texts = parts[1::2], parts[2::2]
    gold = _lettered_gold(labels, _str(rec, "Answer Key").strip())
    return _mc_example(_qa_prompt(_str(rec, "Question Stem")), texts, gold)


BOOLQ_CHOICES = (" no", " yes")


def _boolq_prompt(passage: str, question: str) -> str:
    question = _nonempty(question, "question")
    return f"{_nonempty(passage, 'passage')}{QUESTION_LINE}{question}?\nAnswer:"


def _convert_boolq(rec: Mapping[str, Any]) -> Example:
    if "query" in rec:
        # OLMo request doc: query '{title} -- {passage}\nQuestion: {question}?\nAnswer:', choices ['yes','no']
        query = _str(rec, "query")
        body, sep, tail = query.rpartition("\nQuestion: ")
        if not sep or not tail.endswith("?" + _QUERY_SUFFIX):
            raise _RowError(f"query is not of the form '...\\nQuestion: ...?\\nAnswer:': {query[-80:]!r}")
        question = tail[: -len("?" + _QUERY_SUFFIX)]
        title, sep, passage = body.partition(" -- ")
        if not sep:
            raise _RowError("query has no '{title} -- ' prefix before the passage")
        choices, gold = rec.get("choices"), rec.get("gold")
        if not isinstance(choices, list) or sorted(str(c).strip().lower() for c in choices) != ["no", "yes"]:
            raise _RowError(f"choices must be ['yes', 'no'], got {choices!r}")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < 2:
            raise _RowError(f"gold must be 0 or 1, got {gold!r}")
        answer = choices[gold].strip().lower() == "yes"
    else:
        passage, question = _str(rec, "passage"), _str(rec, "question")
        answer = rec.get("answer", rec.get("label"))
        if isinstance(answer, int) and not isinstance(answer, bool) and answer in (0, 1):
            answer = bool(answer)
        if not isinstance(answer, bool):
            raise _RowError(f"field 'answer' must be true/false, got {answer!r}")
    return _mc_example(_boolq_prompt(passage, question), [c.strip() for c in BOOLQ_CHOICES], int(answer))


RTE_CHOICES = (" True", " False")
_RTE_LABELS = {"entailment": 0, "not_entailment": 1, 0: 0, 1: 1}


def _convert_rte(rec: Mapping[str, Any]) -> Example:
    if "premise" in rec:  # SuperGLUE
        premise, hypothesis = _str(rec, "premise"), _str(rec, "hypothesis")
    else:  # GLUE
        premise, hypothesis = _str(rec, "sentence1"), _str(rec, "sentence2")
    raw = rec.get("label")
    if isinstance(raw, bool) or raw not in _RTE_LABELS:
        raise _RowError(f"label must be 'entailment'/'not_entailment' or 0/1, got {raw!r} (unlabeled row?)")
    prompt = (
        f"{_nonempty(premise, 'premise')}{QUESTION_LINE}{_nonempty(hypothesis, 'hypothesis')} True or False?\nAnswer:"
    )
    return _mc_example(prompt, [c.strip() for c in RTE_CHOICES], _RTE_LABELS[raw])


def _convert_sciq(rec: Mapping[str, Any]) -> Example:
    question = _nonempty(_str(rec, "question"), "question")
    raw = [_str(rec, "correct_answer"), _str(rec, "distractor1"), _str(rec, "distractor2"), _str(rec, "distractor3")]
    # Fixed per-row permutation: sort the four by a sha256 of (question, correct answer, original slot).
    seed = f"sciq\x1f{question}\x1f{raw[0]}"
    order = sorted(range(4), key=lambda i: hashlib.sha256(f"{seed}\x1f{i}".encode("utf-8")).digest())
    prompt = _qa_prompt(question)
    support = rec.get("support") or ""
    if not isinstance(support, str):
        raise _RowError(f"field 'support' must be a string, got {type(support).__name__}")
    if support.strip():
        prompt = f"{support.strip()}\n{prompt}"  # = support + QUESTION_LINE + ...: the passage ends there
    return _mc_example(prompt, [raw[i] for i in order], order.index(0))


_GSM8K_ANSWER = re.compile(r"\n#### -?[0-9][0-9,]*(?:\.[0-9]+)?$")


def _convert_gsm8k(rec: Mapping[str, Any]) -> Example:
    """GSM8K (openai/grade-school-math jsonl): question, answer = chain of thought + '\\n#### {number}'."""
    question = _nonempty(_str(rec, "question"), "question")
    answer = _nonempty(_str(rec, "answer"), "answer")
    if not _GSM8K_ANSWER.search(answer):
        raise _RowError(f"answer does not end with a '\\n#### <number>' line: {answer[-60:]!r}")
    return Example(prompt=_qa_prompt(question), response=" " + answer)


def _convert_dialogsum(rec: Mapping[str, Any]) -> Example:
    """DialogSum (cylnlp/dialogsum jsonl): dialogue + summary (dev), or summary1..3 (test: summary1 is used)."""
    dialogue = _nonempty(_str(rec, "dialogue"), "dialogue")
    summary = _nonempty(_str(rec, "summary" if "summary" in rec else "summary1"), "summary")
    return Example(prompt=f"Dialogue:\n{dialogue}{SUMMARY_LINE}", response=" " + summary)


# --------------------------------------------------------------------------------------------------
# Task registry


# generation metric -> the eval metric a party reports it as (cotune.party.tasks.evaluate; also in eval_accuracy)
GENERATION_METRICS = {"exact_match": "eval_exact_match", "rouge_l": "eval_rouge_l"}


@dataclass(frozen=True)
class GenerationSpec:
    """How a generative task is evaluated: greedy decoding of up to max_new_tokens tokens, cut at the first stop
    sequence, scored by metric: "exact_match" (GSM8K: the final number equals the gold one,
    :func:`cotune.lm.scoring.gsm8k_exact_match`) or "rouge_l" (ROUGE-L F-measure against the response,
    :func:`cotune.lm.scoring.rouge_l`)."""

    metric: str
    max_new_tokens: int
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.metric not in GENERATION_METRICS:
            raise ValueError(f"metric must be one of {tuple(GENERATION_METRICS)}, got {self.metric!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop sequences must be non-empty strings, got {self.stop!r}")


@dataclass(frozen=True, eq=False)
class TaskSpec:
    """A task: how to turn its records into Examples and where each split's file lives.

    splits: split name -> candidate files relative to ``datasets/``; the first that exists is read
            (the others hold the same rows in another format).
    official_sizes: the official row count of each split (the shared files match them).
    unlabeled: split name -> why it cannot be loaded (files exist but carry no labels).
    generation: set for generative tasks (free-form examples): how their eval set is scored.
    """

    name: str
    description: str
    convert: Callable[[Mapping[str, Any]], Example]
    splits: Mapping[str, tuple[str, ...]]
    official_sizes: Mapping[str, int]
    unlabeled: Mapping[str, str] = field(default_factory=dict)
    fixed_choices: tuple[str, ...] | None = None
    generation: GenerationSpec | None = None


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="arc_easy",
            description="AI2 ARC, Easy set: grade-school science questions (3-5 choices)",
            convert=_convert_qa,
            splits={
                "train": ("arc_easy/train.json",),
                "validation": ("arc_easy/validation.json", "arc_easy_hf/validation.jsonl"),
                "test": ("arc_easy/test.json",),
            },
            official_sizes={"train": 2251, "validation": 570, "test": 2376},
        ),
        TaskSpec(
            name="arc_challenge",
            description="AI2 ARC, Challenge set: harder grade-school science questions (3-5 choices)",
            convert=_convert_qa,
            splits={
                "train": ("arc_challenge/train.jsonl",),
                "validation": ("arc_challenge/validation.jsonl",),
                "test": ("arc_challenge/test.jsonl",),
            },
            official_sizes={"train": 1119, "validation": 299, "test": 1172},
        ),
        TaskSpec(
            name="boolq",
            description="BoolQ: yes/no questions about a Wikipedia passage",
            convert=_convert_boolq,
            splits={"train": ("boolq/train.jsonl",), "validation": ("boolq/validation.jsonl",)},
            official_sizes={"train": 9427, "validation": 3270},
            fixed_choices=BOOLQ_CHOICES,
        ),
        TaskSpec(
            name="rte",
            description="RTE (SuperGLUE/GLUE): does the premise entail the hypothesis?",
            convert=_convert_rte,
            splits={
                "train": ("rte_superglue/train.jsonl",),
                "validation": ("rte_superglue/val.jsonl", "rte_glue/validation.jsonl"),
            },
            official_sizes={"train": 2490, "validation": 277},
            unlabeled={"test": "the RTE test split (rte_superglue/test.jsonl, 3,000 rows) has no labels"},
            fixed_choices=RTE_CHOICES,
        ),
        TaskSpec(
            name="commonsense_qa",
            description="CommonsenseQA: commonsense questions with 5 choices",
            convert=_convert_qa,
            splits={"train": ("commonsense_qa/train.jsonl",), "validation": ("commonsense_qa/validation.jsonl",)},
            official_sizes={"train": 9741, "validation": 1221},
        ),
        TaskSpec(
            name="openbookqa",
            description="OpenBookQA (main): elementary science questions with 4 choices",
            convert=_convert_openbookqa,
            splits={
                "train": ("openbookqa/Main/train.tsv",),
                "validation": ("openbookqa/Main/dev.tsv", "openbookqa_hf/validation.jsonl"),
                "test": ("openbookqa/Main/test.tsv",),
            },
            official_sizes={"train": 4957, "validation": 500, "test": 500},
        ),
        TaskSpec(
            name="sciq",
            description="SciQ: science exam questions with 4 choices and an optional support passage",
            convert=_convert_sciq,
            splits={"validation": ("sciq/validation.jsonl",)},
            official_sizes={"validation": 1000},
        ),
        TaskSpec(
            name="gsm8k",
            description="GSM8K: grade-school math word problems; generate a chain of thought ending '#### <number>' "
                        "(exact match of the final number)",
            convert=_convert_gsm8k,
            splits={"train": ("gsm8k/train.jsonl",), "test": ("gsm8k/test.jsonl",)},
            official_sizes={"train": 7473, "test": 1319},
            # the chain of thought is single-newline separated (6 of the 8,792 reference answers hold a blank
            # line): a blank line or a new question ends the answer
            generation=GenerationSpec(metric="exact_match", max_new_tokens=256, stop=("\n\n", "\nQuestion:")),
        ),
        TaskSpec(
            name="dialogsum",
            description="DialogSum: summarise a two-person dialogue (ROUGE-L). Its train split (12,460) is not in the "
                        "shared data: the federated pool is the dev set (validation), evaluation uses test",
            convert=_convert_dialogsum,
            splits={"validation": ("dialogsum/dialogsum.dev.jsonl",), "test": ("dialogsum/dialogsum.test.jsonl",)},
            official_sizes={"validation": 500, "test": 500},
            # a summary is one paragraph (1 of the 1,000 references breaks a line, none starts a line with a
            # speaker tag): a blank line, a new dialogue or a dialogue turn ends it
            generation=GenerationSpec(metric="rouge_l", max_new_tokens=96, stop=("\n\n", "\nDialogue:", "\n#Person")),
        ),
    )
}

SPLIT_ALIASES = {"val": "validation", "dev": "validation", "valid": "validation"}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def evaluation_config_for_task(name: str) -> dict:
    """The party config's ``evaluation`` section that scores task `name`'s eval set correctly: for a generative
    task its metric, max_new_tokens and stop sequences; for a multiple-choice task ``{"metric": ""}`` (accuracy by
    log-likelihood, inferred from the examples' choices)."""
    gen = get_task(name).generation
    if gen is None:
        return {"metric": ""}
    return {"metric": gen.metric, "max_new_tokens": gen.max_new_tokens, "stop": list(gen.stop)}


def federated_splits(name: str) -> tuple[str, str | None]:
    """(pool split, eval split) of a task: the public set and private shards are cut from the pool, evaluation
    uses the eval split; eval None = the task has one split only (SciQ), so the eval set is cut from the pool too.

    Pool: ``train``, else the first split (DialogSum: ``validation``). Eval: ``validation``, else ``test``, never
    the pool."""
    return pool_and_eval_split(list(get_task(name).splits))


def pool_and_eval_split(splits: Sequence[str]) -> tuple[str, str | None]:
    """:func:`federated_splits` among the given split names (e.g. those whose files are present)."""
    if not splits:
        raise ValueError("no splits to choose from")
    pool = "train" if "train" in splits else splits[0]
    held = next((s for s in ("validation", "test") if s in splits and s != pool), None)
    return pool, held


def datasets_root(data_dir: Path | str | None = None) -> Path:
    """The directory holding the task folders: ``data_dir/datasets`` if present, else ``data_dir``
    (default: the shared data directory, which must exist)."""
    base = Path(data_dir) if data_dir is not None else require_shared_data()
    sub = base / "datasets"
    return sub if sub.is_dir() else base


def _canonical_split(spec: TaskSpec, split: str) -> str:
    split = SPLIT_ALIASES.get(split, split)
    if split in spec.unlabeled:
        raise ValueError(f"task {spec.name!r}: split {split!r} cannot be loaded: {spec.unlabeled[split]}")
    if split not in spec.splits:
        raise ValueError(f"task {spec.name!r} has no split {split!r}; its splits: {', '.join(spec.splits)}")
    return split


def resolve_source(name: str, split: str = "train", *, data_dir: Path | str | None = None) -> Path:
    """The file :func:`load_task` reads for (task, split)."""
    spec = get_task(name)
    split = _canonical_split(spec, split)
    root = datasets_root(data_dir)
    for rel in spec.splits[split]:
        path = root / rel
        if path.is_file():
            return path
    tried = ", ".join(str(root / rel) for rel in spec.splits[split])
    raise FileNotFoundError(f"task {name!r} split {split!r}: no data file found (tried {tried})")


def available_splits(name: str, data_dir: Path | str | None = None) -> list[str]:
    """The splits of a task whose data file is present (empty if no shared data directory is found)."""
    spec = get_task(name)
    if data_dir is None:
        found = shared_data_dir()
        if found is None or not found.is_dir():
            return []
        data_dir = found
    root = datasets_root(data_dir)
    return [s for s, rels in spec.splits.items() if any((root / rel).is_file() for rel in rels)]


# --------------------------------------------------------------------------------------------------
# File readers


def _iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each row of a .jsonl, .json (array) or .tsv (with header) file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise MalformedDataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    elif suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MalformedDataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(data, list):
            raise MalformedDataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
        # Line numbers of the top-level items are not kept by json; report the 1-based item number instead.
        for i, rec in enumerate(data, 1):
            yield -i, rec
    elif suffix == ".tsv":
        with path.open("r", encoding="utf-8", newline="") as f:
            header_line = f.readline()
            header = header_line.rstrip("\r\n").split("\t")
            if len(header) < 2:
                raise MalformedDataError(f"{path}:1: expected a tab-separated header line, got {header_line[:80]!r}")
            for lineno, line in enumerate(f, 2):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) != len(header):
                    raise MalformedDataError(
                        f"{path}:{lineno}: expected {len(header)} tab-separated fields, got {len(fields)}"
                    )
                yield lineno, dict(zip(header, fields))
    else:
        raise MalformedDataError(f"{path}: unsupported file type {suffix!r} (expected .jsonl, .json or .tsv)")


def _where(path: Path, lineno: int) -> str:
    return f"{path}:{lineno}" if lineno > 0 else f"{path}: item {-lineno}"


def _parse_file(spec: TaskSpec, path: Path, limit: int | None) -> list[Example]:
    out: list[Example] = []
    records = _iter_records(path)
    if limit is not None:
        records = islice(records, limit)
    for lineno, rec in records:
        if not isinstance(rec, Mapping):
            raise MalformedDataError(f"{_where(path, lineno)}: expected a JSON object, got {type(rec).__name__}")
        try:
            out.append(spec.convert(rec))
        except (_RowError, KeyError, TypeError, AttributeError, IndexError) as e:
            msg = str(e) if isinstance(e, _RowError) else f"{type(e).__name__}: {e}"
            raise MalformedDataError(f"{_where(path, lineno)}: {spec.name}: {msg}") from None
    return out


_CACHE: "OrderedDict[tuple, tuple[Example, ...]]" = OrderedDict()
_CACHE_MAX = 32
_CACHE_LOCK = threading.Lock()


def _load_file(spec: TaskSpec, path: Path, limit: int | None) -> list[Example]:
    st = path.stat()
    key = (spec.name, str(path.resolve()), st.st_mtime_ns, st.st_size)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
    if hit is None:
        if limit is not None:  # a prefix only: parse just what is asked for, leave the cache alone
            return _parse_file(spec, path, limit)
        hit = tuple(_parse_file(spec, path, None))
        with _CACHE_LOCK:
            _CACHE[key] = hit
            while len(_CACHE) > _CACHE_MAX:
                _CACHE.popitem(last=False)
    return list(hit if limit is None else hit[:limit])


def load_task(
    name: str,
    split: str = "train",
    *,
    data_dir: Path | str | None = None,
    limit: int | None = None,
    source: str | None = None,
) -> list[Example]:
    """Load one split of a task as Examples, in file order.

    data_dir: the shared data directory (or its ``datasets/`` folder); default: found by
              :func:`cotune.data.paths.require_shared_data`.
    limit:    keep only the first ``limit`` rows (only those are parsed).
    source:   read this candidate file (path relative to ``datasets/``, one of ``TASKS[name].splits[split]``)
              instead of the first that exists.
    Raises ValueError for an unknown task/split or a malformed row (:class:`MalformedDataError`, naming
    file and line), FileNotFoundError when the data is missing.
    """
    spec = get_task(name)
    split = _canonical_split(spec, split)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    if source is None:
        path = resolve_source(name, split, data_dir=data_dir)
    else:
        if source not in spec.splits[split]:
            raise ValueError(
                f"task {name!r} split {split!r}: unknown source {source!r}; candidates: {', '.join(spec.splits[split])}"
            )
        path = datasets_root(data_dir) / source
        if not path.is_file():
            raise FileNotFoundError(f"task {name!r} split {split!r}: {path} does not exist")
    return _load_file(spec, path, limit)


# --------------------------------------------------------------------------------------------------
# Project JSONL files and the public set's content id


def _canonical_line(ex: Example) -> bytes:
    if not isinstance(ex, Example):
        raise TypeError(f"expected an Example, got {type(ex).__name__}")
    return json.dumps(ex.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def canonical_jsonl_bytes(examples: Iterable[Example]) -> bytes:
    """One canonical JSON object per example (sorted keys, compact, UTF-8, not ASCII-escaped), each + '\\n'."""
    return b"".join(_canonical_line(ex) for ex in examples)


def dataset_hash(examples: Sequence[Example]) -> str:
    """sha256 hex digest of :func:`canonical_jsonl_bytes`: the content id of a list of examples.

    Depends only on the examples' fields and order, so it is the same in every process and on every machine;
    it equals the sha256 of a file written by :func:`write_jsonl`.
    """
    return hashlib.sha256(canonical_jsonl_bytes(examples)).hexdigest()


def write_jsonl(path: Path | str, examples: Iterable[Example]) -> str:
    """Write examples as canonical JSONL (atomically; parent folders are created). Returns the dataset hash."""
    path = Path(path)
    data = canonical_jsonl_bytes(examples)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return hashlib.sha256(data).hexdigest()


def _parse_example_lines(lines: Iterable[str], where: str) -> list[Example]:
    out: list[Example] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MalformedDataError(f"{where}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise MalformedDataError(f"{where}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        try:
            for key in ("prompt", "response"):
                if not isinstance(obj.get(key), str):
                    raise ValueError(f"field {key!r} must be a string")
            choices = obj.get("choices", [])
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
                raise ValueError("field 'choices' must be a list of strings")
            label = obj.get("label", -1)
            if isinstance(label, bool) or not isinstance(label, int):
                raise ValueError(f"field 'label' must be an integer, got {label!r}")
            if label != -1 and not 0 <= label < len(choices):
                raise ValueError(f"label {label} out of range for {len(choices)} choices")
            out.append(Example.from_json(obj))
        except (ValueError, TypeError, KeyError) as e:
            raise MalformedDataError(f"{where}:{lineno}: {e}") from None
    return out


def read_jsonl(path: Path | str) -> list[Example]:
    """Read a JSONL file of ``Example.to_json`` objects (blank lines are skipped).

    Raises MalformedDataError (a ValueError) naming the file and line for invalid JSON, a missing field or a
    label outside ``choices``.
    """
    path = Path(path)
    with path.open("r", encoding="utf-8") as f:
        return _parse_example_lines(f, str(path))


def read_jsonl_bytes(data: bytes, *, name: str = "<jsonl bytes>") -> list[Example]:
    """Like :func:`read_jsonl` for JSONL held in memory (e.g. a public set received as a blob).

    ``read_jsonl_bytes(canonical_jsonl_bytes(xs)) == xs``. Errors name ``name`` and the line.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedDataError(f"{name}: not UTF-8 at byte {e.start}") from None
    return _parse_example_lines(text.split("\n"), name)
