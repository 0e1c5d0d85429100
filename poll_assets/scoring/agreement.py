"""How much the judges agree: Krippendorff's alpha over the panel, and pairwise statistics.

Kendall's tau-b and Cohen's weighted kappa are computed here from the pair's contingency table
(ratings take a handful of values), in numpy: importing scipy.stats and sklearn.metrics for them
cost about 1.5 s of every run that pools ratings."""

from __future__ import annotations

import math
import warnings
from itertools import combinations
from typing import Any

import krippendorff
import numpy as np

MIN_PAIR_ITEMS = 2  # fewer items rated by both judges and the pairwise figures are None


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _alpha(matrix: np.ndarray, value_domain: list[int] | None) -> float | None:
    # krippendorff needs some item rated by two judges and more than one value in the domain.
    pairable = (np.sum(~np.isnan(matrix), axis=0) >= 2).sum()
    if matrix.shape[0] < 2 or pairable == 0:
        return None
    observed = np.unique(matrix[~np.isnan(matrix)])
    if len(observed) < 2:
        return None  # every rating identical: agreement is undefined, not perfect
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return _finite(krippendorff.alpha(
                reliability_data=matrix, level_of_measurement="ordinal", value_domain=value_domain
            ))
    except (ValueError, ZeroDivisionError):
        return None


def _table(xs: list[int], ys: list[int], labels: list[int]) -> np.ndarray:
    """Counts of (x, y) over the pair's items, rows and columns in `labels` order; pairs with a value
    outside `labels` are left out."""
    index = {v: i for i, v in enumerate(labels)}
    table = np.zeros((len(labels), len(labels)))
    for x, y in zip(xs, ys):
        if x in index and y in index:
            table[index[x], index[y]] += 1
    return table


def quadratic_kappa(xs: list[int], ys: list[int], labels: list[int] | None = None) -> float:
    """Cohen's kappa with quadratic weights on the label positions (labels: the ordinal scale,
    default the values seen); nan when undefined (no disagreement is possible)."""
    labels = sorted(set(xs) | set(ys)) if labels is None else labels
    return float(quadratic_kappa_table(_table(xs, ys, labels)))


def quadratic_kappa_table(observed: np.ndarray) -> np.ndarray:
    """Quadratic-weighted kappa of square contingency tables (..., K, K), rows and columns on the same
    ordinal scale; a batch of tables (a bootstrap) gives a batch of kappas, nan where undefined."""
    total = observed.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = observed.sum(axis=-1)[..., :, None] * observed.sum(axis=-2)[..., None, :] / total[..., None, None]
        positions = np.arange(observed.shape[-1])
        weights = (positions[:, None] - positions[None, :]) ** 2
        chance = (weights * expected).sum(axis=(-2, -1))
        kappa = 1 - (weights * observed).sum(axis=(-2, -1)) / chance
    return np.where((total > 0) & (chance > 0), kappa, np.nan)


def kendall_tau_b(xs: list[int], ys: list[int]) -> float:
    """Kendall's tau-b (ties in either list corrected); nan when either list is constant."""
    return float(kendall_tau_b_table(_table(xs, ys, sorted(set(xs) | set(ys)))))


