"""run_calls: retries, fatal stops, timeouts, progress, dedup and cost, against an in-process fake backend."""

from __future__ import annotations

import asyncio
import time

import pytest

from poll_assets.llm.base import CallRequest, FatalProviderError, ProviderError
from poll_assets.llm.cache.response_cache import ResponseCache
from poll_assets.llm.pricing import Price
from poll_assets.llm.online.runner import BatchAbortedError, run_calls
from poll_assets_tests.fake_backend import FakeBackend, with_policy, make_requests

def run(target, requests, **kwargs):
    return asyncio.run(run_calls(*target, requests, **kwargs))


def test_results_in_request_order_with_stats():
    backend = FakeBackend(latency_s=0.001)
    target = with_policy(backend, max_concurrency=8)
    reqs = make_requests(30)
    batch = run(target, reqs)
    assert [c.text for c in batch.completions] == [f"answer to q{i}" for i in range(30)]
    assert all(c.call_id and not c.cached and c.attempts == 1 for c in batch.completions)
    assert len({c.call_id for c in batch.completions}) == 30
    s = batch.stats
    assert (s.calls, s.cache_hits, s.failures, s.retries) == (30, 0, 0, 0)
    assert s.input_tokens == 30 * 4 and s.output_tokens == 30 * 3
    assert s.elapsed_s > 0
    assert not batch.all_failed


def test_retry_on_429_honours_retry_after():
    def script(text, attempt):
        if text == "q1" and attempt == 1:
            return ProviderError("rate_limit", "fake: 429 too many requests", retry_after=0.3)
        return None

    backend = FakeBackend(script=script)
    target = with_policy(backend, max_concurrency=1, max_retries=3)
    batch = run(target, make_requests(3))
    assert all(c.ok for c in batch.completions)
    assert batch.completions[1].attempts == 2
    assert backend.attempts["q1"] == 2
    # The second attempt of q1 came no sooner than the server asked.
    first, second = [t for t, q in zip(backend.starts, backend.order) if q == "q1"]
    assert second - first >= 0.3
    assert batch.stats.calls == 4 and batch.stats.retries == 1


@pytest.mark.parametrize("kind", ["auth", "not_found", "bad_request"])
def test_no_retry_on_non_retryable_errors(kind):
    def script(text, attempt):
        return ProviderError(kind, f"fake: {kind}") if text == "q2" else None

    backend = FakeBackend(script=script)
    target = with_policy(backend, max_retries=5)
    batch = run(target, make_requests(4))
    bad = batch.completions[2]
    assert not bad.ok and bad.error_kind == kind and bad.attempts == 1
    assert backend.attempts["q2"] == 1
    assert [c.ok for c in batch.completions] == [True, True, False, True]
    assert batch.stats.failures == 1


def test_retries_exhausted_keeps_failed_row_and_others():
    def script(text, attempt):
        return ProviderError("server", "fake: 503 overloaded") if text == "q0" else None

    backend = FakeBackend(script=script)
    target = with_policy(backend, max_retries=2)
    batch = run(target, make_requests(5))
    bad = batch.completions[0]
    assert bad.text is None and bad.error == "fake: 503 overloaded" and bad.error_kind == "server"
    assert bad.attempts == 3 and backend.attempts["q0"] == 3
    assert all(c.ok for c in batch.completions[1:])
    assert batch.stats.calls == 3 + 4 and batch.stats.retries == 2 and batch.stats.failures == 1
    assert not batch.all_failed
    assert batch.failure_counts() == {"server": 1}


def test_transient_errors_then_success():
    kinds = ["server", "connection", "malformed"]

    def script(text, attempt):
        return ProviderError(kinds[attempt - 1], "flaky") if attempt <= len(kinds) else None

    backend = FakeBackend(script=script)
    batch = run(with_policy(backend, max_retries=3), make_requests(2))
    assert all(c.ok and c.attempts == 4 for c in batch.completions)


def test_timeout_is_retried_then_reported():
    def script(text, attempt):
        if text == "slow":
            return 5.0  # far past the timeout, every time
        if text == "once" and attempt == 1:
            return 5.0
        return None

    backend = FakeBackend(script=script)
    target = with_policy(backend, timeout_s=0.1, max_retries=1)
    params = make_requests(1)[0].params
    reqs = [CallRequest.build([{"role": "user", "content": t}], params) for t in ("slow", "once", "fast")]
    batch = run(target, reqs)
    slow, once, fast = batch.completions
    assert slow.error_kind == "timeout" and slow.attempts == 2 and "0.1s" in slow.error
    assert once.ok and once.attempts == 2
    assert fast.ok and fast.attempts == 1
    assert batch.stats.elapsed_s < 2.0  # the stalled calls were abandoned, not awaited


