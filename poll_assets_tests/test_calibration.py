"""Calibration against gold labels: the figures on hand-computed cases, matching gold to a run,
weighted pooling and its cross-fitting, and simulated judges of known behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from poll_assets.scoring.agreement import kendall_tau_b, kendall_tau_b_table, quadratic_kappa, quadratic_kappa_table
from poll_assets.scoring.calibration import (
    GoldItems, JurySpec, RunRatings, calibrate, calibration_markdown, calibration_numbers, cohen_kappa_table,
    crossfit_weights, estimate, match_gold, rating_stats, spearman_table,
)
from poll_assets.scoring.gold import GoldPreference, GoldRating, GoldSet, instruction_key
from poll_assets.scoring.pooled_ratings import pool_ratings, prompt_fold
from poll_assets_tests.calibration_sim import JUDGES, SCALE, SPEC, coverage, population, simulate

ONCE = np.ones((1, 1))  # one resample that weighs the single prompt once: the point estimate


def _items(gold: list[int], p: list[int] | None = None) -> GoldItems:
    n = len(gold)
    empty = np.zeros(0, int)
    return GoldItems(np.array(p or [0] * n), np.arange(n), np.array(gold), empty, empty, empty, empty)


# --- figures on cases worked by hand ------------------------------------------------------------------


def test_rating_figures_on_a_hand_worked_case():
    # gold 1 2 3 4 against 1 2 4 4: errors 0 0 1 0 -> MAE 0.25, bias +0.25. Quadratic kappa: observed
    # weighted disagreement 1 (one item one step off); chance: rows 1,1,1,1 by columns 1,1,0,2, over 4 items
    # (= 48 / 4 = 12 by hand), so kappa = 1 - 1/12.
    gold, rater = [1, 2, 3, 4], np.array([[1.0, 2.0, 4.0, 4.0]])
    stats, n = rating_stats(rater, _items(gold), SCALE, ONCE)
    positions = np.arange(5)
    expected = np.outer([1, 1, 1, 1, 0], [1, 1, 0, 2, 0]) / 4
    chance = ((positions[:, None] - positions[None, :]) ** 2 * expected).sum()
    assert n == 4
    assert stats["mae"][0] == pytest.approx(0.25) and stats["bias"][0] == pytest.approx(0.25)
    assert chance == 12 and stats["kappa"][0] == pytest.approx(1 - 1 / 12)
    # tau-b: 6 pairs, the rater ties one (3 vs 4 both 4): 5 concordant, 0 discordant; sqrt(6 * 5).
    assert stats["tau"][0] == pytest.approx(5 / np.sqrt(6 * 5))
    # rho: ranks 1 2 3 4 against 1 2 3.5 3.5.
    r = np.array([1, 2, 3.5, 3.5])
    assert stats["spearman"][0] == pytest.approx(np.corrcoef([1, 2, 3, 4], r)[0, 1])


def test_spearman_from_a_table_by_hand():
    assert spearman_table(np.array([[2.0, 0.0], [0.0, 3.0]])) == pytest.approx(1.0)
    assert spearman_table(np.array([[0.0, 2.0], [2.0, 0.0]])) == pytest.approx(-1.0)
    assert np.isnan(spearman_table(np.array([[1.0, 4.0]])))  # one gold value: no variance, no rho


def test_batched_table_functions_agree_with_the_list_functions():
    rng = np.random.default_rng(3)
    xs, ys = rng.integers(1, 6, 40).tolist(), rng.integers(1, 6, 40).tolist()
    table = np.zeros((5, 5))
    np.add.at(table, (np.array(xs) - 1, np.array(ys) - 1), 1)
    batch = np.stack([table, table * 2, np.zeros((5, 5))])
    assert quadratic_kappa_table(batch)[:2] == pytest.approx([quadratic_kappa(xs, ys, list(SCALE))] * 2)
    assert kendall_tau_b_table(batch)[:2] == pytest.approx([kendall_tau_b(xs, ys)] * 2)
    assert np.isnan(quadratic_kappa_table(batch)[2]) and np.isnan(kendall_tau_b_table(batch)[2])


def test_cohen_kappa_on_a_three_way_label_by_hand():
    # 10 pairs: 6 agree (4 a/a, 1 b/b, 1 tie/tie). Marginals gold 5,3,2 and rater 6,2,2 -> chance
    # (30 + 6 + 4) / 100 = 0.40, so kappa = (0.6 - 0.4) / 0.6 = 1/3.
    table = np.array([[4, 1, 0], [1, 1, 1], [1, 0, 1]], dtype=float)
    assert cohen_kappa_table(table) == pytest.approx(1 / 3)
    assert np.isnan(cohen_kappa_table(np.array([[3, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=float)))


def test_figures_match_scipy():
    from scipy import stats as stats_module  # a reference only: in the dev extra, not a runtime dependency

    rng = np.random.default_rng(5)
    gold, rater = rng.integers(1, 6, 60), rng.integers(1, 6, 60).astype(float)
    stats, _ = rating_stats(rater[None, :], _items(gold.tolist()), SCALE, ONCE)
    assert stats["tau"][0] == pytest.approx(stats_module.kendalltau(gold, rater).statistic)
    assert stats["spearman"][0] == pytest.approx(stats_module.spearmanr(gold, rater).statistic)


def test_a_figure_that_cannot_be_computed_is_absent_with_a_reason():
    few = estimate(np.array([0.5, 0.4, 0.6]), n=3, n_prompts=3, level=0.95)
    assert few.value is None and "too few labels (3 < 5)" in few.reason
    flat, n = rating_stats(np.array([[3.0] * 6]), _items([1, 2, 3, 4, 5, 3]), SCALE, ONCE)
    undefined = estimate(flat["tau"], n=n, n_prompts=6, level=0.95)
    assert undefined.value is None and "no variance" in undefined.reason


# --- gold matched to the run, weighted pooling ---------------------------------------------------------


def _run(n_prompts: int = 3) -> RunRatings:
    ratings = np.array([[[4, 2]] * n_prompts, [[5, 1]] * n_prompts], dtype=float)
    return RunRatings([f"{p:064x}" for p in range(n_prompts)], [f"prompt {p}" for p in range(n_prompts)], ratings)


def test_labels_outside_the_run_or_naming_unknown_generators_are_counted():
    run = _run()
    gold = GoldSet("g", [GoldRating(run.prompt_ids[0], False, "gen_0", 5, 1), GoldRating(run.prompt_ids[0], False, "gen_1", 5, 2),
                         GoldRating("f" * 64, False, "gen_0", 3, 3), GoldRating(run.prompt_ids[1], False, "gen_7", 3, 4)],
                   [GoldPreference(run.prompt_ids[1], False, "gen_1", "gen_0", "a", 5)])
    items = match_gold(gold, run, ["gen_0", "gen_1"])
    assert items.counts == {"rating_labels": 2, "preference_labels": 1, "derived_pairs": 1,
                            "labels_outside_prompts": 1, "labels_unknown_generator": 1, "labels_repeated": 0}
    # the two equal gold ratings of prompt 0 became a tie; the explicit preference keeps its order
    assert sorted(zip(items.pref_p.tolist(), items.pref_a.tolist(), items.pref_win.tolist())) == [(0, 0, 2), (1, 1, 0)]


def test_a_label_naming_a_prompt_by_id_and_by_text_is_used_once_and_counted():
    run = RunRatings(["a" * 64], ["two\r\nlines"], np.array([[[4.0, 2.0]]]))  # a prompt text kept with \r\n
    gold = GoldSet("g", [GoldRating("a" * 64, False, "gen_0", 5, 1),
                         GoldRating(instruction_key("two\nlines"), True, "gen_0", 1, 2)])
    items = match_gold(gold, run, ["gen_0", "gen_1"])
    assert items.counts["rating_labels"] == 1 and items.counts["labels_repeated"] == 1
    assert items.rating_gold.tolist() == [5]


def test_no_matching_labels_gives_no_figures_and_no_verdict():
    run, _ = simulate(10, seed=1)
    _, gold = simulate(10, seed=2)  # another run's prompts
    cal = calibrate(run, gold, SPEC, SCALE, resamples=50)
    assert cal.counts["labels_outside_prompts"] == 30 and cal.primary is None
    assert all(e.value is None for r in cal.rows for e in r.metrics.values())
    assert cal.verdict == ["No verdict: too few gold labels matched this run for any judge's figures."]
    bare = calibrate(run, simulate(10, seed=1)[1], SPEC, SCALE, resamples=0)
    assert bare.row("close").metrics["kappa"].reason == "no interval: gold.bootstrap_resamples is 0"


def test_weighted_pooling_is_the_weighted_mean_of_the_kept_ratings():
    pooled = pool_ratings([[4, 2], [1, None]], method="weighted", weights=[3.0, 1.0])
    assert pooled.avg == [pytest.approx(13 / 4), 2.0]
    masked = pool_ratings([[4, 2], [1, 5]], method="weighted", weights=[0.0, 1.0], exclude=[[False, False], [True, False]])
    assert masked.avg == [None, 5.0]  # the only kept rating of generation 0 has weight 0: absent, not 0
    with pytest.raises(ValueError, match="weights must be 2 non-negative numbers"):
        pool_ratings([[4], [1]], method="weighted", weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="takes one weight per judge"):
        pool_ratings([[4], [1]], method="mean", weights=[1.0, 1.0])


def test_cross_fitted_weights_of_a_prompt_never_see_its_own_labels():
    run, gold = simulate(60, seed=7)
    items = match_gold(gold, run, SPEC.generators)
    per_prompt, overall, source = crossfit_weights(run, items, range(len(JUDGES)), folds=5, seed=0)
    assert source.startswith("fitted: inverse mean squared error") and overall[0] == max(overall)  # `close` weighs most
    target = 0
    changed = GoldSet("g", [r if r.prompt != run.prompt_ids[target] else GoldRating(r.prompt, False, r.generator, 1, r.line)
                            for r in gold.ratings])
    again, _, _ = crossfit_weights(run, match_gold(changed, run, SPEC.generators), range(len(JUDGES)), folds=5, seed=0)
    assert again[target] == per_prompt[target]  # its own labels changed; its weights did not
    fold = prompt_fold(run.prompt_ids[target], 5)
    other = next(p for p in range(60) if prompt_fold(run.prompt_ids[p], 5) != fold)
    assert again[other] != per_prompt[other]  # ... while a prompt of another fold saw the change


# --- simulated judges of known behaviour ----------------------------------------------------------------


def test_simulated_judges_are_ranked_as_they_were_built():
    run, gold = simulate(80, seed=11)
    cal = calibrate(run, gold, SPEC, SCALE, resamples=400, seed=11)
    kappa = {k: cal.row(k).metrics["kappa"].value for k in JUDGES}
    assert sorted(JUDGES, key=kappa.get, reverse=True) == ["close", "biased", "position", "random"]
    bias = {k: cal.row(k).metrics["bias"] for k in JUDGES}
    assert bias["biased"].low > 0.6 and bias["close"].low < 0 < bias["close"].high  # the +1 judge shows as bias
    random_kappa = cal.row("random").metrics["kappa"]
    assert random_kappa.low < 0 < random_kappa.high
    pref = {k: cal.row(k).metrics["pref_kappa"].value for k in ("close", "biased", "position")}
    assert min(pref, key=pref.get) == "position"  # the first-position judge picks the wrong answer most
    # the known (population) ranking is the same
    known = population()
    assert sorted(JUDGES, key=lambda k: known[k]["kappa"], reverse=True) == ["close", "biased", "position", "random"]
    assert any("Leaving out random improves the jury" in s for s in cal.verdict)
    assert cal.verdict[0].startswith("The best judge, close, agrees with the gold labels better than the jury (mean)")


def test_intervals_cover_the_known_value_at_least_90_percent_of_the_time():
    # 40 simulations here; bench/calibration_coverage.py runs 200 (its output is in bench/).
    shares = coverage(40, 60, 300, ("close", "biased", "position", "jury_mean"), ("kappa", "tau", "mae", "pref_agreement"))
    assert np.mean(list(shares.values())) >= 0.9, shares
    assert min(shares.values()) >= 0.8, shares  # one figure over only 40 draws may fall a little short


def test_the_verdict_says_the_data_cannot_tell_when_intervals_overlap():
    # Two judges of the same kind (off by one a fifth of the time, independently), on 12 prompts.
    run, gold = simulate(12, seed=2)
    truth = np.array([[r.rating for r in gold.ratings[p * 3:(p + 1) * 3]] for p in range(12)], dtype=float)
    rng = np.random.default_rng(9)
    other = np.clip(truth + rng.choice([-1, 1], truth.shape) * (rng.random(truth.shape) < 0.2), 1, 5)
    two_alike = JurySpec(judges=("close", "close_too"), generators=SPEC.generators)
    sub = RunRatings(run.prompt_ids, run.instructions, np.stack([run.ratings[0], other]))
    cal = calibrate(sub, gold, two_alike, SCALE, resamples=300, seed=2)
    assert cal.verdict[0].startswith("The data cannot tell"), cal.verdict
    assert "The data do not show that leaving out any one judge would improve the jury." in cal.verdict


def test_the_table_and_numbers_show_every_rater():
    run, gold = simulate(30, seed=4)
    cal = calibrate(run, gold, SPEC, SCALE, resamples=200, seed=4)
    table = calibration_markdown(cal)
    for label in ("| close |", "| jury (mean) |", "| jury (weighted, fitted) |", "| jury without random |"):
        assert label in table
    numbers = calibration_numbers(cal)
    assert numbers["calibration/best_judge_kappa"] == cal.row("close").metrics["kappa"].value
    assert numbers["calibration/jury_kappa"] == cal.row("jury_mean").metrics["kappa"].value
    assert "calibration/kappa/without_random" in numbers