def kendall_tau_b_table(table: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of contingency tables (..., K, L): rows the sorted values of x, columns those
    of y (the two scales may differ); a batch of tables gives a batch of taus, nan where undefined."""
    # below_right[i, j]: items with a larger x AND a larger y than row i, column j; below_left: larger x, smaller y.
    after = np.flip(np.cumsum(np.cumsum(np.flip(table, (-2, -1)), axis=-2), axis=-1), (-2, -1))
    below_right = np.zeros_like(table)
    below_right[..., :-1, :-1] = after[..., 1:, 1:]
    before = np.flip(np.cumsum(np.cumsum(np.flip(table, -2), axis=-2), axis=-1), -2)
    below_left = np.zeros_like(table)
    below_left[..., :-1, 1:] = before[..., 1:, :-1]
    concordant = (table * below_right).sum(axis=(-2, -1))
    discordant = (table * below_left).sum(axis=(-2, -1))
    n = table.sum(axis=(-2, -1))
    pairs = n * (n - 1) / 2
    rows, cols = table.sum(axis=-1), table.sum(axis=-2)
    tied_x = (rows * (rows - 1) / 2).sum(axis=-1)
    tied_y = (cols * (cols - 1) / 2).sum(axis=-1)
    denominator = np.sqrt(np.clip((pairs - tied_x) * (pairs - tied_y), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = (concordant - discordant) / denominator
    return np.where(denominator > 0, tau, np.nan)


def _pair(a: list[int | None], b: list[int | None], labels: list[int] | None) -> dict[str, Any]:
    both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    out: dict[str, Any] = {"n_items": len(both), "cohen_kappa_quadratic": None, "kendall_tau": None,
                           "exact_agreement": None}
    if len(both) < MIN_PAIR_ITEMS:
        return out
    xs, ys = [x for x, _ in both], [y for _, y in both]
    out["exact_agreement"] = sum(x == y for x, y in both) / len(both)
    if len(set(xs) | set(ys)) > 1:
        out["cohen_kappa_quadratic"] = _finite(quadratic_kappa(xs, ys, labels))
    out["kendall_tau"] = _finite(kendall_tau_b(xs, ys))  # nan (so None) for a constant rater
    return out


def judge_agreement(
    ratings_by_judge: dict[str, list[int | None]],
    *,
    value_domain: list[int] | None = None,
) -> dict[str, Any]:
    """Agreement over items aligned across judges (item i of every list is the same generation).

    Returns krippendorff_alpha (ordinal), mean pairwise kappa/tau, and per judge pair: n_items rated
    by both, Cohen's quadratic-weighted kappa, Kendall's tau-b and the exact-agreement share. Any
    figure that is undefined (too few items, no variance) is None. `value_domain` (e.g. [1,2,3,4,5])
    fixes the ordinal scale instead of taking it from the observed values.
    """
    judges = list(ratings_by_judge)
    lengths = {len(v) for v in ratings_by_judge.values()}
    if len(lengths) > 1:
        detail = {j: len(v) for j, v in ratings_by_judge.items()}
        raise ValueError(f"judge_agreement needs aligned rating lists of equal length; got {detail}")
    n_items = lengths.pop() if lengths else 0
    matrix = np.array(
        [[np.nan if r is None else float(r) for r in ratings_by_judge[j]] for j in judges], dtype=float
    ).reshape(len(judges), n_items)
    pairs = []
    for a, b in combinations(judges, 2):
        pairs.append({"judge_a": a, "judge_b": b, **_pair(ratings_by_judge[a], ratings_by_judge[b], value_domain)})
    kappas = [p["cohen_kappa_quadratic"] for p in pairs if p["cohen_kappa_quadratic"] is not None]
    taus = [p["kendall_tau"] for p in pairs if p["kendall_tau"] is not None]
    return {
        "n_judges": len(judges),
        "n_items": n_items,
        "n_items_multi_rated": int((np.sum(~np.isnan(matrix), axis=0) >= 2).sum()) if n_items else 0,
        "krippendorff_alpha": _alpha(matrix, value_domain) if n_items else None,
        "mean_cohen_kappa_quadratic": float(np.mean(kappas)) if kappas else None,
        "mean_kendall_tau": float(np.mean(taus)) if taus else None,
        "pairwise": pairs,
    }


def agreement_metrics(agreement: dict[str, Any]) -> dict[str, float]:
    """`judge_agreement`'s pairwise figures as flat numbers, one metadata entry each, so the UI can
    plot them over time (it plots numbers, not the entries of a JSON blob). Named
    `agreement/<figure>/<judge_a>~<judge_b>`; undefined figures are left out rather than faked."""
    figures = {"kappa": "cohen_kappa_quadratic", "tau": "kendall_tau", "exact": "exact_agreement"}
    flat = {
        f"agreement/{short}/{p['judge_a']}~{p['judge_b']}": float(p[field])
        for p in agreement["pairwise"]
        for short, field in figures.items()
        if p[field] is not None
    }
    for short in ("kappa", "tau"):
        mean = agreement[f"mean_{figures[short]}"]
        if mean is not None:
            flat[f"agreement/mean_{short}"] = float(mean)
    return flat
