"""One step per LLM stage: every member of the stage calls its provider at the same time.

Dagster's in-process executor (what `poll-assets run` and tests use) runs steps one after another,
and the multiprocess executor pays a process start-up (seconds: dagster, pandas, the SDKs) per step.
Running a stage's members as concurrent coroutines inside one step makes the stage take as long as
its slowest member, which is what the per-member concurrency limits are sized for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any

import dagster as dg

from poll_assets.panel import Member


def stage_pool(members: Sequence[Member], default: str) -> str:
    """The Dagster pool of a stage step: the members' pool when they all share one, else `default`."""
    pools = {m.pool_name for m in members}
    return pools.pop() if len(pools) == 1 else default


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
            if m.provider != "local":
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
