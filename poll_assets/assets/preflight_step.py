"""The preflight inside a run: the first thing every LLM stage step does, before any call.

Every step that calls a provider checks ALL the panel members the run will call, not only its own,
so whichever paid step starts first (under any executor, in a full run, a subset run or a
re-execution) fails before the run pays for anything when one member is not ready. The checks
themselves are `poll_assets.llm.preflight`; this module only finds the run's members.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import dagster as dg

from poll_assets.llm.preflight import PreflightError, preflight
from poll_assets.llm.resources import resource_key
from poll_assets.panel import Member, Panel


def run_members(context: dg.AssetExecutionContext, panel: Panel) -> list[Member]:
    """The panel members whose assets this run materializes: outputs named after a member, of a step
    that holds the member's resource, in the run's job (subset to the run's selection) and among the
    steps the run executes (a re-execution may run only some of them)."""
    by_name = {m.name: m for m in panel.members}
    steps = context.run.step_keys_to_execute
    names: set[str] = set()
    for data in context.job_def.asset_layer.data:
        if steps is not None and str(data.node_handle) not in steps:
            continue
        assets_def = data.assets_def
        for key in assets_def.keys:
            m = by_name.get(assets_def.get_output_name_for_asset_key(key))
            if m is not None and resource_key(m) in assets_def.required_resource_keys:
                names.add(m.name)
    return [m for m in panel.members if m.name in names]


def preflight_run(context: dg.AssetExecutionContext, panel: Panel, own: Sequence[Member]) -> None:
    """Fail the step (and so the run) naming every member of the run that is not ready. `own`: the
    step's own members, always checked, whatever the job's layout says."""
    in_run = {m.name for m in [*run_members(context, panel), *own]}
    members = [m for m in panel.members if m.name in in_run]
    try:
        preflight(members, os.environ)
    except PreflightError as exc:
        raise dg.Failure(description=str(exc), metadata={"not_ready": dg.MetadataValue.json(exc.members)},
                         allow_retries=False) from None
    context.log.info(f"preflight: {len(members)} members of this run are ready: {', '.join(m.name for m in members)}")
