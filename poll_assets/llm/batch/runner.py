"""Batch mode: the same requests and cache keys as `run_calls`, sent through a provider's batch API.

`run_batch_calls` returns the same `CallBatch` as `run_calls`, so the stage code does not change:

1. look every request up in the response cache;
2. resume the member's batches already recorded as open, and submit only the requests no open
   batch holds, split to respect the provider's limits;
3. record each batch id in the cache file (`BatchStore`) before waiting on it;
4. poll with backoff, logging counts by status;
5. write every result into the cache as it is downloaded. Requests that errored (retryably),
   expired or were cancelled go into a new batch, up to `max_retries` times, or online through
   `run_calls` when the member says `on_error: online`.

A run killed while it waits, then launched again, finds its batches open in the store and waits on
them again: no request reaches the provider twice.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from poll_assets.llm.base import (
    RETRYABLE_KINDS,
    CallRequest,
    ChatBackend,
    Completion,
    FatalProviderError,
    ProviderError,
    request_key,
)
from poll_assets.llm.batch.settings import BatchPolicy
from poll_assets.llm.batch.store import BatchRecord, BatchStore
from poll_assets.llm.batch.transport import BatchItem, BatchState, BatchTransport
from poll_assets.llm.cache.response_cache import ResponseCache
from poll_assets.llm.online.policy import CallPolicy
from poll_assets.llm.online.runner import CallBatch, _in_request_order, run_calls

ProgressFn = Callable[[str], None]
T = TypeVar("T")


class BatchWaitTimeout(RuntimeError):
    """A step waited `max_wait_s` for its batches; they stay recorded and a relaunch resumes them."""


def transport_for(backend: ChatBackend, policy: BatchPolicy) -> BatchTransport:
    """The batch transport of a member's backend, by the registry's wire format."""
    if policy.wire == "openai":
        from poll_assets.llm.batch.openai_api import OpenAIBatchTransport

        return OpenAIBatchTransport(backend)  # type: ignore[arg-type]
    from poll_assets.llm.batch.anthropic_api import AnthropicBatchTransport

    return AnthropicBatchTransport(backend)  # type: ignore[arg-type]


def split(lines: list[tuple[str, bytes]], max_requests: int, max_bytes: int) -> list[list[tuple[str, bytes]]]:
    """Consecutive chunks, each within both limits (a single line over `max_bytes` goes alone)."""
    chunks: list[list[tuple[str, bytes]]] = []
    size = 0
    for key, line in lines:
        if not chunks or len(chunks[-1]) >= max_requests or size + len(line) > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append((key, line))
        size += len(line)
    return chunks


@dataclass
class _Collector:
    """One member's batch work: what is pending, what came back, and what the batches were."""

    backend: ChatBackend
    policy: CallPolicy
    batch_policy: BatchPolicy
    transport: BatchTransport
    cache: ResponseCache
    store: BatchStore
    log: ProgressFn
    label: str
    pending: dict[str, CallRequest]
    results: dict[str, Completion] = field(default_factory=dict)
    errors: dict[str, ProviderError | None] = field(default_factory=dict)  # the last failure of each pending key
    tries: Counter[str] = field(default_factory=Counter)  # batches each key has been in
    jobs: list[dict[str, Any]] = field(default_factory=list)  # for the asset's metadata
    started: float = field(default_factory=time.monotonic)
    rng: random.Random = field(default_factory=random.Random)

    @property
    def who(self) -> tuple[str, str, str]:
        return self.backend.member, self.backend.provider, self.backend.model

    async def run(self) -> None:
        resumed = [r for r in await asyncio.to_thread(self.store.open_batches, *self.who)
                   if set(r.request_keys) & self.pending.keys()]
        if resumed:
            self.log(f"{self.label}: resuming {len(resumed)} batch(es) submitted earlier: "
                     f"{', '.join(r.batch_id for r in resumed)}")
        while self.pending:
            covered = {k for r in resumed for k in r.request_keys}
            batches = resumed + await self._submit([k for k in self.pending if k not in covered])
            resumed = []
            for record in batches:
                self.tries.update(k for k in record.request_keys if k in self.pending)
            self.jobs += await asyncio.gather(*(self._collect(r) for r in batches))
            self._settle()
            if self.pending and self.batch_policy.on_error == "online":
                await self._online()

    async def _submit(self, keys: list[str]) -> list[BatchRecord]:
        lines = [(k, self.transport.line(k, self.pending[k])) for k in keys]
        chunks = split(lines, self.batch_policy.max_requests, self.batch_policy.max_bytes)
        records = []
        for chunk in chunks:
            batch_id = await self._submit_one([line for _, line in chunk])
            # Durable before anything waits on it: a relaunch resumes this id instead of resubmitting.
            record = await asyncio.to_thread(self.store.record, batch_id, *self.who, [k for k, _ in chunk])
            self.log(f"{self.label}: submitted batch {batch_id} ({len(chunk)} requests, "
                     f"{sum(len(line) for _, line in chunk)} bytes)")
            records.append(record)
        return records

    async def _submit_one(self, lines: list[bytes]) -> str:
        # Retried only when the server answered that it is busy or broken: the batch was not created.
        return await self._retrying(lambda: self.transport.submit(lines), frozenset({"rate_limit", "server"}))

    async def _retrying(self, call: Callable[[], Awaitable[T]], kinds: frozenset[str] = RETRYABLE_KINDS) -> T:
        """A transport call, retried with the policy's backoff on the error kinds given."""
        for attempt in range(1, self.policy.max_retries + 2):
            try:
                return await call()
            except FatalProviderError:
                raise
            except ProviderError as err:
                if err.kind not in kinds or attempt > self.policy.max_retries:
                    raise
                await asyncio.sleep(self.policy.retry.delay(attempt, err.retry_after, self.rng))
        raise AssertionError("unreachable")

    async def _collect(self, record: BatchRecord) -> dict[str, Any]:
        """Wait for one batch, take its results, and mark it collected; returns its metadata entry."""
        state = await self._wait(record)
        requests = {k: self.pending[k] for k in record.request_keys if k in self.pending}
        items = await self._retrying(lambda: self.transport.results(record.batch_id, requests))
        for item in items:
            self._take(item, record.batch_id)
        if self.cache.writes:
            await self.cache.aflush()  # committed before the batch is marked collected
        counts = dict(Counter(i.outcome for i in items))
        if await self._all_taken(record, requests):
            await asyncio.to_thread(self.store.close, record.batch_id, counts)
        return {"batch_id": record.batch_id, "status": state.status, "requests": len(record.request_keys),
                "counts": counts}

    async def _all_taken(self, record: BatchRecord, requests: dict[str, CallRequest]) -> bool:
        """Whether every request of a batch is now answered in the cache or was ours to take. A batch
        resumed by another partition's run (it shared a request) holds answers this run cannot read:
        it stays open, so the partition that submitted it collects it instead of submitting again."""
        others = [k for k in record.request_keys if k not in requests]
        if not others:
            return True
        found = await self.cache.aget_many(others) if self.cache.reads else {}
        if len(found) == len(others):
            return True
        self.log(f"{self.label}: batch {record.batch_id} also holds {len(others) - len(found)} requests of another "
                 "run; it stays open for that run to collect")
        return False

    def _take(self, item: BatchItem, batch_id: str) -> None:
        """One downloaded result: into the cache at once if it succeeded, else remembered for a retry."""
        if item.completion is not None and item.completion.ok:
            c = item.completion
            c.call_id, c.cached, c.attempts = item.key, False, max(1, self.tries[item.key])
            c.extra = {**c.extra, "batch_id": batch_id}
            self.cache.submit(item.key, c, self.backend.provider, self.backend.model, member=self.backend.member)
            if item.key in self.pending:
                self.results[item.key] = c
                self.pending.pop(item.key)
        elif item.key in self.pending:
            self.errors[item.key] = item.error

    async def _wait(self, record: BatchRecord) -> BatchState:
        interval = self.batch_policy.poll_interval_s
        last: dict[str, int] | None = None
        while True:
            try:
                state = await self.transport.poll(record.batch_id)
            except FatalProviderError:
                raise
            except ProviderError as err:  # a hiccup while polling: the batch itself is fine
                self.log(f"{self.label}: batch {record.batch_id}: status check failed ({err}); checking again")
                state = None
            if state is not None and state.ended:
                self.log(f"{self.label}: batch {record.batch_id} {state.status}: {_counts(state.counts)}")
                return state
            waited = time.monotonic() - self.started
            if waited > self.batch_policy.max_wait_s:
                raise BatchWaitTimeout(
                    f"{self.label}: batch {record.batch_id} still pending after {waited:.0f}s "
                    f"(batch.max_wait_s {self.batch_policy.max_wait_s:g}); it stays recorded: re-materialize the "
                    "partition later to collect it without submitting its requests again"
                )
            if state is not None and state.counts != last:
                last = state.counts
                self.log(f"{self.label}: batch {record.batch_id} {state.status}: {_counts(state.counts)}, "
                         f"{waited:.0f}s waited")
            await asyncio.sleep(interval)
            interval = self.batch_policy.next_interval(interval)

    def _settle(self) -> None:
        """After a round: keys with no result and a final error, or out of tries, become failed completions."""
        for key in list(self.pending):
            err = self.errors.get(key, None)
            final = err is not None and not err.retryable
            if final or self.tries[key] > self.policy.max_retries:
                self.results[key] = _failed(key, err, self.tries[key], self.backend.model)
                self.pending.pop(key)
        if self.pending:
            why = Counter("expired or cancelled" if self.errors.get(k) is None else self.errors[k].kind
                          for k in self.pending)
            where = "online" if self.batch_policy.on_error == "online" else "in a new batch"
            self.log(f"{self.label}: {len(self.pending)} requests without a result ({_counts(why)}); sending them {where}")

    async def _online(self) -> None:
        keys = list(self.pending)
        online = await run_calls(self.backend, self.policy, [self.pending[k] for k in keys], self.cache,
                                 progress=self.log, label=f"{self.label} (online)")
        for key, c in zip(keys, online.completions):
            self.results[key] = c
        self.pending.clear()


