"""Asset checks: each pure check passes on good data and fails, naming the problem, on data made bad
on purpose; then each check fails inside the real asset step on a shard made bad on purpose, and a
failed blocking check stops the assets downstream of it."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from poll_assets.engine import checks as c
from poll_assets.assets import generations as generations_module
from poll_assets.assets import judging as judging_module
from poll_assets.assets import pooling as pooling_module
from poll_assets.assets import preferences as preferences_module
from poll_assets.assets import prompts as prompts_module
from poll_assets.assets.generations import check_generation_failures, check_generation_rows
from poll_assets.assets.judging import check_ratings_valid, check_unrated_verdicts
from poll_assets.engine.metadata import check_pending_rows
from poll_assets.assets.pooling import check_agreement, check_pooled_coverage, pooled_agreement
from poll_assets.assets.preferences import check_pairs
from poll_assets.assets.prompts import check_prompts
from poll_assets.io_manager import partition_path
from poll_assets.panel import Thresholds
from poll_assets.rubrics import get_rubric
from poll_assets.pipeline import JOB_NAME, build_assets, build_definitions, build_resources
from poll_assets_tests.fake_panel import PROMPTS, scripted_resources, write_panel

SCALE = (1, 2, 3, 4, 5)
P1, P2 = "a" * 64, "b" * 64


def prompts() -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [P1, P2], "instruction": ["one?", "two?"], "source_row": [0, 1]})


def generations(texts=("x", "y"), errors=(None, None)) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [P1, P2], "generation": list(texts), "error": list(errors),
                         "error_kind": [None if e is None else "server" for e in errors]})


def combined() -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [P1, P2], "generations": [["a1", "a2"], ["b1", None]]})


def ratings(**overrides) -> pd.DataFrame:
    data = {
        "prompt_id": [P1, P2],
        "ratings": [[4, 2], [3, None]],
        "rationales": [["ok", "meh"], ["fine", None]],
        "rating_errors": [[None, None], [None, "generation failed"]],
        "shown_order": [[1, 0], [0]],
    }
    data.update(overrides)
    return pd.DataFrame(data)


def pooled(**overrides) -> pd.DataFrame:
    data = {
        "prompt_id": [P1, P2],
        "generations": [["a1", "a2"], ["b1", None]],
        "poll_ratings": [[[4, 2], [5, 1]], [[3, None], [4, None]]],
        "avg_poll_ratings": [[4.5, 1.5], [3.5, None]],
    }
    data.update(overrides)
    return pd.DataFrame(data)


def pairs(**overrides) -> pd.DataFrame:
    data = {
        "prompt_id": [P1],
        "chosen": [[{"role": "user", "content": "one?"}, {"role": "assistant", "content": "a1"}]],
        "rejected": [[{"role": "user", "content": "one?"}, {"role": "assistant", "content": "a2"}]],
        "chosen_rating": [4.5],
        "rejected_rating": [1.5],
        "chosen_call_id": ["c1"],
        "rejected_call_id": ["c2"],
    }
    data.update(overrides)
    return pd.DataFrame(data)


def test_good_data_passes_every_check():
    assert check_prompts(prompts()).passed
    assert check_generation_rows(generations(), prompts()).passed
    assert check_generation_failures(generations(), 0.1).passed
    assert check_ratings_valid(ratings(), combined(), SCALE).passed
    assert check_unrated_verdicts(ratings(), 0.0).passed
    assert check_pooled_coverage(pooled(), combined(), n_judges=2).passed
    assert check_agreement(pooled_agreement(pooled(), ["j0", "j1"], SCALE)["krippendorff_alpha"], 0.5).passed
    assert check_pairs(pairs()).passed


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (prompts().iloc[0:0], "the shard has no prompts"),
        (prompts().assign(prompt_id=[P1, P1]), "repeated prompt_id: aaaaaaaaaaaa"),
        (prompts().assign(instruction=["one?", "  "]), "rows with an empty instruction: 1"),
    ],
)
def test_prompts_check_fails(frame, message):
    finding = check_prompts(frame)
    assert not finding.passed and message in finding.description


def test_generation_rows_check_fails_on_missing_and_repeated_rows():
    gens = pd.DataFrame({"prompt_id": [P1, P1], "generation": ["x", "x"], "error": [None, None]})
    finding = check_generation_rows(gens, prompts())
    assert not finding.passed
    assert "no row for prompts bbbbbbbbbbbb" in finding.description
    assert "prompts with more than one row: aaaaaaaaaaaa" in finding.description


def test_generation_failure_rate_check_fails_above_threshold():
    finding = check_generation_failures(generations(texts=("x", None), errors=(None, "timeout")), 0.1)
    assert not finding.passed
    assert finding.metadata["failure_rate"] == 0.5
    assert "failure rate 0.500 > max_generation_failure_rate 0.1; failed prompts: bbbbbbbbbbbb" in finding.description
    assert check_generation_failures(generations(texts=("x", None), errors=(None, "timeout")), 0.5).passed


def test_ratings_check_fails_off_scale():
    finding = check_ratings_valid(ratings(ratings=[[4, 7], [3, None]]), combined(), SCALE)
    assert not finding.passed and "ratings off the 1-5 scale: aaaaaaaaaaaa[1]=7" in finding.description


def test_ratings_check_fails_on_none_without_reason():
    finding = check_ratings_valid(ratings(rating_errors=[[None, None], [None, None]]), combined(), SCALE)
    assert not finding.passed and "missing ratings without a reason: bbbbbbbbbbbb[1]" in finding.description


def test_ratings_check_fails_when_not_aligned_with_generations():
    bad = ratings(ratings=[[4], [3, None]], rationales=[["ok"], ["fine", None]], rating_errors=[[None], [None, "x"]])
    finding = check_ratings_valid(bad, combined(), SCALE)
    assert not finding.passed
    assert "ratings not aligned with generations: aaaaaaaaaaaa (1 ratings, 2 generations)" in finding.description


def test_unrated_verdict_check_fails_above_threshold():
    bad = ratings(ratings=[[None, 2], [3, None]], rating_errors=[["no rating found", None], [None, "generation failed"]])
    finding = check_unrated_verdicts(bad, 0.2)
    # Three verdicts were asked for (shown_order), one came back unparseable; the failed generation is not counted.
    assert not finding.passed and finding.metadata["judged"] == 3 and finding.metadata["failures"] == 1
    assert "unrated verdict rate 0.333 > max_parse_failure_rate 0.2" in finding.description
    assert "1 unreadable, 0 from failed judge calls" in finding.description


def test_pooled_coverage_check_fails_on_a_missing_generation_slot():
    finding = check_pooled_coverage(pooled(avg_poll_ratings=[[4.5], [3.5, None]]), combined(), n_judges=2)
    assert not finding.passed
    assert "pooled ratings do not cover every generation: aaaaaaaaaaaa (1 pooled, 2 generations" in finding.description
    missing_prompt = check_pooled_coverage(pooled().iloc[:1], combined(), n_judges=2)
    assert not missing_prompt.passed and "prompts without pooled ratings: bbbbbbbbbbbb" in missing_prompt.description


def test_agreement_check_fails_below_threshold():
    opposed = pooled(poll_ratings=[[[5, 1], [1, 5]], [[4, None], [2, None]]])
    alpha = pooled_agreement(opposed, ["j0", "j1"], SCALE)["krippendorff_alpha"]
    assert alpha is not None and alpha < 0
    finding = check_agreement(alpha, 0.0)
    assert not finding.passed and "< min_agreement 0.0" in finding.description


def test_pairs_check_fails_when_chosen_not_higher_or_identical():
    finding = check_pairs(pairs(chosen_rating=[1.5], rejected_rating=[1.5]))
    assert not finding.passed and "chosen_rating not above rejected_rating: row 0" in finding.description
    same = pairs(rejected=pairs()["chosen"].tolist())
    finding = check_pairs(same)
    assert not finding.passed and "chosen is the same answer as rejected: row 0" in finding.description


def test_a_combined_check_names_each_failing_condition_and_keeps_every_figure():
    # gen rows: one missing prompt; failure rate: one of two failed. Both conditions fail, each named.
    checks = generations_module.generation_checks(Thresholds(max_generation_failure_rate=0.1))
    combined = checks[0]
    assert combined.name == "generations_valid" and combined.blocking and combined.needs == (c.STEP_INPUT,)
    bad = generations(errors=[None, "boom"]).iloc[1:]
    finding = combined.run(bad, {c.STEP_INPUT: prompts()})
    assert not finding.passed
    assert finding.description.startswith("one_row_per_prompt: no row for prompts ")
    assert "; failure_rate: failure rate 1.000 > max_generation_failure_rate 0.1" in finding.description
    assert finding.metadata["failed_conditions"] == "one_row_per_prompt, failure_rate"
    assert (finding.metadata["missing"], finding.metadata["failures"]) == (1, 1)
    # only the failing condition is named; a passing one is not reported as a problem
    one = combined.run(generations(errors=[None, "boom"]), {c.STEP_INPUT: prompts()})
    assert one.metadata["failed_conditions"] == "failure_rate" and "one_row_per_prompt" not in one.description
    good = combined.run(generations(), {c.STEP_INPUT: prompts()})
    assert good.passed and good.metadata["failed_conditions"] == "none"
    assert "one_row_per_prompt: one row for each of 2 prompts" in good.description


def test_combined_conditions_share_a_severity_and_keep_clashing_figures_apart():
    warn = c.StageCheck("w", "warns", lambda df, _: c.Finding(True, "fine", {"threshold": 1.0}),
                        severity=dg.AssetCheckSeverity.WARN)
    error = c.StageCheck("e", "blocks", lambda df, _: c.Finding(False, "bad", {"threshold": 2.0}))
    with pytest.raises(ValueError, match="check both: its conditions must share one severity"):
        c.combined_check("both", "x", [warn, error])
    other = c.StageCheck("f", "blocks too", lambda df, _: c.Finding(True, "ok", {"threshold": 3.0, "rows": 2}))
    finding = c.combined_check("errors", "x", [error, other]).run(pd.DataFrame(), {})
    assert finding.metadata == {"e/threshold": 2.0, "f/threshold": 3.0, "rows": 2, "failed_conditions": "e"}
    assert finding.description == "e: bad"


def test_checks_are_blocking_except_agreement_and_contested_pairs(tmp_path):
    panel, path = write_panel(tmp_path)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "s"), cache_path=str(tmp_path / "c.sqlite"))
    graph = defs.resolve_asset_graph()
    specs = {(k.asset_key.to_user_string(), k.name): graph.get_check_spec(k) for k in graph.asset_check_keys}
    # prompts; per generator and per judge its stage's combined check and pending_rows; pooled; pairs.
    assert len(specs) == 1 + 2 * len(panel.generators) + 2 * len(panel.judges) + 2 + 2
    non_blocking = {key for key, spec in specs.items() if not spec.blocking}
    assert non_blocking == {("pooled_ratings", "judge_agreement"), ("preference_pairs", "contested_pairs")}
    # Partitioned like their asset, so each evaluation is recorded against its shard.
    assert all(spec.partitions_def == graph.get(spec.asset_key).partitions_def for spec in specs.values())


@pytest.mark.parametrize("member_steps", [False, True])
def test_every_check_is_declared_by_the_asset_it_checks(tmp_path, member_steps):
    # No separate check definitions: each check is part of the definition (and so the step) that
    # makes its asset.
    panel, path = write_panel(tmp_path)
    graph = build_definitions(panel, path, storage_dir=str(tmp_path / "s"), cache_path=str(tmp_path / "c.sqlite"),
                              member_steps=member_steps).resolve_asset_graph()
    for assets_def in build_assets(panel, path, member_steps=member_steps):
        assert {k.asset_key for k in assets_def.check_keys} <= set(assets_def.keys)
        for key in assets_def.keys:
            names = {check.name for check in _owned_checks(panel, key)}
            assert {k.name for k in assets_def.check_keys if k.asset_key == key} == names
    assert {k for a in build_assets(panel, path, member_steps=member_steps) for k in a.check_keys} == set(
        graph.asset_check_keys
    )


def _owned_checks(panel, key: dg.AssetKey) -> list[c.StageCheck]:
    """The checks the module that owns `key` declares for it."""
    owned = {
        prompts_module.PROMPTS_KEY: list(prompts_module.PROMPT_CHECKS),
        generations_module.COMBINED_KEY: generations_module.COMBINED_CHECKS,
        pooling_module.POOLED_KEY: pooling_module.pooled_checks(panel.jury, panel.thresholds),
        preferences_module.PAIRS_KEY: preferences_module.pair_checks(panel.binarization),
        **{generations_module.generation_key(m): generations_module.generation_checks(panel.thresholds) for m in panel.generators},
        **{judging_module.ratings_key(m): judging_module.rating_checks(panel.thresholds, get_rubric(panel.judging.aspect))
           for m in panel.judges},
    }
    return owned[key]


def test_every_stage_module_owns_checks_for_its_assets(tmp_path):
    # Only combined_generations declares none (a reshaping of checked frames, whose coverage
    # pooled_ratings checks); every other asset's module declares at least one, with a description.
    panel, path = write_panel(tmp_path)
    keys = {k for a in build_assets(panel, path) for k in a.keys}
    without = {k.to_user_string() for k in keys if not _owned_checks(panel, k)}
    assert without == {"combined_generations"}
    assert all(check.description for k in keys for check in _owned_checks(panel, k))


def test_a_check_that_needs_the_step_input_refuses_to_run_without_it(tmp_path):
    panel, _ = write_panel(tmp_path)
    checks = generations_module.generation_checks(panel.thresholds)
    with pytest.raises(ValueError, match="generations/gen_0:generations_valid needs step_input, but the step gave none"):
        c.evaluate_checks(checks, dg.AssetKey(["generations", "gen_0"]), generations())
    results = c.evaluate_checks(checks, dg.AssetKey(["generations", "gen_0"]), generations(), {c.STEP_INPUT: prompts()})
    assert [(r.check_name, r.passed) for r in results] == [
        ("generations_valid", True), ("pending_rows", True)]


# --- through the asset steps ---------------------------------------------------------------------

SHARD = "shard-00000"


def _events(result: dg.ExecuteInProcessResult, kind: str) -> list[dg.DagsterEvent]:
    return [e for e in result.all_events if e.event_type_value == kind]


def _evaluations(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str], dg.DagsterEvent]:
    return {
        (e.event_specific_data.asset_key.to_user_string(), e.event_specific_data.check_name): e
        for e in _events(result, "ASSET_CHECK_EVALUATION")
    }


def _materialized(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    """Asset -> the step that materialized it."""
    return {e.asset_key.to_user_string(): e.step_key for e in _events(result, "ASSET_MATERIALIZATION")}


def _run(tmp_path: Path, *, member_steps: bool = False, fail: dict[str, str] | None = None, extra: dict | None = None,
         prompts: list[str] | None = None, selection: dg.AssetSelection | None = None,
         ) -> tuple[dg.ExecuteInProcessResult, dg.Definitions]:
    """Run shard-00000 of the scripted panel; `prompts` replaces the source's prompt texts."""
    panel, path = write_panel(tmp_path, extra=extra)
    if prompts is not None:
        (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"), cache_path=str(tmp_path / "c.sqlite"),
                             member_steps=member_steps, resource_overrides=scripted_resources(panel, fail))
    if selection is None:
        result = defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=SHARD, raise_on_error=False)
    else:
        assets = build_assets(panel, path, member_steps=member_steps)
        resources = {**build_resources(panel, str(tmp_path / "storage"), str(tmp_path / "c.sqlite")),
                     **scripted_resources(panel, fail)}
        result = dg.materialize(assets, selection=selection, partition_key=SHARD, resources=resources,
                                raise_on_error=False)
    return result, defs


