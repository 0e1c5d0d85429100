"""Confidence per pair: the judges' votes, the self-family mask, the bootstrap interval, the cuts."""

from __future__ import annotations

import pytest

from poll_assets.scoring.confidence import (
    comparison_confidence,
    LOW_AGREEMENT, LOW_MARGIN, NO_AGREEMENT, NO_INTERVAL, PairConfidence, confidence_cut, margin_interval,
    pair_confidence, paired_votes,
)


def test_votes_count_only_judges_with_both_ratings_after_the_mask():
    ratings = [[5, 2], [4, None], [3, 3], [1, 4], [5, 1]]
    # judge 4 shares the family of generation 0: its vote is masked out
    exclude = [[False, False]] * 4 + [[True, False]]
    assert paired_votes(ratings, 0, 1, exclude) == [(5, 2), (3, 3), (1, 4)]
    conf = pair_confidence(ratings, 0, 1, exclude=exclude, key="p")
    assert (conf.judges_for, conf.judges_against, conf.judges_tied) == (1, 1, 1)
    assert conf.judge_agreement == pytest.approx(1 / 3)
    unmasked = pair_confidence(ratings, 0, 1, key="p")
    assert (unmasked.judges_for, unmasked.judges) == (2, 4)


def test_fewer_than_two_judges_give_no_interval_and_none_give_no_share():
    one = pair_confidence([[5, 1], [None, 2]], 0, 1, key="p")
    assert one.judges == 1 and one.judge_agreement == 1.0
    assert one.margin_low is None and one.margin_high is None
    none = pair_confidence([[None, 1], [4, None]], 0, 1, key="p")
    assert none.judges == 0 and none.judge_agreement is None and none.margin_low is None


def test_unanimous_judges_give_a_point_interval_and_split_judges_one_that_spans_zero():
    same = pair_confidence([[5, 2], [5, 2], [5, 2]], 0, 1, key="p")
    assert (same.margin_low, same.margin_high) == (3.0, 3.0)
    split = pair_confidence([[5, 1], [1, 5], [4, 2], [2, 4]], 0, 1, key="p")
    assert split.margin_low < 0 < split.margin_high
    # the interval holds every bootstrap margin between the extremes a draw can reach
    assert -4 <= split.margin_low and split.margin_high <= 4


def test_the_interval_is_seeded_by_the_key():
    votes = [(5, 1), (3, 2), (2, 4), (4, 4), (5, 3)]
    first = margin_interval(votes, key="prompt-a|g0|g1")
    assert margin_interval(votes, key="prompt-a|g0|g1") == first
    others = {margin_interval(votes, key=f"prompt-{i}", resamples=200) for i in range(20)}
    assert len(others) > 1  # a different key draws other resamples


def test_the_interval_pools_with_the_panels_method():
    votes = [(5, 1), (4, 3), (2, 3), (5, 2), (3, 3)]
    mean = margin_interval(votes, method="mean", key="k")
    median = margin_interval(votes, method="median", key="k")
    # with an odd number of judges a draw's median is one of their ratings: whole-number margins
    assert all(float(b).is_integer() for b in median)
    assert mean != median
    # a mean over 5 draws moves in steps of 1/5
    assert all(abs(b * 5 - round(b * 5)) < 1e-9 for b in mean)
    with pytest.raises(ValueError, match="unknown pooling method 'mode'"):
        margin_interval(votes, method="mode", key="k")


def test_cuts_name_why_and_a_set_minimum_needs_its_figure():
    contested = PairConfidence(judges_for=1, judges_against=1, judges_tied=1, margin_low=-1.0, margin_high=2.0)
    assert confidence_cut(contested) is None
    assert confidence_cut(contested, min_judge_agreement=0.5) == LOW_AGREEMENT
    assert confidence_cut(contested, min_judge_agreement=0.3) is None
    assert confidence_cut(contested, min_margin_low=0.0) == LOW_MARGIN
    assert confidence_cut(contested, min_margin_low=-1.0) is None
    lone = PairConfidence(judges_for=1, judges_against=0, judges_tied=0, margin_low=None, margin_high=None)
    assert confidence_cut(lone, min_judge_agreement=1.0) is None
    assert confidence_cut(lone, min_margin_low=0.5) == NO_INTERVAL
    nobody = PairConfidence(0, 0, 0, None, None)
    assert confidence_cut(nobody, min_judge_agreement=0.0) == NO_AGREEMENT


def test_weighted_pooling_bootstraps_the_weighted_margin():
    """Under weighted pooling each draw pools with the drawn judges' weights: a judge of weight 0
    cannot move the interval, and with every weight 0 there is no interval at all."""
    ratings = [[5, 1], [4, 2], [1, 5]]  # the third judge dissents
    with_dissent = pair_confidence(ratings, 0, 1, method="weighted", key="k", weights=[1.0, 1.0, 1.0])
    silenced = pair_confidence(ratings, 0, 1, method="weighted", key="k", weights=[1.0, 1.0, 0.0])
    assert with_dissent.margin_low < 0 < silenced.margin_low  # the dissent only counts while weighted
    assert (silenced.margin_low, silenced.margin_high) == (2.0, 4.0)  # the draws of the two others: 4, 3 or 2
    assert silenced.judges_against == 1  # the votes stay a plain count of judges
    assert pair_confidence(ratings, 0, 1, method="weighted", key="k", weights=[0.0, 0.0, 0.0]).margin_low is None
    with pytest.raises(ValueError, match="one weight per vote"):
        margin_interval([(5, 1), (4, 2)], method="weighted", key="k")


def test_in_pairwise_mode_a_judge_votes_through_its_comparisons_of_the_two_answers():
    comparisons = [
        [[0, 1, 0, 0], [1, 0, 1, 0]],  # prefers 0 in both orders: for
        [[0, 1, 0, 0], [1, 0, 1, 1]],  # one each way: tied
        [[0, 1, 0, 1], [1, 0, 1, None], [0, 2, 0, 0]],  # 1 once, one unread; its 0-vs-2 comparison is another pair
        [[0, 2, 0, 0]],  # never compared 0 with 1: no vote
    ]
    conf = comparison_confidence(comparisons, 0, 1)
    assert (conf.judges_for, conf.judges_tied, conf.judges_against) == (1, 1, 1)
    assert conf.judge_agreement == 1 / 3 and conf.margin_low is None  # no interval on a strength difference
    masked = comparison_confidence(comparisons, 0, 1, exclude=[[True, False, False]] + [[False] * 3] * 3)
    assert masked.judges == 2  # the first judge is masked out for answer 0
