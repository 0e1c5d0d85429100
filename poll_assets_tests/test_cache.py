"""The response cache: hits, modes, crash safety and several writer processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from poll_assets.llm.base import Completion, ProviderError
from poll_assets.llm.cache.response_cache import CacheError, ResponseCache, default_cache_path
from poll_assets.llm.resources import ResponseCacheResource
from poll_assets.llm.online.runner import run_calls
from poll_assets_tests.cache_backends import CacheAt, cache_at, stored_rows  # noqa: F401 (a fixture)
from poll_assets_tests.fake_backend import FakeBackend, with_policy, make_requests

REPO = Path(__file__).resolve().parents[1]


def run(target, requests, **kwargs):
    return asyncio.run(run_calls(*target, requests, **kwargs))


def worker(db: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "poll_assets_tests.fake_backend", str(db), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_put_get_roundtrip_and_wal(cache_at: CacheAt):
    cache = ResponseCache(cache_at())
    c = Completion(text="hi", finish_reason="stop", input_tokens=3, output_tokens=1, model="m", extra={"x": [1]})
    assert cache.put("k1", c, "fake", "m")
    got = cache.get("k1")
    assert got is not None and got.text == "hi" and got.extra == {"x": [1]}
    assert got.cached and got.call_id == "k1"
    assert cache.get("missing") is None
    if cache.path is not None:
        import sqlite3

        with sqlite3.connect(cache.path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_file_folders_are_created(tmp_path):
    cache = ResponseCache(tmp_path / "sub" / "c.sqlite")
    assert cache.put("k1", Completion(text="hi"), "fake", "m") and cache.get("k1").text == "hi"


def test_failures_are_not_stored(cache_at: CacheAt):
    cache = ResponseCache(cache_at())
    failed = Completion(text=None, error="boom", error_kind="server")
    assert not cache.put("k", failed, "fake", "m")
    assert len(cache) == 0


def test_get_many_handles_large_key_sets(cache_at: CacheAt):
    cache = ResponseCache(cache_at())
    for i in range(1200):
        cache.put(f"k{i}", Completion(text=str(i)), "fake", "m")
    found = cache.get_many([f"k{i}" for i in range(0, 2400, 2)])
    assert len(found) == 600 and found["k1198"].text == "1198"


def test_repeat_run_is_served_from_cache_with_zero_backend_calls(cache_at: CacheAt):
    cache = ResponseCache(cache_at())
    reqs = make_requests(25)
    first = FakeBackend()
    run(with_policy(first), reqs, cache=cache)
    assert first.total_calls == 25 and len(cache) == 25

    second = FakeBackend(prefix="DIFFERENT")
    batch = run(with_policy(second), reqs, cache=cache)
    assert second.total_calls == 0
    assert batch.stats.cache_hits == 25 and batch.stats.calls == 0
    assert all(c.cached and c.text.startswith("answer to") for c in batch.completions)
    assert [c.call_id for c in batch.completions] == [c.call_id for c in run(with_policy(first), reqs).completions]


def test_key_depends_on_model_and_params(cache_at: CacheAt):
    cache = ResponseCache(cache_at())
    run(with_policy(FakeBackend(model="a")), make_requests(3), cache=cache)
    other_model = FakeBackend(model="b")
    run(with_policy(other_model), make_requests(3), cache=cache)
    assert other_model.total_calls == 3
    other_params = FakeBackend(model="a")
    run(with_policy(other_params), make_requests(3, max_new_tokens=17), cache=cache)
    assert other_params.total_calls == 3


def test_bypass_neither_reads_nor_writes(cache_at: CacheAt):
    path = cache_at()
    run(with_policy(FakeBackend()), make_requests(5), cache=ResponseCache(path))
    backend = FakeBackend(prefix="new")
    batch = run(with_policy(backend), make_requests(8), cache=ResponseCache(path, "bypass"))
    assert backend.total_calls == 8 and batch.stats.cache_hits == 0
    assert stored_rows(path) == 5  # q5..q7 were not written
    assert ResponseCache(path).get(batch.completions[0].call_id).text == "answer to q0"  # not overwritten


def test_refresh_rerequests_and_overwrites(cache_at: CacheAt):
    path = cache_at()
    reqs = make_requests(5)
    run(with_policy(FakeBackend()), reqs, cache=ResponseCache(path))
    backend = FakeBackend(prefix="fresh")
    batch = run(with_policy(backend), reqs, cache=ResponseCache(path, "refresh"))
    assert backend.total_calls == 5 and batch.stats.cache_hits == 0
    again = FakeBackend()
    reread = run(with_policy(again), reqs, cache=ResponseCache(path))
    assert again.total_calls == 0
    assert [c.text for c in reread.completions] == [f"fresh q{i}" for i in range(5)]


def test_rerun_redoes_only_failed_rows(cache_at: CacheAt):
    cache = ResponseCache(cache_at())
    reqs = make_requests(10)
    flaky = FakeBackend(script=lambda t, a: ProviderError("server", "503") if t in ("q3", "q7") else None)
    first = run(with_policy(flaky, max_retries=1), reqs, cache=cache)
    assert first.stats.failures == 2 and len(cache) == 8
    healthy = FakeBackend()
    second = run(with_policy(healthy), reqs, cache=cache)
    assert sorted(healthy.attempts) == ["q3", "q7"]
    assert all(c.ok for c in second.completions) and second.stats.cache_hits == 8


def test_completed_calls_survive_a_killed_run(cache_at: CacheAt):
    db = cache_at()
    n = 200
    proc = worker(db, "--n", str(n), "--latency", "0.02", "--concurrency", "2")
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if stored_rows(db) >= 10:
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"worker wrote nothing in 15 s: {proc.stderr.read() if proc.poll() is not None else ''}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    saved = stored_rows(db)
    assert 10 <= saved < n

    backend = FakeBackend()
    batch = run(with_policy(backend, max_concurrency=16), make_requests(n), cache=ResponseCache(db))
    assert backend.total_calls == n - saved
    assert batch.stats.cache_hits == saved and all(c.ok for c in batch.completions)


def test_several_processes_share_one_cache(cache_at: CacheAt):
    db = cache_at()
    procs = [worker(db, "--n", "300", "--tag", tag, "--concurrency", "16") for tag in ("a", "b", "c")]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.strip() == "ok 300 calls 300"
    assert stored_rows(db) == 900


def test_cache_resource_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert default_cache_path() == tmp_path / "home" / "llm_cache.sqlite"
    res = ResponseCacheResource()
    cache = res.get_cache()
    assert cache is res.get_cache()  # one per resource instance
    assert cache.path == (tmp_path / "home" / "llm_cache.sqlite").resolve() and cache.mode == "use"

    monkeypatch.delenv("DAGSTER_HOME")
    monkeypatch.chdir(tmp_path)
    assert default_cache_path() == tmp_path / ".dagster_home" / "llm_cache.sqlite"

    explicit = ResponseCacheResource(path=str(tmp_path / "x.sqlite"), mode="refresh").get_cache()
    assert explicit.path == (tmp_path / "x.sqlite").resolve() and explicit.mode == "refresh"


def test_bad_mode_and_unwritable_path_are_clear(tmp_path):
    with pytest.raises(ValueError, match="cache mode 'sometimes'"):
        ResponseCache(tmp_path / "c.sqlite", "sometimes")  # type: ignore[arg-type]
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = ResponseCache(blocker / "c.sqlite")
    with pytest.raises(CacheError, match=str(blocker)):
        cache.put("k", Completion(text="x"), "fake", "m")


def test_resource_from_panel_settings(tmp_path):
    from poll_assets.pipeline import build_resources
    from poll_assets_tests.fake_panel import write_panel

    panel, _ = write_panel(tmp_path, extra={"cache": {"mode": "bypass", "path": str(tmp_path / "p.sqlite")}})
    res = build_resources(panel, str(tmp_path / "storage"))["response_cache"]
    assert res.get_cache().mode == "bypass" and res.resolved_path() == tmp_path / "p.sqlite"


def test_submitted_completions_are_committed_in_groups_by_the_writer_thread(cache_at: CacheAt):
    cache = ResponseCache(cache_at())
    for i in range(500):
        assert cache.submit(f"k{i}", Completion(text=str(i)), "fake", "m")
    assert not cache.submit("failed", Completion(text=None, error="boom"), "fake", "m")
    assert cache.flush(timeout_s=30) == 500
    # Another connection (another process, in real runs) sees every row once flush returns.
    assert stored_rows(cache_at()) == 500
    assert ResponseCache(cache_at()).get("k499").text == "499"


def test_a_failed_group_write_surfaces_at_flush_naming_the_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = ResponseCache(blocker / "c.sqlite")
    cache.submit("k", Completion(text="x"), "fake", "m")
    with pytest.raises(CacheError, match=str(blocker)):
        cache.flush(timeout_s=30)
    assert cache.flush(timeout_s=30) == 0  # reported once; nothing was written


def test_run_calls_waits_for_its_cache_writes(cache_at: CacheAt):
    db = cache_at()
    backend = FakeBackend()
    batch = run(with_policy(backend, max_concurrency=16), make_requests(300), cache=ResponseCache(db))
    assert all(c.ok for c in batch.completions)
    assert stored_rows(db) == 300  # committed before run_calls returned, not "eventually"


def test_unreachable_postgres_is_a_clear_error_without_the_password():
    cache = ResponseCache("postgresql://poll:s3cret-pw@127.0.0.1:1/cache_db")
    assert "s3cret" not in repr(cache)
    with pytest.raises(CacheError, match=r"response cache postgresql://127\.0\.0\.1:1/cache_db: cannot open") as err:
        cache.get("k")
    assert "s3cret" not in str(err.value)


def test_a_forked_child_opens_its_own_connection_and_leaves_the_parents(cache_at: CacheAt):
    cache = ResponseCache(cache_at())
    assert cache.put("k", Completion(text="before"), "fake", "m")
    pid = os.fork()
    if pid == 0:  # the child: reads and writes through its own connection, then exits at once
        code = 1
        try:
            code = 0 if cache.get("k").text == "before" and cache.put("c", Completion(text="child"), "fake", "m") else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's own connection still works (a child closing the inherited one would end it).
    assert cache.get("c").text == "child"
    assert cache.put("p", Completion(text="parent"), "fake", "m") and len(cache) == 3


_OPEN_AT_ONCE = """
import sys, time
from poll_assets.llm.cache.response_cache import ResponseCache
start = float(sys.argv[2])
while time.time() < start:
    pass
