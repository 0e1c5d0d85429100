"""The one call path: every LLM call of every asset goes through `run_calls`.

It looks requests up in the response cache, claims the missing ones' leases in one transaction (so a
request is paid once across processes), sends the rest within the member's limits (an adaptive concurrency window,
requests/minute, tokens/minute), retries transient failures with backoff until both the retry count
and the retry window are spent, stops early when the circuit breaker says the provider is down,
stores each success in the cache as soon as it arrives, reports progress, and counts tokens for cost.
Retries live here and nowhere else: backends make exactly one attempt per `complete` call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from poll_assets.llm.base import (
    RETRYABLE_KINDS,
    CallRequest,
    ChatBackend,
    Completion,
    FatalProviderError,
    ProviderError,
    request_key,
)
from poll_assets.llm.budget import MemberBudget
from poll_assets.llm.cache.response_cache import DEFAULT_CLAIM_TTL_S, CacheError, ResponseCache, call_holding, default_owner
from poll_assets.llm.online.policy import CallPolicy, RetryPolicy
from poll_assets.llm.pricing import Price, TokenUsage
from poll_assets.llm.redact import safe_url
from poll_assets.llm.tokens import estimate_tokens

__all__ = ["BatchAbortedError", "CallBatch", "CallPolicy", "CallStats", "RetryPolicy", "RunInterrupted", "attempt",
           "enable_graceful_stop", "request_stop", "run_calls", "stop_requested"]

ProgressFn = Callable[[str], None]


@dataclass
class CallStats:
    calls: int = 0  # requests actually sent (attempts included)
    cache_hits: int = 0
    failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0  # part of input_tokens: read from the provider's prompt cache
    cache_write_tokens: int = 0  # part of input_tokens: written to it (Anthropic)
    retries: int = 0
    elapsed_s: float = 0.0
    rate_limited: int = 0  # 429s the member got
    concurrency: float = 0.0  # the size its concurrency window settled at (0: no call was made)
    batches: list[dict[str, Any]] = field(default_factory=list)  # batch mode: the provider batches used
    outages: list[float] = field(default_factory=list)  # outages the breaker rode out, seconds each
    probes: int = 0  # the breaker's probes while open
    # The fresh calls' tokens by how they were billed: online, or through a provider's batch API.
    online_usage: TokenUsage = field(default_factory=TokenUsage)
    batch_usage: TokenUsage = field(default_factory=TokenUsage)

    def add(self, c: Completion) -> None:
        if c.cached:
            self.cache_hits += 1
        else:
            self.calls += c.attempts
            self.retries += max(0, c.attempts - 1)
            self.input_tokens += c.input_tokens
            self.output_tokens += c.output_tokens
            self.cached_input_tokens += c.cached_input_tokens
            self.cache_write_tokens += c.cache_write_tokens
            usage = self.batch_usage if "batch_id" in c.extra else self.online_usage
            usage.add(c.input_tokens, c.output_tokens, c.cached_input_tokens, c.cache_write_tokens)
        if not c.ok:
            self.failures += 1

    def cost_usd(self, price: Price | None) -> float | None:
        """What this batch's fresh calls cost at `price` online and uncached (cache hits are free); None without a price."""
        return None if price is None else price.cost_usd(self.input_tokens, self.output_tokens)

    def paid_usd(self, price: Price | None) -> float | None:
        """What the fresh calls were billed: prompt-cache reads and writes and batch calls at their rates."""
        if price is None:
            return None
        return price.usage_cost_usd(self.online_usage) + price.usage_cost_usd(self.batch_usage, batch=True)


@dataclass
class CallBatch:
    completions: list[Completion]
    stats: CallStats = field(default_factory=CallStats)
    member: str = ""
    provider: str = ""
    model: str = ""
    label: str = ""
    cache_writes: bool = False
    breaker: str | None = None  # why the circuit breaker opened, if it did

    @property
    def provider_down(self) -> bool:
        """Every call made failed, or the circuit breaker opened: the asset should fail, not store gaps."""
        return self.all_failed or self.breaker is not None

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
        """A message for failing an asset whose provider is down: what failed, and how to resume."""
        where = label or self.label or self.member
        if self.breaker is not None:
            return self._breaker_message(where)
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

    def _breaker_message(self, where: str) -> str:
        failed = [c for c in self.completions if not c.ok]
        unsent = sum(1 for c in failed if c.attempts == 0 and not c.cached)
        ok_total = len(self.completions) - len(failed)
        rate = len(failed) / len(self.completions) if self.completions else 0.0
        return (
            f"{where}: member {self.member!r} (provider {self.provider}, model {self.model}) stopped early: "
            f"{self.breaker}. {len(failed)} of {len(self.completions)} calls failed (failure rate {rate:.3f}), "
            f"{unsent} of them never sent. Re-run the shard when the provider is back; "
            f"{_resume_note(ok_total, self.cache_writes)}."
        )


# A graceful stop of the whole process (the CLI sets it on Ctrl-C or SIGTERM): no call starts after
# it, the calls in flight finish and are cached, and each batch then raises RunInterrupted.
_STOP = threading.Event()
_NAP_S = 0.5  # how often a call waiting (backoff, open breaker) looks at the stop