def _failed(key: str, err: ProviderError | None, tries: int, model: str) -> Completion:
    if err is None:
        return Completion(text=None, error=f"the request expired or was cancelled in {tries} batch(es)",
                          error_kind="timeout", attempts=tries, model=model, call_id=key)
    return Completion(text=None, error=str(err), error_kind=err.kind, attempts=tries, model=model, call_id=key)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()) if n) or "no requests"


async def run_batch_calls(
    backend: ChatBackend,
    policy: CallPolicy,
    batch_policy: BatchPolicy,
    requests: Sequence[CallRequest],
    cache: ResponseCache,
    *,
    progress: ProgressFn | None = None,
    label: str | None = None,
    store: BatchStore | None = None,
    transport: BatchTransport | None = None,
) -> CallBatch:
    """The requests through the member's batch API; one Completion per request, in order (as `run_calls`).

    Batch ids are recorded in `store` (by default the `batches` table of the cache's file).
    """
    label = label or backend.member or backend.model
    log = progress or (lambda _line: None)
    start = time.monotonic()
    keys = [request_key(backend.provider, backend.model, backend.base_url, r) for r in requests]
    first_index: dict[str, int] = {}
    for i, k in enumerate(keys):
        first_index.setdefault(k, i)
    results = await cache.aget_many(first_index) if cache.reads else {}
    todo = {k: requests[i] for k, i in first_index.items() if k not in results}
    log(f"{label}: {len(keys)} requests to {backend.member} ({backend.provider}: {backend.model}) in batch mode; "
        f"{len(results)} from cache, {len(keys) - len(first_index)} duplicates, {len(todo)} to send")
    collector = _Collector(backend, policy, batch_policy, transport or transport_for(backend, batch_policy), cache,
                           store or BatchStore(cache.path), log, label, todo)
    if todo:
        backend.hold()
        try:
            await collector.run()
        finally:
            if cache.writes:
                await cache.aflush()
            await backend.release()
    results.update(collector.results)
    batch = CallBatch(_in_request_order(keys, first_index, results), member=backend.member, provider=backend.provider,
                      model=backend.model, label=label, cache_writes=cache.writes)
    for c in batch.completions:
        batch.stats.add(c)
    batch.stats.batches = collector.jobs
    batch.stats.elapsed_s = time.monotonic() - start
    failed = sum(1 for c in batch.completions if not c.ok)
    log(f"{label}: batch mode done: {len(keys) - failed}/{len(keys)} answered, {failed} failed, "
        f"{len(collector.jobs)} batch(es), {batch.stats.elapsed_s:.1f}s")
    return batch