@pytest.mark.parametrize("member_steps", [False, True])
def test_checks_run_in_the_asset_steps_with_no_step_of_their_own(tmp_path, member_steps):
    result, defs = _run(tmp_path, member_steps=member_steps)
    assert result.success
    graph = defs.resolve_asset_graph()
    evaluations = _evaluations(result)
    assert set(evaluations) == {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    materialized = _materialized(result)
    steps = {e.step_key for e in _events(result, "STEP_START")}
    assert steps == set(materialized.values())  # a step per asset (or stage), none per check
    order = {id(e): i for i, e in enumerate(result.all_events)}
    stored_at = {e.asset_key.to_user_string(): order[id(e)] for e in _events(result, "ASSET_MATERIALIZATION")}
    for (asset, name), event in evaluations.items():
        assert event.event_specific_data.passed, (asset, name, event.event_specific_data.description)
        assert order[id(event)] > stored_at[asset]
        assert event.step_key == materialized[asset]
        assert event.event_specific_data.partition == SHARD
        # The evaluation points at the materialization its own step just stored.
        target = event.event_specific_data.target_materialization_data
        assert target is not None and target.run_id == result.run_id


def _corrupt(monkeypatch: pytest.MonkeyPatch, module: object, name: str, change) -> None:
    """Wrap `module.name` so what it returns is changed by `change` (the stage code made buggy on purpose)."""
    real = getattr(module, name)
    if name in ("generate", "judge"):
        async def wrapped(work, *args, **kwargs):  # work: the stage's MemberContext
            out = await real(work, *args, **kwargs)
            return dg.Output(change(work.member, out.value.copy()), metadata=out.metadata)
    else:
        def wrapped(*args, **kwargs):
            return change(real(*args, **kwargs))
    monkeypatch.setattr(module, name, wrapped)


def _drop_last_row_of_gen_1(member, df):
    return df.iloc[:-1] if member.name == "gen_1" else df


def _off_scale_rating_from_judge_1(member, df):
    if member.name == "judge_1":
        df.at[0, "ratings"] = [7, *list(df.at[0, "ratings"])[1:]]
    return df


def _shorten_pooled(pooled):
    pooled.avg = pooled.avg[:-1]
    return pooled


def _swap_ratings_of_first_pair(out):
    rows, dropped = out
    assert rows, "the scripted shard should give at least one pair"
    rows[0]["chosen_rating"], rows[0]["rejected_rating"] = rows[0]["rejected_rating"], rows[0]["chosen_rating"]
    return rows, dropped


COMBINED_CONDITIONS = ("one_row_per_prompt", "failure_rate", "ratings_on_scale", "unrated_verdict_rate")


def _condition(words: str) -> str | None:
    """The condition of a combined check that a case's failure words name first, if any."""
    head = words.split(":")[0]
    return head if head in COMBINED_CONDITIONS else None


# (asset, check, how the shard is made bad, words in the failure, blocking)
CASES = [
    ("prompts", "prompts_valid", {"prompts": ["  ", "", *PROMPTS[2:]]}, "the shard has no prompts", True),
    # the conditions of one combined check: the failing one is named in the description
    ("generations/gen_1", "generations_valid", (generations_module, "generate", _drop_last_row_of_gen_1),
     "one_row_per_prompt: no row for prompts", True),
    ("generations/gen_1", "generations_valid", {"fail": {"gen_1": "primary colours"}},
     "failure_rate: failure rate 0.500 > max_generation_failure_rate 0.1", True),
    ("ratings/judge_1", "ratings_valid", (judging_module, "judge", _off_scale_rating_from_judge_1),
     "ratings_on_scale: ratings off the 1-5 scale", True),
    ("ratings/judge_1", "ratings_valid", {"fail": {"judge_1": "primary colours"}},
     "unrated_verdict_rate: unrated verdict rate 0.500 > max_parse_failure_rate 0.2", True),
    ("pooled_ratings", "covers_every_generation", (pooling_module, "pool_ratings", _shorten_pooled),
     "pooled ratings do not cover every generation", True),
    ("pooled_ratings", "judge_agreement",
     {"extra": {"thresholds": {"max_generation_failure_rate": 0.1, "max_parse_failure_rate": 0.2, "min_agreement": 1.0}}},
     "< min_agreement 1.0", False),
    ("preference_pairs", "chosen_beats_rejected", (preferences_module, "preference_rows", _swap_ratings_of_first_pair),
     "chosen_rating not above rejected_rating: row 0", True),
    # a margin interval can only reach 4 when every judge rates 5 against 1: the shard's pairs are left out
    ("preference_pairs", "contested_pairs", {"extra": {"binarization": {"min_margin_low": 4.0}}},
     "contested pair(s) left out (min_judge_agreement=None, min_margin_low=4.0)", False),
]


@pytest.mark.parametrize("member_steps", [False, True], ids=["stage_steps", "member_steps"])
@pytest.mark.parametrize(("asset", "check", "bad", "words", "blocking"), CASES,
                         ids=[f"{a}:{n}:{_condition(w) or ''}" for a, n, _, w, _ in CASES])
def test_a_bad_shard_fails_its_check_in_the_asset_step(tmp_path, monkeypatch, member_steps, asset, check, bad, words,
                                                        blocking):
    options: dict = {}
    if isinstance(bad, tuple):
        _corrupt(monkeypatch, *bad)
    else:
        options = bad
    result, defs = _run(tmp_path, member_steps=member_steps, **options)

    evaluations = _evaluations(result)
    event = evaluations[(asset, check)]
    evaluation = event.event_specific_data
    assert not evaluation.passed and words in evaluation.description
    assert evaluation.blocking is blocking and evaluation.partition == SHARD
    if _condition(words):  # a combined check: its metadata names the one failing condition
        assert evaluation.metadata["failed_conditions"].value == _condition(words)
    assert evaluation.severity == (dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN)
    assert [k for k, e in evaluations.items() if not e.event_specific_data.passed] == [(asset, check)]

    # The check ran in the step that made the asset, after the asset was stored.
    materialized = _materialized(result)
    assert event.step_key == materialized[asset]
    assert partition_path(tmp_path / "storage", dg.AssetKey.from_user_string(asset), SHARD).is_file()

    graph = defs.resolve_asset_graph()
    key = dg.AssetKey.from_user_string(asset)
    downstream = {k.to_user_string() for k in dg.AssetSelection.assets(key).downstream().resolve(graph)} - {asset}
    downstream &= {k.to_user_string() for k in graph.materializable_asset_keys} - {"preference_dataset"}
    if blocking:
        assert not result.success
        failure = next(e for e in _events(result, "STEP_FAILURE") if e.step_key == event.step_key)
        assert "blocking asset check failed" in failure.event_specific_data.error.message
        assert f"{asset}: {check}" in failure.event_specific_data.error.message
        assert not downstream & set(materialized), "an asset was built on a shard a blocking check rejected"
        for stage in downstream:
            assert not partition_path(tmp_path / "storage", dg.AssetKey.from_user_string(stage), SHARD).exists()
    else:
        assert result.success and downstream <= set(materialized)


def test_a_subset_of_a_stage_evaluates_only_its_selected_checks(tmp_path):
    gen_0, gen_1 = dg.AssetKey(["generations", "gen_0"]), dg.AssetKey(["generations", "gen_1"])
    selection = dg.AssetSelection.assets("prompts", gen_0, gen_1) - dg.AssetSelection.checks(
        dg.AssetCheckKey(gen_0, "pending_rows"))
    # gen_1 fails every call: only gen_0 runs, and its one selected check is evaluated.
    result, _ = _run(tmp_path, fail={"gen_1": "*"}, selection=selection)
    assert not result.success
    assert set(_materialized(result)) == {"prompts", "generations/gen_0"}
    assert set(_evaluations(result)) == {("prompts", "prompts_valid"), ("generations/gen_0", "generations_valid")}


def test_ratings_metadata_counts_parse_failures_apart_from_failed_judge_calls(tmp_path):
    # judge_1's call on the first prompt fails: two verdicts without a rating, neither a parse failure.
    result, _ = _run(tmp_path, fail={"judge_1": "primary colours"})
    stored = {e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
              for e in _events(result, "ASSET_MATERIALIZATION")}
    meta = stored["ratings/judge_1"]
    assert meta["judge_call_failures"].value == 2
    assert meta["parse_failures"].value == 0 and meta["parse_failure_rate"].value == 0.0
    assert stored["ratings/judge_0"]["judge_call_failures"].value == 0


def test_pending_rows_are_the_transient_failures_only():
    frame = pd.DataFrame({"prompt_id": [P1, P2, "c" * 64, "d" * 64],
                          "error_kind": ["server", "bad_request", None, "connection"]})
    finding = check_pending_rows(frame)
    assert not finding.passed and finding.metadata == {"pending_rows": 2}
    assert finding.description.startswith("2 of 4 rows pending") and "aaaaaaaaaaaa, dddddddddddd" in finding.description
    assert check_pending_rows(frame.iloc[1:3]).passed  # a refusal fails the same way again: not pending


def test_contested_check_states_how_many_pairs_were_left_out_and_why(tmp_path):
    from poll_assets.assets.preferences import LeftOut, check_contested
    from poll_assets.scoring.confidence import LOW_AGREEMENT, NO_INTERVAL

    panel, _ = write_panel(tmp_path, extra={"binarization": {"min_judge_agreement": 0.75, "min_margin_low": 0.0}})
    assert check_contested(LeftOut(prompts={"tie": 2}), panel.binarization).passed  # ties are not contested pairs
    left_out = LeftOut(pairs={LOW_AGREEMENT: 2, NO_INTERVAL: 1})
    finding = check_contested(left_out, panel.binarization)
    assert not finding.passed
    assert finding.description == ("3 contested pair(s) left out (min_judge_agreement=0.75, min_margin_low=0.0): "
                                   f"2 {LOW_AGREEMENT}; 1 {NO_INTERVAL}")
    assert finding.metadata["pairs_left_out"] == 3