def request_stop() -> None:
    """Start no more calls in this process; the ones in flight finish and their answers are cached."""
    _STOP.set()


class _GracefulSignals:
    """Ctrl-C and SIGTERM as a graceful stop (`request_stop`), while batches run in the main thread.

    Dagster puts its own handlers in place while it executes a run (they raise an interrupt inside
    the step at once, abandoning the calls in flight); the batches put this one back over them for
    as long as any batch runs. A second signal goes to the handler that was there before: an
    immediate stop."""

    def __init__(self) -> None:
        self.enabled = False
        self.notice: Callable[[str], None] | None = None
        self.depth = 0
        self.previous: dict[int, Any] = {}

    def handler(self, signum: int, frame: Any) -> None:
        if not _STOP.is_set():
            request_stop()
            if self.notice is not None:
                self.notice(signal.Signals(signum).name)
            return
        previous = self.previous.get(signum)
        if callable(previous) and previous is not self.handler:
            previous(signum, frame)
        raise KeyboardInterrupt

    def __enter__(self) -> None:
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return
        if self.depth == 0:
            self.previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            for s in self.previous:
                signal.signal(s, self.handler)
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        if not self.enabled or threading.current_thread() is not threading.main_thread() or self.depth == 0:
            return
        self.depth -= 1
        if self.depth == 0:
            for s, previous in self.previous.items():
                signal.signal(s, previous)


_SIGNALS = _GracefulSignals()


def enable_graceful_stop(notice: Callable[[str], None] | None = None) -> Callable[[int, Any], None]:
    """Make Ctrl-C and SIGTERM stop this process's batches gracefully (the CLI's `run` does); `notice`
    is told the signal's name on the first one. Returns the handler, for the time between runs."""
    _SIGNALS.enabled, _SIGNALS.notice = True, notice
    return _SIGNALS.handler


def stop_requested() -> bool:
    return _STOP.is_set()


def clear_stop() -> None:
    _STOP.clear()


class RunInterrupted(RuntimeError):
    """The process was asked to stop (Ctrl-C, SIGTERM): what arrived is cached, the rest was not called."""


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
        if not c.cached:  # an answer another process paid for counts no retries here
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


async def attempt(backend: ChatBackend, request: CallRequest, timeout_s: float) -> Completion:
    """One call, cut off after `timeout_s`: the one place a call's deadline is enforced (backends
    and their SDK clients set none). Raises ProviderError, a timeout included."""
    try:
        async with asyncio.timeout(timeout_s):
            return await backend.complete(request)
    except TimeoutError:
        raise ProviderError("timeout", f"{backend.who}: no complete response within {timeout_s:g}s") from None


# Failures where nothing answered: the provider (or the way to it) is down, not busy.
NO_ANSWER_KINDS = frozenset({"connection", "timeout"})


