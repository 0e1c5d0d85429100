"""One step per LLM stage: every member of the stage calls its provider at the same time.

Dagster's in-process executor (what `poll-assets run` and tests use) runs steps one after another,
and the multiprocess executor pays a process start-up (seconds: dagster, pandas, the SDKs) per step.
Running a stage's members as concurrent coroutines inside one step makes the stage take as long as
its slowest member, which is what the per-member concurrency limits are sized for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.engine.metadata import member_kinds
from poll_assets.engine.preflight_step import preflight_run
from poll_assets.engine.schema import ColumnSchema
from poll_assets.engine.shards import shard_events, shard_frames
from poll_assets.engine.checks import STEP_INPUT, StageCheck, asset_check_specs, evaluate_checks
from poll_assets.llm.base import CallRequest, ChatBackend, Completion, ProviderError, request_key
from poll_assets.llm.batch.runner import run_batch_calls
from poll_assets.llm.batch.settings import BatchPolicy
from poll_assets.llm.budget import BudgetLedger, BudgetSettings, MemberBudget, RunBudget
from poll_assets.llm.cache.response_cache import ResponseCache
from poll_assets.llm.online.policy import CallPolicy
from poll_assets.llm.pricing import Price
from poll_assets.llm.providers.registry import provider_spec
from poll_assets.llm.resources import ChatModelResource, ResponseCacheResource, member_backend, resource_key
from poll_assets.llm.online.runner import CallBatch, CallStats, run_calls
from poll_assets.panel import Member
from poll_assets.run_liveness import RUN_PROCESS_KEY


class SharedCalls:
    """The calls of every shard of a run, for one member, sent through ONE `run_calls` per round:
    the shards' requests overlap within the member's limits instead of waiting for each other. A
    round is sent when every shard still working has handed in its requests (`submit`); a shard
    that is done (`finish`) is no longer waited for. Most work sends one round; a judge's repair
    re-asks are later rounds. Each shard gets back its own part (its completions, and stats counted
    over them)."""

    def __init__(self, send: Callable[[Sequence[CallRequest]], Awaitable[CallBatch]], shards: int,
                 on_nothing: Callable[[], None] = lambda: None):
        self._send = send
        self._on_nothing = on_nothing  # every shard finished without sending anything
        self._working = shards
        self._sent = False
        self._parts: list[tuple[list[CallRequest], asyncio.Future[CallBatch]]] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def submit(self, requests: Sequence[CallRequest]) -> CallBatch:
        future: asyncio.Future[CallBatch] = asyncio.get_running_loop().create_future()
        self._parts.append((list(requests), future))
        self._next_round()
        return await future

    def finish(self) -> None:
        """A shard's work is over (done, or failed): the others stop waiting for it."""
        self._working -= 1
        self._next_round()

    def _next_round(self) -> None:
        if self._parts and len(self._parts) == self._working:
            parts, self._parts, self._sent = self._parts, [], True
            self._tasks.append(asyncio.ensure_future(self._run(parts)))
        elif self._working == 0 and not self._sent:
            self._sent = True
            self._on_nothing()

    async def _run(self, parts: list[tuple[list[CallRequest], asyncio.Future[CallBatch]]]) -> None:
        try:
            batch = await self._send([r for requests, _ in parts for r in requests])
        except Exception as exc:  # every shard of this member fails with it (e.g. an invalid key)
            for _, future in parts:
                future.set_exception(exc)
            return
        except BaseException:
            for _, future in parts:
                future.cancel()
            raise
        start = 0
        for requests, future in parts:
            future.set_result(batch_part(batch, start, start + len(requests)))
            start += len(requests)


def batch_part(batch: CallBatch, start: int, end: int) -> CallBatch:
    """The completions [start, end) of a batch, with the per-call counts taken over them; what
    belongs to the whole batch (elapsed time, the provider batches used, the 429s met, the
    concurrency the member settled at and the outages its breaker rode out) is kept as it is."""
    # A fresh CallStats, so every per-call count (token usage by billing included) starts at zero.
    whole = batch.stats
    stats = CallStats(elapsed_s=whole.elapsed_s, batches=whole.batches, rate_limited=whole.rate_limited,
                      concurrency=whole.concurrency, outages=whole.outages, probes=whole.probes)
    for completion in batch.completions[start:end]:
        stats.add(completion)
    return replace(batch, completions=batch.completions[start:end], stats=stats)


