"""Inter-judge agreement, checked against reference computations written out in this file."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from poll_assets.scoring.agreement import agreement_metrics, judge_agreement


def ref_quadratic_kappa(a: list[int], b: list[int], labels: list[int]) -> float:
    k = len(labels)
    idx = {v: i for i, v in enumerate(labels)}
    observed = np.zeros((k, k))
    for x, y in zip(a, b):
        observed[idx[x], idx[y]] += 1
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    w = np.array([[(i - j) ** 2 for j in range(k)] for i in range(k)], dtype=float)
    return 1 - (w * observed).sum() / (w * expected).sum()


def ref_kendall_tau_b(a: list[int], b: list[int]) -> float:
    conc = disc = ties_a = ties_b = 0
    for i, j in combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif da * db > 0:
            conc += 1
        else:
            disc += 1
    return (conc - disc) / np.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))


def ref_ordinal_alpha(data: list[list[int | None]], domain: list[int]) -> float:
    """Krippendorff's alpha, ordinal metric, from the coincidence matrix (Krippendorff 2011)."""
    k = len(domain)
    idx = {v: i for i, v in enumerate(domain)}
    o = np.zeros((k, k))
    for unit in zip(*data):
        vals = [v for v in unit if v is not None]
        m = len(vals)
        if m < 2:
            continue
        for i, x in enumerate(vals):
            for j, y in enumerate(vals):
                if i != j:
                    o[idx[x], idx[y]] += 1 / (m - 1)
    n_c = o.sum(1)
    n = n_c.sum()

    def delta(c: int, kk: int) -> float:
        lo, hi = min(c, kk), max(c, kk)
        return (n_c[lo:hi + 1].sum() - (n_c[lo] + n_c[hi]) / 2) ** 2

    d_o = sum(o[c, kk] * delta(c, kk) for c in range(k) for kk in range(k))
    d_e = sum(n_c[c] * n_c[kk] * delta(c, kk) for c in range(k) for kk in range(k)) / (n - 1)
    return 1 - d_o / d_e


def test_matches_reference_computations():
    a = [4, 2, 5, 3, 3, 3, 2, 5, 4]
    b = [3, 2, 4, 5, 1, 2, 2, 4, 4]
    c = [4, 1, 5, None, None, None, 1, None, 3]
    got = judge_agreement({"a": a, "b": b, "c": c}, value_domain=[1, 2, 3, 4, 5])
    assert got["n_judges"] == 3 and got["n_items"] == 9 and got["n_items_multi_rated"] == 9
    assert got["krippendorff_alpha"] == pytest.approx(ref_ordinal_alpha([a, b, c], [1, 2, 3, 4, 5]))
    pairs = {(p["judge_a"], p["judge_b"]): p for p in got["pairwise"]}
    assert list(pairs) == [("a", "b"), ("a", "c"), ("b", "c")]
    ac_a = [x for x, y in zip(a, c) if y is not None]
    ac_c = [y for y in c if y is not None]
    assert pairs[("a", "c")]["n_items"] == 5
    # a vs c on shared items: (4,4) (2,1) (5,5) (2,1) (4,3) -> 2 of 5 identical
    assert pairs[("a", "c")]["exact_agreement"] == pytest.approx(2 / 5)
    for (x, y), (ra, rb) in {("a", "b"): (a, b), ("a", "c"): (ac_a, ac_c)}.items():
        assert pairs[(x, y)]["cohen_kappa_quadratic"] == pytest.approx(ref_quadratic_kappa(ra, rb, [1, 2, 3, 4, 5]))
        assert pairs[(x, y)]["kendall_tau"] == pytest.approx(ref_kendall_tau_b(ra, rb))
    kappas = [p["cohen_kappa_quadratic"] for p in got["pairwise"]]
    assert got["mean_cohen_kappa_quadratic"] == pytest.approx(sum(kappas) / 3)


