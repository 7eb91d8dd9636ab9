"""RECOMP selection rules as pure functions: extractive positives/negatives with epsilon, the in-batch contrastive
loss, and the abstractive target with selective augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from trainer_worker.compressor_data import ContrastiveExample, choose_summary, select_pairs
from trainer_worker.context import PermanentJobError
from trainer_worker.train_compressor import CompressorConfig, contrastive_loss, in_batch_layout


def test_the_positive_is_the_best_score_and_a_gap_of_exactly_epsilon_is_no_negative() -> None:
    scores = [-2.0, -1.0, -1.5, -2.5]  # exact binary fractions: best - score is exact
    similarities = [0.1, 0.9, 0.2, 0.3]
    assert select_pairs(scores, similarities, epsilon=1.0) == (1, [3])  # -2.0 sits exactly at best - epsilon
    assert select_pairs(scores, similarities, epsilon=0.5) == (1, [3, 0])  # -1.5: gap 0.5, not more than 0.5
    assert select_pairs(scores, similarities, epsilon=0.25) == (1, [3, 2, 0])


def test_negatives_are_taken_most_similar_first_and_capped_at_five() -> None:
    scores = [0.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0]
    similarities = [0.0, 0.1, 0.7, 0.3, 0.9, 0.5, 0.2, 0.8]
    best, negatives = select_pairs(scores, similarities, epsilon=1.0)
    assert (best, negatives) == (0, [4, 7, 2, 5, 3])
    assert select_pairs(scores, similarities, epsilon=1.0, max_negatives=2)[1] == [4, 7]


def test_an_item_without_a_valid_negative_gets_none() -> None:
    assert select_pairs([-1.0, -1.05, -1.1], [0.5, 0.4, 0.3], epsilon=0.2) == (0, [])
    assert select_pairs([-1.0], [0.5], epsilon=0.0) == (0, [])
    with pytest.raises(ValueError):
        select_pairs([-1.0, -2.0], [0.5], epsilon=0.0)


def test_in_batch_layout_puts_every_item_sentences_against_every_question() -> None:
    batch = [ContrastiveExample("q0", "p0", ("n0", "shared")), ContrastiveExample("q1", "shared", ("n1",))]
    texts, targets, masked = in_batch_layout(batch)
    assert texts == ["p0", "n0", "shared", "shared", "n1"] and targets == [0, 3]
    assert masked == [(1, 2)]  # q1's positive, met again as q0's negative, is no negative of q1


def test_contrastive_loss_matches_a_hand_computation() -> None:
    questions = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sentences = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    loss = contrastive_loss(questions, sentences, [0, 2], [(1, 1)], temperature=0.5)
    first = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.2) + math.exp(0.0)))
    second = -math.log(math.exp(2.0) / (math.exp(0.0) + math.exp(2.0)))  # sentence 1 masked for question 1
    assert float(loss) == pytest.approx((first + second) / 2, rel=1e-6)


def test_the_best_summary_is_the_target_when_it_beats_closed_book() -> None:
    candidates = [("Lanmark is on the Varo.", -1.2), ("The Varo flows north.", -0.4), ("", 5.0)]
    assert choose_summary(candidates, closed_book=-2.0) == "The Varo flows north."


def test_the_target_is_empty_when_no_summary_beats_answering_without_retrieval() -> None:
    assert choose_summary([("Bread is baked.", -3.0), ("Comets.", -2.5)], closed_book=-2.5) == ""
    assert choose_summary([("", 0.0)], closed_book=-9.0) == ""
    assert choose_summary([], closed_book=-9.0) == ""


def test_config_takes_the_method_of_the_job_kind_and_candidates_by_profile() -> None:
    config = CompressorConfig.of({"method": "abstractive", "epsilon": 0}, "extractive")
    assert (config.method, config.epsilon) == ("extractive", 0.0)
    assert (config.candidates("paper"), config.candidates("fast")) == (4, 2)
    assert CompressorConfig.of({"n_candidates": 3}, "abstractive").candidates("paper") == 3
    with pytest.raises(PermanentJobError, match="epsilon"):
        CompressorConfig.of({"epsilon": -0.1}, "extractive")