class BackendGate:
    """A stage's members build their provider clients only when some of their calls are not cached
    (building one imports its SDK: seconds for some, and llama.cpp loads its weights), and all of
    them before any member sends: an import on the event loop would stall every call in flight. So
    a warm re-run imports no SDK, and a cold run imports them all before the first request. The
    step's check before its first paid call (`before_paying`: the preflight's model listing) runs
    here too, once, for whichever members will send."""

    def __init__(self, members: int, before_paying: Callable[[], None] | None = None):
        self._waiting = members
        self._open = asyncio.Event()
        self._before_paying = before_paying
        self._checked: asyncio.Future[None] | None = None

    async def passed(self) -> None:
        """This member has said whether it needs its client; wait until every member has."""
        self.leave()
        await self._open.wait()

    def leave(self) -> None:
        """This member will not send (it failed first, or has nothing to send)."""
        self._waiting -= 1
        if self._waiting <= 0:
            self._open.set()

    async def cleared_to_pay(self) -> None:
        """This member is about to make calls the cache cannot answer: the check runs once (in a
        thread: it may call the network), and every member that pays waits for it, or fails with it."""
        if self._before_paying is None:
            return
        if self._checked is None:
            self._checked = asyncio.ensure_future(asyncio.to_thread(self._before_paying))
        await asyncio.shield(self._checked)


class CacheOnlyBackend(ChatBackend):
    """A member's identity for the response cache (the call ids), without its client: for a batch
    that the cache serves whole. A call reaching it means the cache lost an answer under us."""

    def __init__(self, resource: ChatModelResource):
        self.provider, self.model = resource.provider, resource.model
        self.member, self.base_url = resource.member, resource.base_url

    async def complete(self, request: CallRequest) -> Completion:
        raise ProviderError("server", f"{self.who}: an answer found in the response cache a moment ago is gone")


@dataclass
class MemberCalls:
    """How one member's batch is sent: through `run_calls`, under its policy, with its backend built
    only if the cache cannot serve the whole batch (see BackendGate)."""

    member: Member
    resource: ChatModelResource | ChatBackend  # tests bind a ChatBackend directly
    policy: CallPolicy
    cache: ResponseCache
    log: Callable[[str], None]
    label: str
    gate: BackendGate
    turn: asyncio.Lock | None = None  # in-process models take turns (see run_stage_step)
    budget: MemberBudget | None = None  # the run's spending cap (panel `budget:`), priced for this member

    async def send(self, requests: Sequence[CallRequest]) -> CallBatch:
        try:
            backend = await self._backend_for(requests)
        except BaseException:
            self.gate.leave()
            raise
        await self.gate.passed()
        if backend is None:
            await self.gate.cleared_to_pay()
            backend = member_backend(self.resource)  # every member builds before any member sends
        if self.turn is None:
            return await self._calls(backend, requests)
        async with self.turn:
            return await self._calls(backend, requests)

    async def _calls(self, backend: ChatBackend, requests: Sequence[CallRequest]) -> CallBatch:
        """Online, or through the provider's batch API when the member's `batch.enabled` (same cache
        keys, same CallBatch)."""
        if self.member.batch.enabled:
            batch_policy = BatchPolicy.resolve(self.member.batch, self.member.provider)
            return await run_batch_calls(backend, self.policy, batch_policy, requests, self.cache,
                                         progress=self.log, label=self.label)
        return await run_calls(backend, self.policy, requests, self.cache, progress=self.log, label=self.label,
                               budget=self.budget)

    async def _backend_for(self, requests: Sequence[CallRequest]) -> ChatBackend | None:
        """The cache-only backend when the cache holds every answer; None when the real one is needed."""
        if isinstance(self.resource, ChatBackend):
            return self.resource
        if not self.cache.reads or self.member.batch.enabled:  # a batch job's client is always built
            return None
        identity = CacheOnlyBackend(self.resource)
        keys = {request_key(identity.provider, identity.model, identity.base_url, r) for r in requests}
        return identity if await self.cache.aholds_all(keys) else None


@dataclass(frozen=True)
class RunSettings:
    """What the engine needs of the panel in every LLM stage step, whatever the stage: every member
    (a step checks all the run's members before any call), the run's spending cap, and by member
    name its price and its call policy (its `limits:` as resolved once by `pipeline.run_settings`;
    the engine hands it to the runner as it is)."""

    members: tuple[Member, ...]
    budget: BudgetSettings | None
    prices: Mapping[str, Price | None]
    policies: Mapping[str, CallPolicy]

    def price_of(self, member: Member) -> Price | None:
        return self.prices.get(member.name)


