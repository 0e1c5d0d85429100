"""The preflight inside a run: every LLM stage step checks the run's members before any call.

Every step that calls a provider checks ALL the panel members the run will call, not only its own,
so whichever paid step starts first (under any executor, in a full run, a subset run or a
re-execution) fails before the run pays for anything when one member is not ready. It is done in
two parts: the offline checks (keys, base URLs, weights files) when the step starts, and the model
listing only when the step is about to make its first call the response cache cannot answer. So a
re-run that the cache serves whole asks no provider anything (and imports no SDK), and a run lists
the models once per process, not once per step. The checks themselves are `poll_assets.llm.preflight`;
this module only finds the run's members.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import dagster as dg

from poll_assets.llm.preflight import NotReady, PreflightError, preflight
from poll_assets.llm.resources import resource_key
from poll_assets.panel import Member


def run_members(context: dg.AssetExecutionContext, panel_members: Sequence[Member]) -> list[Member]:
    """The panel members whose assets this run materializes: outputs named after a member, of a step
    that holds the member's resource, in the run's job (subset to the run's selection) and among the
    steps the run executes (a re-execution may run only some of them)."""
    by_name = {m.name: m for m in panel_members}
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
    return [m for m in panel_members if m.name in names]


# Runs whose members' models this process has already listed (the in-process executor runs every
# step of a run in one process: the judges' step need not ask again).
_MODELS_LISTED: set[str] = set()


def preflight_run(context: dg.AssetExecutionContext, panel_members: Sequence[Member], own: Sequence[Member]) -> Callable[[], None]:
    """Fail the step (and so the run) naming every member of the run whose key, base URL or weights
    are not ready. `own`: the step's own members, always checked, whatever the job's layout says.
    Returns the model check, to be called before the step's first call that the cache cannot answer:
    it fails the same way, naming every member whose model the provider says it does not serve,
    and logs a warning for a model a list left out."""
    in_run = {m.name for m in [*run_members(context, panel_members), *own]}
    members = [m for m in panel_members if m.name in in_run]
    _fail_if_not_ready(lambda: preflight(members, os.environ, check_models=False))
    names = ", ".join(m.name for m in members)
    context.log.info(f"preflight: the {len(members)} members of this run pass the offline checks "
                     f"(keys, base URLs, weights files): {names}")
    run_id = context.run.run_id

    def check_models() -> None:
        if run_id in _MODELS_LISTED:
            return
        warnings = _fail_if_not_ready(lambda: preflight(members, os.environ))
        _MODELS_LISTED.add(run_id)
        for warning in warnings:  # a model a list left out: the run goes on, its first call decides
            context.log.warning(f"preflight: {warning.line()}")
        context.log.info(f"preflight: the {len(members)} members of this run are ready to be called: {names}")

    return check_models


def _fail_if_not_ready(check: Callable[[], list[NotReady]]) -> list[NotReady]:
    try:
        return check()
    except PreflightError as exc:
        raise dg.Failure(description=str(exc), metadata={"not_ready": dg.MetadataValue.json(exc.members)},
                         allow_retries=False) from None