class _Breaker:
    """A member's circuit breaker: it tells a provider that is down from one that is briefly away.

    It trips when `after` attempts in a row got no answer at all (refused or reset connections,
    timeouts). Then:
    - a provider that has not answered once in this batch is down: it fails at once, and calls not
      yet made fail with the cause (a dead endpoint costs seconds, not a retry window per call);
    - one that was answering is in an outage: the breaker is open, calls wait without spending
      attempts, and one probe at a time tries the provider, with backoff between probes (from
      `probe_base_s`, doubling, at most `probe_cap_s`). Any answer closes it and the waiting calls go
      on; `window_s` seconds after the provider stopped answering with still no answer, it fails.
    It also fails when every attempt failed (answers such as 503s included) for `window_s` seconds.
    """

    def __init__(self, after: int, window_s: float, probe_base_s: float = 1.0, probe_cap_s: float = 5.0) -> None:
        self.after = after
        self.window_s = window_s
        self.probe_base_s = probe_base_s
        self.probe_cap_s = probe_cap_s
        self.in_a_row = 0
        self.failing_since: float | None = None
        self.answered = False  # the provider answered at least once in this batch
        self.open_since: float | None = None  # open: when the provider stopped answering
        self.probing = False
        self.probes = 0  # probes sent in the current outage
        self.next_probe_at = 0.0
        self.outages: list[float] = []  # how long each outage ridden out lasted, in seconds
        self.probes_sent = 0
        self.message: str | None = None  # set when it failed for good
        self.kind: str | None = None
        self.opened = asyncio.Event()  # set while open or failed: a retry's backoff sleep ends at once
        self._wake = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return self.open_since is not None and self.message is None

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    async def admit(self) -> bool:
        """Wait while the breaker is open; True when this attempt is the one probe. Returns at once
        when it is closed or has failed (the caller reads `message`)."""
        while self.is_open:
            now = time.monotonic()
            if not self.probing and now >= self.next_probe_at:
                self.probing = True
                self.probes += 1
                self.probes_sent += 1
                return True
            if _STOP.is_set():
                return False
            wake = self._wake
            wait = _NAP_S if self.probing else min(_NAP_S, max(0.0, self.next_probe_at - now))
            try:
                await asyncio.wait_for(wake.wait(), wait)
            except TimeoutError:
                pass
        return False

    def success(self, sent_at: float | None = None) -> None:
        """An answer. One to a request sent before the provider stopped answering (`sent_at`, monotonic)
        says nothing of the provider now: it leaves an open breaker open."""
        if self.open_since is not None and sent_at is not None and sent_at < self.open_since:
            self.answered = True
            return
        self.in_a_row = 0
        self.failing_since = None
        self._close()

    def _close(self) -> None:
        """The provider answered: close an open breaker and let the waiting calls go."""
        self.answered = True
        if self.open_since is not None:
            self.outages.append(time.monotonic() - self.open_since)
            self.open_since, self.probing = None, False
            self.opened.clear()
            self._notify()

    def failure(self, err: ProviderError, probe: bool = False) -> None:
        now = time.monotonic()
        self.probing = self.probing and not probe
        self.failing_since = self.failing_since if self.failing_since is not None else now
        no_answer = err.kind in NO_ANSWER_KINDS
        self.in_a_row = self.in_a_row + 1 if no_answer else 0
        if self.message is not None:
            return
        if self.open_since is not None:
            self._in_outage(err, now, no_answer, probe)
        elif self.in_a_row >= self.after and not self.answered:
            self._fail(f"{self.in_a_row} attempts in a row got no answer (threshold {self.after} in a row)", err)
        elif self.in_a_row >= self.after:
            self.open_since, self.probes = self.failing_since, 0
            self._schedule_probe(now)
            self.opened.set()
            self._notify()
        elif self.window_s > 0 and now - self.failing_since >= self.window_s and err.retryable:
            self._fail(f"every attempt failed for {now - self.failing_since:.1f}s "
                       f"(retry_window_s {self.window_s:g})", err)

    def _in_outage(self, err: ProviderError, now: float, no_answer: bool, probe: bool) -> None:
        assert self.open_since is not None
        if not no_answer:  # an answer, if an error: the provider is back; the calls' own retries go on
            self._close()
            return
        if now - self.open_since >= self.window_s:
            self._fail(f"no answer for {now - self.open_since:.1f}s after the provider stopped answering "
                       f"({self.probes} probes; retry_window_s {self.window_s:g})", err)
        elif probe:
            self._schedule_probe(now)
            self._notify()

    def _schedule_probe(self, now: float) -> None:
        assert self.open_since is not None
        delay = min(self.probe_cap_s, self.probe_base_s * 2 ** self.probes)
        self.next_probe_at = min(now + delay, self.open_since + self.window_s)  # the last probe ends the window

    def _fail(self, why: str, err: ProviderError) -> None:
        self.message, self.kind = f"circuit breaker open: {why}; cause: {err}", err.kind
        self.opened.set()
        self._notify()


# The member's limits in one batch: the rate buckets and the adaptive concurrency window, built
# from its policy by `_Sender`. They hold asyncio primitives, which bind to the event loop that
# first uses them, so every batch builds its own (each batch may run under its own `asyncio.run`):
# the limits apply per batch, i.e. per process, and Dagster pools bound how many such run at once.


class TokenBucket:
    """An async token bucket refilled continuously at `per_minute / 60` tokens a second.

    The bucket holds at most `burst` tokens (default: one second's worth, at least 1), so a batch
    starts with a short burst and then settles to the configured rate instead of firing a whole
    minute's budget at once. A request larger than the bucket waits until it is full and then
    borrows from the future (the level goes negative), which keeps the long-run rate exact.
    """

    def __init__(
        self,
        per_minute: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute <= 0:
            raise ValueError(f"per_minute must be positive, got {per_minute}")
        self.rate = per_minute / 60.0
        self.capacity = float(burst) if burst is not None else max(1.0, self.rate)
        self._clock = clock
        self._level = self.capacity
        self._updated = clock()
        self._lock = asyncio.Lock()  # waiters queue in FIFO order, one refill wait at a time

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._updated) * self.rate)
        self._updated = now

    @property
    def level(self) -> float:
        self._refill()
        return self._level

    async def acquire(self, amount: float = 1.0) -> None:
        need = min(float(amount), self.capacity)
        async with self._lock:
            while True:
                self._refill()
                if self._level >= need:
                    break
                await asyncio.sleep((need - self._level) / self.rate)
            self._level -= amount

    def adjust(self, delta: float) -> None:
        """Charge `delta` more tokens (or refund when negative) once the real usage is known."""
        self._refill()
        self._level = min(self.capacity, self._level - delta)


class BatchStopped(Exception):
    """Raised to calls still waiting for a slot after the batch was stopped by a fatal error."""


class ConcurrencyWindow:
    """A semaphore whose size may change while calls hold it (the AIMD window of `CallLimits`).

    `size` is a float so additive increase can grow it by 1/size per success; int(size) slots
    (at least one) are open. Shrinking never interrupts a holder: new calls wait until enough
    holders left."""

    def __init__(self, size: int) -> None:
        self.size = float(size)
        self.held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def _open(self) -> int:
        return max(1, int(self.size)) - self.held

    async def acquire(self) -> None:
        while self._open() <= 0:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append(future)
            try:
                await future
            except asyncio.CancelledError:
                if future.done():  # woken and cancelled at once: hand the wake-up on
                    self.wake()
                raise
            finally:
                if future in self._waiters:
                    self._waiters.remove(future)
        self.held += 1

    def release(self) -> None:
        self.held -= 1
        self.wake()

    def resize(self, size: float) -> None:
        self.size = size
        self.wake()

    def wake(self) -> None:
        for future in list(self._waiters)[: max(0, self._open())]:
            if not future.done():
                future.set_result(None)