@dataclass
class MemberContext:
    """What one member's work on one shard gets from the engine: the member, its price, a log
    function, a label for messages, and the member's calls, which the run's shards send together.
    The stage's own settings are not here: the stage binds them into the work it hands the engine."""

    member: Member
    price: Price | None
    log: Callable[[str], None]
    label: str
    shared: SharedCalls
    finished: bool = False

    @classmethod
    def alone(cls, member: Member, backend: ChatModelResource | ChatBackend, policy: CallPolicy,
              cache: ResponseCache, log: Callable[[str], None], label: str,
              price: Price | None = None) -> MemberContext:
        """A member's work on one shard outside a stage step (tests call `generate` or `judge` so)."""
        calls = MemberCalls(member, backend, policy, cache, log, label, BackendGate(1))
        return cls(member, price, log, label, SharedCalls(calls.send, 1))

    async def run_calls(self, requests: Sequence[CallRequest]) -> CallBatch:
        """The member's requests through the one call path, under its policy, together with the
        run's other shards' requests of the same round."""
        return await self.shared.submit(requests)

    def close(self) -> None:
        """The shard's work is over: the other shards stop waiting for it."""
        if not self.finished:
            self.finished = True
            self.shared.finish()


# What a stage does for one member: (its context, the stage's input frame) -> that member's output.
# `generate` and `judge`, with the stage's settings bound (functools.partial), have this shape.
MemberWork = Callable[[MemberContext, pd.DataFrame], Coroutine[Any, Any, dg.Output[Any]]]


def stage_pool(members: Sequence[Member], default: str) -> str:
    """The Dagster pool of a stage step: the members' pool when they all share one, else `default`."""
    pools = {m.pool_name for m in members}
    return pools.pop() if len(pools) == 1 else default


def stage_multi_asset_kwargs(
    *,
    name: str,
    members: Sequence[Member],
    key_of: Callable[[Member], dg.AssetKey],
    group: str,
    code_versions: Mapping[str, str],
    descriptions: Mapping[str, str],
    input_name: str,
    default_pool: str,
    partitions_def: dg.PartitionsDefinition,
    checks: Sequence[StageCheck],
    columns: ColumnSchema,
) -> dict[str, Any]:
    """The `dg.multi_asset` arguments of an LLM stage: one optional output (asset) per member, with its
    own key, kinds, code_version and checks, the stage's one input, and the members' pool.
    `code_versions` and `descriptions`: by member name, as the stage made them from its settings."""
    return {
        "name": name,
        "outs": {
            m.name: dg.AssetOut(
                key=key_of(m),
                group_name=group,
                kinds=member_kinds(m),
                code_version=code_versions[m.name],
                description=descriptions[m.name],
                metadata=columns.definition_metadata(),
                is_required=False,
            )
            for m in members
        },
        "ins": {input_name: dg.AssetIn(input_name)},
        "partitions_def": partitions_def,
        "can_subset": True,
        "pool": stage_pool(members, default_pool),
        "required_resource_keys": {resource_key(m) for m in members} | {"response_cache", RUN_PROCESS_KEY},
        "check_specs": [s for m in members for s in asset_check_specs(checks, key_of(m), partitions_def)],
    }


def run_stage_step(
    context: dg.AssetExecutionContext,
    run: RunSettings,
    members: Sequence[Member],
    key_of: Callable[[Member], dg.AssetKey],
    step_input: Any,
    work: MemberWork,
    stage_checks: Sequence[StageCheck],
    input_name: str,
) -> Iterator[dg.Output[Any] | dg.AssetCheckResult | dg.AssetCheckEvaluation]:
    """The body of a stage step: first, every member of the run is checked; then the selected
    members do `work` on every shard of the run at the same time (each member's calls for all shards
    in one batch), and each shard's checks run on its output (see `run_stage`). `work` carries the
    stage's own settings, bound by the stage: the engine never holds them."""
    cache: ResponseCacheResource = context.resources.response_cache
    selected = [m for m in members if key_of(m) in context.selected_asset_keys]
    check_models = preflight_run(context, run.members, selected)
    checks = context.selected_asset_check_keys
    frames = shard_frames(context, input_name, step_input)
    gate = BackendGate(len(selected), before_paying=check_models)
    # In-process models share the CPU (and llama.cpp's per-model lock): running them side by side
    # gains nothing and would start their call timeouts while they wait, so they take turns.
    local_turn = asyncio.Lock()
    budget = run_budget(run.budget, context.run.run_id, cache)

    async def member_shards(m: Member) -> dict[str, dg.Output[Any]]:
        label = key_of(m).to_user_string()
        turn = local_turn if provider_spec(m.provider).in_process else None
        price = run.price_of(m)
        calls = MemberCalls(m, getattr(context.resources, resource_key(m)),  # resource keys are per member
                            run.policies[m.name], cache.get_cache(), context.log.info, label,
                            gate, turn, MemberBudget(budget, m.name, price) if budget and price else None)
        shared = SharedCalls(calls.send, len(frames), on_nothing=gate.leave)

        async def one(shard: str) -> dg.Output[Any]:
            work_ctx = MemberContext(m, price, context.log.info, label, shared)
            try:
                return await work(work_ctx, frames[shard])
            finally:
                work_ctx.close()

        return await shard_outcomes(label, list(frames), [one(s) for s in frames])

    yield from run_stage(
        context,
        selected,
        member_shards,
        key_of,
        checks=lambda m, shard, df: evaluate_checks(stage_checks, key_of(m), df, {STEP_INPUT: frames[shard]}, checks),
    )


