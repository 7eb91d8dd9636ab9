"""Answer metrics of the evaluations: SQuAD-style exact match, contains, Rouge-L, and multiple-choice accuracy.

Every free-text metric takes one prediction and the list of gold answers, and scores against the best-matching
answer (NarrativeQA gives two answers per question). Multiple choice is scored the way the harnesses do it for
QuALITY: each option's log-likelihood as a continuation of the question, divided by its number of tokens so long
options are not penalised for their length, and the argmax is the model's choice.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MSG_NO_ANSWERS = "a question needs at least one gold answer to be scored"
MSG_NO_OPTIONS = "multiple choice needs at least one option"
MSG_EMPTY_OPTION = "option {index} has no scored tokens; every option must contain at least one token"
MSG_LENGTHS = "predictions ({predictions}) and gold labels ({golds}) differ in number"

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _best(prediction: str, answers: Sequence[str], score: Callable[[str, str], float]) -> float:
    if not answers:
        raise ValueError(MSG_NO_ANSWERS)
    return max(score(prediction, answer) for answer in answers)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals some normalised answer, else 0.0."""
    return _best(prediction, answers, lambda p, a: float(normalize_answer(p) == normalize_answer(a)))


def contains_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when some normalised answer occurs in the normalised prediction (whole words), else 0.0."""

    def contains(p: str, a: str) -> float:
        answer = normalize_answer(a)
        # Padding with spaces matches whole words only: "1902" is not found in "19021".
        return float(bool(answer) and f" {answer} " in f" {normalize_answer(p)} ")

    return _best(prediction, answers, contains)


@functools.lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(prediction: str, answers: Sequence[str], *, use_stemmer: bool = True) -> float:
    """The best Rouge-L F-measure of the prediction against the answers (the `rouge-score` package)."""
    scorer = _rouge_scorer(use_stemmer)
    return _best(prediction, answers, lambda p, a: float(scorer.score(a, p)["rougeL"].fmeasure))


def length_normalized_scores(option_logprobs: Sequence[Sequence[float]]) -> list[float]:
    """Each option's mean token log-probability (sum over its tokens / number of its tokens)."""
    if not option_logprobs:
        raise ValueError(MSG_NO_OPTIONS)
    scores = []
    for index, logprobs in enumerate(option_logprobs):
        if not logprobs:
            raise ValueError(MSG_EMPTY_OPTION.format(index=index))
        scores.append(math.fsum(logprobs) / len(logprobs))
    return scores


def choose_option(option_logprobs: Sequence[Sequence[float]]) -> int:
    """The index of the option with the highest length-normalised log-likelihood (the first one on ties)."""
    scores = length_normalized_scores(option_logprobs)
    return max(range(len(scores)), key=scores.__getitem__)


def multiple_choice_accuracy(predictions: Sequence[int], golds: Sequence[int]) -> float:
    """Fraction of questions whose chosen option index is the gold one."""
    if len(predictions) != len(golds):
        raise ValueError(MSG_LENGTHS.format(predictions=len(predictions), golds=len(golds)))
    return mean(float(p == g) for p, g in zip(predictions, golds, strict=True))


@dataclass(frozen=True, slots=True)
class MetricSummary:
    """The mean of a metric over `count` scored items (mean is NaN when nothing was scored)."""

    mean: float
    count: int


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; NaN for no values (an empty evaluation has no score, not a score of 0)."""
    items = list(values)
    return math.fsum(items) / len(items) if items else math.nan


def summarize(values: Iterable[float]) -> MetricSummary:
    """Mean and count of one metric's per-item scores."""
    items = list(values)
    return MetricSummary(mean=mean(items), count=len(items))


def aggregate(scores: Mapping[str, Iterable[float]]) -> dict[str, MetricSummary]:
    """Mean and count of every metric, by metric name."""
    return {name: summarize(values) for name, values in scores.items()}