class CallLimits:
    """The limits one batch of calls to one member runs under.

    Concurrency adapts to the provider (AIMD, as TCP does): the window starts at the policy's
    `max_concurrency`, halves on a 429 or on an answer saying no request is left (once per window:
    signals from calls started before the last cut do not cut again), and grows by one slot per window's worth of successes, never above
    `max_concurrency`. A tighter provider so costs time, not rows.
    """

    def __init__(self, policy: CallPolicy) -> None:
        # The policy was checked when it was made (CallPolicy): its numbers are used as they are.
        self.max_concurrency = policy.max_concurrency
        self.window = ConcurrencyWindow(policy.max_concurrency)
        self.requests = TokenBucket(policy.rpm) if policy.rpm else None
        self.tokens = TokenBucket(policy.tpm) if policy.tpm else None
        self._resume_at = 0.0
        self._cuts = 0  # how many times the window was cut; an attempt remembers the count it started under
        self.rate_limited = 0  # 429s seen
        self.stopped = False
        self.in_flight = 0
        self.peak_in_flight = 0

    @property
    def concurrency(self) -> float:
        """The current size of the concurrency window."""
        return self.window.size

    def congested(self, started_under: int) -> None:
        """A 429 for an attempt started under cut number `started_under`: halve the window, once per cut."""
        self.rate_limited += 1
        self._cut(started_under)

    def _cut(self, started_under: int) -> None:
        if started_under == self._cuts:
            self._cuts += 1
            self.window.resize(max(1.0, self.window.size / 2))

    def succeeded(self, started_under: int, remaining_requests: int | None = None) -> None:
        """An answer: grow the window by 1/size (one slot per window's worth of answers), or, when
        the provider said no request is left, cut it as a 429 would (without the 429)."""
        if remaining_requests == 0:
            self._cut(started_under)
        elif self.window.size < self.max_concurrency:
            self.window.resize(min(float(self.max_concurrency), self.window.size + 1.0 / self.window.size))

    def pause_for(self, seconds: float) -> None:
        """Hold back every new attempt for `seconds` (the provider asked us to slow down)."""
        self._resume_at = max(self._resume_at, time.monotonic() + max(0.0, seconds))

    def stop(self) -> None:
        """No further attempt starts; waiting calls raise BatchStopped."""
        self.stopped = True

    @asynccontextmanager
    async def slot(self, estimated_tokens: int = 0) -> AsyncIterator[int]:
        """Wait for a free slot, any pause, and the rate budgets; hold the slot for one attempt.
        Yields the window's cut count, for `congested`."""
        await self.window.acquire()
        try:
            while (wait := self._resume_at - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            if self.requests is not None:
                await self.requests.acquire(1)
            if self.tokens is not None:
                await self.tokens.acquire(estimated_tokens)
            if self.stopped:
                raise BatchStopped()
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                yield self._cuts
            finally:
                self.in_flight -= 1
        finally:
            self.window.release()

    def settle_tokens(self, estimated: int, actual: int) -> None:
        """Replace the up-front token estimate with what the provider reported."""
        if self.tokens is not None and actual > 0:
            self.tokens.adjust(actual - estimated)


class _Sender:
    """Sends one batch's uncached requests within the policy and keeps what came back.

    A fixed set of workers pulls calls from one queue, so memory and scheduling work stay flat
    however many calls the partition holds. Twice as many workers as slots: a call sleeping before
    its retry holds no slot, and the spare workers keep the slots busy meanwhile. Each answer is
    handed to the cache's writer thread before the next await, so a paid-for answer is never lost
    to a cancellation.

    With a writable cache, the batch's calls are claimed together before the workers start (`_claim_all`),
    and a claim that aged in the queue is taken again before its call takes a slot. A call another
    process holds is handed to a waiting task, which holds no worker and no slot: it takes that
    process's answer (a cache hit, not a call), or puts the call back in the queue when the claim
    ends without one.
    """

    budget: MemberBudget | None = None  # the run's spending cap, when the panel sets one

    def __init__(self, backend: ChatBackend, policy: CallPolicy, cache: ResponseCache | None,
                 report: _Progress, seed: int | None) -> None:
        self.backend = backend
        self.policy = policy
        self.cache = cache
        self.report = report
        self.rng = random.Random(seed)
        self.limits = CallLimits(policy)
        self.breaker = _Breaker(policy.breaker_after, policy.retry_window_s, policy.retry.base_s, policy.probe_cap_s)
        self.lease = _Lease(cache) if cache is not None and cache.writes else None
        self.results: dict[str, Completion] = {}
        self.written = 0  # answers handed to the cache
        self.queue: asyncio.Queue[tuple[str, CallRequest] | None] = asyncio.Queue()
        self.open_calls = 0
        self.n_workers = 0
        self.waiting: set[asyncio.Task[None]] = set()

    async def send(self, todo: list[tuple[str, CallRequest]]) -> list[BaseException]:
        """Make every call; returns what stopped the workers (empty when every call settled)."""
        self.open_calls = len(todo)
        if self.lease is not None:
            try:
                todo = await self._claim_all(todo)
            except CacheError as exc:
                return [exc]
        for item in todo:
            self.queue.put_nowait(item)
        self.n_workers = min(2 * self.limits.max_concurrency, self.open_calls)
        if self.n_workers == 0:
            return []
        workers = [asyncio.create_task(self._worker()) for _ in range(self.n_workers)]
        ticker = asyncio.create_task(self.report.ticker())
        try:
            done, pending = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
            failures = _raised(done)
            if failures and all(isinstance(f, BatchStopped) for f in failures):
                # A worker stopped by the batch's stop finished first; the one whose error stopped it
                # is still unwinding (its lease release): let it finish, so its error is not lost.
                failures += await _unwinding(pending)
                pending = {t for t in pending if not t.done()}
            if failures:
                # Abandon calls in flight or waiting; what already came back is queued for the cache.
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            return failures  # type: ignore[return-value]
        finally:
            ticker.cancel()
            for t in [*workers, *self.waiting]:
                if not t.done():
                    t.cancel()

    async def _claim_all(self, todo: list[tuple[str, CallRequest]]) -> list[tuple[str, CallRequest]]:
        """Claim the batch's keys in one transaction; what is ours to send. An answer stored since the
        lookup settles its call (a cache hit); a key another process holds goes to a waiting task."""
        assert self.lease is not None
        mine, answers = await self.lease.claim_batch([k for k, _ in todo])
        for key, answer in answers.items():
            self._settle(key, answer)
        for key, request in todo:
            if key not in mine and key not in answers:
                self._wait_elsewhere(key, request)
        return [(k, r) for k, r in todo if k in mine]

    def _settle(self, key: str | None, c: Completion | None) -> None:
        """One call is over: its completion, or none (it was not started: over the run's budget)."""
        if key is not None and c is not None:
            self.results[key] = c
            self.report.record(c)
        self.open_calls -= 1
        if self.open_calls == 0:
            for _ in range(self.n_workers):
                self.queue.put_nowait(None)

    async def _worker(self) -> None:
        while (item := await self.queue.get()) is not None:
            key, request = item
            if _STOP.is_set() or (self.cache is not None and self.cache.write_failed):
                self._settle(None, None)  # not started: interrupted, or no answer could be kept (run_calls says so)
                continue
            held = await self.budget.reserve(request) if self.budget is not None else 0.0
            if held is None:
                self._settle(None, None)  # it would pass the run's budget: not started (run_calls says so)
                continue
            c = await self._call_once(key, request)
            if self.budget is not None:  # an answer paid elsewhere, or not yet come, costs nothing here
                self.budget.settle(held, c if c is not None and not c.cached else Completion(text=None, call_id=key))
            if c is not None:
                self._settle(key, c)

    async def _call_once(self, key: str, request: CallRequest) -> Completion | None:
        """The call's completion, paid at most once across processes; None when another process
        holds its lease (a waiting task settles it)."""
        if self.breaker.message is not None:
            return self._failed(key, 0, time.monotonic(), self.breaker.message, self.breaker.kind)
        if self.lease is None:
            c = await self._with_retries(key, request)
            if self.cache is not None and self.cache.submit(key, c, self.backend.provider, self.backend.model,
                                                            member=self.backend.member):
                self.written += 1
            return c
        mine, answer = await self.lease.take(key)
        if answer is not None:
            return answer  # another process answered between our lookup and our claim
        if not mine:
            self._wait_elsewhere(key, request)
            return None
        c = await call_holding(self.lease.cache, key, self.lease.owner, self.lease.ttl_s,
                               lambda: self._with_retries(key, request), self.backend.provider, self.backend.model,
                               self.backend.member)
        self.written += c.ok
        return c

    def _wait_elsewhere(self, key: str, request: CallRequest) -> None:
        async def wait() -> None:
            assert self.lease is not None
            try:
                answer = await self.lease.cache.wait_for(key, since=self.lease.since)
            except CacheError:
                answer = None  # the worker that takes the call again meets the error itself
            if answer is None:  # released or expired without an answer: ours to make
                self.queue.put_nowait((key, request))
            else:
                self._settle(key, answer)

        task = asyncio.create_task(wait())
        self.waiting.add(task)
        task.add_done_callback(self.waiting.discard)

    def _failed(self, key: str, attempts: int, started: float, error: str | None, kind: str | None) -> Completion:
        return Completion(text=None, error=error, error_kind=kind, attempts=attempts, model=self.backend.model,
                          call_id=key, latency_s=time.monotonic() - started)

    async def _with_retries(self, key: str, request: CallRequest) -> Completion:
        """One request, retried within the policy. Returns a Completion (ok or failed); raises
        FatalProviderError and whatever a broken backend raises. While the breaker is open the call
        waits; that time, and the attempts it makes as the breaker's probe or that fail while it is
        open, do not count against its retries or its retry window."""
        estimate = estimate_tokens(request)
        begun = started = time.monotonic()  # `started` moves on by the time spent waiting on the breaker
        attempts = counted = 0
        while True:
            waiting = time.monotonic()
            probe = await self.breaker.admit()
            started += time.monotonic() - waiting
            if self.breaker.message is not None:
                return self._failed(key, attempts, begun, self.breaker.message, self.breaker.kind)
            if _STOP.is_set():
                return self._failed(key, attempts, begun, "not sent: the run was interrupted", "other")
            attempts += 1
            sent = time.monotonic()
            try:
                done = await self._attempt(request, estimate)
            except FatalProviderError:
                raise
            except ProviderError as err:
                self.breaker.failure(err, probe)
                if self.breaker.is_open and err.retryable:
                    continue  # wait for the provider to come back
                counted += not probe
                if self._gives_up(err, counted, started):
                    return self._failed(key, attempts, begun, str(err), err.kind)
                await self._back_off(err, counted, started)
                continue
            self.breaker.success(sent)
            done.attempts, done.call_id, done.cached = attempts, key, False
            return done

    def _gives_up(self, err: ProviderError, attempts: int, started: float) -> bool:
        """Give up on a non-retryable error, or once both the retries and the retry window are spent."""
        if not err.retryable:
            return True
        spent = time.monotonic() - started >= self.policy.retry_window_s
        return attempts > self.policy.max_retries and spent

    async def _attempt(self, request: CallRequest, estimate: int) -> Completion:
        """One attempt in a slot. A fatal error or a backend bug stops the batch before the slot is
        released, so no queued call starts after it."""
        async with self.limits.slot(estimate) as started_under:
            try:
                done = await attempt(self.backend, request, self.policy.timeout_s)
            except FatalProviderError:
                self.limits.stop()
                raise
            except ProviderError as err:
                if err.kind == "rate_limit":
                    self.limits.congested(started_under)
                raise
            except Exception:
                self.limits.stop()  # a backend bug: stop the batch the same way
                raise
        self.limits.succeeded(started_under, self.backend.remaining_requests())
        self.limits.settle_tokens(estimate, done.input_tokens + done.output_tokens)
        return done

    async def _back_off(self, err: ProviderError, attempts: int, started: float) -> None:
        """Sleep before the next attempt; past max_retries no later than the window's end. An
        opening breaker cuts the sleep short."""
        retry = self.policy.retry
        if err.kind == "rate_limit" and err.retry_after:
            self.limits.pause_for(min(err.retry_after, retry.max_retry_after_s))
        delay = retry.delay(attempts, err.retry_after, self.rng)
        if attempts > self.policy.max_retries:
            delay = min(delay, max(0.0, started + self.policy.retry_window_s - time.monotonic()))
        until = time.monotonic() + delay
        while (left := until - time.monotonic()) > 0 and not _STOP.is_set():
            try:
                await asyncio.wait_for(self.breaker.opened.wait(), min(left, _NAP_S))
                return
            except TimeoutError:
                pass


def _raised(done: set[asyncio.Task[None]]) -> list[BaseException]:
    return [t.exception() for t in done if not t.cancelled() and t.exception() is not None]  # type: ignore[misc]


async def _unwinding(pending: set[asyncio.Task[None]], within_s: float = 5.0) -> list[BaseException]:
    """The errors of workers that end within `within_s`, up to the first that is not a BatchStopped."""
    found: list[BaseException] = []
    deadline = time.monotonic() + within_s
    while pending and not any(not isinstance(f, BatchStopped) for f in found):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_EXCEPTION)
        found += _raised(done)
    return found


