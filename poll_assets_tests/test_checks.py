"""Asset checks: each pure check passes on good data and fails, naming the problem, on data made bad
on purpose; then a bad shard run through the real graph is stopped by a blocking check."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from poll_assets import checks as c
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets_tests.fake_panel import scripted_resources, write_panel

SCALE = (1, 2, 3, 4, 5)
P1, P2 = "a" * 64, "b" * 64


def prompts() -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [P1, P2], "instruction": ["one?", "two?"], "source_row": [0, 1]})


def generations(texts=("x", "y"), errors=(None, None)) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [P1, P2], "generation": list(texts), "error": list(errors)})


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
    assert c.check_prompts(prompts()).passed
    assert c.check_generation_rows(generations(), prompts()).passed
    assert c.check_generation_failures(generations(), 0.1).passed
    assert c.check_ratings_valid(ratings(), combined(), SCALE).passed
    assert c.check_parse_failures(ratings(), 0.0).passed
    assert c.check_pooled_coverage(pooled(), combined(), n_judges=2).passed
    assert c.check_agreement(c.pooled_alpha(pooled(), ["j0", "j1"], SCALE), 0.5).passed
    assert c.check_pairs(pairs()).passed


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (prompts().iloc[0:0], "the shard has no prompts"),
        (prompts().assign(prompt_id=[P1, P1]), "repeated prompt_id: aaaaaaaaaaaa"),
        (prompts().assign(instruction=["one?", "  "]), "rows with an empty instruction: 1"),
    ],
)
def test_prompts_check_fails(frame, message):
    finding = c.check_prompts(frame)
    assert not finding.passed and message in finding.description


def test_generation_rows_check_fails_on_missing_and_repeated_rows():
    gens = pd.DataFrame({"prompt_id": [P1, P1], "generation": ["x", "x"], "error": [None, None]})
    finding = c.check_generation_rows(gens, prompts())
    assert not finding.passed
    assert "no row for prompts bbbbbbbbbbbb" in finding.description
    assert "prompts with more than one row: aaaaaaaaaaaa" in finding.description


def test_generation_failure_rate_check_fails_above_threshold():
    finding = c.check_generation_failures(generations(texts=("x", None), errors=(None, "timeout")), 0.1)
    assert not finding.passed
    assert finding.metadata["failure_rate"] == 0.5
    assert "failure rate 0.500 > max_generation_failure_rate 0.1; failed prompts: bbbbbbbbbbbb" in finding.description
    assert c.check_generation_failures(generations(texts=("x", None), errors=(None, "timeout")), 0.5).passed


def test_ratings_check_fails_off_scale():
    finding = c.check_ratings_valid(ratings(ratings=[[4, 7], [3, None]]), combined(), SCALE)
    assert not finding.passed and "ratings off the 1-5 scale: aaaaaaaaaaaa[1]=7" in finding.description


def test_ratings_check_fails_on_none_without_reason():
    finding = c.check_ratings_valid(ratings(rating_errors=[[None, None], [None, None]]), combined(), SCALE)
    assert not finding.passed and "missing ratings without a reason: bbbbbbbbbbbb[1]" in finding.description


def test_ratings_check_fails_when_not_aligned_with_generations():
    bad = ratings(ratings=[[4], [3, None]], rationales=[["ok"], ["fine", None]], rating_errors=[[None], [None, "x"]])
    finding = c.check_ratings_valid(bad, combined(), SCALE)
    assert not finding.passed
    assert "ratings not aligned with generations: aaaaaaaaaaaa (1 ratings, 2 generations)" in finding.description


def test_parse_failure_check_fails_above_threshold():
    bad = ratings(ratings=[[None, 2], [3, None]], rating_errors=[["no rating found", None], [None, "generation failed"]])
    finding = c.check_parse_failures(bad, 0.2)
    # Three verdicts were asked for (shown_order), one came back unparseable; the failed generation is not counted.
    assert not finding.passed and finding.metadata["judged"] == 3 and finding.metadata["failures"] == 1
    assert "parse failure rate 0.333 > max_parse_failure_rate 0.2" in finding.description


def test_pooled_coverage_check_fails_on_a_missing_generation_slot():
    finding = c.check_pooled_coverage(pooled(avg_poll_ratings=[[4.5], [3.5, None]]), combined(), n_judges=2)
    assert not finding.passed
    assert "pooled ratings do not cover every generation: aaaaaaaaaaaa (1 pooled, 2 generations" in finding.description
    missing_prompt = c.check_pooled_coverage(pooled().iloc[:1], combined(), n_judges=2)
    assert not missing_prompt.passed and "prompts without pooled ratings: bbbbbbbbbbbb" in missing_prompt.description


def test_agreement_check_fails_below_threshold():
    opposed = pooled(poll_ratings=[[[5, 1], [1, 5]], [[4, None], [2, None]]])
    alpha = c.pooled_alpha(opposed, ["j0", "j1"], SCALE)
    assert alpha is not None and alpha < 0
    finding = c.check_agreement(alpha, 0.0)
    assert not finding.passed and "< min_agreement 0.0" in finding.description


def test_pairs_check_fails_when_chosen_not_higher_or_identical():
    finding = c.check_pairs(pairs(chosen_rating=[1.5], rejected_rating=[1.5]))
    assert not finding.passed and "chosen_rating not above rejected_rating: row 0" in finding.description
    same = pairs(rejected=pairs()["chosen"].tolist())
    finding = c.check_pairs(same)
    assert not finding.passed and "chosen is the same answer as rejected: row 0" in finding.description


def test_checks_are_blocking_except_agreement(tmp_path):
    panel, path = write_panel(tmp_path)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "s"), cache_path=str(tmp_path / "c.sqlite"))
    graph = defs.resolve_asset_graph()
    specs = {(k.asset_key.to_user_string(), k.name): graph.get_check_spec(k) for k in graph.asset_check_keys}
    assert len(specs) == 1 + 2 * len(panel.generators) + 2 * len(panel.judges) + 2 + 1
    non_blocking = {key for key, spec in specs.items() if not spec.blocking}
    assert non_blocking == {("pooled_ratings", "judge_agreement")}


def test_blocking_check_stops_downstream_on_a_bad_shard(tmp_path, dagster_home):
    # gen_1 fails on one of the shard's two prompts: its asset still materializes (one failure is
    # not a total failure), but a 0.5 failure rate is over 0.1, so its blocking check fails and
    # nothing downstream of it is built from the bad shard.
    panel, path = write_panel(tmp_path)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"), cache_path=str(tmp_path / "c.sqlite"),
                             resource_overrides=scripted_resources(panel, {"gen_1": "primary colours"}))
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def(JOB_NAME).execute_in_process(
            partition_key="shard-00000", instance=instance, raise_on_error=False
        )
        assert not result.success
        evaluations = {
            (e.asset_key.to_user_string(), e.check_name): e
            for e in (ev.event_specific_data for ev in result.all_events if ev.event_type_value == "ASSET_CHECK_EVALUATION")
        }
        bad = evaluations[("generations/gen_1", "failure_rate")]
        assert not bad.passed and bad.metadata["failure_rate"].value == 0.5
        assert evaluations[("generations/gen_0", "failure_rate")].passed
        materialized = {
            e.asset_key.to_user_string() for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"
        }
        assert materialized == {"prompts", "generations/gen_0", "generations/gen_1"}
    storage = tmp_path / "storage"
    assert (storage / "generations" / "gen_1" / "shard-00000.parquet").is_file()
    for stage in ("combined_generations", "pooled_ratings", "preference_pairs"):
        assert not (storage / stage / "shard-00000.parquet").exists()
