"""Pooling the panel's ratings into one score per generation, with the self-preference mask (pure; the
`pooled_ratings` asset in assets/pooling.py calls it)."""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

PoolingMethod = Literal["mean", "median", "majority", "weighted"]  # the one list; the panel's `pooling.method` uses it
POOLING_METHODS: tuple[str, ...] = get_args(PoolingMethod)


@dataclass
class PooledRatings:
    avg: list[float | None]  # pooled rating per generation; None when fewer than min_judges rated it
    n_valid: list[int]  # ratings that went into each pooled value
    excluded: int = 0  # ratings that existed but were dropped by the exclude mask
    method: str = "mean"
    min_judges: int = 1
    excluded_per_generation: list[int] = field(default_factory=list)


def _pool(values: list[int], method: str, weights: list[float] | None = None) -> float | None:
    if method == "weighted":  # weights of the judges whose ratings are kept; None when they are all zero
        total = sum(weights or [])
        return None if total <= 0 else sum(w * v for w, v in zip(weights or [], values)) / total
    if method == "mean":
        return float(statistics.fmean(values))
    if method == "median":
        return float(statistics.median(values))
    # majority: the most frequent rating; a tie between several modes falls back to the mean
    modes = statistics.multimode(values)
    return float(modes[0]) if len(modes) == 1 else float(statistics.fmean(values))


def pool_ratings(
    ratings: list[list[int | None]],
    *,
    method: str = "mean",
    min_judges: int = 1,
    exclude: list[list[bool]] | None = None,
    weights: Sequence[float] | None = None,
) -> PooledRatings:
    """ratings[j][g] is judge j's rating of generation g (None: no usable rating).

    exclude[j][g] True drops that rating (e.g. a judge rating its own model family). A generation
    with fewer than `min_judges` remaining ratings gets None. `weights[j]` (method "weighted" only,
    >= 0): the pooled rating is the weighted mean of the kept ratings; None where their weights sum to 0.
    """
    if method not in POOLING_METHODS:
        raise ValueError(f"unknown pooling method {method!r}; use one of {list(POOLING_METHODS)}")
    if (method == "weighted") != (weights is not None):
        raise ValueError("pooling method 'weighted' takes one weight per judge; the other methods take none")
    if weights is not None and (len(weights) != len(ratings) or any(w < 0 for w in weights)):
        raise ValueError(f"weights must be {len(ratings)} non-negative numbers (one per judge), got {list(weights)}")
    if min_judges < 1:
        raise ValueError(f"min_judges must be >= 1, got {min_judges}")
    n_gen = len(ratings[0]) if ratings else 0
    for j, row in enumerate(ratings):
        if len(row) != n_gen:
            raise ValueError(f"ratings[{j}] has {len(row)} entries, expected {n_gen} (one per generation)")
    if exclude is not None:
        if len(exclude) != len(ratings) or any(len(row) != n_gen for row in exclude):
            raise ValueError(
                f"exclude must have the shape of ratings ({len(ratings)} judges x {n_gen} generations)"
            )
    avg: list[float | None] = []
    n_valid: list[int] = []
    dropped: list[int] = []
    for g in range(n_gen):
        kept: list[int] = []
        kept_weights: list[float] = []
        dropped_g = 0
        for j, row in enumerate(ratings):
            value = row[g]
            if value is None:
                continue
            if exclude is not None and exclude[j][g]:
                dropped_g += 1
                continue
            kept.append(value)
            kept_weights.append(weights[j] if weights is not None else 1.0)
        n_valid.append(len(kept))
        dropped.append(dropped_g)
        avg.append(_pool(kept, method, kept_weights) if len(kept) >= min_judges else None)
    return PooledRatings(avg, n_valid, sum(dropped), method, min_judges, dropped)


def _norm_family(family: str) -> str:
    return family.strip().lower()


def self_family_mask(judge_families: list[str], generation_families: list[str]) -> list[list[bool]]:
    """mask[j][g] is True when judge j and the model behind generation g share a family."""
    return [
        [_norm_family(jf) == _norm_family(gf) for gf in generation_families]
        for jf in judge_families
    ]


def prompt_fold(prompt_id: str, folds: int, seed: int = 0) -> int:
    """The cross-fitting fold of a prompt (0 .. folds-1), from its id alone: the same prompt falls in
    the same fold in every shard and in the whole-dataset view."""
    return int(hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()[:8], 16) % folds