class _Lease:
    """This batch's side of the cache's lease: one owner id for every key it claims.

    The batch's keys are claimed together, in one transaction (`claim_batch`), before any is sent. A
    claim so taken is used as it is if its call starts within `age_limit_s` (a third of the ttl: the
    claim then has two thirds of its life left, and the call's heartbeat renews it after one third);
    one that aged longer in the queue may have expired and been taken over by another process, so it
    is claimed again, with the answer check of a fresh claim (`_take`), just before it is sent."""

    def __init__(self, cache: ResponseCache, ttl_s: float = DEFAULT_CLAIM_TTL_S) -> None:
        self.cache = cache
        self.ttl_s = ttl_s
        self.age_limit_s = ttl_s / 3
        self.owner = default_owner()
        self.since = None if cache.reads else time.time()  # "refresh" wants answers newer than this batch
        self.claimed: dict[str, float] = {}  # key -> when claim_batch claimed it (monotonic), not yet sent

    async def claim_batch(self, keys: list[str]) -> tuple[set[str], dict[str, Completion]]:
        """Claim every key free or expired in one transaction: (the keys now ours, the answers stored
        since our lookup). Keys in neither part are held by another live process."""
        mine, answers = await asyncio.to_thread(self.cache.claim_many, keys, self.owner, self.ttl_s, self.since)
        now = time.monotonic()
        self.claimed = dict.fromkeys(mine, now)
        return mine, answers

    def _take(self, key: str) -> tuple[bool, Completion | None]:
        if not self.cache.claim(key, self.owner, self.ttl_s):
            return False, None
        answer, _ = self.cache.claim_state(key, self.since)
        if answer is not None:
            self.cache.release(key, self.owner)
        return True, answer

    async def take(self, key: str) -> tuple[bool, Completion | None]:
        """Just before sending `key`: (whether we hold its claim now, an answer already stored). A
        fresh claim from `claim_batch` costs nothing; any other, one thread hop."""
        claimed_at = self.claimed.get(key)
        if claimed_at is not None and time.monotonic() - claimed_at < self.age_limit_s:
            # Yield once, as the thread hop did: a worker that just gave its slot back must not take
            # it again before the worker woken for it (the window is not first-come, first-served).
            # The key leaves `claimed` after it, so a cancelled batch still releases it.
            await asyncio.sleep(0)
            self.claimed.pop(key, None)
            return True, None
        self.claimed.pop(key, None)
        return await asyncio.to_thread(self._take, key)

    async def release_unsent(self) -> None:
        """Release the claims of keys never sent (the batch stopped, the budget or the breaker refused them)."""
        keys, self.claimed = list(self.claimed), {}
        await asyncio.to_thread(self.cache.release_many, keys, self.owner)


