"""Per-member call limits: a concurrency cap and token buckets for requests and tokens per minute.

Everything here holds asyncio primitives, which bind to the event loop that first uses them, so
`run_calls` builds a fresh `CallLimits` for every batch (each batch may run under its own
`asyncio.run`). The limits therefore apply per batch, i.e. per process: parallel partition runs
each get the full rate, and Dagster pools are what bound how many of those run at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from poll_assets.llm.base import CallRequest
from poll_assets.llm.online.policy import CallPolicy
from poll_assets.llm.tokens import request_input_tokens

def estimate_tokens(request: CallRequest) -> int:
    """Tokens a call may consume, counted the way providers charge a TPM budget up front:
    the prompt (estimated, `tokens.request_input_tokens`) plus the full `max_new_tokens` allowance."""
    return request_input_tokens(request) + request.params.max_new_tokens


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
