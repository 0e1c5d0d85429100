"""The one call path: every LLM call of every asset goes through `run_calls`.

It looks requests up in the response cache, sends the rest within the member's limits
(concurrency, requests/minute, tokens/minute), retries transient failures with backoff, stores
each success in the cache as soon as it arrives, reports progress, and counts tokens for cost.
Retries live here and nowhere else: backends make exactly one attempt per `complete` call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from poll_assets.llm.base import (
    RETRYABLE_KINDS,
    CallRequest,
    Completion,
    FatalProviderError,
    ProviderError,
    request_key,
)
from poll_assets.llm.cache import CacheError, ResponseCache
from poll_assets.llm.limits import BatchStopped, CallLimits, estimate_tokens
from poll_assets.llm.resources import LLMResource
from poll_assets.panel import Price

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: before retry n, sleep uniform(0, min(cap, base * 2**(n-1))).

    A server's Retry-After is a floor: we never come back sooner than it asked (capped at
    `max_retry_after_s`, so a silly value cannot park a run for hours).
    """

    base_s: float = 1.0
    cap_s: float = 60.0
    max_retry_after_s: float = 300.0

    def delay(self, retry_number: int, retry_after: float | None, rng: random.Random) -> float:
        backoff = rng.uniform(0.0, min(self.cap_s, self.base_s * 2 ** (retry_number - 1)))
        if retry_after is not None and retry_after > 0:
            return max(backoff, min(retry_after, self.max_retry_after_s))
        return backoff


DEFAULT_RETRY = RetryPolicy()


@dataclass
class CallStats:
    calls: int = 0  # requests actually sent (attempts included)
    cache_hits: int = 0
    failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    retries: int = 0
    elapsed_s: float = 0.0

    def add(self, c: Completion) -> None:
        if c.cached:
            self.cache_hits += 1
        else:
            self.calls += c.attempts
            self.retries += max(0, c.attempts - 1)
            self.input_tokens += c.input_tokens
            self.output_tokens += c.output_tokens
        if not c.ok:
            self.failures += 1

    def cost_usd(self, price: Price | None) -> float | None:
        """What this batch's fresh calls cost at `price` (cache hits are free); None without a price."""
        if price is None:
            return None
        return (self.input_tokens * price.input_per_mtok + self.output_tokens * price.output_per_mtok) / 1e6

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CallBatch:
    completions: list[Completion]
    stats: CallStats = field(default_factory=CallStats)
    member: str = ""
    provider: str = ""
    model: str = ""
    label: str = ""
    cache_writes: bool = False

    @property
    def attempted(self) -> list[Completion]:
        """Completions that came from a request made in this batch (not from the cache)."""
        return [c for c in self.completions if not c.cached]

    @property
    def all_failed(self) -> bool:
        """True when at least one call was made and every call made failed: the provider looks down."""
        fresh = self.attempted
        return bool(fresh) and not any(c.ok for c in fresh)

    def failure_counts(self) -> dict[str, int]:
        """Failed rows by error kind, e.g. {"server": 3, "timeout": 1}."""
        return dict(Counter(c.error_kind or "other" for c in self.completions if not c.ok))

    def failure_message(self, label: str | None = None) -> str:
        """A message for failing an asset whose calls all failed: what failed, and how to resume."""
        where = label or self.label or self.member
        fresh = self.attempted
        failed = [c for c in fresh if not c.ok]
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(c.error_kind or "other" for c in failed).items()))
        last = failed[-1].error if failed else None
        ok_total = sum(1 for c in self.completions if c.ok)
        msg = (
            f"{where}: all {len(fresh)} calls to member {self.member!r} "
            f"(provider {self.provider}, model {self.model}) failed ({kinds})"
        )
        if last:
            msg += f"; last error: {last}"
        if all(c.error_kind in RETRYABLE_KINDS for c in failed):
            msg += ". The provider seems to be down or overloaded: re-materialize the partition later"
        else:
            msg += ". Fix the cause above, then re-materialize the partition"
        msg += "; " + _resume_note(ok_total, self.cache_writes) + "."
        return msg


class BatchAbortedError(RuntimeError):
    """A fatal provider error (bad key, unknown model) stopped the batch. Says what failed and how to resume."""

    def __init__(self, message: str, kind: str, completed: int):
        super().__init__(message)
        self.kind = kind
        self.completed = completed


_FIX_HINTS = {
    "auth": "the member's API key (the environment variable named by its api_key_env, or the provider default)",
    "not_found": "the member's model name or base_url in the panel file",
    "bad_request": "the member's request settings in the panel file",
}