def _stop_error(failures: list[BaseException], sender: _Sender, todo: int, completed: int,
                cache_writes: bool, label: str) -> Exception:
    """What a batch stopped by a fatal provider error (or a backend bug) raises: what failed, and how to resume."""
    backend = sender.backend
    who = f"member {backend.member!r} (provider {backend.provider}, model {backend.model})"
    fatal = next((e for e in failures if isinstance(e, FatalProviderError)), None)
    if fatal is None:
        # A backend bug or an error it failed to classify: stop, but keep what is cached.
        bug = next((e for e in failures if not isinstance(e, BatchStopped)), failures[0])
        if isinstance(bug, CacheError):  # the cache's lease failed (a PostgreSQL server gone): name the cache
            error = CacheError(f"{label}: {who}: {bug}; {_resume_note(completed, cache_writes)}")
            error.__cause__ = bug
            return error
        error: Exception = RuntimeError(
            f"{label}: {who}: the backend raised {type(bug).__name__} instead of a ProviderError: {bug}; "
            f"{_resume_note(completed, cache_writes)}"
        )
        error.__cause__ = bug
        return error
    hint = _FIX_HINTS.get(fatal.kind, "the cause above")
    message = (
        f"{label}: {who} stopped on a {fatal.kind} error: {fatal}. {todo - len(sender.results)} of {todo} calls "
        f"were not completed. Fix {hint}, then re-materialize the partition; {_resume_note(completed, cache_writes)}."
    )
    error = BatchAbortedError(message, fatal.kind, completed)
    error.__cause__ = fatal
    return error


