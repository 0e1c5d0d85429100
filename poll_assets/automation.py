"""Scheduled re-runs with Dagster declarative automation.

Every asset gets the same condition. On a tick of the panel's cron (and only then) it requests
the (asset, shard) pairs that need work, and nothing else:

- **missing**: never materialized, e.g. a new shard after `num_examples` was raised;
- **failed**: the latest run that planned it failed;
- **pending rows**: its `pending_rows` check failed on the latest materialization (rows whose calls
  failed for a transient reason: an outage, a provider that stayed down); the re-run calls only those
  rows, the others come from the response cache;
- **code changed**: the asset's `code_version` changed since its last materialization (a judge's
  model, params or rubric version; each member hashes only its own settings);
- **upstream changed**: a parent was updated by a run that did not also update this asset, or a
  parent is requested on this tick (so a re-judged shard is re-pooled and re-binarized in the same run).

It skips a partition that is already running, whose parents are running or missing-and-not-requested,
or whose parent failed a blocking asset check on its latest materialization: re-running the child on
data a check rejected would defeat the check. Such a partition waits until its parent changes.

"Code changed" and "upstream changed" are events, noticed on whichever evaluation first sees them
(the sensor evaluates every 30 s or so). `.since(newly_updated())` keeps them true until the
partition is materialized again, so a change made at noon is acted on at the next cron tick.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from poll_assets.engine.metadata import PENDING_CHECK
from poll_assets.panel import Schedule
from poll_assets.run_liveness import fail_dead_runs

SENSOR_NAME = "poll_automation"
DEAD_RUN_SENSOR_NAME = "poll_dead_runs"

AC = dg.AutomationCondition


def rerun_condition(
    cron: str, timezone: str = "UTC", pending_checks: Sequence[dg.AssetCheckKey] = ()
) -> dg.AutomationCondition:
    """The condition every asset of the graph carries; see the module docstring. `pending_checks`
    are the `pending_rows` checks of the graph (only those: a failed agreement warning or a
    blocking check failed by refusals must not re-run a shard on every tick)."""
    updated = AC.newly_updated()
    code_changed = AC.code_version_changed().since(updated).with_label("code_version_changed_since_materialized")
    deps_changed = AC.any_deps_updated().since(updated).with_label("deps_updated_since_materialized")
    needs_run = AC.missing() | AC.execution_failed() | code_changed | deps_changed
    if pending_checks:
        # blocking_only=True (pending_rows is blocking) also keeps Dagster 1.13 from narrowing the
        # asset graph's own set of check keys in place, which `allow` does on the unfiltered set.
        pending = AC.any_checks_match(AC.check_failed(), blocking_only=True).allow(
            dg.AssetSelection.checks(*pending_checks))
        needs_run = needs_run | pending.with_label("has_pending_rows")
    needs_run = needs_run.with_label("missing_failed_stale_or_pending")
    parent_rejected = AC.any_deps_match(
        AC.any_checks_match(AC.check_failed(), blocking_only=True) & ~AC.will_be_requested()
    ).with_label("parent_failed_blocking_check")
    return (
        AC.cron_tick_passed(cron, timezone)
        & needs_run
        & ~AC.in_progress()
        & ~AC.any_deps_in_progress()
        & ~AC.any_deps_missing()
        & ~parent_rejected
    ).with_label(f"poll_rerun({cron}, {timezone})")


def with_rerun_condition(assets: list[dg.AssetsDefinition], schedule: Schedule) -> list[dg.AssetsDefinition]:
    pending = [key for a in assets for key in a.check_keys if key.name == PENDING_CHECK]
    condition = rerun_condition(schedule.cron, schedule.timezone, pending)
    return [a.map_asset_specs(lambda spec: spec.replace_attributes(automation_condition=condition)) for a in assets]


def build_automation_sensor(schedule: Schedule) -> dg.AutomationConditionSensorDefinition:
    """The sensor that evaluates the conditions. Running from the start when the panel enables the
    schedule; otherwise present but stopped, to be switched on under Automation in the UI."""
    status = dg.DefaultSensorStatus.RUNNING if schedule.enabled else dg.DefaultSensorStatus.STOPPED
    return dg.AutomationConditionSensorDefinition(
        SENSOR_NAME,
        target=dg.AssetSelection.all(),
        default_status=status,
        minimum_interval_seconds=30,
        description=(
            f"On cron `{schedule.cron}` ({schedule.timezone}): materialize every shard that is missing, "
            "whose last run failed, or whose code version or upstream data changed since it was made."
        ),
    )


def build_dead_run_sensor() -> dg.SensorDefinition:
    """Marks failed the runs of this host whose process died, so the re-run condition's next tick
    sees them as failed rather than in progress (see run_liveness). Always running: it pays nothing."""

    @dg.sensor(
        name=DEAD_RUN_SENSOR_NAME,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Marks FAILURE every STARTED run of this host whose process has exited (e.g. killed with kill -9).",
    )
    def _dead_runs(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        dead = fail_dead_runs(context.instance)
        for run in dead:
            context.log.warning(f"run {run.run_id} ({run.job_name}) marked failed: {run.reason}")
        return dg.SkipReason(f"{len(dead)} dead run(s) marked failed" if dead else "no dead runs")

    return _dead_runs