def test_fatal_error_stops_batch_and_says_how_to_resume(tmp_path):
    def script(text, attempt):
        return FatalProviderError("auth", "fake: 401 invalid API key") if text == "q5" else None

    cache = ResponseCache(tmp_path / "c.sqlite")
    backend = FakeBackend(script=script, latency_s=0.01)
    target = with_policy(backend, max_concurrency=1)
    reqs = make_requests(40)
    with pytest.raises(BatchAbortedError) as info:
        run(target, reqs, cache=cache, label="generations/fake_member")
    msg = str(info.value)
    assert info.value.kind == "auth"
    assert "generations/fake_member" in msg and "401 invalid API key" in msg
    assert "API key" in msg and "re-materialize the partition" in msg
    assert "5 completed calls are cached and will not be requested again" in msg
    assert backend.total_calls == 6  # q0..q4 and the fatal q5; nothing after
    assert len(cache) == 5

    # After the fix, a re-run requests only what is missing.
    fixed = FakeBackend()
    batch = run(with_policy(fixed, max_concurrency=4), reqs, cache=cache)
    assert fixed.total_calls == 35 and batch.stats.cache_hits == 5
    assert all(c.ok for c in batch.completions)


def test_fatal_error_without_cache_says_calls_will_repeat():
    def script(text, attempt):
        return FatalProviderError("not_found", "fake: 404 model fake-1 not found") if text == "q2" else None

    target = with_policy(FakeBackend(script=script), max_concurrency=1)
    with pytest.raises(BatchAbortedError) as info:
        run(target, make_requests(5))
    msg = str(info.value)
    assert "model name or base_url" in msg and "will be requested again" in msg


