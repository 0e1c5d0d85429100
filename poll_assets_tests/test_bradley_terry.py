"""Bradley–Terry (poll_assets/scoring/bradley_terry.py): the fit recovers a known order, stays finite under
perfect separation, and the leaderboard's bootstrap intervals are seeded and hold the estimate."""

from __future__ import annotations

import hashlib
import math

import pytest

from poll_assets.scoring.bradley_terry import Outcome, fit, leaderboard, leaderboard_markdown, win_counts
from poll_assets.pairwise import plan_pairs


def _scripted_outcomes(n_prompts: int, quality: list[float], bias: float, judges: int = 3) -> list[list[Outcome]]:
    """Per prompt: the outcomes of `judges` scripted judges asked every pair in both orders; each
    prefers the better generation with probability given by the BT model of `quality`, except that
    with probability `bias` it picks the answer shown first (deterministic hash draws)."""
    prompts = []
    for p in range(n_prompts):
        outcomes = []
        for j in range(judges):
            for c in plan_pairs(range(len(quality)), anchor=None, both_orders=True, seed=0, key=str(p)):
                u, v = (int(hashlib.sha256(f"{p}/{j}/{c}/{k}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for k in (0, 1))
                p_a = 1 / (1 + math.exp(quality[c.b] - quality[c.a]))
                won = c.first if u < bias else (c.a if v < p_a else c.b)
                outcomes.append(Outcome(c.a, c.b, 1.0 if won == c.a else 0.0))
        prompts.append(outcomes)
    return prompts


def test_fit_recovers_the_order_and_the_gaps():
    quality = [0.0, 0.5, 1.0, 2.0]
    flat = [o for p in _scripted_outcomes(300, quality, bias=0.3) for o in p]
    strengths = fit(4, flat)
    assert sorted(range(4), key=lambda g: strengths[g]) == [0, 1, 2, 3]
    # position bias in both orders shrinks the gaps by about (1 - bias), but never reorders them
    centred = [q - sum(quality) / 4 for q in quality]
    for s, q in zip(strengths, centred):
        assert abs(s - 0.7 * q) < 0.2


def test_perfect_separation_gives_finite_strengths():
    outcomes = [Outcome(0, 1, 1.0)] * 4  # 0 beats 1 in all four answers
    s0, s1 = fit(2, outcomes)
    assert s0 > s1 and math.isfinite(s0) and math.isfinite(s1)
    assert s0 - s1 == pytest.approx(math.log(4.1 / 0.1), rel=1e-6)  # 0.1 virtual win each way
    assert fit(3, outcomes)[2] is None  # never compared: no strength
    assert abs(sum(s for s in (s0, s1))) < 1e-9


def test_ties_are_half_wins():
    wins, played = win_counts(2, [Outcome(0, 1, 0.5), Outcome(0, 1, 1.0)])
    assert wins == [1.5, 0.5] and played == [2, 2]
    assert fit(2, [Outcome(0, 1, 0.5)] * 6) == pytest.approx([0.0, 0.0], abs=1e-9)


def test_leaderboard_intervals_are_seeded_and_hold_the_estimate():
    prompts = _scripted_outcomes(60, [0.0, 1.0, 2.0], bias=0.0, judges=2)
    names = ["small", "mid", "large"]
    board = leaderboard(names, prompts, resamples=200, seed=7)
    assert [r.name for r in board] == ["large", "mid", "small"]
    for r in board:
        assert r.low <= r.strength <= r.high
    assert board == leaderboard(names, prompts, resamples=200, seed=7)
    table = leaderboard_markdown(board, prompts=60)
    assert table.splitlines()[2].startswith("| 1 | large |") and "95% interval" in table
