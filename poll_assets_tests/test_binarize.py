"""Binarization: strategies, ties, margins, seeds, self-pairs and failed generations."""

from __future__ import annotations

import pytest

from poll_assets.scoring.binarize import FEWER_THAN_TWO, TIE, BELOW_MARGIN, PreferencePair, binarize


def test_best_vs_worst():
    r = binarize([3.0, 4.5, None, 1.5])
    assert r.pairs == [PreferencePair(1, 3, 3.0)]
    chosen, rejected, margin = r.pairs[0]  # unpacks as a tuple
    assert (chosen, rejected, margin) == (1, 3, 3.0)
    assert r.reason is None and r.ties_dropped == 0 and r.n_rated == 3


def test_too_few_and_all_tied():
    assert binarize([4.0, None]).reason == FEWER_THAN_TWO
    assert binarize([]).reason == FEWER_THAN_TWO
    for strategy in ("best_vs_worst", "best_vs_random", "all_pairs"):
        r = binarize([3.0, 3.0, 3.0], strategy=strategy)
        assert r.pairs == [] and r.reason == TIE and r.ties_dropped >= 1
    assert binarize([3.0, 3.0, 3.0], strategy="all_pairs").ties_dropped == 3


def test_invalid_generations_are_skipped():
    r = binarize([5.0, 4.0, 1.0], valid=[False, True, True])
    assert r.pairs == [PreferencePair(1, 2, 3.0)]
    assert binarize([5.0, 1.0], valid=[True, False]).reason == FEWER_THAN_TWO
    with pytest.raises(ValueError, match="valid has 1 entries for 2 generations"):
        binarize([5.0, 1.0], valid=[True])


def test_all_pairs_with_margin():
    avg = [4.0, 2.0, 4.0, 3.5]
    r = binarize(avg, strategy="all_pairs")
    assert sorted(r.pairs) == sorted([
        PreferencePair(0, 1, 2.0), PreferencePair(0, 3, 0.5), PreferencePair(2, 1, 2.0),
        PreferencePair(3, 1, 1.5), PreferencePair(2, 3, 0.5),
    ])
    assert r.ties_dropped == 1  # 0 vs 2
    r = binarize(avg, strategy="all_pairs", min_margin=1.5)
    assert sorted(r.pairs) == [PreferencePair(0, 1, 2.0), PreferencePair(2, 1, 2.0), PreferencePair(3, 1, 1.5)]
    assert r.below_margin == 2 and r.ties_dropped == 1
    r = binarize([3.0, 2.5], min_margin=1.0)
    assert r.pairs == [] and r.reason == BELOW_MARGIN


@pytest.mark.parametrize("strategy", ["best_vs_worst", "best_vs_random", "all_pairs"])
def test_never_a_self_pair_and_chosen_always_better(strategy):
    for seed in range(30):
        avg = [float((seed * 7 + g * 3) % 5) for g in range(5)]
        for p in binarize(avg, strategy=strategy, seed=seed, key=f"k{seed}").pairs:
            assert p.chosen != p.rejected
            assert avg[p.chosen] - avg[p.rejected] == p.margin > 0


def test_best_vs_random_is_seeded_and_picks_only_lower_ones():
    avg = [5.0, 1.0, 2.0, 3.0, 5.0]
    seen = set()
    for key in (f"prompt-{i}" for i in range(50)):
        a = binarize(avg, strategy="best_vs_random", seed=1, key=key)
        assert a == binarize(avg, strategy="best_vs_random", seed=1, key=key)
        (p,) = a.pairs
        assert p.chosen in (0, 4) and p.rejected in (1, 2, 3)
        seen.add((p.chosen, p.rejected))
    # Both tied bests and every lower generation get used across prompts.
    assert {c for c, _ in seen} == {0, 4} and {r for _, r in seen} == {1, 2, 3}
    # The seed matters.
    picks = lambda s: [binarize(avg, strategy="best_vs_random", seed=s, key=f"p{i}").pairs[0] for i in range(20)]
    assert picks(1) != picks(2)


def test_tie_for_best_is_broken_by_seed():
    avg = [4.0, 4.0, 1.0]
    chosen = {binarize(avg, key=f"p{i}").pairs[0].chosen for i in range(40)}
    assert chosen == {0, 1}  # no position is always favoured


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown binarization strategy 'best'"):
        binarize([1.0, 2.0], strategy="best")
    with pytest.raises(ValueError, match="min_margin"):
        binarize([1.0, 2.0], min_margin=-1)


# --- preference_rows: confidence per pair and the minimums that leave contested prompts out ---

import pandas as pd  # noqa: E402

from poll_assets.assets.keys import PAIRS_KEY, POOLED_COLUMNS  # noqa: E402
from poll_assets.assets.preferences import preference_rows  # noqa: E402
from poll_assets.scoring.confidence import LOW_AGREEMENT, LOW_MARGIN  # noqa: E402
from poll_assets.pipeline import build_definitions  # noqa: E402
from poll_assets.scoring.pooled_ratings import pool_ratings  # noqa: E402
from poll_assets_tests.fake_panel import write_panel  # noqa: E402

