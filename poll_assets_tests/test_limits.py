"""Concurrency and rate limits, measured on an in-process fake backend.

Rate assertions are upper bounds on counts within windows plus a lower bound on total time:
a slow machine can only make them easier to satisfy, never flaky the other way.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from poll_assets.llm.base import CallRequest, GenerationParams, ProviderError
from poll_assets.llm.providers.openai_api import OpenAIChatBackend
from poll_assets.llm.providers.remote import remaining_requests_header
from poll_assets.llm.online.policy import CallPolicy, Limits, RetryPolicy
from poll_assets.llm.resources import ChatModelResource
from poll_assets.llm.online.runner import CallLimits, TokenBucket, run_calls
from poll_assets.llm.tokens import estimate_tokens
from poll_assets_tests.fake_backend import FakeBackend, make_requests, with_policy


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@pytest.mark.parametrize("limit", [1, 3, 16])
def test_concurrency_never_exceeds_max(limit):
    backend = FakeBackend(latency_s=0.005)
    target = with_policy(backend, max_concurrency=limit)
    batch = asyncio.run(run_calls(*target, make_requests(60)))
    assert all(c.ok for c in batch.completions)
    assert backend.peak_in_flight == limit  # reached, never exceeded


def test_concurrency_slot_is_freed_during_backoff():
    # While one call sleeps before its retry, the others keep the slots busy.
    def script(text, attempt):
        return ProviderError("server", "503") if text == "q0" and attempt == 1 else None

    class FixedWait(RetryPolicy):
        def delay(self, retry_number, retry_after, rng):  # noqa: ANN001, ANN201
            return 1.0

    backend = FakeBackend(latency_s=0.07, script=script)
    target = with_policy(backend, max_concurrency=2, max_retries=1, retry=FixedWait())
    batch = asyncio.run(run_calls(*target, make_requests(20)))
    assert all(c.ok for c in batch.completions)
    assert backend.peak_in_flight == 2
    # The other 19 calls all ran while q0 waited 1 s to retry: 0.67 s of work on both slots, where a
    # waiting call holding its slot would have left one slot for 1.33 s of work.
    assert backend.order[-1] == "q0" and backend.order.count("q0") == 2


def test_rpm_limiter_spreads_calls():
    rpm = 1200  # 20/s, burst of 20
    backend = FakeBackend()
    target = with_policy(backend, max_concurrency=50, rpm=rpm)
    start = time.monotonic()
    batch = asyncio.run(run_calls(*target, make_requests(50)))
    elapsed = time.monotonic() - start
    assert all(c.ok for c in batch.completions)
    # 50 calls at 20/s after a burst of 20 need at least 1.5 s.
    assert elapsed >= 1.4
    # No 0.5 s window holds more than the burst plus half a second's refill (+1 for edge rounding).
    assert max_in_window(backend.starts, 0.5) <= 20 + 10 + 1
    # And never more than the burst within the first instant.
    assert sum(1 for t in backend.starts if t - backend.starts[0] < 0.05) <= 21


def test_tpm_limiter_spreads_calls():
    params = GenerationParams(max_new_tokens=100)
    reqs = [CallRequest.build([{"role": "user", "content": f"p{i}"}], params) for i in range(8)]
    per_call = estimate_tokens(reqs[0])
    tpm = per_call * 4 * 60  # 4 calls a second, burst of 4
    # Report usage equal to the estimate, so no refund changes the pace.
    backend = FakeBackend(usage=(per_call - 100, 100))
    target = with_policy(backend, max_concurrency=8, tpm=tpm)
    start = time.monotonic()
    batch = asyncio.run(run_calls(*target, reqs))
    assert all(c.ok for c in batch.completions)
    assert time.monotonic() - start >= 0.9  # 4 beyond the burst at 4/s
    assert max_in_window(backend.starts, 0.5) <= 4 + 2 + 1


def test_token_bucket_rate_and_borrowing():
    async def go() -> list[float]:
        bucket = TokenBucket(per_minute=600)  # 10/s, burst 10
        stamps = []
        for _ in range(25):
            await bucket.acquire(1)
            stamps.append(time.monotonic())
        return stamps

    stamps = asyncio.run(go())
    assert stamps[-1] - stamps[0] >= 1.4  # 15 beyond the burst at 10/s
    assert max_in_window(stamps, 0.5) <= 10 + 5 + 1

    async def big() -> float:
        bucket = TokenBucket(per_minute=60 * 100)  # 100/s, burst 100
        await bucket.acquire(150)  # larger than the burst: allowed once full, leaves a debt
        t = time.monotonic()
        await bucket.acquire(1)
        return time.monotonic() - t

    assert asyncio.run(big()) >= 0.49  # the 50-token debt is repaid at 100/s first


def test_token_bucket_refund():
    async def go() -> None:
        bucket = TokenBucket(per_minute=60, burst=10)
        await bucket.acquire(10)
        assert bucket.level < 0.5
        bucket.adjust(-8)  # used 2 of the 10 estimated
        assert bucket.level >= 8

    asyncio.run(go())


def test_pause_holds_back_new_attempts():
    async def go() -> float:
        limits = CallLimits(CallPolicy(max_concurrency=4))
        limits.pause_for(0.3)
        t = time.monotonic()
        async with limits.slot():
            pass
        return time.monotonic() - t

    assert asyncio.run(go()) >= 0.29


def test_rate_limit_with_retry_after_pauses_the_member():
    def script(text, attempt):
        if text == "q0" and attempt == 1:
            return ProviderError("rate_limit", "429", retry_after=0.3)
        return None

    backend = FakeBackend(latency_s=0.01, script=script)
    target = with_policy(backend, max_concurrency=1, max_retries=2, retry=RetryPolicy(base_s=0.001))
    asyncio.run(run_calls(*target, make_requests(4)))
    # After the 429 the next attempt of any request waits out the Retry-After.
    assert backend.starts[1] - backend.starts[0] >= 0.3


def test_estimate_tokens_counts_prompt_and_allowance():
    short = CallRequest.build([{"role": "user", "content": "x" * 40}], GenerationParams(max_new_tokens=50))
    long = CallRequest.build([{"role": "user", "content": "x" * 4000}], GenerationParams(max_new_tokens=50))
    assert estimate_tokens(short) >= 50 + 10
    assert estimate_tokens(long) - estimate_tokens(short) == (4000 - 40) // 4


def test_local_backend_runs_one_call_at_a_time():
    # The local model serializes on a lock; run_calls must queue calls itself so that their
    # timeout does not tick while they wait for that lock in a worker thread.
    limits = Limits(max_concurrency=8)
    assert CallLimits(CallPolicy.resolve(limits, "local")).max_concurrency == 1
    assert CallLimits(CallPolicy.resolve(limits, "openai")).max_concurrency == 8


def test_local_model_batch_through_run_calls():
    pytest.importorskip("xllamacpp")
    backend = ChatModelResource(provider="local", member="local_gen", model="SmolLM2-135M-Instruct").backend()
    policy = CallPolicy.resolve(Limits(max_concurrency=4, timeout_s=60), "local")
    params = GenerationParams(max_new_tokens=4, temperature=0.0)
    reqs = [CallRequest.build([{"role": "user", "content": f"Say the number {i}."}], params) for i in range(3)]
    batch = asyncio.run(run_calls(backend, policy, reqs))
    assert all(c.ok and c.output_tokens > 0 for c in batch.completions), [c.error for c in batch.completions]


def test_aimd_window_halves_once_per_cut_and_grows_back_slowly():
    async def go():
        limits = CallLimits(CallPolicy(max_concurrency=64))
        async with limits.slot() as first:
            pass
        limits.congested(first)
        limits.congested(first)  # a second 429 from a call started before the cut: no second cut
        assert limits.concurrency == 32 and limits.rate_limited == 2
        async with limits.slot() as second:
            pass
        limits.succeeded(second, remaining_requests=0)  # the provider says nothing is left: cut
        assert limits.concurrency == 16 and limits.rate_limited == 2
        for _ in range(16):  # one window's worth of answers grows it by about one slot
            limits.succeeded(second, remaining_requests=5)
        assert 16.9 < limits.concurrency < 17.1
        for _ in range(10_000):
            limits.succeeded(second)
        assert limits.concurrency == 64  # never above max_concurrency

    asyncio.run(go())


def test_a_shrunk_window_admits_no_new_call_until_holders_leave():
    async def go():
        limits = CallLimits(CallPolicy(max_concurrency=4))
        entered = asyncio.Event()
        release = asyncio.Event()

        async def hold():
            async with limits.slot():
                entered.set()
                await release.wait()

        holders = [asyncio.create_task(hold()) for _ in range(4)]
        await asyncio.sleep(0.01)
        limits.congested(0)  # 4 -> 2 while 4 are in flight
        late = asyncio.create_task(hold())
        await asyncio.sleep(0.01)
        assert limits.in_flight == 4 and not late.done()
        release.set()
        await asyncio.gather(*holders, late)
        assert limits.peak_in_flight == 4 and limits.window.held == 0

    asyncio.run(go())


def test_a_remote_backend_reports_the_latest_responses_rate_limit_header(fake_llm):
    """The runner reads `remaining_requests()` after each answer: what the latest response said."""
    backend = OpenAIChatBackend("gpt-4o-mini", provider="openai", base_url=f"{fake_llm.url}/v1", api_key="k")
    request = CallRequest.build([{"role": "user", "content": "hi"}], GenerationParams(max_new_tokens=8))

    async def one_call() -> int | None:
        await backend.complete(request)
        return backend.remaining_requests()

    assert backend.remaining_requests() is None  # nothing heard yet
    fake_llm.reset(max_concurrent=3)
    assert asyncio.run(one_call()) == 2  # cap 3, this call in flight
    fake_llm.reset()  # no cap: the server sends no rate-limit header
    assert asyncio.run(one_call()) is None


def test_the_remaining_requests_header_is_read_from_either_providers_name():
    assert remaining_requests_header({"x-ratelimit-remaining-requests": "3"}) == 3
    assert remaining_requests_header({"anthropic-ratelimit-requests-remaining": "0"}) == 0
    assert remaining_requests_header({"x-ratelimit-remaining-requests": "soon"}) is None
    assert remaining_requests_header({}) is None