print(len(ResponseCache(sys.argv[1])))
"""


def test_processes_opening_a_new_sqlite_file_at_once_all_succeed(tmp_path):
    """The switch of a new file to WAL can answer "database is locked" without waiting; every
    process that opens the cache at the same moment must still get it."""
    for round_ in range(3):
        db = tmp_path / f"new-{round_}.sqlite"
        start = time.time() + 1.5  # after every interpreter has started
        procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AT_ONCE, str(db), str(start)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            assert out.strip() == "0"



def test_answers_name_the_member_that_paid_so_the_estimate_uses_its_own_mean(cache_at: CacheAt):
    # A generator and a judge of one model write very different lengths: the estimate must take
    # each member's own mean, and fall back to the model's mean for a member with no answers yet.
    from poll_assets.estimate import expected_output
    from poll_assets.panel import Member

    cache = ResponseCache(cache_at())
    for name, tokens in (("writer", 400), ("judge", 20)):
        backend = FakeBackend(model="shared-1", member=name, usage=(10, tokens))
        backend.provider = "openai"  # as a panel member of a registered provider would write them
        requests = make_requests(3, name, max_new_tokens=1000)
        batch = asyncio.run(run_calls(*with_policy(backend), requests, cache))
        assert all(c.ok for c in batch.completions)
    cache.flush()
    assert cache.output_tokens_seen("openai", "shared-1", member="writer") == (3, 400.0)
    assert cache.output_tokens_seen("openai", "shared-1", member="judge") == (3, 20.0)
    assert cache.output_tokens_seen("openai", "shared-1") == (6, 210.0)
    # The member's name is stored beside the answer, not read back into it.
    stored = cache.get(batch.completions[0].call_id)
    assert stored is not None and stored.text == batch.completions[0].text

    def member(name: str) -> Member:
        return Member(name=name, provider="openai", model="shared-1", family=name, params={"max_new_tokens": 1000})

    assert expected_output(member("writer"), cache) == (400.0, "mean of 3 cached answers of this member")
    assert expected_output(member("judge"), cache) == (20.0, "mean of 3 cached answers of this member")
    assert expected_output(member("newcomer"), cache) == (
        210.0, "mean of 6 cached answers of shared-1 (none yet of this member)")
    assert expected_output(member("newcomer"), None) == (1000.0, "max_new_tokens bound (no cached answers yet)")


def test_cache_keys_and_stored_rows_are_those_of_earlier_releases(tmp_path):
    # Keys and rows are built without dataclasses.asdict now (its deep copies cost ~100 µs a call);
    # a key that changed would make every cache written before miss, and pay for its calls again.
    from poll_assets.llm.base import CallRequest, GenerationParams, request_key
    from poll_assets.llm.cache.response_cache import _row

    params = GenerationParams(temperature=0.7, max_new_tokens=9, top_p=0.9, stop=("a", "\n"), seed=3)
    request = CallRequest.build([{"role": "system", "content": "s"}, {"role": "user", "content": "héllo"}], params,
                                {"type": "object", "properties": {"r": {"type": "integer"}}}, 2)
    # Computed with the release before this change (asdict of the params).
    assert request_key("openai", "m", "http://x", request) == \
        "1bb2d7bb6cae950d405ac06e5129dc71859044e811c9d774da52d76db846ffa1"
    c = Completion(text="t", finish_reason="stop", cached=True, call_id="old", extra={"refusals": ["x"], "n": {"a": (1, 2)}})
    _, _, _, blob, _ = _row("k", c, "openai", "m", member="gen")
    assert blob == ('{"text": "t", "finish_reason": "stop", "input_tokens": 0, "output_tokens": 0, "latency_s": 0.0, '
                    '"model": null, "request_id": null, "output_mode": "text", "cached": false, "attempts": 1, '
                    '"error": null, "error_kind": null, "call_id": "k", "cached_input_tokens": 0, '
                    '"cache_write_tokens": 0, "extra": {"refusals": ["x"], "n": {"a": [1, 2]}}, "member": "gen"}')


def test_holds_all_counts_stored_answers_without_reading_them(cache_at: CacheAt, monkeypatch):
    location = cache_at()
    cache = ResponseCache(location)
    cache.put("a", Completion(text="x", finish_reason="stop"), "p", "m")
    cache.put("b", Completion(text="y", finish_reason="stop"), "p", "m")
    monkeypatch.setattr(cache.store, "read", lambda keys: pytest.fail("holds_all must not read the answers"))
    assert asyncio.run(cache.aholds_all(["a", "b", "a"]))
    assert not asyncio.run(cache.aholds_all(["a", "b", "c"]))
    assert not asyncio.run(ResponseCache(location, mode="refresh").aholds_all(["a"]))  # refresh never serves from it
