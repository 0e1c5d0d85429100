"""Calibration in pairwise mode (poll_assets/scoring/pairwise_calibration.py): gold preferences (and pairs derived
from gold ratings) against each judge's outcome on the pair and the jury's Bradley-Terry outcome."""

from __future__ import annotations

import pytest

from poll_assets.scoring.calibration import calibration_markdown
from poll_assets.scoring.gold import GoldPreference, GoldRating, GoldSet
from poll_assets.pairwise import plan_pairs
from poll_assets.scoring.pairwise_calibration import NO_RATINGS, calibrate_pairwise

GENERATORS = ["g0", "g1", "g2"]


def _answers(n_prompts: int, judge) -> list[list]:
    """One judge's answers per prompt: every pair in both orders, winner chosen by `judge(p, comparison)`."""
    return [[(c.a, c.b, c.first, judge(p, c)) for c in plan_pairs(range(3), anchor=None, both_orders=True, seed=0, key=str(p))]
            for p in range(n_prompts)]


def test_judges_and_jury_against_gold_preferences():
    n = 30
    truthful = _answers(n, lambda p, c: max(c.a, c.b))  # the higher index is better, as gold says
    first = _answers(n, lambda p, c: c.first)  # always the answer shown first: its two orders cancel (a tie)
    contrary = _answers(n, lambda p, c: min(c.a, c.b))
    answers = [[truthful[p], first[p], contrary[p]] for p in range(n)]
    gold = GoldSet("gold", preferences=[GoldPreference(f"p{p}", False, "g0", "g2", "b", p) for p in range(n)],
                   ratings=[r for p in range(n) for r in (GoldRating(f"p{p}", False, "g1", 3, 0), GoldRating(f"p{p}", False, "g2", 5, 0))])
    cal = calibrate_pairwise([f"p{p}" for p in range(n)], [f"q{p}" for p in range(n)], answers, gold,
                             ["truthful", "first", "contrary"], GENERATORS, resamples=200, seed=1)
    agree = {r.key: r.metrics["pref_agreement"].value for r in cal.rows}
    assert agree["truthful"] == 1.0 and agree["first"] == 0.0 and agree["contrary"] == 0.0
    assert cal.row("truthful").n_pairs == 2 * n  # the gold preference and the pair derived from the ratings
    # The jury: truthful and contrary cancel, the first-position judge's answers are ties: equal strengths, a tie.
    assert agree["jury_bt"] == 0.0
    assert agree["without_contrary"] == 1.0  # the truthful judge with a tie-giver: the truthful side wins
    assert cal.row("truthful").metrics["kappa"].reason == NO_RATINGS
    assert cal.counts["derived_pairs"] == n
    assert "jury (Bradley-Terry)" in calibration_markdown(cal)


def test_unread_answers_give_no_label():
    unread = _answers(6, lambda p, c: None)
    gold = GoldSet("gold", preferences=[GoldPreference(f"p{p}", False, "g0", "g1", "a", p) for p in range(6)])
    cal = calibrate_pairwise([f"p{p}" for p in range(6)], ["q"] * 6, [[u] for u in unread], gold, ["j"], GENERATORS,
                             resamples=50)
    assert cal.row("j").n_pairs == 0 and cal.row("j").metrics["pref_agreement"].value is None
    assert cal.primary is None
