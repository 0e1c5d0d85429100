"""How much the judges agree: Krippendorff's alpha over the panel, and pairwise statistics."""

from __future__ import annotations

import math
import warnings
from itertools import combinations
from typing import Any

import krippendorff
import numpy as np
from scipy.stats import kendalltau
from sklearn.metrics import cohen_kappa_score

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


def _pair(a: list[int | None], b: list[int | None], labels: list[int] | None) -> dict[str, Any]:
    both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    out: dict[str, Any] = {"n_items": len(both), "cohen_kappa_quadratic": None, "kendall_tau": None,
                           "exact_agreement": None}
    if len(both) < MIN_PAIR_ITEMS:
        return out
    xs, ys = [x for x, _ in both], [y for _, y in both]
    out["exact_agreement"] = sum(x == y for x, y in both) / len(both)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant raters: both statistics are undefined (nan)
        if len(set(xs) | set(ys)) > 1:
            out["cohen_kappa_quadratic"] = _finite(cohen_kappa_score(xs, ys, weights="quadratic", labels=labels))
        out["kendall_tau"] = _finite(kendalltau(xs, ys).statistic)
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