def _resume_note(completed: int, cache_writes: bool) -> str:
    if cache_writes:
        return f"{completed} completed calls are cached and will not be requested again"
    return f"the response cache is off, so the {completed} completed calls will be requested again"


class _Progress:
    """Logs done/total, rate, ETA and failures, at most every `every_s` seconds and once at the end."""

    def __init__(self, emit: ProgressFn | None, label: str, total: int, hits: int, every_s: float):
        self.emit = emit
        self.label = label
        self.total = total
        self.hits = hits
        self.every_s = every_s
        self.start = time.monotonic()
        self.last = self.start
        self.done = 0
        self.failed = 0
        self.retries = 0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        fresh_total = self.total - self.hits
        rate = self.done / elapsed
        if self.done >= fresh_total:
            eta = "done"
        elif rate > 0:
            eta = f"ETA {_fmt_seconds((fresh_total - self.done) / rate)}"
        else:
            eta = "ETA unknown"
        return (
            f"{self.label}: {self.done + self.hits}/{self.total} done ({self.hits} from cache), "
            f"{rate:.1f} calls/s, {eta}, {self.failed} failed, {self.retries} retries, "
            f"{_fmt_seconds(elapsed)} elapsed"
        )

    def record(self, c: Completion) -> None:
        self.done += 1
        self.retries += max(0, c.attempts - 1)
        if not c.ok:
            self.failed += 1
        now = time.monotonic()
        if self.emit and now - self.last >= self.every_s:
            self.last = now
            self.emit(self.line())

    async def ticker(self) -> None:
        # Keeps the log alive when single calls are slower than the interval.
        while True:
            await asyncio.sleep(self.every_s)
            if self.emit and time.monotonic() - self.last >= self.every_s:
                self.last = time.monotonic()
                self.emit(self.line())


def _fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


async def _attempt_all(
    llm: LLMResource,
    backend: Any,
    request: CallRequest,
    key: str,
    limits: CallLimits,
    policy: RetryPolicy,
    rng: random.Random,
) -> Completion:
    """One request, with retries. Returns a Completion (ok or failed); raises FatalProviderError."""
    estimate = estimate_tokens(request)
    attempts = 0
    started = time.monotonic()
    while True:
        attempts += 1
        err: ProviderError
        try:
            async with limits.slot(estimate):
                try:
                    done = await asyncio.wait_for(backend.complete(request, llm.timeout_s), llm.timeout_s)
                except FatalProviderError:
                    # Stop before the slot is released, so no queued call starts after this one.
                    limits.stop()
                    raise
                except (ProviderError, asyncio.TimeoutError):
                    raise
                except Exception:
                    limits.stop()  # a backend bug: stop the batch the same way
                    raise
        except FatalProviderError:
            raise
        except ProviderError as exc:
            err = exc
        except asyncio.TimeoutError:
            err = ProviderError("timeout", f"{llm.provider} model {llm.model}: no response within {llm.timeout_s:g}s")
        else:
            limits.settle_tokens(estimate, done.input_tokens + done.output_tokens)
            done.attempts = attempts
            done.call_id = key
            done.cached = False
            return done
        if not err.retryable or attempts > llm.max_retries:
            return Completion(
                text=None,
                error=str(err),
                error_kind=err.kind,
                attempts=attempts,
                model=llm.model,
                call_id=key,
                latency_s=time.monotonic() - started,
            )
        if err.kind == "rate_limit" and err.retry_after:
            limits.pause_for(min(err.retry_after, policy.max_retry_after_s))
        await asyncio.sleep(policy.delay(attempts, err.retry_after, rng))


async def _release(backend: Any) -> None:
    """Let the backend close its client once no batch on this loop uses it (open sockets must not
    outlive the event loop that owns them)."""
    release = getattr(backend, "release", None)
    if release is not None:
        await release()


