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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

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


def wins_matrix(n: int, outcomes: Iterable[Outcome]) -> np.ndarray:
    """W[i, j]: how often i beat j (a tie adds half to both)."""
    w = np.zeros((n, n))
    for o in outcomes:
        w[o.i, o.j] += o.win
        w[o.j, o.i] += 1.0 - o.win
    return w


def fit(n: int, outcomes: Iterable[Outcome], *, prior: float = DEFAULT_PRIOR) -> list[float | None]:
    """Strength per item (log scale, mean 0 over the items that took part); None for an item that
    took part in no comparison. Needs prior > 0 (see the module's note)."""
    return fit_matrix(wins_matrix(n, outcomes), prior=prior)


def fit_matrix(wins: np.ndarray, *, prior: float = DEFAULT_PRIOR) -> list[float | None]:
    """`fit` from a wins matrix (W[i, j]: i's wins over j). Items with no comparison get None."""
    if prior <= 0:
        raise ValueError(f"prior must be > 0 (a virtual tie per pair keeps strengths finite), got {prior}")
    games = wins + wins.T
    active = np.flatnonzero(games.sum(axis=1) > 0)
    out: list[float | None] = [None] * len(wins)
    if len(active) == 0:
        return out
    m = len(active)
    n_ij = games[np.ix_(active, active)] + prior * (1 - np.eye(m))
    w = wins[np.ix_(active, active)].sum(axis=1) + prior / 2 * (m - 1)
    p = np.ones(m)
    for _ in range(MAX_ITERATIONS):
        denom = (n_ij / (p[:, None] + p[None, :])).sum(axis=1)
        new = w / denom if m > 1 else np.ones(1)
        new /= np.exp(np.log(new).mean())
        change = float(np.max(np.abs(np.log(new) - np.log(p))))
        p = new
        if change < TOLERANCE:
            break
    for k, item in enumerate(active):
        out[int(item)] = float(np.log(p[k]))
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
    per_prompt = np.stack([wins_matrix(n, outcomes) for outcomes in prompts]) if prompts else np.zeros((0, n, n))
    total = per_prompt.sum(axis=0)
    strengths = fit_matrix(total, prior=prior)
    wins, played = total.sum(axis=1), (total + total.T).sum(axis=1)
    draws: list[list[float]] = [[] for _ in range(n)]
    rng = np.random.default_rng(seed)
    for _ in range(resamples if len(prompts) else 0):
        counts = rng.multinomial(len(prompts), np.full(len(prompts), 1 / len(prompts)))
        for g, s in enumerate(fit_matrix(np.tensordot(counts, per_prompt, axes=1), prior=prior)):
            if s is not None:
                draws[g].append(s)
    tail = (1 - level) / 2
    rows = [Standing(names[g], strengths[g],
                     _percentile(draws[g], tail) if draws[g] else None,
                     _percentile(draws[g], 1 - tail) if draws[g] else None, float(wins[g]), int(round(played[g])))
            for g in range(n)]
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


def leaderboard_svg(rows: Sequence[dict], *, level: float = 0.95) -> str:
    """The leaderboard as a small SVG: one row per generator, a dot at its strength and a bar over its
    interval, on a common axis with 0 (the average generator) marked."""
    shown = [r for r in rows if r.get("strength") is not None]
    values = [v for r in shown for v in (r["strength"], r.get("low"), r.get("high")) if v is not None] or [0.0]
    lo, hi = min(min(values), 0.0) - 0.1, max(max(values), 0.0) + 0.1
    width, left, right, row_h = 560, 150, 20, 26
    height = 40 + row_h * len(shown)
    x = lambda v: left + (v - lo) / (hi - lo) * (width - left - right)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<text x="{left}" y="14">Bradley–Terry strength (log odds), {level:.0%} bootstrap interval</text>',
             f'<line x1="{x(0):.1f}" y1="20" x2="{x(0):.1f}" y2="{height - 6}" stroke="#999" stroke-dasharray="3,3"/>']
    for k, r in enumerate(shown):
        y = 36 + k * row_h
        name = str(r["name"]).replace("&", "&amp;").replace("<", "&lt;")
        parts.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end">{name}</text>')
        if r.get("low") is not None and r.get("high") is not None:
            parts.append(f'<line x1="{x(r["low"]):.1f}" y1="{y}" x2="{x(r["high"]):.1f}" y2="{y}" stroke="#4a78b5" stroke-width="3"/>')
        parts.append(f'<circle cx="{x(r["strength"]):.1f}" cy="{y}" r="5" fill="#1f3f6e"/>')
        parts.append(f'<text x="{width - right}" y="{y + 4}" text-anchor="end">{r["strength"]:+.2f}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
