"""Evaluation metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from evals.metrics import (
    MSG_EMPTY_OPTION,
    MSG_NO_ANSWERS,
    MetricSummary,
    aggregate,
    choose_option,
    contains_match,
    exact_match,
    length_normalized_scores,
    mean,
    multiple_choice_accuracy,
    normalize_answer,
    rouge_l,
    summarize,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("The  Cat, sat!", "cat sat"),
    ("An apple a day", "apple day"),
    ("  Harbor-Point\t(1847) ", "harborpoint 1847"),
    ("theory", "theory"),  # articles are removed as whole words only
    ("", ""),
])
def test_normalize_answer_is_squad_normalisation(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match_takes_the_best_answer_after_normalising() -> None:
    assert exact_match("The Cat.", ["dog", "cat"]) == 1.0
    assert exact_match("cats", ["cat"]) == 0.0
    assert exact_match("a cat", ["the  CAT"]) == 1.0
    with pytest.raises(ValueError, match=MSG_NO_ANSWERS):
        exact_match("cat", [])


def test_contains_matches_whole_normalised_words() -> None:
    assert contains_match("It opened in 1902, after four years.", ["1902"]) == 1.0
    assert contains_match("It opened in 19021.", ["1902"]) == 0.0
    assert contains_match("They crossed the old bridge", ["Old Bridge!", "ferry"]) == 1.0
    assert contains_match("anything", ["the"]) == 0.0  # an answer that normalises to nothing never matches


def test_rouge_l_is_the_lcs_f_measure() -> None:
    # LCS of "the cat sat on the mat" / "the cat lay on the mat" is 5 of 6 tokens each way: P = R = F = 5/6.
    assert rouge_l("the cat sat on the mat", ["the cat lay on the mat"]) == pytest.approx(5 / 6)
    # "a b c d" vs "a c e": LCS "a c" -> P = 2/4, R = 2/3, F = 2PR / (P + R) = 4/7.
    assert rouge_l("a b c d", ["a c e"], use_stemmer=False) == pytest.approx(4 / 7)
    assert rouge_l("a b c d", ["x y", "a c e"]) == pytest.approx(4 / 7)  # the best answer counts
    assert rouge_l("nothing shared", ["x y"]) == 0.0


def test_rouge_l_stemming_is_configurable() -> None:
    assert rouge_l("running dogs", ["run dog"]) == pytest.approx(1.0)
    assert rouge_l("running dogs", ["run dog"], use_stemmer=False) == 0.0


def test_length_normalisation_changes_the_choice() -> None:
    # By sum option 1 would win (-2.5 > -4); per token option 0 does (-1 > -2.5).
    options = [[-1.0, -1.0, -1.0, -1.0], [-2.5]]
    assert length_normalized_scores(options) == [-1.0, -2.5]
    assert choose_option(options) == 0
    assert choose_option([[-1.0, -3.0], [-1.5]]) == 1  # means -2.0 and -1.5
    assert choose_option([[-2.0], [-1.0, -3.0]]) == 0  # a tie goes to the first option
    with pytest.raises(ValueError, match=MSG_EMPTY_OPTION.format(index=1)):
        choose_option([[-1.0], []])


def test_multiple_choice_accuracy() -> None:
    assert multiple_choice_accuracy([0, 1, 2, 3], [0, 1, 0, 0]) == 0.5
    assert multiple_choice_accuracy([2], [2]) == 1.0
    with pytest.raises(ValueError, match="differ in number"):
        multiple_choice_accuracy([0, 1], [0])


def test_aggregates() -> None:
    assert mean([1.0, 0.0, 0.5]) == 0.5
    assert math.isnan(mean([]))
    summary = summarize(x for x in [1.0, 0.0, 1.0])
    assert summary.count == 3 and summary.mean == pytest.approx(2 / 3)
    result = aggregate({"em": [1.0, 0.0], "rouge_l": [0.25]})
    assert result == {"em": MetricSummary(0.5, 2), "rouge_l": MetricSummary(0.25, 1)}
    assert summarize([]).count == 0
