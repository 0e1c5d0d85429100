"""Bradley–Terry strengths from pairwise outcomes (pure), with a leaderboard and bootstrap intervals.

Model: P(i beats j) = p_i / (p_i + p_j); the strength reported is log p_i, centred so that the
strengths of the items fitted have mean 0 (a difference of 1 is odds of e : 1).

Fit: Hunter's (2004) MM algorithm, p_i <- W_i / sum_j n_ij / (p_i + p_j), where W_i counts i's wins
(a tie is half a win for each side) and n_ij the comparisons of i and j. It increases the likelihood
at every step and needs no step size; each iteration is O(pairs).

Regularisation: every pair of the items that took part gets a virtual tie of weight `prior`
(default 0.2 comparisons: 0.1 win each way), as a symmetric pseudo-count. Without it an item that
won every comparison has an infinite strength (perfect separation is common on one prompt with a few
judges); with it every strength is finite, and the pull towards equality is small next to real
comparisons (4 real comparisons of a pair against 0.2 virtual ones). The virtual ties also connect
items that were never compared directly, so the strengths are always on one scale.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_PRIOR = 0.2
MAX_ITERATIONS = 10_000
TOLERANCE = 1e-10


@dataclass(frozen=True)
class Outcome:
    """One comparison of items i and j: `win` 1.0 when i won, 0.0 when j won, 0.5 for a tie."""

    i: int
    j: int
    win: float


def win_counts(n: int, outcomes: Iterable[Outcome]) -> tuple[list[float], list[int]]:
    """Per item: wins (ties as half wins) and comparisons taken part in."""
    wins, played = [0.0] * n, [0] * n
    for o in outcomes:
        wins[o.i] += o.win
        wins[o.j] += 1.0 - o.win
        played[o.i] += 1
        played[o.j] += 1
    return wins, played


def fit(n: int, outcomes: Iterable[Outcome], *, prior: float = DEFAULT_PRIOR) -> list[float | None]:
    """Strength per item (log scale, mean 0 over the items that took part); None for an item that
    took part in no comparison. Needs prior > 0 (see the module's note)."""
    if prior <= 0:
        raise ValueError(f"prior must be > 0 (a virtual tie per pair keeps strengths finite), got {prior}")
    outcomes = list(outcomes)
    active = sorted({o.i for o in outcomes} | {o.j for o in outcomes})
    if not active:
        return [None] * n
    slot = {item: k for k, item in enumerate(active)}
    m = len(active)
    wins = [0.0] * m
    games = [[0.0] * m for _ in range(m)]
    for o in outcomes:
        a, b = slot[o.i], slot[o.j]
        wins[a] += o.win
        wins[b] += 1.0 - o.win
        games[a][b] += 1.0
        games[b][a] += 1.0
    for a in range(m):
        wins[a] += prior / 2 * (m - 1)
        for b in range(m):
            if a != b:
                games[a][b] += prior
    p = [1.0] * m
    for _ in range(MAX_ITERATIONS):
        new = [wins[a] / sum(games[a][b] / (p[a] + p[b]) for b in range(m) if b != a) if m > 1 else 1.0 for a in range(m)]
        scale = math.exp(sum(math.log(x) for x in new) / m)
        new = [x / scale for x in new]
        change = max(abs(math.log(x) - math.log(y)) for x, y in zip(new, p))
        p = new
        if change < TOLERANCE:
            break
    out: list[float | None] = [None] * n
    for item, k in slot.items():
        out[item] = math.log(p[k])
    return out


@dataclass(frozen=True)
class Standing:
    """One generator on the leaderboard."""

    name: str
    strength: float | None
    low: float | None  # bootstrap interval over prompts; None without resamples
    high: float | None
    wins: float
    comparisons: int

    @property
    def win_rate(self) -> float | None:
        return self.wins / self.comparisons if self.comparisons else None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def leaderboard(names: Sequence[str], prompts: Sequence[Sequence[Outcome]], *, resamples: int = 1000, seed: int = 0,
                level: float = 0.95, prior: float = DEFAULT_PRIOR) -> list[Standing]:
    """Bradley–Terry over every prompt's outcomes (items: the generators), best first, with a
    percentile bootstrap interval over prompts (prompts drawn with replacement, the fit repeated)."""
    n = len(names)
    flat = [o for outcomes in prompts for o in outcomes]
    strengths = fit(n, flat, prior=prior)
    wins, played = win_counts(n, flat)
    draws: list[list[float]] = [[] for _ in range(n)]
    rng = random.Random(seed)
    for _ in range(resamples if prompts else 0):
        sample = [o for _ in prompts for o in prompts[rng.randrange(len(prompts))]]
        for g, s in enumerate(fit(n, sample, prior=prior)):
            if s is not None:
                draws[g].append(s)
    tail = (1 - level) / 2
    rows = [Standing(names[g], strengths[g],
                     _percentile(draws[g], tail) if draws[g] else None,
                     _percentile(draws[g], 1 - tail) if draws[g] else None, wins[g], played[g]) for g in range(n)]
    return sorted(rows, key=lambda r: (r.strength is None, -(r.strength or 0.0), r.name))


def leaderboard_markdown(rows: Sequence[Standing], *, level: float = 0.95, prompts: int | None = None) -> str:
    """The leaderboard as a markdown table (strength, interval, wins, comparisons, win rate)."""
    def num(x: float | None) -> str:
        return "–" if x is None else f"{x:+.2f}"

    pct = f"{level:.0%}"
    lines = [f"| rank | generator | strength | {pct} interval | wins | comparisons | win rate |",
             "|---:|---|---:|---|---:|---:|---:|"]
    for k, r in enumerate(rows, start=1):
        interval = "–" if r.low is None else f"[{num(r.low)}, {num(r.high)}]"
        rate = "–" if r.win_rate is None else f"{r.win_rate:.1%}"
        lines.append(f"| {k} | {r.name} | {num(r.strength)} | {interval} | {r.wins:g} | {r.comparisons} | {rate} |")
    if prompts is not None:
        lines.append(f"\nBradley–Terry strengths (log odds, mean 0) over {prompts} prompts; ties count as half wins; "
                     "intervals: percentile bootstrap over prompts.")
    return "\n".join(lines)
