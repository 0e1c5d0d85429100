"""Turning pooled ratings into chosen/rejected pairs.

Strategies
- best_vs_worst: the highest-rated generation against the lowest-rated one (distilabel's
  FormatTextGenerationDPO).
- best_vs_random: the highest-rated against one picked at random among those rated strictly lower
  (as in UltraFeedback-binarized, without its tie problem).
- all_pairs: every pair of generations whose ratings differ.

Rules common to all: generations without a pooled rating, or marked invalid (a failed generation),
are skipped; a generation is never paired with itself; pairs whose margin is 0 are ties and are
dropped and counted; pairs whose margin is below `min_margin` are dropped and counted. When several
generations tie for best (or worst), one of them is picked with a generator seeded by (seed, key) -
so the result is deterministic, but no generator position is systematically favoured as it would
be by "lowest index wins".
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

Strategy = Literal["best_vs_worst", "best_vs_random", "all_pairs"]  # the one list; the panel's `binarization.strategy` uses it
STRATEGIES: tuple[str, ...] = get_args(Strategy)

FEWER_THAN_TWO = "fewer than two rated generations"
TIE = "tie"
BELOW_MARGIN = "margin below min_margin"


class PreferencePair(NamedTuple):
    chosen: int  # index of the preferred generation
    rejected: int
    margin: float  # pooled rating of chosen minus that of rejected, > 0


@dataclass
class BinarizeResult:
    pairs: list[PreferencePair] = field(default_factory=list)
    reason: str | None = None  # why there is no pair, when there is none
    ties_dropped: int = 0
    below_margin: int = 0
    n_rated: int = 0  # generations that took part


def _rng(seed: int, key: str) -> random.Random:
    digest = hashlib.sha256(json.dumps([seed, key]).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _pick(candidates: list[int], rng: random.Random) -> int:
    return candidates[0] if len(candidates) == 1 else rng.choice(candidates)


def _proposed(strategy: str, rated: list[int], score: dict[int, float], rng: random.Random) -> list[tuple[int, int]]:
    """The (chosen, rejected) pairs the strategy proposes, before margins are checked. When every
    rating is equal it proposes the best against itself, which the caller counts as a tie."""
    top = max(score.values())
    best = _pick([g for g in rated if score[g] == top], rng)
    if strategy == "best_vs_worst":
        bottom = min(score.values())
        return [(best, best)] if bottom == top else [(best, _pick([g for g in rated if score[g] == bottom], rng))]
    if strategy == "best_vs_random":
        lower = [g for g in rated if score[g] < top]
        return [(best, rng.choice(lower))] if lower else [(best, best)]
    return [(a, b) if score[a] >= score[b] else (b, a) for i, a in enumerate(rated) for b in rated[i + 1:]]


def binarize(
    avg_ratings: list[float | None],
    *,
    strategy: str = "best_vs_worst",
    min_margin: float = 0.0,
    seed: int = 0,
    key: str = "",
    valid: list[bool] | None = None,
) -> BinarizeResult:
    """Pairs for one prompt from its generations' pooled ratings. `key` (e.g. the prompt id) varies
    the random choices between prompts while keeping each one reproducible."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown binarization strategy {strategy!r}; use one of {list(STRATEGIES)}")
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    if valid is not None and len(valid) != len(avg_ratings):
        raise ValueError(f"valid has {len(valid)} entries for {len(avg_ratings)} generations")
    rated = [g for g, r in enumerate(avg_ratings) if r is not None and (valid is None or valid[g])]
    result = BinarizeResult(n_rated=len(rated))
    if len(rated) < 2:
        result.reason = FEWER_THAN_TWO
        return result
    score = {g: float(avg_ratings[g]) for g in rated}  # type: ignore[arg-type]
    for chosen, rejected in _proposed(strategy, rated, score, _rng(seed, key)):
        margin = score[chosen] - score[rejected]
        if margin <= 0:
            result.ties_dropped += 1
        elif margin < min_margin:
            result.below_margin += 1
        else:
            result.pairs.append(PreferencePair(chosen, rejected, margin))
    if not result.pairs:
        result.reason = BELOW_MARGIN if result.below_margin else TIE
    return result