# judge x generation ratings of three prompts: the judges agree, split, and tie
AGREED = [[5, 1], [4, 2], [5, 2]]
SPLIT = [[5, 1], [1, 4], [4, 3]]  # pooled 3.33 vs 2.67: chosen by 2 judges of 3, the middle one against
TIED = [[3, 3], [3, 3], [3, 3]]


def _pooled(matrices: list[list[list[int]]]) -> pd.DataFrame:
    rows = []
    for i, matrix in enumerate(matrices):
        pid = f"{i:064x}"
        rows.append({
            "prompt_id": pid, "instruction": f"prompt {i}", "generations": [f"answer {i}a", f"answer {i}b"],
            "generation_models": ["gen-model-0", "gen-model-1"], "generation_call_ids": [f"c{i}a", f"c{i}b"],
            "poll_ratings": matrix, "poll_rationales": [["r", "r"]] * 3,
            "poll_models": ["judge-model-0", "judge-model-1", "judge-model-2"], "poll_call_ids": ["j0", "j1", "j2"],
            "avg_poll_ratings": pool_ratings(matrix).avg, "n_valid_judges": [3, 3],
        })
    return POOLED_COLUMNS.frame(rows)


def _panel(tmp_path, **binarization):
    return write_panel(tmp_path, n_generators=2, n_judges=3, extra={"binarization": binarization})[0]


def _parts(panel):
    """What the preference stage gets of a panel: its jury and its binarization settings."""
    return panel.jury, panel.binarization


def test_every_pair_carries_its_generators_and_the_judges_confidence(tmp_path):
    rows, left_out = preference_rows(_pooled([AGREED, SPLIT, TIED]), *_parts(_panel(tmp_path)))
    assert [r["prompt"] for r in rows] == ["prompt 0", "prompt 1"]
    agreed, split = rows
    assert (agreed["chosen_generator"], agreed["rejected_generator"]) == ("gen_0", "gen_1")
    assert (agreed["chosen_model"], agreed["rejected_model"]) == ("gen-model-0", "gen-model-1")
    assert (agreed["judges_for"], agreed["judges_against"], agreed["judges_tied"], agreed["judge_agreement"]) == (3, 0, 0, 1.0)
    assert 2.0 <= agreed["margin_low"] <= agreed["margin"] <= agreed["margin_high"] <= 4.0
    assert (split["judges_for"], split["judges_against"]) == (2, 1) and split["judge_agreement"] == pytest.approx(2 / 3)
    assert split["margin_low"] < 0 < split["margin_high"]
    assert left_out.prompts == {TIE: 1} and left_out.pairs == {}


def test_a_contested_prompt_is_left_out_and_counted(tmp_path):
    pooled = _pooled([AGREED, SPLIT, TIED])
    rows, left_out = preference_rows(pooled, *_parts(_panel(tmp_path, min_judge_agreement=0.75)))
    assert [r["prompt"] for r in rows] == ["prompt 0"]
    assert left_out.pairs == {LOW_AGREEMENT: 1}
    assert left_out.prompts == {TIE: 1, LOW_AGREEMENT: 1}
    # lowering the minimum lets the split prompt back in; raising it past 2/3 keeps it out
    assert len(preference_rows(pooled, *_parts(_panel(tmp_path, min_judge_agreement=0.6)))[0]) == 2
    assert len(preference_rows(pooled, *_parts(_panel(tmp_path, min_judge_agreement=1.0)))[0]) == 1


def test_a_margin_whose_interval_reaches_below_the_minimum_is_left_out(tmp_path):
    pooled = _pooled([AGREED, SPLIT])
    rows, left_out = preference_rows(pooled, *_parts(_panel(tmp_path, min_margin_low=0.0)))
    assert [r["prompt"] for r in rows] == ["prompt 0"] and left_out.pairs == {LOW_MARGIN: 1}
    rows, left_out = preference_rows(pooled, *_parts(_panel(tmp_path, min_margin_low=-4.0)))
    assert len(rows) == 2 and left_out.pairs == {}


def test_the_self_family_mask_removes_a_judges_vote(tmp_path):
    panel, _ = write_panel(tmp_path, n_generators=2, n_judges=3, extra={
        "judges": [{"name": f"judge_{i}", "provider": "local", "model": f"judge-model-{i}", "family": fam}
                   for i, fam in enumerate(["j0", "g1", "j2"])]})  # judge_1 is of generator 1's family
    (row,), _ = preference_rows(_pooled([SPLIT]), *_parts(panel))
    assert (row["judges_for"], row["judges_against"], row["judge_agreement"]) == (2, 0, 1.0)


def test_the_confidence_minimums_are_part_of_the_pairs_code_version(tmp_path):
    def version(sub: str, **binarization) -> str:
        (tmp_path / sub).mkdir()
        panel, path = write_panel(tmp_path / sub, extra={"binarization": binarization})
        defs = build_definitions(panel, path, storage_dir=str(tmp_path / sub / "s"), cache_path=str(tmp_path / sub / "c"))
        return defs.resolve_asset_graph().get(PAIRS_KEY).code_version

    plain = version("a")
    assert version("b", min_judge_agreement=0.7) != plain
    assert version("c", min_margin_low=0.5) != plain
    assert version("d", min_judge_agreement=0.7) == version("e", min_judge_agreement=0.7)
