"""The response cache's lease: a request is paid once across processes, and a dead claimant never blocks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from poll_assets.llm.base import Completion
from poll_assets.llm.cache.response_cache import ResponseCache, claim_or_wait
from poll_assets_tests.cache_backends import CacheAt, cache_at  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]


def worker(db: str, log: Path, keys: list[str], *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "poll_assets_tests.lease_worker", db, str(log), ",".join(keys), *extra]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def calls(log: Path) -> list[str]:
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


def answers(proc: subprocess.Popen) -> dict[str, str]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_claim_is_exclusive_until_released_or_expired(cache_at: CacheAt):
    cache = ResponseCache(cache_at())
    assert cache.claim("k", "a", ttl_s=30)
    assert not cache.claim("k", "b", ttl_s=30)
    assert cache.claim("k", "a", ttl_s=30)  # the owner may claim again
    cache.release("k", "b")  # not b's: nothing happens
    assert not cache.claim("k", "b", ttl_s=30)
    cache.release("k", "a")
    assert cache.claim("k", "b", ttl_s=0.05)
    assert not cache.renew("k", "a", ttl_s=30)
    time.sleep(0.1)
    assert cache.claim("k", "a", ttl_s=30)  # b's claim expired


def test_answer_and_release_arrive_together(cache_at: CacheAt):
    cache = ResponseCache(cache_at())
    assert cache.claim("k", "a")
    assert cache.claim_state("k") == (None, True)
    cache.submit("k", Completion(text="yes", finish_reason="stop"), "fake", "m", release_owner="a")
    cache.flush()
    answer, held = cache.claim_state("k")
    assert answer is not None and answer.text == "yes" and not held


def test_waiter_gets_the_claimants_answer_and_a_failed_call_hands_over(cache_at: CacheAt):
    cache = ResponseCache(cache_at())
    made: list[str] = []

    def caller(name: str, ok: bool):
        async def call() -> Completion:
            made.append(name)
            await asyncio.sleep(0.2)
            return Completion(text=name, finish_reason="stop") if ok else Completion(text=None, error="boom")

        return call

    async def both(first_ok: bool):
        first = asyncio.create_task(claim_or_wait(cache, f"k{first_ok}", caller("first", first_ok), "f", "m", poll_s=0.02))
        await asyncio.sleep(0.05)
        second = await claim_or_wait(cache, f"k{first_ok}", caller("second", True), "f", "m", poll_s=0.02)
        return await first, second

    first, second = asyncio.run(both(True))
    assert made == ["first"] and first.text == second.text == "first" and second.cached
    made.clear()
    first, second = asyncio.run(both(False))
    assert made == ["first", "second"] and not first.ok and second.text == "second"


def test_two_processes_pay_each_key_once(tmp_path, cache_at: CacheAt):
    db, log = cache_at(), tmp_path / "calls.log"
    keys = [f"k{i:02d}" for i in range(20)]
    # Opposite orders over the same keys: each holds claims the other waits for, and neither deadlocks.
    procs = [worker(db, log, keys, "--call-s", "0.1"), worker(db, log, keys[::-1], "--call-s", "0.1")]
    results = [answers(p) for p in procs]
    made = calls(log)
    assert sorted(made) == keys  # exactly N calls in total, one per key
    assert results[0] == results[1] and set(results[0]) == set(keys)


def test_overlapping_key_sets_in_different_orders(tmp_path, cache_at: CacheAt):
    db, log = cache_at(), tmp_path / "calls.log"
    a = [f"k{i:02d}" for i in range(0, 15)]
    b = [f"k{i:02d}" for i in range(5, 20)][::-1]
    procs = [worker(db, log, a, "--call-s", "0.05"), worker(db, log, b, "--call-s", "0.05")]
    for p in procs:
        answers(p)
    assert sorted(calls(log)) == sorted(set(a) | set(b))


def test_killed_claimant_expires_and_the_waiter_takes_over(tmp_path, cache_at: CacheAt):
    db, log = cache_at(), tmp_path / "calls.log"
    claimant = worker(db, log, ["k"], "--hang", "--ttl-s", "1")
    deadline = time.monotonic() + 30
    while "k" not in calls(log):
        assert time.monotonic() < deadline and claimant.poll() is None, claimant.stderr.read() if claimant.stderr else ""
        time.sleep(0.05)
    waiter = worker(db, log, ["k"], "--ttl-s", "1")
    time.sleep(0.5)
    os.kill(claimant.pid, signal.SIGKILL)
    claimant.wait()
    started = time.monotonic()
    got = answers(waiter)
    assert time.monotonic() - started < 5  # one ttl, not forever
    assert got["k"] == f"answer to k from {waiter.pid}"
    assert calls(log) == ["k", "k"]  # the dead claimant's call and the waiter's own


def test_live_claimant_is_not_taken_over_while_it_renews(cache_at: CacheAt):
    cache = ResponseCache(cache_at())
    made: list[str] = []

    async def slow() -> Completion:
        made.append("slow")
        await asyncio.sleep(1.0)  # longer than the ttl: only the heartbeat keeps the claim
        return Completion(text="slow", finish_reason="stop")

    async def fast() -> Completion:
        made.append("fast")
        return Completion(text="fast", finish_reason="stop")

    async def both():
        first = asyncio.create_task(claim_or_wait(cache, "k", slow, "f", "m", ttl_s=0.3, poll_s=0.02))
        await asyncio.sleep(0.05)
        return await first, await claim_or_wait(cache, "k", fast, "f", "m", ttl_s=0.3, poll_s=0.02)

    first, second = asyncio.run(both())
    assert made == ["slow"] and second.text == "slow"


def test_many_waiters_share_one_poll(cache_at: CacheAt, monkeypatch):
    cache = ResponseCache(cache_at())
    keys = [f"k{i}" for i in range(200)]
    for k in keys:
        assert cache.claim(k, "other process")
    reads: list[int] = []
    real = cache.claim_states
    monkeypatch.setattr(cache, "claim_states", lambda ks, since=None: reads.append(len(ks)) or real(ks, since))

    async def wait_all():
        waiting = [asyncio.create_task(cache.wait_for(k, poll_s=0.05)) for k in keys]
        await asyncio.sleep(0.5)  # about ten polls while the other process "calls"
        for k in keys:
            cache.submit(k, Completion(text=f"answer {k}", finish_reason="stop"), "f", "m", release_owner="other process")
        cache.flush()
        return await asyncio.gather(*waiting)

    got = asyncio.run(wait_all())
    assert [c.text for c in got] == [f"answer {k}" for k in keys]
    assert len(reads) <= 25 and max(reads) == 200  # each poll reads every waiting key at once


def test_three_processes_over_http_send_each_request_once(tmp_path, cache_at: CacheAt, fake_llm):
    fake_llm.reset(latency_ms=100)
    db, log = cache_at(), tmp_path / "calls.log"
    keys = [f"prompt-{i}" for i in range(15)]
    orders = [keys, keys[::-1], keys[7:] + keys[:7]]
    procs = [worker(db, log, order, "--url", fake_llm.url) for order in orders]
    results = [answers(p) for p in procs]
    stats = fake_llm.stats()
    assert stats["total"] == len(keys) and stats["max_repeats"] == 1  # one HTTP request per distinct prompt
    assert results[0] == results[1] == results[2]


# -- the batch claim: a whole batch's keys claimed in one transaction, an aged claim taken again ------


def test_claim_many_takes_free_expired_and_own_keys_and_returns_stored_answers(cache_at: CacheAt):
    cache = ResponseCache(cache_at())
    assert cache.claim("live", "other", ttl_s=30)
    assert cache.claim("expired", "other", ttl_s=0.05)
    assert cache.claim("mine", "me", ttl_s=30)
    cache.put("answered", Completion(text="stored", finish_reason="stop"), "f", "m")
    time.sleep(0.1)
    mine, answers = cache.claim_many(["free", "live", "expired", "mine", "answered", "free"], "me", ttl_s=30)
    assert mine == {"free", "expired", "mine"}
    assert set(answers) == {"answered"} and answers["answered"].text == "stored" and answers["answered"].cached
    assert cache.claim_state("answered") == (answers["answered"], False)  # its claim released in the same transaction
    assert not cache.claim("live", "me") and not cache.claim("expired", "other")
    cache.release_many(["free", "expired", "live"], "me")  # only what "me" holds is released
    assert cache.claim("free", "third") and cache.claim("expired", "third") and not cache.claim("live", "third")


def test_a_batch_claim_used_at_once_costs_no_second_claim(cache_at: CacheAt, monkeypatch):
    from poll_assets.llm.online.runner import _Lease

    cache = ResponseCache(cache_at())
    lease = _Lease(cache, ttl_s=30)
    single: list[str] = []
    monkeypatch.setattr(cache, "claim", lambda key, *a, **k: single.append(key) or True)

    async def go():
        mine, _ = await lease.claim_batch(["a", "b"])
        return mine, await lease.take("a"), await lease.take("b")

    mine, a, b = asyncio.run(go())
    assert mine == {"a", "b"} and a == b == (True, None) and single == []


def test_an_aged_claim_is_taken_again_before_sending_and_never_from_a_live_owner(cache_at: CacheAt):
    from poll_assets.llm.online.runner import _Lease

    cache = ResponseCache(cache_at())
    lease = _Lease(cache, ttl_s=0.3)

    async def go():
        mine, _ = await lease.claim_batch(["taken", "answered", "idle"])
        assert mine == {"taken", "answered", "idle"}
        await asyncio.sleep(0.4)  # queued past the ttl: every claim expired
        # Meanwhile other processes took two of them over: one still calls, one has answered.
        assert cache.claim("taken", "other", ttl_s=30) and cache.claim("answered", "another", ttl_s=30)
        cache.submit("answered", Completion(text="theirs", finish_reason="stop"), "f", "m", release_owner="another")
        cache.flush()
        return await lease.take("taken"), await lease.take("answered"), await lease.take("idle")

    taken, answered, idle = asyncio.run(go())
    assert taken == (False, None)  # held by a live process: not sent here
    assert answered[1] is not None and answered[1].text == "theirs"  # answered elsewhere: not sent again
    assert idle == (True, None)  # expired and free: ours again, taken over exactly once
    assert cache.claim_state("idle") == (None, True) and not cache.claim("idle", "other")
    assert cache.claim_state("answered")[1] is False  # the re-claim was released with the answer


def test_run_calls_does_not_send_a_key_another_live_process_holds(cache_at: CacheAt):
    from poll_assets.llm.base import request_key
    from poll_assets.llm.online.runner import run_calls
    from poll_assets_tests.fake_backend import FakeBackend, make_requests, with_policy

    cache = ResponseCache(cache_at())
    backend = FakeBackend()
    requests = make_requests(6)
    held = request_key(backend.provider, backend.model, backend.base_url, requests[2])
    assert cache.claim(held, "other process", ttl_s=30)

    async def go():
        batch = asyncio.create_task(run_calls(*with_policy(backend, max_concurrency=2), requests, cache))
        await asyncio.sleep(0.5)  # the other five are done; the held one waits for its owner
        assert not batch.done()
        cache.submit(held, Completion(text="from the other process", finish_reason="stop"), "f", "m",
                     release_owner="other process")
        return await batch

    batch = asyncio.run(go())
    assert backend.total_calls == 5 and backend.attempts["q2"] == 0
    assert batch.completions[2].text == "from the other process" and batch.completions[2].cached
    assert batch.stats.calls == 5 and batch.stats.cache_hits == 1


def test_a_stopped_batch_releases_the_claims_of_calls_it_never_sent(cache_at: CacheAt):
    from poll_assets.llm.base import FatalProviderError, request_key
    from poll_assets.llm.online.runner import BatchAbortedError, run_calls
    from poll_assets_tests.fake_backend import FakeBackend, make_requests, with_policy

    cache = ResponseCache(cache_at())
    backend = FakeBackend(script=lambda text, attempt: FatalProviderError("auth", "fake: 401") if text == "q0" else None)
    requests = make_requests(20)
    try:
        asyncio.run(run_calls(*with_policy(backend, max_concurrency=1), requests, cache))
        raise AssertionError("the batch should have stopped")
    except BatchAbortedError:
        pass
    keys = [request_key(backend.provider, backend.model, backend.base_url, r) for r in requests]
    assert backend.total_calls < 20
    assert not any(held for _, held in cache.claim_states(keys).values())  # another process may take them at once