def test_perfect_and_opposite():
    up = [1, 2, 3, 4, 5]
    assert judge_agreement({"x": up, "y": up})["krippendorff_alpha"] == pytest.approx(1.0)
    opposite = judge_agreement({"x": up, "y": up[::-1]})
    assert opposite["krippendorff_alpha"] < 0
    assert opposite["pairwise"][0]["kendall_tau"] == pytest.approx(-1.0)
    assert opposite["pairwise"][0]["cohen_kappa_quadratic"] == pytest.approx(-1.0)


def test_undefined_figures_are_none():
    constant = judge_agreement({"x": [3, 3, 3], "y": [3, 3, 3]})
    assert constant["krippendorff_alpha"] is None
    assert constant["pairwise"][0]["cohen_kappa_quadratic"] is None
    assert constant["pairwise"][0]["kendall_tau"] is None
    assert constant["pairwise"][0]["exact_agreement"] == 1.0
    disjoint = judge_agreement({"x": [3, None], "y": [None, 4]})
    assert disjoint["krippendorff_alpha"] is None and disjoint["pairwise"][0]["n_items"] == 0
    one_item = judge_agreement({"x": [3, 1], "y": [4, None]})
    assert one_item["pairwise"][0]["cohen_kappa_quadratic"] is None
    single = judge_agreement({"x": [1, 5]})
    assert single["krippendorff_alpha"] is None and single["pairwise"] == []
    empty = judge_agreement({})
    assert empty["krippendorff_alpha"] is None and empty["n_items"] == 0


def test_misaligned_lists_are_refused():
    with pytest.raises(ValueError, match="equal length"):
        judge_agreement({"x": [1, 2], "y": [1]})


def test_agreement_metrics_are_one_number_per_pair_and_figure():
    ratings = {"a": [1, 2, 3, 4, 5], "b": [1, 2, 3, 5, 4], "c": [5, 5, 5, 5, 5]}
    agreement = judge_agreement(ratings, value_domain=[1, 2, 3, 4, 5])
    flat = agreement_metrics(agreement)
    assert all(isinstance(v, float) for v in flat.values())
    ab = next(p for p in agreement["pairwise"] if (p["judge_a"], p["judge_b"]) == ("a", "b"))
    assert flat["agreement/kappa/a~b"] == pytest.approx(ab["cohen_kappa_quadratic"])
    assert flat["agreement/tau/a~b"] == pytest.approx(ab["kendall_tau"])
    assert flat["agreement/exact/a~b"] == pytest.approx(3 / 5)
    # c never varies: tau with it is undefined, so it has no entry; its exact agreement with a is 1/5.
    assert "agreement/tau/a~c" not in flat and "agreement/tau/b~c" not in flat
    assert flat["agreement/exact/a~c"] == pytest.approx(1 / 5)
    assert flat["agreement/mean_tau"] == pytest.approx(agreement["mean_kendall_tau"])
    assert set(flat) == {f"agreement/{f}/{p}" for f in ("kappa", "tau", "exact") for p in ("a~b", "a~c", "b~c")} - {
        "agreement/tau/a~c", "agreement/tau/b~c"} | {"agreement/mean_kappa", "agreement/mean_tau"}


def test_agreement_metrics_of_one_judge_is_empty():
    assert agreement_metrics(judge_agreement({"a": [1, 2, 3]})) == {}


def test_kappa_and_tau_match_the_references_on_random_ratings_with_ties():
    from poll_assets.scoring.agreement import kendall_tau_b, quadratic_kappa

    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(300):
        n = int(rng.integers(2, 30))
        domain = [1, 2, 3, 4, 5][: int(rng.integers(2, 6))]
        a, b = [int(v) for v in rng.choice(domain, n)], [int(v) for v in rng.choice(domain, n)]
        if len(set(a)) < 2 or len(set(b)) < 2:
            assert np.isnan(kendall_tau_b(a, b))  # a constant list: tau-b is undefined
            continue
        assert quadratic_kappa(a, b, [1, 2, 3, 4, 5]) == pytest.approx(ref_quadratic_kappa(a, b, [1, 2, 3, 4, 5]))
        assert kendall_tau_b(a, b) == pytest.approx(ref_kendall_tau_b(a, b))
        checked += 1
    assert checked > 200
