"""Pooling ratings across judges, with None, min_judges, methods and the self-family mask."""

from __future__ import annotations

import pytest

from poll_assets.scoring.pooled_ratings import pool_ratings, self_family_mask


def test_mean_ignores_none():
    pooled = pool_ratings([[4, None, 2], [5, None, None], [3, 1, None]])
    assert pooled.avg == [4.0, 1.0, 2.0]
    assert pooled.n_valid == [3, 1, 1]
    assert pooled.excluded == 0


def test_min_judges():
    ratings = [[4, None, 2], [5, None, None], [3, 1, None]]
    pooled = pool_ratings(ratings, min_judges=2)
    assert pooled.avg == [4.0, None, None]
    assert pooled.n_valid == [3, 1, 1]
    assert pool_ratings(ratings, min_judges=4).avg == [None, None, None]
    with pytest.raises(ValueError, match="min_judges"):
        pool_ratings(ratings, min_judges=0)


def test_median_and_majority():
    ratings = [[1, 2, 5, 4], [2, 2, 5, 4], [5, 3, 1, 5], [5, 3, 1, 5]]
    assert pool_ratings(ratings, method="median").avg == [3.5, 2.5, 3.0, 4.5]
    # majority: column 0 ties between 5 (x2) and... 1,2 once each -> 5; column 1: 2 and 3 tie -> mean 2.5
    assert pool_ratings(ratings, method="majority").avg == [5.0, 2.5, 3.0, 4.5]
    assert pool_ratings([[4], [4], [1]], method="majority").avg == [4.0]
    with pytest.raises(ValueError, match="unknown pooling method 'max'"):
        pool_ratings(ratings, method="max")


def test_exclude_mask_drops_ratings_and_counts_only_real_ones():
    ratings = [[5, 1, None], [2, 2, 2]]
    exclude = [[True, False, True], [False, False, False]]
    pooled = pool_ratings(ratings, exclude=exclude)
    assert pooled.avg == [2.0, 1.5, 2.0]
    assert pooled.n_valid == [1, 2, 1]
    assert pooled.excluded == 1  # the excluded None was no rating to begin with
    assert pooled.excluded_per_generation == [1, 0, 0]
    # Excluding the only judge of a generation leaves it unrated.
    assert pool_ratings([[5, 3]], exclude=[[True, False]]).avg == [None, 3.0]


def test_shape_errors_name_the_row():
    with pytest.raises(ValueError, match=r"ratings\[1\] has 2 entries, expected 3"):
        pool_ratings([[1, 2, 3], [1, 2]])
    with pytest.raises(ValueError, match="exclude must have the shape"):
        pool_ratings([[1, 2]], exclude=[[True]])
    assert pool_ratings([]).avg == []


def test_self_family_mask():
    mask = self_family_mask(["Llama", "qwen", "gemma"], ["llama ", "Qwen", "mistral", "llama"])
    assert mask == [
        [True, False, False, True],
        [False, True, False, False],
        [False, False, False, False],
    ]
