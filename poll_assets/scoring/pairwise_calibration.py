"""Calibration in pairwise mode (pure): each judge's and the jury's outcome on the gold preference pairs,
scored with calibration.py's preference agreement and Cohen's kappa, bootstrap over prompts.

A judge's outcome on a gold pair (a, b) of a prompt: its answers on that pair in both orders, a win
each way cancelling (a, b or tie; none read: no label). The jury's: the prompt's Bradley–Terry
strengths over every judge (the score pairs are built from), a tie where they are equal. Gold rating
labels count too: two gold ratings of one prompt give a gold preference (calibration.match_gold).
Rating figures (kappa on ratings, tau, ...) are absent in this mode: the judges give no ratings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from poll_assets.scoring.calibration import (
    PREFERENCE_METRICS, RATING_METRICS, Calibration, CalibrationRow, Estimate, GoldItems, RunRatings, _comparisons,
    _verdict, bootstrap_weights, estimate, match_gold, preference_label_stats,
)
from poll_assets.scoring.gold import GoldSet
from poll_assets.scoring.pooled_comparisons import Answer, pair_label, pool_comparisons

NO_RATINGS = "pairwise mode: the judges compare, they give no ratings"
STRENGTH_TIE = 1e-9  # strengths closer than this are a tie (equal wins give equal strengths up to rounding)
JURY = "jury_bt"


def _strength_label(strengths: Sequence[float | None], a: int, b: int) -> int:
    sa, sb = strengths[a], strengths[b]
    if sa is None or sb is None:
        return -1
    return 2 if abs(sa - sb) <= STRENGTH_TIE else 0 if sa > sb else 1


def _labels(answers: list[list[list[Answer]]], items: GoldItems, judges: Sequence[int],
            exclude: Sequence[Sequence[bool]] | None, n_generators: int, by_strength: bool) -> np.ndarray:
    """One label per gold preference item from the answers of `judges` (by strengths, or one judge's votes)."""
    out = np.full(len(items.pref_p), -1)
    for k, (p, a, b) in enumerate(zip(items.pref_p, items.pref_a, items.pref_b)):
        mine = [answers[p][j] if j < len(answers[p]) else [] for j in judges]
        if by_strength:
            kept = [exclude[j] for j in judges] if exclude is not None else None
            out[k] = _strength_label(pool_comparisons(n_generators, mine, kept).strengths, int(a), int(b))
        else:
            out[k] = pair_label([x for judge in mine for x in judge], int(a), int(b))
    return out


def calibrate_pairwise(prompt_ids: Sequence[str], instructions: Sequence[str], answers: list[list[list[Answer]]],
                       gold: GoldSet, judges: Sequence[str], generators: Sequence[str],
                       exclude: Sequence[Sequence[bool]] | None = None, *, resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> Calibration:
    """answers[p][j]: judge j's answers on prompt p. The table: every judge, the jury (Bradley–Terry over
    every judge) and every jury without one judge, on the prompts with gold preference labels."""
    run = RunRatings(list(prompt_ids), list(instructions), np.zeros((len(judges), len(prompt_ids), len(generators))))
    items = match_gold(gold, run, generators)
    labelled = np.unique(items.pref_p.astype(int))
    position = np.full(len(prompt_ids), -1)
    position[labelled] = np.arange(len(labelled))
    local = GoldItems(items.rating_p[:0], items.rating_g[:0], items.rating_gold[:0], position[items.pref_p],
                      items.pref_a, items.pref_b, items.pref_win, items.counts)
    sub = [answers[p] for p in labelled]
    everyone = list(range(len(judges)))
    raters: dict[str, tuple[str, str, np.ndarray]] = {
        name: (name, "judge", _labels(sub, local, [j], None, len(generators), by_strength=False))
        for j, name in enumerate(judges)}
    raters[JURY] = ("jury (Bradley-Terry)", "jury", _labels(sub, local, everyone, exclude, len(generators), True))
    if len(judges) > 1:
        for j, name in enumerate(judges):
            rest = [k for k in everyone if k != j]
            raters[f"without_{name}"] = (f"jury without {name}", "leave_one_out",
                                         _labels(sub, local, rest, exclude, len(generators), True))
    resample = bootstrap_weights(len(labelled), resamples, seed)
    rows, raw = [], {}
    for key, (label, kind, labels) in raters.items():
        stats, n = preference_label_stats(labels, local, resample)
        raw[key] = stats
        metrics: dict[str, Estimate] = {m: Estimate(None, reason=NO_RATINGS) for m in RATING_METRICS}
        metrics.update({m: estimate(stats[m], n, len(labelled), level) for m in PREFERENCE_METRICS})
        rows.append(CalibrationRow(key, label, kind, 0, n, metrics))
    primary = "pref_kappa" if any(r.metrics["pref_kappa"].value is not None for r in rows if r.kind == "judge") else None
    comparisons = _comparisons(rows, raw, primary, JURY, len(labelled), level) if primary else {}
    counts: dict[str, Any] = {**items.counts, "labelled_prompts": len(labelled), "prompts": len(prompt_ids)}
    return Calibration(rows, JURY, primary, comparisons, _verdict(rows, comparisons, primary, JURY), counts, None,
                       "none (pairwise mode)", resamples, level)
