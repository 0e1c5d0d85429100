"""What the instance holds of each shard, read for the run plan (engine/run_state.py), on a scripted
panel materialized in process: the plan agrees with Dagster's own stale status per (asset, shard)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import yaml
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from poll_assets.engine.run_state import asset_states
from poll_assets.panel import load_panel
from poll_assets.pipeline import build_definitions
from poll_assets.run_plan import CODE_CHANGED, MISSING, plan_shards
from poll_assets_tests.fake_panel import scripted_resources, write_panel
from poll_assets_tests.instance import make_dagster_home

SHARDS = ["shard-00000", "shard-00001", "shard-00002"]


def _job(tmp_path: Path, **panel_args):
    panel, path = write_panel(tmp_path, n_prompts=6, shard_size=2, **panel_args)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"),
                             cache_path=str(tmp_path / "cache.sqlite"), resource_overrides=scripted_resources(panel))
    return defs.resolve_implicit_global_asset_job_def()


def _run(job, instance, shards, assets=None) -> None:
    tags = ({"dagster/asset_partition_range_start": shards[0], "dagster/asset_partition_range_end": shards[-1]}
            if len(shards) > 1 else {})
    one = {"partition_key": shards[0]} if len(shards) == 1 else {}
    result = job.execute_in_process(instance=instance, tags=tags, asset_selection=assets, raise_on_error=False, **one)
    assert result.success


def _dagster_stale(instance, job) -> set[tuple[str, str]]:
    resolver = CachingStaleStatusResolver(instance, job.asset_layer.asset_graph, LoadingContextForTest(instance))
    return {(key.to_user_string(), shard) for key in job.asset_layer.selected_asset_keys for shard in SHARDS
            if resolver.get_status(key, shard) != StaleStatus.FRESH}


def test_the_plan_reads_missing_fresh_and_a_parent_remade_with_the_same_data(tmp_path: Path) -> None:
    job = _job(tmp_path)
    with dg.DagsterInstance.local_temp(str(make_dagster_home(tmp_path / "home"))) as instance:
        _run(job, instance, SHARDS[:2])  # one range run; shard-00002 never made
        plan = plan_shards(asset_states(instance, job), SHARDS)
        assert list(plan.todo) == ["shard-00002"] and set(plan.todo["shard-00002"].values()) == {MISSING}
        assert {shard for _, shard in _dagster_stale(instance, job)} == {"shard-00002"}

        _run(job, instance, ["shard-00002"])
        assert plan_shards(asset_states(instance, job), SHARDS).empty and not _dagster_stale(instance, job)

        # prompts re-made alone, in a range and alone: the same data version, so its children stay fresh.
        _run(job, instance, SHARDS[:2], [dg.AssetKey("prompts")])
        _run(job, instance, ["shard-00002"], [dg.AssetKey("prompts")])
        assert plan_shards(asset_states(instance, job), SHARDS).empty and not _dagster_stale(instance, job)


def test_a_changed_judge_is_stale_by_code_as_dagster_says_and_its_children_follow(tmp_path: Path) -> None:
    job = _job(tmp_path)
    with dg.DagsterInstance.local_temp(str(make_dagster_home(tmp_path / "home"))) as instance:
        _run(job, instance, SHARDS)
        judge = next(k for k in job.asset_layer.selected_asset_keys if k.path[0] == "ratings")
        # A new code version for one judge: the graph rebuilt with that judge's params changed.
        panel_file = tmp_path / "panel.yaml"
        raw = yaml.safe_load(panel_file.read_text())
        member = next(m for m in raw["judges"] if m["name"] == judge.path[1])
        member.setdefault("params", {})["max_new_tokens"] = 77
        panel_file.write_text(yaml.safe_dump(raw))
        panel, path = load_panel(panel_file)
        job2 = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"),
                                 cache_path=str(tmp_path / "cache.sqlite"),
                                 resource_overrides=scripted_resources(panel)).resolve_implicit_global_asset_job_def()
        plan = plan_shards(asset_states(instance, job2), SHARDS)
        for shard in SHARDS:
            assert plan.todo[shard] == {judge.to_user_string(): CODE_CHANGED, "pooled_ratings": f"after {judge.to_user_string()}",
                                        "preference_pairs": "after pooled_ratings"}
        # Dagster's resolver flags the root (the judge) only; the plan adds what will be re-made from it.
        assert _dagster_stale(instance, job2) == {(judge.to_user_string(), s) for s in SHARDS}


def test_a_tag_read_from_the_stored_json_is_the_one_dagster_unpacks() -> None:
    from poll_assets.engine.run_state import _Latest

    version = '{"method":"mean"}{"quote":"\\"x\\""}'  # a stage's code version is JSON text: quotes inside
    decoy = 'the text "dagster/code_version": "not this one"'  # in metadata, always inside an escaped string
    event = dg.AssetMaterialization("pooled_ratings", partition="shard-00000", metadata={"note": decoy},
                                    tags={"dagster/code_version": version, "dagster/data_version": "abc"})
    entry = dg.EventLogEntry(
        error_info=None, level="INFO", user_message="", run_id="r", timestamp=0.0,
        dagster_event=dg.DagsterEvent(event_type_value="ASSET_MATERIALIZATION", job_name="j",
                                      event_specific_data=_step_materialization(event)))
    stored = dg.serialize_value(entry)
    latest = _Latest(1, "shard-00000", "r", stored)
    assert latest.tag("dagster/code_version") == version and latest.tag("dagster/data_version") == "abc"
    assert latest.tag("dagster/input_data_version/prompts") is None
    compact = _Latest(1, "shard-00000", "r", stored.replace('"dagster/code_version": ', '"dagster/code_version":'))
    assert compact.tag("dagster/code_version") == version  # another layout: read by unpacking the event


def _step_materialization(event: dg.AssetMaterialization):
    from dagster._core.events import StepMaterializationData

    return StepMaterializationData(event)
