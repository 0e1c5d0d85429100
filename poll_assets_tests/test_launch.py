"""CLI runs recorded under the code location `poll-assets ui` serves (engine/launch.py)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import yaml

from poll_assets.engine.launch import WORKSPACE, runs_from_location, workspace_job_origin
from poll_assets_tests.instance import make_dagster_home


@dg.op
def _one() -> int:
    return 1


@dg.job
def tiny() -> None:
    _one()


@dg.job
def other() -> None:
    _one()


def test_the_origin_is_the_workspace_location_the_ui_loads() -> None:
    (entry,) = yaml.safe_load(WORKSPACE.read_text())["load_from"]
    origin = workspace_job_origin("__ASSET_JOB")
    assert origin.location_name == entry["python_module"]["location_name"] == "poll_assets"
    assert origin.repository_origin.repository_name == "__repository__" and origin.job_name == "__ASSET_JOB"
    assert origin.repository_origin.code_location_origin.loadable_target_origin.module_name == "poll_assets.definitions"


def test_without_a_workspace_file_the_origin_is_the_definitions_module(tmp_path: Path) -> None:
    origin = workspace_job_origin("__ASSET_JOB", workspace=tmp_path / "none.yaml")
    assert origin.repository_origin.code_location_origin.loadable_target_origin.module_name == "poll_assets.definitions"


def test_runs_of_the_job_get_the_origin_within_the_block_only(tmp_path: Path) -> None:
    origin = workspace_job_origin("tiny")
    with dg.DagsterInstance.local_temp(str(make_dagster_home(tmp_path / "home"))) as instance:
        with runs_from_location(instance, origin):
            inside = tiny.execute_in_process(instance=instance).dagster_run
            unrelated = other.execute_in_process(instance=instance).dagster_run
        after = tiny.execute_in_process(instance=instance).dagster_run
        stored = instance.get_run_by_id(inside.run_id)
        assert stored is not None and stored.remote_job_origin == origin
        assert instance.get_run_by_id(unrelated.run_id).remote_job_origin is None  # another job's name: untouched
        assert instance.get_run_by_id(after.run_id).remote_job_origin is None  # the instance is itself again