def test_unclassified_backend_exception_stops_batch_with_context(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    backend = FakeBackend(script=lambda t, a: KeyError("choices") if t == "q3" else None)
    with pytest.raises(RuntimeError) as info:
        run(with_policy(backend, max_concurrency=1), make_requests(10), cache=cache, label="gen/x")
    msg = str(info.value)
    assert msg.startswith("gen/x: member 'fake_member'") and "KeyError" in msg
    # The calls before q3 finished and are cached, and the message says exactly how many the cache
    # holds (with the lease's thread hops, the call queued after q3 may or may not have begun).
    cached = len(ResponseCache(tmp_path / "c.sqlite"))
    assert cached >= 2 and f"{cached} completed calls are cached" in msg
    assert isinstance(info.value.__cause__, KeyError)
    assert 4 <= backend.total_calls <= cached + 2  # q3 itself, and at most one call that was cut short


def test_all_failed_and_failure_message():
    backend = FakeBackend(script=lambda text, attempt: ProviderError("server", "fake: 502 bad gateway"))
    target = with_policy(backend, max_retries=1)
    batch = run(target, make_requests(6), label="judgments/j")
    assert batch.all_failed
    assert batch.stats.failures == 6 and batch.stats.calls == 12
    msg = batch.failure_message()
    assert msg.startswith("judgments/j: all 6 calls to member 'fake_member'")
    assert "6 server" in msg and "502 bad gateway" in msg and "down" in msg
    assert "re-materialize the partition later" in msg


def test_all_failed_is_false_when_only_cache_hits(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    run(with_policy(FakeBackend()), make_requests(3), cache=cache)
    broken = FakeBackend(script=lambda t, a: ProviderError("server", "down"))
    batch = run(with_policy(broken), make_requests(3), cache=cache)
    assert broken.total_calls == 0 and not batch.all_failed


def test_duplicate_requests_are_sent_once():
    backend = FakeBackend()
    reqs = make_requests(3)
    batch = run(with_policy(backend), [reqs[0], reqs[1], reqs[0], reqs[2], reqs[0]])
    assert backend.total_calls == 3
    assert [c.cached for c in batch.completions] == [False, False, True, False, True]
    assert batch.completions[2].text == batch.completions[0].text
    assert batch.stats.calls == 3 and batch.stats.cache_hits == 2


def test_cost_from_tokens_and_cache_hits_are_free(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    target = with_policy(FakeBackend())
    first = run(target, make_requests(10), cache=cache)
    price = Price(input_per_mtok=2.0, output_per_mtok=10.0)
    expected = (first.stats.input_tokens * 2.0 + first.stats.output_tokens * 10.0) / 1e6
    assert first.stats.cost_usd(price) == pytest.approx(expected) and expected > 0
    assert first.stats.cost_usd(None) is None
    again = run(target, make_requests(10), cache=cache)
    assert again.stats.cost_usd(price) == 0.0


def test_progress_is_throttled_and_reports_the_end():
    lines: list[str] = []
    backend = FakeBackend(latency_s=0.02)
    target = with_policy(backend, max_concurrency=2)
    batch = run(target, make_requests(40), progress=lines.append, label="gen/x", progress_every_s=0.1)
    elapsed = batch.stats.elapsed_s
    assert lines[0].startswith("gen/x: 40 requests") and "40 to call" in lines[0]
    assert lines[-1].startswith("gen/x: 40/40 done") and "0 failed" in lines[-1]
    middle = lines[1:-1]
    assert middle, "expected interim progress lines"
    assert any("ETA" in line and "calls/s" in line for line in middle)
    # Throttled: at most one interim line per interval (+1 for rounding at the edges).
    assert len(middle) <= elapsed / 0.1 + 1


def test_progress_reports_failures_so_far():
    lines: list[str] = []
    backend = FakeBackend(script=lambda t, a: ProviderError("bad_request", "nope") if t.endswith("3") else None)
    run(with_policy(backend), make_requests(20), progress=lines.append, progress_every_s=0.0)
    assert "2 failed" in lines[-1]  # q3 and q13


def test_fresh_event_loop_per_batch():
    # Limits are loop-bound; the same resource must work across separate asyncio.run calls.
    backend = FakeBackend()
    target = with_policy(backend, max_concurrency=2, rpm=60_000, tpm=10_000_000)
    for tag in "abc":
        batch = run(target, make_requests(5, tag=tag))
        assert all(c.ok for c in batch.completions)
    assert backend.total_calls == 15


def test_empty_batch():
    backend = FakeBackend()
    batch = run(with_policy(backend), [])
    assert batch.completions == [] and backend.total_calls == 0 and not batch.all_failed


def test_a_fixed_pool_of_workers_whatever_the_batch_size():
    # Memory must not grow with the partition: no task per call, only one per concurrency slot.
    backend = FakeBackend(latency_s=0.0005)
    target = with_policy(backend, max_concurrency=8)
    peak = 0

    async def main() -> list:
        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, len(asyncio.all_tasks()))
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        batch = await run_calls(*target, make_requests(2000))
        watcher.cancel()
        return batch.completions

    done = asyncio.run(main())
    assert len(done) == 2000 and all(c.ok for c in done)
    # main, watcher, progress ticker and 16 workers (two per slot), with room for 8 more: bounded by
    # the concurrency, where one task per call would have made over 2000.
    assert peak <= 3 + 2 * 8 + 8, peak
    assert backend.total_calls == 2000


def test_a_provider_failing_every_attempt_for_the_retry_window_opens_the_breaker():
    # 503 on every attempt: each call would retry for the whole window, one pair of calls after
    # another (25 x 0.4 s); the breaker's time rule fails the rest at once after one window.
    backend = FakeBackend(script=lambda text, attempt: ProviderError("server", "fake: 503 overloaded"))
    target = with_policy(backend, max_concurrency=2, max_retries=0, retry_window_s=0.4)
    batch = run(target, make_requests(50))
    assert batch.stats.elapsed_s < 2.0
    assert not any(c.ok for c in batch.completions) and batch.provider_down
    assert batch.breaker.startswith("circuit breaker open: every attempt failed for 0.4s (retry_window_s 0.4)")
    unsent = [c for c in batch.completions if c.attempts == 0]
    assert len(unsent) > 40 and all(c.error == batch.breaker and c.error_kind == "server" for c in unsent)


def test_retries_continue_past_max_retries_until_the_window_ends():
    # Fails for its first 0.3 s; max_retries 1 alone would give up after two quick attempts.
    start = []

    def script(text, attempt):
        start.append(start[0] if start else time.monotonic())
        return ProviderError("server", "fake: 503") if time.monotonic() - start[0] < 0.3 else None

    backend = FakeBackend(script=script)
    target = with_policy(backend, max_retries=1, retry_window_s=5.0)
    batch = run(target, make_requests(1))
    assert batch.completions[0].ok and batch.completions[0].attempts > 2
