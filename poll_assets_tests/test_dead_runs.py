"""A run killed with kill -9 is marked failed, and the next cron tick requests its shard again.

A real `poll-assets run` runs in a subprocess against a temporary DAGSTER_HOME and the loopback
fake provider server, and is killed mid-run; the automation conditions are then evaluated tick by
tick as the sensor would.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from poll_assets.automation import DEAD_RUN_SENSOR_NAME
from poll_assets.panel import load_panel
from poll_assets.pipeline import build_definitions
from poll_assets.run_liveness import HOST_TAG, PID_TAG, fail_dead_runs, process_gone, process_tags
from poll_assets_tests.test_faults import KEY_ENV, PARTITION, REPO, http_panel_file

START = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)).replace(hour=4, minute=0, second=0, microsecond=0)


def cli(home: Path, panel: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), KEY_ENV: "fake-key", "DAGSTER_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "poll_assets.cli", "run", "--panel", str(panel)],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def killed_run(fake_llm, tmp_path):
    """A `poll-assets run` killed with SIGKILL once the provider has answered a few calls."""
    fake_llm.reset(latency_ms=300)
    panel_path = http_panel_file(tmp_path, fake_llm, 12, concurrency=2)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    proc = cli(home, panel_path, tmp_path)
    try:
        deadline = time.monotonic() + 90
        while fake_llm.stats()["total"] < 4:
            assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "the run never called the provider"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    instance = dg.DagsterInstance.from_config(str(home))
    yield instance, panel_path, home, proc.pid
    instance.dispose()


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor, when: dt.datetime):
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor, evaluation_time=when)
    graph = defs.resolve_asset_graph()
    requested = {(k.to_user_string(), p) for k in graph.get_all_asset_keys() for p in result.get_requested_partitions(k)}
    return requested, result.cursor


def test_killed_run_is_marked_failed_and_its_shard_requested_again(killed_run, tmp_path):
    instance, panel_path, home, pid = killed_run
    (run,) = instance.get_runs()
    assert run.status == dg.DagsterRunStatus.STARTED  # what Dagster alone leaves behind
    assert run.tags[PID_TAG] == str(pid)

    panel, path = load_panel(panel_path)
    defs = build_definitions(panel, path, storage_dir=str(home / "storage"), cache_path=str(home / "llm_cache.sqlite"))
    requested, cursor = tick(defs, instance, None, START)
    requested, cursor = tick(defs, instance, cursor, START + dt.timedelta(days=1))
    assert not {p for _, p in requested} & {PARTITION}  # still "in progress": the tick skips the shard

    sensor = defs.resolve_sensor_def(DEAD_RUN_SENSOR_NAME)
    skip = sensor(dg.build_sensor_context(instance=instance))
    assert "1 dead run(s) marked failed" in skip.skip_message
    run = instance.get_run_by_id(run.run_id)
    assert run.status == dg.DagsterRunStatus.FAILURE
    failure = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    assert f"its process {pid} on {run.tags[HOST_TAG]} has exited" in failure[-1].dagster_event.message

    requested, cursor = tick(defs, instance, cursor, START + dt.timedelta(days=2))
    assert ("generations/gen_openai", PARTITION) in requested
    assert ("preference_pairs", PARTITION) in requested
    assert fail_dead_runs(instance) == []  # marked once


@pytest.mark.slow
def test_next_poll_assets_run_reports_the_dead_run_and_finishes(killed_run, tmp_path, fake_llm):
    instance, panel_path, home, pid = killed_run
    fake_llm.configure(latency_ms=0)
    proc = cli(home, panel_path, tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"its process {pid} on" in out and "marked it failed" in out
    statuses = sorted(r.status.value for r in instance.get_runs())
    assert statuses == ["FAILURE", "SUCCESS"]


def test_live_and_foreign_processes_are_never_taken_for_dead():
    assert process_gone(process_tags()) is None  # this very process
    assert process_gone({**process_tags(), HOST_TAG: "another-host"}) is None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_gone(process_tags(child.pid) | {PID_TAG: str(child.pid)}) is not None
    reused = {**process_tags(), "poll-assets/pid_start": "1"}  # our pid, but another process's start time
    assert "another process" in process_gone(reused)


def test_a_step_holding_the_run_process_resource_tags_its_run():
    """A run launched without the CLI (the UI) gets its worker's host and pid from the resource."""
    import dagster as dg

    from poll_assets.run_liveness import RUN_PROCESS_KEY, RunProcessResource

    @dg.asset(required_resource_keys={RUN_PROCESS_KEY})
    def tagged() -> int:
        return 1

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([tagged], resources={RUN_PROCESS_KEY: RunProcessResource()}, instance=instance)
    tags = instance.get_run_by_id(result.run_id).tags
    assert tags[PID_TAG] == str(os.getpid()) and tags[HOST_TAG] == process_tags()[HOST_TAG]
