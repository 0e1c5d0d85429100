"""Builds the whole Dagster graph from a panel: assets, resources, job."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from poll_assets.assets.generations import build_combined_asset, build_generation_asset, build_generation_stage
from poll_assets.assets.judging import build_ratings_asset, build_ratings_stage
from poll_assets.assets.pooling import build_pooled_asset
from poll_assets.assets.preferences import build_preferences_asset
from poll_assets.assets.prompts import ShardEstimate, build_prompts_asset
from poll_assets.assets.publishing import build_hub_publisher, build_publish_job
from poll_assets.automation import build_automation_sensor, build_dead_run_sensor, with_rerun_condition
from poll_assets.engine.stage import RunSettings
from poll_assets.estimate import estimate_prompts
from poll_assets.io_manager import ParquetIOManagerFactory, default_storage_dir
from poll_assets.llm.online.policy import CallPolicy
from poll_assets.llm.resources import build_cache_resource, build_llm_resource, resource_key
from poll_assets.panel import Panel
from poll_assets.partitions import backfill_policy, build_partitions_def
from poll_assets.rubrics.ultrafeedback import Rubric, get_rubric
from poll_assets.run_liveness import RUN_PROCESS_KEY, RunProcessResource
from poll_assets.shard_cost import overhead_share

JOB_NAME = "poll_job"


def build_assets(
    panel: Panel, panel_path: Path, *, member_steps: bool = False, rubric: Rubric | None = None
) -> list[dg.AssetsDefinition]:
    """One asset per stage, and one per generator and per judge, all on the same shards.

    By default the generators share one step, and the judges another, so a stage's members call
    their providers at the same time even under the in-process executor (see engine/stage.py).
    `member_steps=True` gives every member its own step and its own pool instead, for running
    members as separate processes with the multiprocess executor. `rubric`: the panel's, when the
    caller has resolved it already.
    """
    rubric = rubric or get_rubric(panel.judging.aspect)
    parts = build_partitions_def(panel.source)
    run = run_settings(panel)  # what the engine needs of the panel in every LLM stage step
    if member_steps:
        generators = [build_generation_asset(m, panel.source, panel.thresholds, run, parts, panel_path.parent)
                      for m in panel.generators]
        judges = [build_ratings_asset(m, panel.judging, panel.thresholds, rubric, run, parts) for m in panel.judges]
    else:
        generators = [build_generation_stage(panel.generators, panel.source, panel.thresholds, run, parts,
                                             base_dir=panel_path.parent)]
        judges = [build_ratings_stage(panel.judges, panel.judging, panel.thresholds, rubric, run, parts)]
    assets = [
        build_prompts_asset(panel.source, panel_path.parent, parts, shard_estimate(panel, rubric),
                            overhead_share(panel.shard_shape(), panel.source.shard_size)),
        *generators,
        build_combined_asset(panel.generators, parts),
        *judges,
        build_pooled_asset(panel.jury, panel.gold, panel.thresholds, parts, rubric,
                           panel.gold.location(panel_path) if panel.gold else None),
        build_preferences_asset(panel.jury, panel.binarization, parts),
    ]
    # A backfill runs `shards_per_run` shards per run; every step takes such a range (engine/shards.py).
    policy = backfill_policy(panel.source)
    return [a.with_attributes(backfill_policy=policy) for a in assets]


def run_settings(panel: Panel) -> RunSettings:
    """What every LLM stage step needs of the panel: its members, budget and prices, and each member's
    `limits:` resolved here, once per build of the graph, into the call policy the runner follows."""
    return RunSettings(tuple(panel.members), panel.budget, panel.member_prices(),
                       {m.name: CallPolicy.resolve(m.limits, m.provider) for m in panel.members})


def shard_estimate(panel: Panel, rubric: Rubric) -> ShardEstimate:
    """The cost estimate of one shard's prompts, shown on the prompts asset before any call (the two
    judging modes side by side only in `poll-assets estimate`: at 1,000 prompts a shard, pricing the other
    mode took 27 s of the prompts step)."""
    jury, prices = panel.jury, panel.member_prices()
    return lambda rows, cache, shard: estimate_prompts(jury, prices, rows, cache, rubric, partitions=[shard],
                                                       compare_modes=False)


def build_resources(panel: Panel, storage_dir: str | None = None, cache_path: str | None = None) -> dict[str, object]:
    """Every resource in one place: the IO manager, the response cache, the run's process tag, one LLM
    client per member."""
    storage_dir = storage_dir or default_storage_dir()
    resources: dict[str, object] = {
        "io_manager": ParquetIOManagerFactory(base_dir=storage_dir),
        "hub_publisher": build_hub_publisher(panel, storage_dir),
        "response_cache": build_cache_resource(panel.cache, cache_path),
        RUN_PROCESS_KEY: RunProcessResource(),  # tags each run with its process, for dead-run detection
    }
    for member in panel.members:
        resources[resource_key(member)] = build_llm_resource(member)
    return resources


def build_definitions(
    panel: Panel,
    panel_path: Path,
    *,
    storage_dir: str | None = None,
    cache_path: str | None = None,
    resource_overrides: Mapping[str, Any] | None = None,
    member_steps: bool = False,
) -> dg.Definitions:
    """Assets (with the scheduled re-run condition and their checks, which run in the asset's own
    step), the jobs and the automation sensor.

    `resource_overrides` replaces resources by key, e.g. a test binds a ChatBackend to `llm_<member>`.
    `member_steps=True` gives each generator and judge its own step (see `build_assets`)."""
    rubric = get_rubric(panel.judging.aspect)  # resolved once, passed to every stage that uses it
    assets = with_rerun_condition(build_assets(panel, panel_path, member_steps=member_steps, rubric=rubric),
                                  panel.schedule)
    dataset_spec, publish_job = build_publish_job(panel, rubric, panel.gold.location(panel_path) if panel.gold else None)
    job = dg.define_asset_job(JOB_NAME, selection=dg.AssetSelection.assets(*assets),
                              description=f"Every asset of the `{panel.name}` panel for one shard.")
    resources = build_resources(panel, storage_dir, cache_path)
    resources.update(resource_overrides or {})
    return dg.Definitions(
        assets=[*assets, dataset_spec],
        jobs=[job, publish_job],
        sensors=[build_automation_sensor(panel.schedule), build_dead_run_sensor()],
        resources=resources,
    )
