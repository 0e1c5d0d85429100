"""How much the panel agrees on one preference pair, without gold labels (pure functions).

For a pair (chosen, rejected) of one prompt, the judges that count are those with a rating of both
answers once the self-preference mask has removed the ratings it excludes. Each of them votes:
for (rates chosen strictly above rejected), against (strictly below) or tied. `judge_agreement` is
the share of votes for.

The interval is a percentile bootstrap over those judges: draw as many judges as there are, with
replacement, pool each answer's ratings over the draw with the panel's pooling method, and take
chosen minus rejected; the 2.5th and 97.5th percentiles of those margins bound the 95 % interval.
The draws are seeded by the pair's key, so a re-run gives the same interval. With fewer than two
judges there is nothing to resample: the interval is absent (None), never a guess. Under weighted
pooling each draw pools with the drawn judges' weights; a draw whose weights sum to 0 has no pooled
margin (as `pool_ratings` gives none) and is left out, and with no draw left there is no interval.
`judge_agreement` stays a plain share of judges under every method.

In pairwise mode (`comparison_confidence`) a judge votes through its comparisons of the two answers
(both orders): for when it preferred chosen more often than rejected, against when less, tied when
as often. The margin there is a difference of Bradley-Terry strengths, which this module does not
resample: its interval is absent.

`confidence_cut` applies the panel's `min_judge_agreement` and `min_margin_low` to one pair and says
why it is left out, if it is.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95

# Why a pair is left out by the confidence settings (the keys of the counts in metadata and the card).
LOW_AGREEMENT = "judge agreement below min_judge_agreement"
NO_AGREEMENT = "no judge rated both answers (min_judge_agreement set)"
LOW_MARGIN = "margin lower bound below min_margin_low"
NO_INTERVAL = "fewer than 2 judges rated both answers (min_margin_low set)"
CONFIDENCE_REASONS = (LOW_AGREEMENT, NO_AGREEMENT, LOW_MARGIN, NO_INTERVAL)


@dataclass(frozen=True)
class PairConfidence:
    judges_for: int  # judges rating chosen strictly above rejected
    judges_against: int  # strictly below
    judges_tied: int
    margin_low: float | None  # the 95 % bootstrap interval on the pooled margin; None below 2 judges
    margin_high: float | None

    @property
    def judges(self) -> int:
        return self.judges_for + self.judges_against + self.judges_tied

    @property
    def judge_agreement(self) -> float | None:
        """The share of judges that prefer chosen; None when no judge rated both answers."""
        return self.judges_for / self.judges if self.judges else None


def voting_judges(
    ratings: Sequence[Sequence[int | None]],
    chosen: int,
    rejected: int,
    exclude: Sequence[Sequence[bool]] | None = None,
) -> list[int]:
    """The judges (indices) that rated both answers, the masked ratings (`exclude[j][g]`, e.g. a judge
    of the generator's own family) removed first."""
    voters = []
    for j, row in enumerate(ratings):
        if row[chosen] is None or row[rejected] is None:
            continue
        if exclude is not None and (exclude[j][chosen] or exclude[j][rejected]):
            continue
        voters.append(j)
    return voters


def paired_votes(
    ratings: Sequence[Sequence[int | None]],
    chosen: int,
    rejected: int,
    exclude: Sequence[Sequence[bool]] | None = None,
) -> list[tuple[int, int]]:
    """(rating of chosen, rating of rejected) of every judge that rated both (`voting_judges`)."""
    return [(int(ratings[j][chosen]), int(ratings[j][rejected])) for j in voting_judges(ratings, chosen, rejected, exclude)]


def _seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def _pool_rows(values: np.ndarray, method: str) -> np.ndarray:
    """The pooled value of each row of `values` (resamples x judges), as `pool_ratings` pools."""
    if method == "mean":
        return values.mean(axis=1)
    if method == "median":
        return np.median(values, axis=1)
    if method == "majority":  # the single most frequent rating; several modes fall back to the mean
        out = []
        for row in values.tolist():
            modes = statistics.multimode(row)
            out.append(float(modes[0]) if len(modes) == 1 else float(statistics.fmean(row)))
        return np.asarray(out, dtype=float)
    raise ValueError(f"unknown pooling method {method!r}")


def _weighted_margins(pairs: np.ndarray, draws: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Each draw's weighted-mean margin; draws whose weights sum to 0 have none and are dropped."""
    w = np.asarray(weights, dtype=float)[draws]
    total = w.sum(axis=1)
    keep = total > 0
    diff = (w * (pairs[draws, 0] - pairs[draws, 1])).sum(axis=1)
    return diff[keep] / total[keep]


def margin_interval(votes: Sequence[tuple[int, int]], *, method: str = "mean", key: str = "",
                    resamples: int = RESAMPLES, level: float = LEVEL,
                    weights: Sequence[float] | None = None) -> tuple[float, float] | None:
    """The percentile-bootstrap interval (over judges) of the pooled margin; None below 2 judges.
    `weights` (method "weighted" only): one per vote, the weight of the judge who cast it."""
    if len(votes) < 2:
        return None
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples >= 1; got {level}, {resamples}")
    if (method == "weighted") != (weights is not None) or (weights is not None and len(weights) != len(votes)):
        raise ValueError("pooling method 'weighted' takes one weight per vote; the other methods take none")
    pairs = np.asarray(votes, dtype=float)
    draws = np.random.default_rng(_seed(key)).integers(0, len(votes), size=(resamples, len(votes)))
    if weights is not None:
        margins = _weighted_margins(pairs, draws, weights)
        if not len(margins):
            return None
    else:
        margins = _pool_rows(pairs[draws, 0], method) - _pool_rows(pairs[draws, 1], method)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(margins, [tail, 100 - tail], method="inverted_cdf")  # bounds are margins a draw gave
    return round(float(low), 6), round(float(high), 6)


def pair_confidence(
    ratings: Sequence[Sequence[int | None]],
    chosen: int,
    rejected: int,
    *,
    exclude: Sequence[Sequence[bool]] | None = None,
    method: str = "mean",
    key: str = "",
    resamples: int = RESAMPLES,
    weights: Sequence[float] | None = None,
) -> PairConfidence:
    """The judges' votes on one pair and the interval on its margin. `ratings[j][g]` is judge j's
    rating of generation g; `key` (e.g. prompt id and the two generators) seeds the bootstrap;
    `weights[j]` (method "weighted" only) is judge j's pooling weight for this prompt."""
    voters = voting_judges(ratings, chosen, rejected, exclude)
    votes = [(int(ratings[j][chosen]), int(ratings[j][rejected])) for j in voters]
    interval = margin_interval(votes, method=method, key=key, resamples=resamples,
                               weights=None if weights is None else [weights[j] for j in voters])
    return PairConfidence(
        judges_for=sum(c > r for c, r in votes),
        judges_against=sum(c < r for c, r in votes),
        judges_tied=sum(c == r for c, r in votes),
        margin_low=interval[0] if interval else None,
        margin_high=interval[1] if interval else None,
    )


def comparison_confidence(
    comparisons: Sequence[Sequence[Sequence[int | None]]],
    chosen: int,
    rejected: int,
    *,
    exclude: Sequence[Sequence[bool]] | None = None,
) -> PairConfidence:
    """The judges' votes on one pair from their pairwise comparisons: `comparisons[j]` lists judge j's
    [a, b, shown first, winner] (winner -1 for a tie, None where unread). A judge with no read
    comparison of the two, or masked for either (`exclude[j][g]`), does not vote."""
    votes = {"for": 0, "against": 0, "tied": 0}
    for j, judged in enumerate(comparisons):
        if exclude is not None and (exclude[j][chosen] or exclude[j][rejected]):
            continue
        read = [c[3] for c in judged if {c[0], c[1]} == {chosen, rejected} and c[3] is not None]
        if not read:
            continue
        wins = sum(w == chosen for w in read) - sum(w == rejected for w in read)
        votes["for" if wins > 0 else "against" if wins < 0 else "tied"] += 1
    return PairConfidence(judges_for=votes["for"], judges_against=votes["against"], judges_tied=votes["tied"],
                          margin_low=None, margin_high=None)


def confidence_cut(conf: PairConfidence, *, min_judge_agreement: float | None = None,
                   min_margin_low: float | None = None) -> str | None:
    """Why the pair is left out under these minimums (one of CONFIDENCE_REASONS), or None to keep it.
    A minimum that is set needs its figure: a pair without one is left out, not waved through."""
    if min_judge_agreement is not None:
        if conf.judge_agreement is None:
            return NO_AGREEMENT
        if conf.judge_agreement < min_judge_agreement:
            return LOW_AGREEMENT
    if min_margin_low is not None:
        if conf.margin_low is None:
            return NO_INTERVAL
        if conf.margin_low < min_margin_low:
            return LOW_MARGIN
    return None
