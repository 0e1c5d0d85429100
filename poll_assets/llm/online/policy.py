"""How one member's calls are made: limits, timeout and retries, resolved once and apart from Dagster.

`Limits` is the `limits:` section of a member in the panel file. `CallPolicy.resolve` turns it,
with the provider's registry row, into the frozen policy `run_calls` follows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from poll_assets.llm.providers.registry import provider_spec


class Limits(BaseModel):
    """A member's `limits:` as written in the panel file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrency: int = Field(default=8, ge=1, le=1024, description="Calls in flight at once for this member (capped by the provider's in-process parallelism; the start of the adaptive window).")
    rpm: int | None = Field(default=None, ge=1, description="Requests per minute, paced with a burst of at most one second's worth; None sets no limit.")
    tpm: int | None = Field(default=None, ge=1, description="Tokens per minute, charged up front and corrected with the real usage; None sets no limit.")
    timeout_s: float = Field(default=120.0, gt=0, description="Bound on every single attempt; a timeout is retried like any transient error.")
    max_retries: int = Field(default=5, ge=0, le=20, description="Retries after the first attempt (at least; see retry_window_s).")
    # A transient failure is retried until both max_retries and this window are spent, so a short
    # outage costs time, not rows (see CallPolicy.retry_window_s).
    retry_window_s: float = Field(default=90.0, ge=0, le=3600, description="A failing call retries until both max_retries retries were made and this many seconds passed since its first attempt.")


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
_DEFAULT = Limits()  # the defaults live in one place: the panel file's `limits:` fields above


@dataclass(frozen=True)
class CallPolicy:
    """The rules one batch of calls to one member runs under."""

    max_concurrency: int = _DEFAULT.max_concurrency
    rpm: int | None = _DEFAULT.rpm
    tpm: int | None = _DEFAULT.tpm
    timeout_s: float = _DEFAULT.timeout_s  # per attempt; enforced in one place, `runner.attempt`
    max_retries: int = _DEFAULT.max_retries
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # A call failing with a transient error is retried until BOTH `max_retries` retries were made
    # and `retry_window_s` seconds passed since its first attempt: 90 s rides out a provider's
    # restart or a one-minute rate-limit window; the circuit breaker keeps a dead provider from
    # costing that much per call.
    retry_window_s: float = _DEFAULT.retry_window_s
    # The circuit breaker: this many attempts in a row without any answer (connection refused or
    # reset, timeout) trip it. A provider that never answered in the batch then fails at once; one
    # that was answering is probed (one probe at a time, backoff from retry.base_s doubling up to
    # probe_cap_s) until retry_window_s passes without an answer. Nothing but failures for
    # retry_window_s also fails it.
    breaker_after: int = 8
    probe_cap_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.breaker_after < 1:
            raise ValueError(f"breaker_after must be at least 1, got {self.breaker_after}")

    @classmethod
    def resolve(cls, limits: Limits, provider: str, retry: RetryPolicy = DEFAULT_RETRY) -> "CallPolicy":
        """The policy for a member of `provider` with these limits. A provider whose calls run in this
        process (the local llama.cpp model runs one at a time) caps the concurrency, so queued calls
        wait for a slot, before their timeout starts, rather than inside the backend."""
        concurrency = limits.max_concurrency
        parallelism = provider_spec(provider).in_process_parallelism
        if parallelism is not None:
            concurrency = min(concurrency, parallelism)
        return cls(concurrency, limits.rpm, limits.tpm, limits.timeout_s, limits.max_retries, retry,
                   retry_window_s=limits.retry_window_s)
