"""Batch mode over real HTTP, for both wire formats: `run_batch_calls` against the loopback server's
OpenAI (`/v1/files`, `/v1/batches`) and Anthropic (`/v1/messages/batches`) batch endpoints."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from poll_assets.llm.base import BackendConfig, CallRequest, ChatBackend, GenerationParams, request_key
from poll_assets.llm.batch.runner import BatchWaitTimeout, run_batch_calls, split, transport_for
from poll_assets.llm.batch.settings import BatchPolicy, BatchSettings
from poll_assets.llm.batch.store import BatchStore
from poll_assets.llm.cache.response_cache import ResponseCache
from poll_assets.llm.online.policy import CallPolicy, RetryPolicy
from poll_assets.llm.providers.registry import provider_spec
from poll_assets.llm.online.runner import run_calls
from poll_assets_tests.fake_llm_server import FakeLLMServer

WIRES = ["openai", "anthropic"]
SCHEMA = {"type": "object", "properties": {"rating": {"type": "integer", "minimum": 1, "maximum": 5}},
          "required": ["rating"], "additionalProperties": False}


@pytest.fixture
def fake(fake_llm: FakeLLMServer) -> FakeLLMServer:
    fake_llm.batches.reset()
    return fake_llm


def backend_for(provider: str, url: str) -> ChatBackend:
    base = f"{url}/{provider}_m/v1" if provider == "openai" else f"{url}/{provider}_m"
    config = BackendConfig(provider=provider, model=f"{provider}-model", member=f"{provider}_m", base_url=base,
                           api_key="test-key")
    return provider_spec(provider).backend_class().from_config(config)


def make_requests(n: int) -> list[CallRequest]:
    """Plain and structured requests, one repeated (sent once, shared)."""
    params = GenerationParams(max_new_tokens=24)
    out = [CallRequest.build([{"role": "user", "content": f"question number {i}"}], params,
                             json_schema=SCHEMA if i % 3 == 0 else None) for i in range(n)]
    return out + [out[1]]


def batch_policy(provider: str, **settings: object) -> BatchPolicy:
    return BatchPolicy.resolve(BatchSettings(enabled=True, poll_interval_s=0.05, max_poll_interval_s=0.2,
                                             **settings), provider)  # type: ignore[arg-type]


def run(provider: str, url: str, cache_path: Path, n: int, *, policy: CallPolicy | None = None,
        log: list[str] | None = None, requests: list[CallRequest] | None = None, **settings: object):
    cache = ResponseCache(cache_path)
    backend = backend_for(provider, url)
    return asyncio.run(run_batch_calls(backend, policy or CallPolicy(max_retries=3), batch_policy(provider, **settings),
                                       requests or make_requests(n), cache,
                                       progress=(log.append if log is not None else None)))


@pytest.mark.parametrize("provider", WIRES)
def test_batch_answers_every_request_like_the_online_call_and_caches_it(tmp_path, fake, provider):
    log: list[str] = []
    batch = run(provider, fake.url, tmp_path / "c.sqlite", 7, log=log)
    assert len(batch.completions) == 8 and all(c.ok for c in batch.completions)
    assert fake.stats()["total"] == 0  # nothing went online
    stats = fake.batches.stats()
    assert stats["batches"] == 1 and stats["submitted_requests"] == 7 and stats["max_body_submissions"] == 1
    assert [b["requests"] for b in batch.stats.batches] == [7]
    assert batch.stats.batches[0]["counts"] == {"succeeded": 7}
    assert any("submitted batch" in line for line in log) and any("ended" in line or "completed" in line for line in log)
    structured = [c for r, c in zip(make_requests(7), batch.completions) if r.json_schema is not None]
    assert {c.output_mode for c in structured} == {"json_schema" if provider == "openai" else "tool_use"}
    # Same requests, same cache keys and the same answers as online calls.
    online = asyncio.run(run_calls(backend_for(provider, fake.url), CallPolicy(), make_requests(7),
                                   ResponseCache(tmp_path / "online.sqlite")))
    assert [c.call_id for c in online.completions] == [c.call_id for c in batch.completions]
    assert [c.text for c in online.completions] == [c.text for c in batch.completions]
    # A second run is served from the cache: no new batch.
    again = run(provider, fake.url, tmp_path / "c.sqlite", 7)
    assert all(c.cached for c in again.completions) and fake.batches.stats()["batches"] == 1
    assert BatchStore(tmp_path / "c.sqlite").open_batches(f"{provider}_m", provider, f"{provider}-model") == []


@pytest.mark.parametrize("provider", WIRES)
def test_requests_are_split_within_the_batch_limits(tmp_path, fake, provider):
    batch = run(provider, fake.url, tmp_path / "c.sqlite", 7, max_requests=3)
    assert [b["requests"] for b in batch.stats.batches] == [3, 3, 1]
    assert all(c.ok for c in batch.completions) and fake.batches.stats()["max_submissions"] == 1


def test_split_respects_both_limits():
    lines = [(str(i), b"x" * size) for i, size in enumerate([400, 400, 400, 1500, 10])]
    assert [[k for k, _ in c] for c in split(lines, 10, 1000)] == [["0", "1"], ["2"], ["3"], ["4"]]
    assert [[k for k, _ in c] for c in split(lines, 2, 10_000)] == [["0", "1"], ["2", "3"], ["4"]]


@pytest.mark.parametrize("provider", WIRES)
def test_partial_failures_and_expiry_are_resubmitted_without_losing_a_row(tmp_path, fake, provider):
    fake.batches.configure(error_fraction=0.3, expire_batches=1, expire_keep=0.5)
    batch = run(provider, fake.url, tmp_path / "c.sqlite", 12)
    assert all(c.ok for c in batch.completions), [c.error for c in batch.completions if not c.ok]
    first = batch.stats.batches[0]["counts"]
    assert first.get("expired", 0) == 6 and first.get("errored", 0) >= 1  # both faults really happened
    submissions = fake.batches.submissions
    # Only the requests without a result went again, each once more; none that had an answer.
    assert sum(submissions.values()) == 12 + first["expired"] + first["errored"]
    assert max(submissions.values()) == 2 and fake.stats()["total"] == 0
    assert len(ResponseCache(tmp_path / "c.sqlite")) == 12


@pytest.mark.parametrize("provider", WIRES)
def test_on_error_online_sends_the_failed_requests_online(tmp_path, fake, provider):
    fake.batches.configure(error_fraction=0.3)
    batch = run(provider, fake.url, tmp_path / "c.sqlite", 12, on_error="online")
    errored = batch.stats.batches[0]["counts"]["errored"]
    assert errored >= 1 and all(c.ok for c in batch.completions)
    assert fake.stats()["total"] == errored and fake.batches.stats()["batches"] == 1


@pytest.mark.parametrize("provider", WIRES)
def test_a_request_the_provider_rejects_fails_its_row_and_is_not_resubmitted(tmp_path, fake, provider):
    fake.batches.configure(error_fraction=0.3, error_status=400)
    batch = run(provider, fake.url, tmp_path / "c.sqlite", 12)
    failed = [c for c in batch.completions if not c.ok]
    assert failed and {c.error_kind for c in failed} == {"bad_request"}
    assert "batch request failed" in failed[0].error or "HTTP 400" in failed[0].error
    assert fake.batches.stats()["batches"] == 1 and fake.batches.stats()["max_submissions"] == 1
    assert batch.stats.failures == len(failed)


# -- a run killed while it waits ------------------------------------------------------------------------

CHILD = """
import sys
from pathlib import Path
from poll_assets_tests.test_batch import run
run(sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
"""


def open_batch_ids(cache_path: Path) -> list[str]:
    if not cache_path.exists():
        return []
    with sqlite3.connect(cache_path) as conn:
        try:
            return [r[0] for r in conn.execute("SELECT batch_id FROM batches WHERE state = 'open'")]
        except sqlite3.OperationalError:  # the table is not created yet
            return []


@pytest.mark.parametrize("provider", WIRES)
def test_a_run_killed_while_waiting_resumes_its_batches_without_resubmitting(tmp_path, fake, provider):
    fake.batches.configure(processing_s=3600)  # the batch stays pending until the test says otherwise
    cache_path = tmp_path / "c.sqlite"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, provider, fake.url, str(cache_path), "9", ],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not open_batch_ids(cache_path):
            assert child.poll() is None, child.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never recorded a batch"
            time.sleep(0.1)
        time.sleep(0.3)  # it is now polling the pending batch
        assert child.poll() is None
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    recorded = open_batch_ids(cache_path)
    assert len(recorded) == 1 and fake.batches.stats()["batches"] == 1
    fake.batches.configure(processing_s=0.0)
    log: list[str] = []
    batch = run(provider, fake.url, cache_path, 9, log=log)
    assert all(c.ok for c in batch.completions)
    assert [b["batch_id"] for b in batch.stats.batches] == recorded  # the same batch, collected
    assert any(f"resuming 1 batch(es) submitted earlier: {recorded[0]}" in line for line in log)
    stats = fake.batches.stats()
    assert stats["batches"] == 1 and stats["submitted_requests"] == 9 and stats["max_submissions"] == 1
    assert open_batch_ids(cache_path) == []


def test_the_batch_key_is_the_online_cache_key(tmp_path, fake):
    backend = backend_for("openai", fake.url)
    requests = make_requests(4)
    batch = run("openai", fake.url, tmp_path / "c.sqlite", 4)
    keys = [request_key(backend.provider, backend.model, backend.base_url, r) for r in requests]
    assert [c.call_id for c in batch.completions] == keys
    assert set(fake.batches.submissions) == set(keys)  # the custom_id sent is the cache key


@pytest.mark.parametrize("provider", WIRES)
def test_a_step_that_waits_too_long_fails_and_the_next_run_collects_the_same_batch(tmp_path, fake, provider):
    fake.batches.configure(processing_s=3600)
    with pytest.raises(BatchWaitTimeout) as err:
        run(provider, fake.url, tmp_path / "c.sqlite", 5, max_wait_s=0.3)
    (pending,) = open_batch_ids(tmp_path / "c.sqlite")
    assert pending in str(err.value) and "without submitting its requests again" in str(err.value)
    fake.batches.configure(processing_s=0.0)
    batch = run(provider, fake.url, tmp_path / "c.sqlite", 5)
    assert all(c.ok for c in batch.completions) and [b["batch_id"] for b in batch.stats.batches] == [pending]
    assert fake.batches.stats()["max_submissions"] == 1 and fake.batches.stats()["batches"] == 1


def test_a_batch_resumed_by_another_partition_stays_open_for_its_own(tmp_path, fake):
    """Two shards share one request. Shard A's batch is pending when shard B runs: B takes the shared
    answer from A's batch and leaves the batch open, so A's next run collects the rest of it."""
    shard_a, extra = make_requests(4)[:4], make_requests(6)[4:6]
    shard_b = [shard_a[0], *extra]
    cache = tmp_path / "c.sqlite"
    fake.batches.configure(processing_s=3600)
    with pytest.raises(BatchWaitTimeout):
        run("anthropic", fake.url, cache, 0, requests=shard_a, max_wait_s=0.2)
    (batch_a,) = open_batch_ids(cache)
    fake.batches.configure(processing_s=0.0)
    log: list[str] = []
    b = run("anthropic", fake.url, cache, 0, requests=shard_b, log=log)
    assert all(c.ok for c in b.completions) and batch_a in [j["batch_id"] for j in b.stats.batches]
    assert any("stays open for that run" in line for line in log)
    assert batch_a in open_batch_ids(cache)
    a = run("anthropic", fake.url, cache, 0, requests=shard_a)
    assert all(c.ok for c in a.completions) and [j["batch_id"] for j in a.stats.batches] == [batch_a]
    assert fake.batches.stats()["max_submissions"] == 1 and open_batch_ids(cache) == []


@pytest.mark.parametrize("provider", WIRES)
def test_a_batch_cancelled_at_the_provider_is_resubmitted_for_its_unanswered_requests(tmp_path, fake, provider):
    cache = tmp_path / "c.sqlite"
    fake.batches.configure(processing_s=3600)
    with pytest.raises(BatchWaitTimeout):
        run(provider, fake.url, cache, 4, max_wait_s=0.2)
    (cancelled,) = open_batch_ids(cache)
    backend = backend_for(provider, fake.url)
    transport = transport_for(backend, batch_policy(provider))

    async def cancel() -> None:
        backend.hold()
        try:
            await transport.cancel(cancelled)
        finally:
            await backend.release()

    asyncio.run(cancel())  # e.g. someone cancelled it in the provider's console
    fake.batches.configure(processing_s=0.0)
    batch = run(provider, fake.url, cache, 4)
    assert all(c.ok for c in batch.completions)
    first, second = batch.stats.batches
    assert first["batch_id"] == cancelled and first["counts"] == {"canceled": 4}
    assert second["counts"] == {"succeeded": 4} and set(fake.batches.submissions.values()) == {2}


@pytest.mark.parametrize("provider", WIRES)
def test_status_checks_and_downloads_that_fail_are_tried_again(tmp_path, fake, provider):
    fake.batches.configure(flaky_reads=2, flaky_downloads=2)  # status checks, then downloads, answer 503
    log: list[str] = []
    policy = CallPolicy(max_retries=3, retry=RetryPolicy(base_s=0.01))
    batch = run(provider, fake.url, tmp_path / "c.sqlite", 5, policy=policy, log=log)
    assert all(c.ok for c in batch.completions)
    assert fake.batches.config.flaky_reads == fake.batches.config.flaky_downloads == 0
    assert any("status check failed" in line for line in log)
    assert fake.batches.stats()["max_submissions"] == 1


def test_a_batch_refused_as_a_whole_fails_its_rows_with_the_reason_and_is_not_resubmitted(tmp_path, fake):
    fake.batches.configure(invalid_batches=1)
    batch = run("openai", fake.url, tmp_path / "c.sqlite", 4)
    assert not any(c.ok for c in batch.completions)
    assert {c.error_kind for c in batch.completions} == {"bad_request"}
    assert "failed validation: line 1 is not valid" in batch.completions[0].error
    assert batch.stats.batches[0]["status"] == "failed" and fake.batches.stats()["batches"] == 1