async def run_calls(
    llm: LLMResource,
    requests: Sequence[CallRequest],
    *,
    cache: ResponseCache | None = None,
    progress: ProgressFn | None = None,
    label: str | None = None,
    retry: RetryPolicy | None = None,
    progress_every_s: float = 5.0,
    seed: int | None = None,
) -> CallBatch:
    """Run the requests within the member's limits; one Completion per request, in order.

    Identical requests (same `request_key`) are sent once and shared; the copies count as cache
    hits. Failed calls come back as Completions with `error`/`error_kind` set. A
    FatalProviderError cancels the remaining calls and raises BatchAbortedError.
    """
    label = label or llm.member
    policy = retry or DEFAULT_RETRY
    rng = random.Random(seed)
    start = time.monotonic()
    provider = llm.provider
    keys = [request_key(provider, llm.model, llm.base_url, r) for r in requests]

    # The first occurrence of each key is requested; later ones reuse its answer.
    first_index: dict[str, int] = {}
    for i, k in enumerate(keys):
        first_index.setdefault(k, i)

    hits: dict[str, Completion] = {}
    if cache is not None and cache.reads and first_index:
        hits = await cache.aget_many(first_index)
    todo = [(k, i) for k, i in first_index.items() if k not in hits]
    duplicates = len(keys) - len(first_index)
    cache_writes = cache is not None and cache.writes

    report = _Progress(progress, label, len(keys), len(keys) - len(todo), progress_every_s)
    results: dict[str, Completion] = dict(hits)
    written = 0

    if todo:
        backend = llm.backend()
        if hasattr(backend, "hold"):
            backend.hold()
        limits = CallLimits.for_resource(llm, backend)
        if progress:
            rate = "".join(
                f", {name} {value}" for name, value in (("rpm", llm.rpm), ("tpm", llm.tpm)) if value is not None
            )
            progress(
                f"{label}: {len(keys)} requests to {llm.member} ({provider}: {llm.model}); "
                f"{len(hits)} from cache, {duplicates} duplicates, {len(todo)} to call "
                f"(concurrency {limits.max_concurrency}{rate})"
            )

        # A fixed set of workers pulls calls from one queue, so memory and scheduling work stay flat
        # however many calls the partition holds. Twice as many workers as slots: a call sleeping
        # before its retry holds no slot, and the spare workers keep the slots busy meanwhile.
        queue = iter(todo)
        failures: list[BaseException] = []

        async def worker() -> None:
            nonlocal written
            for key, index in queue:
                c = await _attempt_all(llm, backend, requests[index], key, limits, policy, rng)
                # Handed to the cache's writer thread before the next await: a paid-for answer is
                # never lost to a cancellation.
                if cache is not None and cache.submit(key, c, provider, llm.model):
                    written += 1
                results[key] = c
                report.record(c)

        workers = [asyncio.create_task(worker()) for _ in range(min(2 * limits.max_concurrency, len(todo)))]
        ticker = asyncio.create_task(report.ticker())
        try:
            done, pending = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
            failures = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]  # type: ignore[misc]
            if failures:
                # Abandon calls in flight or waiting; what already came back is queued for the cache.
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            ticker.cancel()
            for t in workers:
                if not t.done():
                    t.cancel()
            cache_error: CacheError | None = None
            if cache is not None and cache_writes:
                try:
                    await cache.aflush()
                except CacheError as exc:
                    cache_error = exc
            await _release(backend)
        if cache_error is not None:
            if not failures:
                raise cache_error
            written = 0  # the message below must not promise cached calls that were not written
        if failures:
            completed = (len(hits) + written) if cache_writes else sum(1 for c in results.values() if c.ok)
            fatal = next((e for e in failures if isinstance(e, FatalProviderError)), None)
            if fatal is None:
                # A backend bug or an error it failed to classify: stop, but keep what is cached.
                bug = next(e for e in failures if not isinstance(e, BatchStopped))
                raise RuntimeError(
                    f"{label}: member {llm.member!r} (provider {provider}, model {llm.model}): the backend raised "
                    f"{type(bug).__name__} instead of a ProviderError: {bug}; "
                    f"{_resume_note(completed, cache_writes)}"
                ) from bug
            hint = _FIX_HINTS.get(fatal.kind, "the cause above")
            message = (
                f"{label}: member {llm.member!r} (provider {provider}, model {llm.model}) stopped on a "
                f"{fatal.kind} error: {fatal}. {len(todo) - len(results)} of {len(todo)} calls were not completed. "
                f"Fix {hint}, then re-materialize the partition; {_resume_note(completed, cache_writes)}."
            )
            raise BatchAbortedError(message, fatal.kind, completed) from fatal

    completions: list[Completion] = []
    for i, k in enumerate(keys):
        c = results[k]
        if i != first_index[k]:
            c = dataclasses.replace(c, cached=True, extra=dict(c.extra))
        completions.append(c)

    batch = CallBatch(
        completions, member=llm.member, provider=provider, model=llm.model, label=label, cache_writes=cache_writes
    )
    for c in completions:
        batch.stats.add(c)
    batch.stats.elapsed_s = time.monotonic() - start
    if progress:
        progress(report.line() if todo else f"{label}: all {len(keys)} requests served from the cache")
    return batch


def run_calls_blocking(llm: LLMResource, requests: Sequence[CallRequest], **kwargs: Any) -> CallBatch:
    """`run_calls` for synchronous code (a fresh event loop; not for use inside a running loop)."""
    return asyncio.run(run_calls(llm, requests, **kwargs))
