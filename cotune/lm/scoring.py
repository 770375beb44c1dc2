"""Scores of generated text: GSM8K exact match of the final number, and ROUGE-L F-measure (DialogSum).

Pure text functions (no torch); :func:`score_generations` applies a metric named by
:class:`cotune.data.tasks.GenerationSpec` / ``evaluation.metric``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

__all__ = ["METRICS", "gsm8k_answer", "normalize_number", "gsm8k_exact_match", "rouge_l", "score_generations"]

METRICS = ("exact_match", "rouge_l")

# a number as GSM8K writes it: an optional sign or dollar sign, digits with thousands commas, an optional fraction
_NUMBER = re.compile(r"(-?)\$?(-?)(\d[\d,]*(?:\.\d+)?|\.\d+)")


def normalize_number(text: str) -> str | None:
    """A number's canonical decimal string: '$1,080.00' -> '1080', '-3.50' -> '-3.5', '.5' -> '0.5', '18.' -> '18'
    (commas, a dollar sign and trailing zeros of the fraction do not matter); None when `text` is no number."""
    text = text.strip().rstrip(".")
    m = _NUMBER.fullmatch(text)
    if m is None:
        return None
    sign = "-" if (m.group(1) or m.group(2)) else ""
    try:
        value = Decimal(sign + m.group(3).replace(",", ""))
    except InvalidOperation:
        return None
    if value == 0:
        return "0"
    out = format(value.normalize(), "f")
    return out


def gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K solution, normalised (:func:`normalize_number`): the first number after the
    first '####' if the text has one (the reference format; what a model writes after that number does not count),
    else the last number in the text; None when there is none."""
    head, sep, tail = text.partition("####")
    if sep:
        m = _NUMBER.search(tail)
        return normalize_number(m.group(0)) if m else None
    found = list(_NUMBER.finditer(head))
    return normalize_number(found[-1].group(0)) if found else None


def gsm8k_exact_match(prediction: str, reference: str) -> float:
    """1.0 when the prediction's final number equals the reference's (the number after its '####'), compared as
    normalised decimals ('18.0' matches '18', '1,080' matches '1080'); else 0.0."""
    gold = gsm8k_answer(reference)
    if gold is None:
        raise ValueError(f"the reference has no final number: {reference[-80:]!r}")
    return 1.0 if gsm8k_answer(prediction) == gold else 0.0


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    # stemming as ROUGE-1.5.5 -m (the DialogSum paper's files2rouge) and Hugging Face's summarization examples
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (sentence-level longest common subsequence) of a prediction against one reference, by
    Google's reference implementation (the `rouge-score` package: lower-cased alphanumeric tokens, Porter
    stemming). 0.0 when either side has no token."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def score_generations(metric: str, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per item score in [0, 1] of `metric` ("exact_match" | "rouge_l")."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if metric == "exact_match":
        fn = gsm8k_exact_match
    elif metric == "rouge_l":
        fn = rouge_l
    else:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return [fn(p, r) for p, r in zip(predictions, references)]