async def _send(sender: _Sender, todo: list[tuple[str, CallRequest]], hits: int, label: str) -> dict[str, Completion]:
    """Run the sender between the backend's hold and release; wait for the cache writes; raise
    what stopped the batch, if anything."""
    cache = sender.cache
    cache_writes = cache is not None and cache.writes
    sender.backend.hold()
    try:
        failures = await sender.send(todo)
    finally:
        cache_error: CacheError | None = None
        if cache is not None and cache_writes:
            try:
                await cache.aflush()
            except CacheError as exc:
                cache_error = exc
        if sender.lease is not None:
            try:
                await sender.lease.release_unsent()
            except CacheError:
                pass  # the claims then expire within their ttl; the error that matters is raised below
        # Open sockets must not outlive the event loop that owns them.
        await sender.backend.release()
    if cache_error is not None:
        if not failures:
            raise await _cache_failed(cache_error, sender, todo, label)
        sender.written = 0  # the message below must not promise cached calls that were not written
    if failures:
        fresh_ok = sum(1 for c in sender.results.values() if c.ok)
        # A worker cancelled right after its answer was handed to the cache has not counted it yet: the
        # cache itself says how many of this batch's calls it now holds.
        stored = len(await cache.aget_many(k for k, _ in todo)) if cache_writes and cache_error is None else 0
        completed = (hits + max(sender.written, stored)) if cache_writes else hits + fresh_ok
        raise _stop_error(failures, sender, len(todo), completed, cache_writes, label)
    return sender.results


async def _cache_failed(error: CacheError, sender: _Sender, todo: list[tuple[str, CallRequest]],
                        label: str) -> CacheError:
    """The error of a batch whose response cache could not be written: which cache, why, and what is safe."""
    assert sender.cache is not None
    arrived = sum(1 for c in sender.results.values() if c.ok)
    try:
        stored: int | None = len(await sender.cache.aget_many(k for k, _ in todo))
    except CacheError:
        stored = None  # the database is gone: what it holds cannot be counted now
    held = (f"{stored} of this batch's answers are stored and will not be requested again" if stored is not None
            else "the cache cannot say now how many of this batch's answers it holds")
    b = sender.backend
    failed = CacheError(
        f"{label}: member {b.member!r} (provider {b.provider}, model {b.model}): {error}. No call was started "
        f"after the cache failed: {arrived} answers arrived and {len(todo) - len(sender.results)} calls were not "
        f"made; {held}. Fix the cache (disk space, file permissions, the database server), then re-run the shard."
    )
    failed.__cause__ = error
    return failed


def _interrupted(label: str, sender: _Sender, total: int, hits: int, cache_writes: bool) -> RunInterrupted:
    arrived = sum(1 for c in sender.results.values() if c.ok)
    return RunInterrupted(
        f"{label}: interrupted (Ctrl-C or SIGTERM) after {arrived} answers arrived; {hits} came from the cache and "
        f"{total - hits - arrived} were not completed. {_resume_note(hits + arrived, cache_writes)[0].upper()}"
        f"{_resume_note(hits + arrived, cache_writes)[1:]}: run the shard again to pay only for what is missing."
    )


