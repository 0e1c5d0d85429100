"""Binarization: strategies, ties, margins, seeds, self-pairs and failed generations."""

from __future__ import annotations

import pytest

from poll_assets.binarize import FEWER_THAN_TWO, TIE, BELOW_MARGIN, PreferencePair, binarize


def test_best_vs_worst():
    r = binarize([3.0, 4.5, None, 1.5])
    assert r.pairs == [PreferencePair(1, 3, 3.0)]
    chosen, rejected, margin = r.pairs[0]  # unpacks as a tuple
    assert (chosen, rejected, margin) == (1, 3, 3.0)
    assert r.reason is None and r.ties_dropped == 0 and r.n_rated == 3


def test_too_few_and_all_tied():
    assert binarize([4.0, None]).reason == FEWER_THAN_TWO
    assert binarize([]).reason == FEWER_THAN_TWO
    for strategy in ("best_vs_worst", "best_vs_random", "all_pairs"):
        r = binarize([3.0, 3.0, 3.0], strategy=strategy)
        assert r.pairs == [] and r.reason == TIE and r.ties_dropped >= 1
    assert binarize([3.0, 3.0, 3.0], strategy="all_pairs").ties_dropped == 3


def test_invalid_generations_are_skipped():
    r = binarize([5.0, 4.0, 1.0], valid=[False, True, True])
    assert r.pairs == [PreferencePair(1, 2, 3.0)]
    assert binarize([5.0, 1.0], valid=[True, False]).reason == FEWER_THAN_TWO
    with pytest.raises(ValueError, match="valid has 1 entries for 2 generations"):
        binarize([5.0, 1.0], valid=[True])


def test_all_pairs_with_margin():
    avg = [4.0, 2.0, 4.0, 3.5]
    r = binarize(avg, strategy="all_pairs")
    assert sorted(r.pairs) == sorted([
        PreferencePair(0, 1, 2.0), PreferencePair(0, 3, 0.5), PreferencePair(2, 1, 2.0),
        PreferencePair(3, 1, 1.5), PreferencePair(2, 3, 0.5),
    ])
    assert r.ties_dropped == 1  # 0 vs 2
    r = binarize(avg, strategy="all_pairs", min_margin=1.5)
    assert sorted(r.pairs) == [PreferencePair(0, 1, 2.0), PreferencePair(2, 1, 2.0), PreferencePair(3, 1, 1.5)]
    assert r.below_margin == 2 and r.ties_dropped == 1
    r = binarize([3.0, 2.5], min_margin=1.0)
    assert r.pairs == [] and r.reason == BELOW_MARGIN


@pytest.mark.parametrize("strategy", ["best_vs_worst", "best_vs_random", "all_pairs"])
def test_never_a_self_pair_and_chosen_always_better(strategy):
    for seed in range(30):
        avg = [float((seed * 7 + g * 3) % 5) for g in range(5)]
        for p in binarize(avg, strategy=strategy, seed=seed, key=f"k{seed}").pairs:
            assert p.chosen != p.rejected
            assert avg[p.chosen] - avg[p.rejected] == p.margin > 0


def test_best_vs_random_is_seeded_and_picks_only_lower_ones():
    avg = [5.0, 1.0, 2.0, 3.0, 5.0]
    seen = set()
    for key in (f"prompt-{i}" for i in range(50)):
        a = binarize(avg, strategy="best_vs_random", seed=1, key=key)
        assert a == binarize(avg, strategy="best_vs_random", seed=1, key=key)
        (p,) = a.pairs
        assert p.chosen in (0, 4) and p.rejected in (1, 2, 3)
        seen.add((p.chosen, p.rejected))
    # Both tied bests and every lower generation get used across prompts.
    assert {c for c, _ in seen} == {0, 4} and {r for _, r in seen} == {1, 2, 3}
    # The seed matters.
    picks = lambda s: [binarize(avg, strategy="best_vs_random", seed=s, key=f"p{i}").pairs[0] for i in range(20)]
    assert picks(1) != picks(2)


def test_tie_for_best_is_broken_by_seed():
    avg = [4.0, 4.0, 1.0]
    chosen = {binarize(avg, key=f"p{i}").pairs[0].chosen for i in range(40)}
    assert chosen == {0, 1}  # no position is always favoured


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown binarization strategy 'best'"):
        binarize([1.0, 2.0], strategy="best")
    with pytest.raises(ValueError, match="min_margin"):
        binarize([1.0, 2.0], min_margin=-1)
