"""One step per LLM stage: every member of the stage calls its provider at the same time.

Dagster's in-process executor (what `poll-assets run` and tests use) runs steps one after another,
and the multiprocess executor pays a process start-up (seconds: dagster, pandas, the SDKs) per step.
Running a stage's members as concurrent coroutines inside one step makes the stage take as long as
its slowest member, which is what the per-member concurrency limits are sized for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.assets.metadata import member_kinds
from poll_assets.assets.preflight_step import preflight_run
from poll_assets.assets.schema import ColumnSchema
from poll_assets.checks import STEP_INPUT, StageCheck, asset_check_specs, evaluate_checks
from poll_assets.llm.base import CallRequest, ChatBackend
from poll_assets.llm.batch import run_batch_calls
from poll_assets.llm.batch_settings import BatchPolicy
from poll_assets.llm.budget import BudgetLedger, MemberBudget, RunBudget
from poll_assets.llm.cache import ResponseCache
from poll_assets.llm.policy import CallPolicy
from poll_assets.llm.providers import provider_spec
from poll_assets.llm.resources import ResponseCacheResource, member_backend, resource_key
from poll_assets.llm.runner import CallBatch, run_calls
from poll_assets.panel import Member, Panel


@dataclass(frozen=True)
class MemberContext:
    """What one member's work in a stage step gets: its settings, its backend, its call policy
    (resolved once, here, from its `limits` and its provider's registry row), the response cache,
    a log function and a label for messages."""

    member: Member
    panel: Panel
    backend: ChatBackend
    policy: CallPolicy
    cache: ResponseCache
    log: Callable[[str], None]
    label: str
    budget: MemberBudget | None = None  # the run's spending cap (panel `budget:`), priced for this member

    async def run_calls(self, requests: Sequence[CallRequest]) -> CallBatch:
        """The member's requests through the one call path, under its policy: online, or through its
        provider's batch API when the member's `batch.enabled` (same cache keys, same CallBatch)."""
        if self.member.batch.enabled:
            batch_policy = BatchPolicy.resolve(self.member.batch, self.member.provider)
            return await run_batch_calls(self.backend, self.policy, batch_policy, requests, self.cache,
                                         progress=self.log, label=self.label)
        return await run_calls(self.backend, self.policy, requests, self.cache, progress=self.log, label=self.label,
                               budget=self.budget)


# What a stage does for one member: (its context, the stage's input frame) -> that member's output.
# `generate` and `judge` have this shape.
MemberWork = Callable[[MemberContext, pd.DataFrame], Coroutine[Any, Any, dg.Output[Any]]]


def stage_pool(members: Sequence[Member], default: str) -> str:
    """The Dagster pool of a stage step: the members' pool when they all share one, else `default`."""
    pools = {m.pool_name for m in members}
    return pools.pop() if len(pools) == 1 else default


def stage_multi_asset_kwargs(
    *,
    name: str,
    panel: Panel,
    members: Sequence[Member],
    key_of: Callable[[Member], dg.AssetKey],
    group: str,
    code_version_of: Callable[[Member], str],
    description_of: Callable[[Member], str],
    input_name: str,
    default_pool: str,
    partitions_def: dg.PartitionsDefinition,
    checks: Sequence[StageCheck],
    columns: ColumnSchema,
) -> dict[str, Any]:
    """The `dg.multi_asset` arguments of an LLM stage: one optional output (asset) per member, with its
    own key, kinds, code_version and checks, the stage's one input, and the members' pool."""
    return {
        "name": name,
        "outs": {
            m.name: dg.AssetOut(
                key=key_of(m),
                group_name=group,
                kinds=member_kinds(m),
                code_version=code_version_of(m),
                description=description_of(m),
                metadata=columns.definition_metadata(),
                is_required=False,
            )
            for m in members
        },
        "ins": {input_name: dg.AssetIn(input_name)},
        "partitions_def": partitions_def,
        "can_subset": True,
        "pool": stage_pool(members, default_pool),
        "required_resource_keys": {resource_key(m) for m in members} | {"response_cache"},
        "check_specs": [s for m in members for s in asset_check_specs(checks, key_of(m), partitions_def)],
    }


def run_stage_step(
    context: dg.AssetExecutionContext,
    panel: Panel,
    members: Sequence[Member],
    key_of: Callable[[Member], dg.AssetKey],
    frame: pd.DataFrame,
    work: MemberWork,
    stage_checks: Sequence[StageCheck],
) -> Iterator[dg.Output[Any] | dg.AssetCheckResult]:
    """The body of a stage step: the selected members do `work` on `frame` at the same time, and each
    one's checks run on its output (see `run_stage`). First, every member of the run is checked."""
    cache: ResponseCacheResource = context.resources.response_cache
    selected = [m for m in members if key_of(m) in context.selected_asset_keys]
    preflight_run(context, panel, selected)
    checks = context.selected_asset_check_keys
    budget = run_budget(panel, context.run.run_id, cache)

    def member_context(m: Member) -> MemberContext:
        backend = member_backend(getattr(context.resources, resource_key(m)))  # resource keys are per member
        price = panel.price_of(m)
        return MemberContext(m, panel, backend, CallPolicy.resolve(m.limits, m.provider), cache.get_cache(),
                             context.log.info, key_of(m).to_user_string(),
                             MemberBudget(budget, m.name, price) if budget and price else None)

    yield from run_stage(
        context,
        selected,
        lambda m: work(member_context(m), frame),
        checks=lambda m, df: evaluate_checks(stage_checks, key_of(m), df, {STEP_INPUT: frame}, checks),
    )


def run_budget(panel: Panel, run_id: str, cache: ResponseCacheResource) -> RunBudget | None:
    """The run's budget, with what its earlier steps spent (the ledger beside the response cache)."""
    if panel.budget is None:
        return None
    return RunBudget.open(panel.budget, run_id, BudgetLedger(cache.resolved_path()))


def run_stage(
    context: dg.AssetExecutionContext,
    members: Sequence[Member],
    compute: Callable[[Member], Coroutine[Any, Any, dg.Output[Any]]],
    checks: Callable[[Member, Any], Iterable[dg.AssetCheckResult]] | None = None,
) -> Iterator[dg.Output[Any] | dg.AssetCheckResult]:
    """Run `compute` for every member concurrently; yield each success as that member's output,
    followed by `checks(member, value)`, the results of its asset checks on the value in hand.

    A failing member never cancels the others. Successes are yielded (and so stored) before the
    step fails, so a re-run only has to redo the member that failed, whose finished calls are cached.
    A member that failed has no output, so its checks are not evaluated.
    """

    async def _all() -> list[dg.Output[Any] | BaseException]:
        # In-process models share the CPU (and llama.cpp's per-model lock): running them side by side
        # gains nothing and would start their call timeouts while they wait, so they take turns.
        local_turn = asyncio.Lock()

        async def one(m: Member) -> dg.Output[Any]:
            if not provider_spec(m.provider).in_process:
                return await compute(m)
            async with local_turn:
                return await compute(m)

        return await asyncio.gather(*(one(m) for m in members), return_exceptions=True)

    results = asyncio.run(_all())
    failed: list[tuple[Member, BaseException]] = []
    for member, result in zip(members, results):
        if isinstance(result, BaseException):
            failed.append((member, result))
            continue
        yield dg.Output(result.value, output_name=member.name, metadata=result.metadata)
        if checks is not None:  # after the output: a check result refers to the stored materialization
            yield from checks(member, result.value)
    if not failed:
        return
    for member, exc in failed:
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: not ours to reword
            raise exc
    if len(failed) == 1:
        raise failed[0][1]
    lines = [f"- {m.name}: {exc.description if isinstance(exc, dg.Failure) else exc}" for m, exc in failed]
    raise dg.Failure(
        description=f"{len(failed)} of {len(members)} members failed; the others' outputs were stored:\n" + "\n".join(lines)
    ) from failed[0][1]