def _form_key(backend: ChatBackend) -> str:
    return f"structured_form {backend.provider} {safe_url(backend.base_url) or ''} {backend.model}"


async def _recall_form(backend: ChatBackend, cache: ResponseCache | None,
                       todo: list[tuple[str, CallRequest]]) -> str | None:
    """The structured-output form an earlier run learned for this server and model, handed to the
    backend so this run does not start with a probe its server refuses."""
    if cache is None or not cache.writes or not any(r.json_schema is not None for _, r in todo):
        return None
    form = await asyncio.to_thread(cache.remembered, _form_key(backend))
    if form is not None:
        backend.assume_form(form)
    return form


async def _remember_form(backend: ChatBackend, cache: ResponseCache | None, remembered: str | None) -> None:
    learned = backend.learned_form()
    if cache is not None and learned is not None and learned != remembered:
        try:
            await asyncio.to_thread(cache.remember, _form_key(backend), learned)
        except CacheError:
            pass  # a fact to save a probe next time, never worth failing a batch whose answers are in


def _start_line(label: str, backend: ChatBackend, policy: CallPolicy, total: int, hits: int, todo: int) -> str:
    rate = "".join(f", {name} {value}" for name, value in (("rpm", policy.rpm), ("tpm", policy.tpm)) if value is not None)
    return (
        f"{label}: {total} requests to {backend.member} ({backend.provider}: {backend.model}); "
        f"{hits} from cache, {total - hits - todo} duplicates, {todo} to call "
        f"(concurrency {policy.max_concurrency}{rate})"
    )


def _in_request_order(keys: list[str], first_index: dict[str, int], results: dict[str, Completion]) -> list[Completion]:
    """One completion per request; a repeated request gets a copy of its first occurrence's, marked cached."""
    completions: list[Completion] = []
    for i, k in enumerate(keys):
        c = results[k]
        if i != first_index[k]:
            c = dataclasses.replace(c, cached=True, extra=dict(c.extra))
        completions.append(c)
    return completions


async def run_calls(
    backend: ChatBackend,
    policy: CallPolicy,
    requests: Sequence[CallRequest],
    cache: ResponseCache | None = None,
    *,
    progress: ProgressFn | None = None,
    label: str | None = None,
    progress_every_s: float = 5.0,
    seed: int | None = None,
    budget: MemberBudget | None = None,
) -> CallBatch:
    """Run the requests under the policy; one Completion per request, in order.

    Identical requests (same `request_key`) are sent once and shared; the copies count as cache
    hits. Failed calls come back as Completions with `error`/`error_kind` set. A
    FatalProviderError cancels the remaining calls and raises BatchAbortedError.
    """
    label = label or backend.member or backend.model
    start = time.monotonic()
    keys = [request_key(backend.provider, backend.model, backend.base_url, r) for r in requests]
    first_index: dict[str, int] = {}  # the first occurrence of each key is requested, later ones reuse it
    for i, k in enumerate(keys):
        first_index.setdefault(k, i)
    hits: dict[str, Completion] = {}
    if cache is not None and cache.reads and first_index:
        hits = await cache.aget_many(first_index)
    todo = [(k, requests[i]) for k, i in first_index.items() if k not in hits]
    report = _Progress(progress, label, len(keys), len(keys) - len(todo), progress_every_s)
    results = dict(hits)
    sender: _Sender | None = None
    if todo and _STOP.is_set():
        raise RunInterrupted(f"{label}: interrupted (Ctrl-C or SIGTERM) before its {len(todo)} calls were made; "
                             f"{len(hits)} came from the cache. Run the shard again to pay only for what is missing.")
    if todo:
        if progress:
            progress(_start_line(label, backend, policy, len(keys), len(hits), len(todo)))
        sender = _Sender(backend, policy, cache, report, seed)
        sender.budget = budget
        remembered = await _recall_form(backend, cache, todo)
        try:
            with _SIGNALS:
                results.update(await _send(sender, todo, len(hits), label))
        finally:
            await _remember_form(backend, cache, remembered)
        if _STOP.is_set():
            raise _interrupted(label, sender, len(keys), len(hits), cache is not None and cache.writes)
        if budget is not None and budget.refused:
            raise budget.exceeded(label, len(hits) + sender.written, cache is not None and cache.writes)
    batch = CallBatch(_in_request_order(keys, first_index, results), member=backend.member,
                      provider=backend.provider, model=backend.model, label=label,
                      cache_writes=cache is not None and cache.writes)
    for c in batch.completions:
        batch.stats.add(c)
    if sender is not None:
        batch.breaker = sender.breaker.message
        batch.stats.rate_limited = sender.limits.rate_limited
        batch.stats.outages = [round(x, 1) for x in sender.breaker.outages]
        batch.stats.probes = sender.breaker.probes_sent
        batch.stats.concurrency = round(sender.limits.concurrency, 1) if batch.stats.calls else 0.0
    batch.stats.elapsed_s = time.monotonic() - start
    if progress:
        progress(report.line() if todo else f"{label}: all {len(keys)} requests served from the cache")
    return batch
