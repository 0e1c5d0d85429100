"""The call path's reliability guarantees over real HTTP (the OpenAI SDK against the loopback fake
server): limits that adapt to a tighter provider, retries that ride out a short outage, a circuit
breaker that fails a dead provider fast, and the lease that pays a request once across processes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from poll_assets.llm.cache import ResponseCache
from poll_assets.llm.openai_api import OpenAIChatBackend
from poll_assets.llm.policy import CallPolicy, RetryPolicy
from poll_assets.llm.runner import run_calls
from poll_assets_tests.fake_backend import make_requests

REPO = Path(__file__).resolve().parents[1]


def openai_member(url: str, tag: str = "rel") -> OpenAIChatBackend:
    return OpenAIChatBackend("gpt-4o-mini", provider="openai", base_url=f"{url}/{tag}/v1", api_key="k", member="m")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed): every connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_server_capped_at_8_with_the_member_at_64_loses_no_row(fake_llm):
    fake_llm.reset(latency_ms=40, max_concurrent=8, retry_after_s=0.2)
    policy = CallPolicy(max_concurrency=64)  # default retries, window and backoff
    batch = asyncio.run(run_calls(openai_member(fake_llm.url), policy, make_requests(300)))
    stats, server = batch.stats, fake_llm.stats()
    print(f"\ncap 8, member at 64, 300 calls: {server['over_cap']} 429s, {server['total']} requests, "
          f"window settled at {stats.concurrency}, {stats.elapsed_s:.1f}s")
    assert all(c.ok for c in batch.completions), batch.failure_counts()
    assert server["over_cap"] > 0  # the cap really bit
    assert stats.rate_limited == server["over_cap"] and stats.retries == server["over_cap"]
    assert server["total"] == 300 + server["over_cap"]
    # AIMD brought the window down from 64 towards the provider's 8.
    assert 1 <= stats.concurrency <= 16, stats.concurrency


def test_a_short_outage_mid_run_leaves_no_failed_row(fake_llm):
    # 2 s of 503s from the 40th request on, with backoff and window scaled down alike (a 10 s
    # outage under the default settings is the slow test in test_faults).
    fake_llm.reset(latency_ms=20, outage_from_request=40, outage_s=2.0)
    policy = CallPolicy(max_concurrency=8, max_retries=3, retry=RetryPolicy(base_s=0.1, cap_s=1.0), retry_window_s=8.0)
    batch = asyncio.run(run_calls(openai_member(fake_llm.url), policy, make_requests(120)))
    outage = fake_llm.stats()["outcomes"].get("outage", 0)
    assert outage > 8, fake_llm.stats()["outcomes"]  # every call in flight hit it, several times over
    assert all(c.ok for c in batch.completions), batch.failure_counts()
    assert batch.breaker is None and batch.stats.retries == outage


def test_count_alone_would_have_lost_rows_to_the_same_outage(fake_llm):
    # The same outage, without the retry window: three quick retries give up inside it.
    fake_llm.reset(latency_ms=20, outage_from_request=40, outage_s=2.0)
    policy = CallPolicy(max_concurrency=8, max_retries=3, retry=RetryPolicy(base_s=0.1, cap_s=1.0), retry_window_s=0.0)
    batch = asyncio.run(run_calls(openai_member(fake_llm.url), policy, make_requests(120)))
    assert batch.failure_counts().get("server", 0) > 0


def test_a_dead_provider_fails_within_seconds_with_few_attempts(tmp_path):
    backend = OpenAIChatBackend("gpt-4o-mini", provider="openai", base_url=f"http://127.0.0.1:{closed_port()}/v1",
                                api_key="k", member="gen_dead")
    policy = CallPolicy(max_concurrency=8)  # default retries (5), window (90 s) and backoff
    cache = ResponseCache(tmp_path / "c.sqlite")
    start = time.monotonic()
    batch = asyncio.run(run_calls(backend, policy, make_requests(140), cache, label="generations/gen_dead"))
    took = time.monotonic() - start
    print(f"\ndead provider, 140 calls: failed in {took:.2f}s after {batch.stats.calls} attempts")
    assert took < 20
    assert batch.stats.calls < 140  # far below 140 calls x 6 attempts
    assert not any(c.ok for c in batch.completions) and batch.provider_down
    message = batch.failure_message()
    assert "circuit breaker open: 8 attempts in a row got no answer (threshold 8 in a row)" in message
    assert "cause: member 'gen_dead'" in message and "connection failed" in message
    assert "failure rate 1.000" in message and "Re-run the shard when the provider is back" in message


_TWO_RUNS = """
import asyncio, sys
from poll_assets.llm.cache import ResponseCache
from poll_assets.llm.policy import CallPolicy
from poll_assets.llm.runner import run_calls
from poll_assets_tests.fake_backend import make_requests
from poll_assets_tests.test_reliability import openai_member
batch = asyncio.run(run_calls(openai_member(sys.argv[1]), CallPolicy(max_concurrency=4), make_requests(40),
                              ResponseCache(sys.argv[2])))
print(sum(c.ok for c in batch.completions), batch.stats.calls, batch.stats.cache_hits)
"""


def test_two_processes_running_one_batch_pay_each_call_once(fake_llm, tmp_path):
    fake_llm.reset(latency_ms=150)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-c", _TWO_RUNS, fake_llm.url, str(tmp_path / "c.sqlite")]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    counts = [tuple(map(int, out.split())) for out, _ in outs]
    stats = fake_llm.stats()
    assert stats["total"] == 40 and stats["max_repeats"] == 1, counts
    assert all(ok == 40 for ok, _, _ in counts)
    assert sum(calls for _, calls, _ in counts) == 40  # each process made its share; the other's were cache hits
    assert all(calls + hits == 40 for _, calls, hits in counts)