def run_budget(settings: BudgetSettings | None, run_id: str, cache: ResponseCacheResource) -> RunBudget | None:
    """The run's budget, with what its earlier steps spent (the ledger beside the response cache)."""
    if settings is None:
        return None
    return RunBudget.open(settings, run_id, BudgetLedger(cache.resolved_path()))


async def shard_outcomes(
    label: str, shards: list[str], work: list[Coroutine[Any, Any, dg.Output[Any]]]
) -> dict[str, dg.Output[Any]]:
    """Every shard's output, or the failure: one shard's error as it is, several named by shard."""
    results = await asyncio.gather(*work, return_exceptions=True)
    failed = [(s, r) for s, r in zip(shards, results) if isinstance(r, BaseException)]
    for _, exc in failed:
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: not ours to reword
            raise exc
    if len(failed) == 1 or (failed and len(shards) == 1) or _one_cause(e for _, e in failed):
        raise failed[0][1]
    if failed:
        lines = [f"- {s}: {exc.description if isinstance(exc, dg.Failure) else exc}" for s, exc in failed]
        raise dg.Failure(description=f"{label}: {len(failed)} of {len(shards)} shards failed:\n" + "\n".join(lines)) from failed[0][1]
    return dict(zip(shards, results))  # type: ignore[arg-type]


def _one_cause(errors: Iterable[BaseException]) -> bool:
    """Every failure is the same exception (one check that failed every member that would pay):
    it is raised once, as it is, not listed once per member or shard."""
    return len({id(e) for e in errors}) == 1


def run_stage(
    context: dg.AssetExecutionContext,
    members: Sequence[Member],
    compute: Callable[[Member], Coroutine[Any, Any, Mapping[str, dg.Output[Any]]]],
    key_of: Callable[[Member], dg.AssetKey],
    checks: Callable[[Member, str, Any], Iterable[dg.AssetCheckResult]] | None = None,
) -> Iterator[dg.Output[Any] | dg.AssetCheckResult | dg.AssetCheckEvaluation]:
    """Run `compute` for every member concurrently; yield each success ({shard: output}) as that
    member's output, followed by `checks(member, shard, value)`, the results of its asset checks on
    each shard's value in hand.

    A failing member never cancels the others. Successes are yielded (and so stored) before the
    step fails, so a re-run only has to redo the member that failed, whose finished calls are cached.
    A member that failed has no output, so its checks are not evaluated.
    """

    async def _all() -> list[Mapping[str, dg.Output[Any]] | BaseException]:
        return await asyncio.gather(*(compute(m) for m in members), return_exceptions=True)

    results = asyncio.run(_all())
    failed: list[tuple[Member, BaseException]] = []
    for member, result in zip(members, results):
        if isinstance(result, BaseException):
            failed.append((member, result))
            continue
        made = {shard: (out, list(checks(member, shard, out.value)) if checks else []) for shard, out in result.items()}
        yield from shard_events(context, key_of(member), made, output_name=member.name)
    if not failed:
        return
    for member, exc in failed:
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: not ours to reword
            raise exc
    if len(failed) == 1 or _one_cause(e for _, e in failed):
        raise failed[0][1]
    lines = [f"- {m.name}: {exc.description if isinstance(exc, dg.Failure) else exc}" for m, exc in failed]
    raise dg.Failure(
        description=f"{len(failed)} of {len(members)} members failed; the others' outputs were stored:\n" + "\n".join(lines)
    ) from failed[0][1]
