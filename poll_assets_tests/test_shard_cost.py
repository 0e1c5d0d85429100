"""The shard cost model (poll_assets/shard_cost.py), the default shard size it gives a panel that
leaves `source.shard_size` unset, and the prompts step that refuses to re-key a stored dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from poll_assets import shard_cost as sc
from poll_assets.assets.prompts import shard_size_conflict
from poll_assets.code_versions import prompts_version
from poll_assets.panel import PANELS_DIR, Source, load_panel
from poll_assets.partitions import shard_bounds, shard_keys
from poll_assets.pipeline import build_assets, build_definitions, build_resources
from poll_assets_tests.fake_panel import PROMPTS, write_panel_file
from poll_assets_tests.instance import make_dagster_home

REMOTE = sc.MemberLoad(calls_per_prompt=1, concurrency=10, call_s=1.0)


def shape(*stages: tuple[sc.MemberLoad, ...], events: int = 100, shards_per_run: int = 2) -> sc.ShardShape:
    return sc.ShardShape(tuple(stages), events, shards_per_run)


# --- the pure model ---------------------------------------------------------------------------

def test_overhead_share_is_the_fixed_cost_over_the_shards_whole_time():
    s = shape((REMOTE,))
    # 100 events x 10 ms + a 2 s run shared by 2 shards = 2 s; 20 prompts x 1 s / 10 in flight = 2 s
    assert sc.overhead_seconds(s, event_s=0.01, run_fixed_s=2.0) == pytest.approx(2.0)
    assert sc.call_seconds(s, 20) == pytest.approx(2.0)
    assert sc.overhead_share(s, 20, event_s=0.01, run_fixed_s=2.0) == pytest.approx(0.5)
    shares = [sc.overhead_share(s, n) for n in (10, 50, 100, 1000)]
    assert shares == sorted(shares, reverse=True) and shares[-1] < 0.05 < shares[0]


def test_a_stages_remote_members_call_side_by_side_and_in_process_ones_take_turns():
    slow = sc.MemberLoad(calls_per_prompt=2, concurrency=4, call_s=2.0)  # 1 s per prompt
    local = sc.MemberLoad(calls_per_prompt=1, concurrency=8, call_s=0.5, in_process=True)  # concurrency ignored
    assert sc.stage_seconds_per_prompt([REMOTE, slow]) == pytest.approx(1.0)
    assert sc.stage_seconds_per_prompt([local, local]) == pytest.approx(1.0)
    assert sc.stage_seconds_per_prompt([slow, local, local]) == pytest.approx(2.0)
    # stages follow each other: their times add up
    assert sc.call_seconds(shape((REMOTE, slow), (local,)), 10) == pytest.approx(10 * 1.5)


def test_size_for_share_is_the_smallest_size_meeting_the_target():
    s = shape((REMOTE,), (REMOTE,))
    n = sc.size_for_share(s, target=0.05)
    assert n is not None and sc.overhead_share(s, n) <= 0.05 < sc.overhead_share(s, n - 1)
    assert sc.size_for_share(shape((sc.MemberLoad(0, 1, 0.0),))) is None  # no call: nothing to weigh against


def test_the_default_is_the_first_ladder_size_at_or_above_what_the_target_needs():
    fast = sc.MemberLoad(calls_per_prompt=1, concurrency=16, call_s=0.5)
    s = shape((fast,), (fast,), events=41, shards_per_run=20)
    wanted = sc.size_for_share(s)
    assert wanted is not None and min(sc.SHARD_SIZE_LADDER) < wanted <= max(sc.SHARD_SIZE_LADDER)
    chosen = sc.default_shard_size(s)
    assert chosen in sc.SHARD_SIZE_LADDER and chosen >= wanted
    assert all(size < wanted for size in sc.SHARD_SIZE_LADDER if size < chosen)
    slow = shape((sc.MemberLoad(1, 1, 30.0),), events=41, shards_per_run=20)
    assert sc.default_shard_size(slow) == min(sc.SHARD_SIZE_LADDER)  # long calls: the smallest is enough
    assert sc.default_shard_size(shape((sc.MemberLoad(1, 1024, 0.01),))) == max(sc.SHARD_SIZE_LADDER)  # capped
    assert sc.default_shard_size(shape((sc.MemberLoad(0, 1, 0.0),))) == max(sc.SHARD_SIZE_LADDER)


# --- the panel's default ------------------------------------------------------------------------

def paper_raw(tmp_path: Path, *, concurrency: int | None = None, **source: Any) -> dict[str, Any]:
    """paper.yaml with the bundled prompts; shard_size unset unless given; every member's
    max_concurrency set to `concurrency` when given."""
    raw = yaml.safe_load((PANELS_DIR / "paper.yaml").read_text())
    raw["source"] = {"data_files": ["prompts.jsonl"], "column_mapping": {"prompt": "instruction"},
                     "num_examples": 4, **source}
    if concurrency is not None:
        for member in (*raw["generators"], *raw["judges"]):
            member["limits"] = {"max_concurrency": concurrency}
    return raw


def load(tmp_path: Path, raw: dict[str, Any], name: str = "panel.yaml"):
    return load_panel(write_panel_file(tmp_path, raw, prompts=PROMPTS, name=name))[0]


def test_an_unset_shard_size_is_chosen_by_the_model_and_an_explicit_one_wins(tmp_path):
    chosen = load(tmp_path, paper_raw(tmp_path, concurrency=64))
    assert chosen.source.shard_size_chosen and chosen.source.shard_size_origin == "default of the shard cost model"
    assert chosen.source.shard_size == sc.default_shard_size(chosen.shard_shape())
    assert chosen.source.shard_size > sc.LEGACY_DEFAULT_SHARD_SIZE  # 64 calls in flight: a bigger shard pays
    explicit = load(tmp_path, paper_raw(tmp_path, concurrency=64, shard_size=7), name="explicit.yaml")
    assert explicit.source.shard_size == 7 and not explicit.source.shard_size_chosen
    # the prompts' code version holds the size, whoever chose it
    same = load(tmp_path, paper_raw(tmp_path, concurrency=64, shard_size=chosen.source.shard_size), name="same.yaml")
    assert prompts_version(same.source) == prompts_version(chosen.source)


def test_a_bare_source_without_a_size_cannot_be_sharded():
    with pytest.raises(ValueError, match="source.shard_size is unset: load the source as part of a panel"):
        shard_bounds("shard-00000", Source(data_files=["p.jsonl"], num_examples=3))


def test_the_default_does_not_move_with_num_examples(tmp_path):
    # Raising num_examples appends shards; a default that followed it would re-key every shard.
    small = load(tmp_path, paper_raw(tmp_path, concurrency=64))
    big = load(tmp_path, paper_raw(tmp_path, concurrency=64, num_examples=100_000), name="big.yaml")
    assert small.source.shard_size == big.source.shard_size
    keys = shard_keys(big.source.num_examples, big.source.shard_size)
    assert keys[:1] == shard_keys(small.source.num_examples, small.source.shard_size)


@pytest.mark.parametrize("panel_file", ["paper.yaml", "local.yaml"])
def test_the_models_events_per_shard_count_the_built_graphs_assets_and_checks(tmp_path, panel_file):
    panel, path = load_panel(PANELS_DIR / panel_file)
    graph = build_definitions(panel, path, storage_dir=str(tmp_path / "s"),
                              cache_path=str(tmp_path / "c.sqlite")).resolve_asset_graph()
    partitioned = [k for k in graph.materializable_asset_keys if graph.get(k).partitions_def is not None]
    checks = [k for k in graph.asset_check_keys if graph.get(k.asset_key).partitions_def is not None]
    assert panel.shard_shape().events_per_shard == sc.events_per_shard(len(partitioned), len(checks))


# --- a stored dataset is not re-keyed silently ---------------------------------------------------

def test_a_chosen_size_that_differs_from_the_stored_shards_is_a_conflict(tmp_path):
    chosen = load(tmp_path, paper_raw(tmp_path, concurrency=64)).source
    problem = shard_size_conflict(50, chosen)
    assert problem is not None and "sharded 50 rows per shard" in problem and "source.shard_size: 50" in problem
    legacy = shard_size_conflict(None, chosen)  # stored before the size was recorded: unset meant 50
    assert legacy is not None and "when an unset shard_size meant 50" in legacy
    assert shard_size_conflict(chosen.shard_size, chosen) is None
    explicit = load(tmp_path, paper_raw(tmp_path, shard_size=7), name="explicit.yaml").source
    assert shard_size_conflict(50, explicit) is None  # the user's own choice


def _materialize_prompts(tmp_path: Path, raw: dict[str, Any], instance: dg.DagsterInstance, name: str):
    path = write_panel_file(tmp_path, raw, prompts=PROMPTS, name=name)
    panel, _ = load_panel(path)
    prompts = [a for a in build_assets(panel, path) if dg.AssetKey("prompts") in a.keys]
    resources = build_resources(panel, str(tmp_path / "storage"), str(tmp_path / "c.sqlite"))
    return dg.materialize(prompts, partition_key="shard-00000", instance=instance, resources=resources,
                          raise_on_error=False, selection=[dg.AssetKey("prompts")])


def test_the_prompts_step_shows_the_size_and_refuses_a_chosen_one_that_re_keys_stored_shards(tmp_path, monkeypatch):
    home = make_dagster_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = dg.DagsterInstance.local_temp(str(home))
    first = _materialize_prompts(tmp_path, paper_raw(tmp_path, shard_size=2), instance, "explicit.yaml")
    assert first.success
    (mat,) = first.asset_materializations_for_node("prompts")
    assert mat.metadata["shard_size"].value == 2 and mat.metadata["shard_size_from"].value == "source.shard_size"
    assert 0 < mat.metadata["shard_overhead_share"].value < 1

    # the same storage, the size now left to the model: the step fails before writing anything
    again = _materialize_prompts(tmp_path, paper_raw(tmp_path), instance, "unset.yaml")
    assert not again.success
    failure = next(e for e in again.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message
    assert "sharded 2 rows per shard" in message and "source.shard_size: 2" in message
    assert not again.asset_materializations_for_node("prompts")

    # a fresh instance: the chosen size is used and shown as chosen
    fresh_home = make_dagster_home(tmp_path / "fresh")
    fresh = _materialize_prompts(tmp_path, paper_raw(tmp_path), dg.DagsterInstance.local_temp(str(fresh_home)),
                                 "unset.yaml")
    assert fresh.success
    (mat,) = fresh.asset_materializations_for_node("prompts")
    assert mat.metadata["shard_size_from"].value == "default of the shard cost model"
    assert mat.metadata["shard_size"].value == load(tmp_path, paper_raw(tmp_path), "unset.yaml").source.shard_size
