"""Scheduled re-runs: on a cron tick, exactly the missing, failed or stale (asset, shard) pairs are requested.

The graph runs for real (Parquet files, a real temporary DagsterInstance, checks included) with
scripted in-process LLM clients; the automation conditions are evaluated tick by tick with
`dg.evaluate_automation_conditions`, carrying the cursor like the sensor does.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections import defaultdict
from pathlib import Path

import dagster as dg
import pytest
import yaml

from poll_assets.engine.metadata import PENDING_CHECK
from poll_assets.automation import SENSOR_NAME
from poll_assets.llm.base import ProviderError
from poll_assets.llm.online.policy import Limits
from poll_assets.llm.resources import resource_key
from poll_assets.panel import Panel, PanelConfigError, load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets_tests.fake_panel import scripted_resources, write_panel
from poll_assets_tests.instance import make_dagster_home

ALL = {"prompts", "generations/gen_0", "generations/gen_1", "combined_generations", "ratings/judge_0",
       "ratings/judge_1", "pooled_ratings", "preference_pairs"}
# An hour after a 03:00 tick, so "the next tick" is exactly one day later. In the future, so it
# is after every materialization the test makes.
START = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)).replace(hour=4, minute=0, second=0, microsecond=0)


class World:
    """One project: a panel on disk, its storage, cache and Dagster instance, and a tick clock."""

    def __init__(self, tmp_path: Path, template: Path | None = None) -> None:
        self.tmp = tmp_path
        home = tmp_path / "home"
        if template is not None:  # a copy of a finished world: instance, storage, cache and panel
            shutil.copytree(template, tmp_path, dirs_exist_ok=True)
            self.panel, self.path = load_panel(tmp_path / "panel.yaml")
        else:
            make_dagster_home(home)
            self.panel, self.path = write_panel(tmp_path)
        self.instance = dg.DagsterInstance.local_temp(str(home))
        self.cursor = None
        self.now = START

    def defs(self, panel: Panel | None = None, fail: dict[str, str] | None = None) -> dg.Definitions:
        panel = panel or self.panel
        return build_definitions(panel, self.path, storage_dir=str(self.tmp / "storage"),
                                 cache_path=str(self.tmp / "cache.sqlite"),
                                 resource_overrides=scripted_resources(panel, fail))

    def run(self, partition: str, *, panel: Panel | None = None, fail: dict[str, str] | None = None,
            assets: set[str] | None = None) -> dg.ExecuteInProcessResult:
        job = self.defs(panel, fail).resolve_job_def(JOB_NAME)
        selection = [dg.AssetKey.from_user_string(a) for a in sorted(assets)] if assets else None
        return job.execute_in_process(partition_key=partition, instance=self.instance, raise_on_error=False,
                                      asset_selection=selection)

    def tick(self, panel: Panel | None = None, *, advance: dt.timedelta = dt.timedelta(days=1)) -> set[tuple[str, str]]:
        """Evaluate the conditions `advance` after the previous tick; the requested (asset, shard) pairs."""
        self.now += advance
        defs = self.defs(panel)
        result = dg.evaluate_automation_conditions(defs=defs, instance=self.instance,
                                                   cursor=self.cursor, evaluation_time=self.now)
        self.cursor = result.cursor
        graph = defs.resolve_asset_graph()
        return {
            (key.to_user_string(), p)
            for key in graph.get_all_asset_keys()
            for p in result.get_requested_partitions(key)
        }

    def run_requested(self, requested: set[tuple[str, str]], panel: Panel | None = None) -> None:
        """Do what the sensor would launch: one run per shard with the requested assets."""
        by_partition: dict[str, set[str]] = defaultdict(set)
        for asset, partition in requested:
            by_partition[partition].add(asset)
        for partition, assets in by_partition.items():
            assert self.run(partition, panel=panel, assets=assets).success

    def close(self) -> None:
        self.instance.dispose()


@pytest.fixture(scope="module")
def both_shards_done(tmp_path_factory) -> Path:
    """A project with both shards materialized, made once and copied for each test."""
    folder = tmp_path_factory.mktemp("done")
    w = World(folder)
    for shard in ("shard-00000", "shard-00001"):
        assert w.run(shard).success
    w.close()
    return folder


@pytest.fixture
def world(both_shards_done, tmp_path):
    w = World(tmp_path, template=both_shards_done)
    assert w.tick(advance=dt.timedelta(0)) == set()  # the first evaluation only sets the cursor
    yield w
    w.close()


def pairs(assets: set[str], shards: list[str]) -> set[tuple[str, str]]:
    return {(a, s) for a in assets for s in shards}


def _with_judge_temperature(panel: Panel, temperature: float) -> Panel:
    j0 = panel.judges[0]
    j0 = j0.model_copy(update={"params": j0.params.model_copy(update={"temperature": temperature})})
    return panel.model_copy(update={"judges": [j0, *panel.judges[1:]]})


def test_unchanged_project_requests_nothing(world):
    assert world.tick() == set()
    assert world.tick() == set()


def test_new_shard_after_num_examples_raised(world):
    bigger = world.panel.model_copy(update={"source": world.panel.source.model_copy(update={"num_examples": 6})})
    requested = world.tick(bigger)
    assert requested == pairs(ALL, ["shard-00002"])
    world.run_requested(requested, bigger)
    assert world.tick(bigger) == set()


def test_changed_judge_reruns_only_its_ratings_and_downstream(world):
    changed = _with_judge_temperature(world.panel, 0.9)
    # The change is noticed between cron ticks and kept until the next tick; nothing runs before it.
    assert world.tick(changed, advance=dt.timedelta(hours=2)) == set()
    requested = world.tick(changed, advance=dt.timedelta(hours=22))
    assert requested == pairs({"ratings/judge_0", "pooled_ratings", "preference_pairs"}, ["shard-00000", "shard-00001"])
    world.run_requested(requested, changed)
    assert world.tick(changed) == set()


def test_failed_partition_is_retried_with_what_it_blocked(tmp_path):
    w = World(tmp_path)
    try:
        assert w.run("shard-00000").success
        failed = w.run("shard-00001", fail={"gen_1": "*"})  # every call of gen_1 fails: the step fails
        assert not failed.success
        assert w.tick(advance=dt.timedelta(0)) == set()
        requested = w.tick()
        expected = pairs(ALL - {"prompts", "generations/gen_0"}, ["shard-00001"])
        assert requested == expected
        w.run_requested(requested)
        assert w.tick() == set()
    finally:
        w.close()


def test_no_request_between_cron_ticks_even_when_work_is_due(tmp_path):
    w = World(tmp_path)
    try:
        assert w.tick(advance=dt.timedelta(0)) == set()
        assert w.tick(advance=dt.timedelta(hours=1)) == set()  # 05:00: every shard missing, no tick yet
        assert w.tick(advance=dt.timedelta(hours=22)) == pairs(ALL, ["shard-00000", "shard-00001"])  # past 03:00
    finally:
        w.close()


def test_child_of_a_failed_blocking_check_waits(tmp_path):
    # gen_1 fails on one prompt of two: it materializes, but its failure-rate check (0.5 > 0.1)
    # fails and blocks the rest of the shard. Re-running the children on the rejected data would
    # defeat the check, so the tick leaves the shard alone until gen_1 itself changes.
    w = World(tmp_path)
    try:
        assert w.run("shard-00000").success
        shard1_prompt = "Translate"  # the second prompt of shard-00001
        result = w.run("shard-00001", fail={"gen_1": shard1_prompt})
        assert not result.success
        assert w.tick(advance=dt.timedelta(0)) == set()
        assert w.tick() == set()
        fixed = w.panel.model_copy(update={"generators": [w.panel.generators[0],
                                                          w.panel.generators[1].model_copy(update={"model": "gen-model-1b"})]})
        requested = w.tick(fixed)
        # gen_1 changed everywhere; shard-00001's blocked children come along in the same run.
        assert requested == pairs(ALL - {"prompts", "generations/gen_0"}, ["shard-00000", "shard-00001"])
    finally:
        w.close()


def test_sensor_follows_the_panel_schedule(tmp_path):
    w = World(tmp_path)
    try:
        sensor = w.defs().resolve_sensor_def(SENSOR_NAME)
        assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
        off = w.panel.model_copy(update={"schedule": w.panel.schedule.model_copy(update={"enabled": False})})
        assert w.defs(off).resolve_sensor_def(SENSOR_NAME).default_status == dg.DefaultSensorStatus.STOPPED
        graph = w.defs().resolve_asset_graph()
        # preference_dataset is recorded by publish_job, not materialized per shard: no condition.
        labels = {graph.get(k).automation_condition.get_label() for k in graph.get_all_asset_keys() if graph.get(k).is_materializable}
        assert labels == {"poll_rerun(0 3 * * *, UTC)"}
    finally:
        w.close()


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"cron": "every night"}, "schedule.cron: Value error, 'every night' is not a valid cron expression"),
        ({"timezone": "Mars/Olympus"}, "schedule.timezone: Value error, 'Mars/Olympus' is not an IANA time zone"),
        ({"enabled": "sometimes"}, "schedule.enabled: Input should be a valid boolean"),
    ],
)
def test_bad_schedule_is_refused_with_its_field(tmp_path, schedule, message):
    _, path = write_panel(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["schedule"] = schedule
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PanelConfigError, match=f"{path}: {message}"):
        load_panel(path)


def test_schedule_defaults_to_off_and_bundled_panels_set_it():
    assert Panel.model_fields["schedule"].default_factory().enabled is False
    assert load_panel("local")[0].schedule.enabled is True
    assert load_panel("paper")[0].schedule.enabled is False


def test_pending_rows_are_requested_again_and_only_they_are_called(tmp_path):
    # gen_1's call for one prompt of shard-00001 fails with a 503-like error and is not retried
    # (max_retries 0, no retry window): the row is pending, its blocking pending_rows check fails,
    # and the next tick requests that shard again. The re-run calls gen_1 for that one row only.
    w = World(tmp_path)
    try:
        quick = Limits(max_retries=0, retry_window_s=0)
        gen_1 = w.panel.generators[1].model_copy(update={"limits": quick})
        panel = w.panel.model_copy(update={"generators": [w.panel.generators[0], gen_1]})
        assert w.run("shard-00000", panel=panel).success
        resources = scripted_resources(panel)
        backend = resources[resource_key(gen_1)]
        backend.script = lambda text, attempt: ProviderError("server", "HTTP 503") if "Translate" in text else None
        result = run_with(w, panel, resources, "shard-00001")
        assert not result.success  # pending rows fail the run instead of passing as a success
        failed = {(c.asset_key.to_user_string(), c.check_name) for c in result.get_asset_check_evaluations() if not c.passed}
        assert ("generations/gen_1", PENDING_CHECK) in failed and ("generations/gen_0", PENDING_CHECK) not in failed
        meta = w.instance.get_latest_materialization_event(dg.AssetKey(["generations", "gen_1"]))
        assert meta.asset_materialization.metadata[PENDING_CHECK].value == 1

        assert w.tick(panel, advance=dt.timedelta(0)) == set()
        requested = w.tick(panel)
        assert requested == pairs(ALL - {"prompts", "generations/gen_0"}, ["shard-00001"])
        backend.script = None  # the provider is back
        calls_before = backend.total_calls
        assets = [dg.AssetKey.from_user_string(a) for a, _ in sorted(requested)]
        assert run_with(w, panel, resources, "shard-00001", assets).success
        assert backend.total_calls - calls_before == 1  # only the pending row; the other came from the cache
        assert w.tick(panel) == set()
    finally:
        w.close()


def run_with(w: World, panel: Panel, resources: dict, partition: str, assets=None) -> dg.ExecuteInProcessResult:
    defs = build_definitions(panel, w.path, storage_dir=str(w.tmp / "storage"), cache_path=str(w.tmp / "cache.sqlite"),
                             resource_overrides=resources)
    return defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=partition, instance=w.instance,
                                                              raise_on_error=False, asset_selection=assets)
