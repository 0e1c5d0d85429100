"""The call path's reliability guarantees over real HTTP (the OpenAI SDK against the loopback fake
server): limits that adapt to a tighter provider, retries that ride out a short outage, a circuit
breaker that fails a dead provider fast, and the lease that pays a request once across processes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from poll_assets.llm.cache.response_cache import ResponseCache
from poll_assets.llm.providers.openai_api import OpenAIChatBackend
from poll_assets.llm.online.policy import CallPolicy, RetryPolicy
from poll_assets.llm.online.runner import run_calls
from poll_assets_tests.cache_backends import CacheAt, cache_at  # noqa: F401 (a fixture)
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
from poll_assets.llm.cache.response_cache import ResponseCache
from poll_assets.llm.online.policy import CallPolicy
from poll_assets.llm.online.runner import run_calls
from poll_assets_tests.fake_backend import make_requests
from poll_assets_tests.test_reliability import openai_member
batch = asyncio.run(run_calls(openai_member(sys.argv[1]), CallPolicy(max_concurrency=4), make_requests(40),
                              ResponseCache(sys.argv[2])))
print(sum(c.ok for c in batch.completions), batch.stats.calls, batch.stats.cache_hits)
"""


def test_two_processes_running_one_batch_pay_each_call_once(fake_llm, cache_at: CacheAt):
    # On each database the cache can live in (SQLite; PostgreSQL when POLL_TEST_POSTGRES_URL is set).
    fake_llm.reset(latency_ms=150)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-c", _TWO_RUNS, fake_llm.url, cache_at()]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    counts = [tuple(map(int, out.split())) for out, _ in outs]
    stats = fake_llm.stats()
    assert stats["total"] == 40 and stats["max_repeats"] == 1, counts
    assert all(ok == 40 for ok, _, _ in counts)
    assert sum(calls for _, calls, _ in counts) == 40  # each process made its share; the other's were cache hits
    assert all(calls + hits == 40 for _, calls, hits in counts)


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "DAGSTER_HOME": str(home), **extra}


def test_two_poll_assets_runs_of_one_shard_make_7n_requests(fake_llm, tmp_path):
    # The paper panel (4 generators, 3 judges) on N = 10 prompts: 4N generation calls and 3N judge
    # calls, 7N = 70 requests. Two `poll-assets run` processes of the same shard, started together on
    # one DAGSTER_HOME (so one response cache), make those 70 between them, not 140.
    from poll_assets_tests.test_paper_fake_server import CANARY, KEY_VARS, paper_on_fake

    fake_llm.reset(latency_ms=1500)
    path, raw = paper_on_fake(tmp_path, fake_llm.url)
    raw.pop("cache")  # the default: the shared cache in $DAGSTER_HOME
    raw["source"].update(num_examples=10, shard_size=10)
    path.write_text(__import__("yaml").safe_dump(raw))
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    # The instance's SQLite tables exist before the two runs start: two processes creating a fresh
    # instance's schema at the same moment race each other (a Dagster set-up matter, not the calls').
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.get_runs(limit=1)
        instance.get_latest_materialization_event(dg.AssetKey("prompts"))
    env = cli_env(home, **{var: CANARY for var in KEY_VARS})
    argv = [sys.executable, "-m", "poll_assets.cli", "run", "--panel", str(path)]
    procs = [subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, "\n".join(line for line in out.splitlines() if " - DEBUG - " not in line)[-4000:]
    n, members = 10, len(raw["generators"]) + len(raw["judges"])
    stats = fake_llm.stats()
    print(f"\ntwo runs of one shard, paper panel, N={n}: {stats['total']} requests (7N = {members * n})")
    assert members == 7 and stats["total"] == members * n and stats["max_repeats"] == 1


def step_seconds(log: str, step: str) -> float:
    """Seconds between the first and the last line a step logged, from the console log's timestamps."""
    import datetime
    import re

    stamps = [datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S") for m in
              re.finditer(rf"^(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d) \+0000 - dagster - \w+ - .* - {step} - ", log, re.M)]
    assert stamps, f"no log line of step {step}"
    return (stamps[-1] - stamps[0]).total_seconds()


def test_cli_says_why_a_dead_provider_stopped_the_run_and_how_to_resume(fake_llm, tmp_path):
    # Both generators point at a port nothing listens on: 2 x 70 = 140 calls, default retry settings.
    import yaml

    from poll_assets_tests.test_faults import KEY_ENV, http_panel_file

    path = http_panel_file(tmp_path, fake_llm, 70, retry_window_s=None, max_retries=5)
    raw = yaml.safe_load(path.read_text())
    dead = f"http://127.0.0.1:{closed_port()}"
    for g in raw["generators"]:
        g["base_url"] = dead + ("/v1" if g["provider"] == "openai" else "")
    path.write_text(yaml.safe_dump(raw))
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "poll_assets.cli", "run", "--panel", str(path)], cwd=tmp_path,
                            env=cli_env(home, **{KEY_ENV: "fake-key"}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().startswith("panel ")  # the definitions are loaded
    loaded = time.monotonic()
    stdout, stderr = proc.communicate(timeout=300)
    took = time.monotonic() - start
    run_s = time.monotonic() - loaded
    proc.stdout, proc.stderr = stdout, stderr  # type: ignore[assignment]
    step_s = step_seconds(stderr, "generations")
    print(f"\ndead provider through the CLI: exit {proc.returncode} after {took:.1f}s (process start included), "
          f"{run_s:.1f}s from the command's first line (its definitions loaded) to its exit, the generations step "
          f"{step_s:.0f}s from its first log line to its failure (1 s resolution)")
    assert proc.returncode == 1, stdout + stderr
    assert took < 60  # Python's and Dagster's start-up included; the calls themselves take well under a second
    assert step_s < 15  # the step that met the dead provider: its preflight, its calls, its failure
    # One failure line for the stage step, then one line per member with its own message.
    assert "step failed: generations: 2 of 2 members failed" in proc.stderr, proc.stderr
    text = proc.stderr[proc.stderr.index("step failed: generations: "):]
    for member in ("gen_hf", "gen_openai"):
        assert f"generations/{member}: member '{member}'" in text, text
    assert "circuit breaker open: 8 attempts in a row got no answer (threshold 8 in a row)" in text
    assert "connection failed" in text and "failure rate 1.000" in text
    assert "Re-run the shard when the provider is back" in text
    assert fake_llm.stats()["total"] == 0  # the judges never ran


# -- the breaker rides out outages of a provider that was answering ---------------------------------------


def test_an_answer_to_a_request_sent_before_the_outage_leaves_the_breaker_open():
    """A request in flight when the provider went away may still be answered; that says nothing of
    the provider now, so only an answer to a request sent after the breaker opened closes it."""
    from poll_assets.llm.base import ProviderError
    from poll_assets.llm.online.runner import _Breaker

    async def scenario() -> tuple[bool, bool, list[float]]:
        breaker = _Breaker(after=2, window_s=60)
        breaker.success(time.monotonic())  # the provider was answering
        before = time.monotonic()
        for _ in range(2):
            breaker.failure(ProviderError("connection", "refused"))
        stale_left_it_open = (breaker.success(before), breaker.is_open)[1]
        breaker.success(time.monotonic())  # a probe's answer
        return stale_left_it_open, breaker.is_open, breaker.outages

    stale_left_it_open, still_open, outages = asyncio.run(scenario())
    assert stale_left_it_open and not still_open and len(outages) == 1


def test_a_ten_second_refused_outage_mid_batch_waits_probes_and_pays_nothing_twice(fake_llm, tmp_path):
    # The server stops listening at the 60th request for 10 s. Default policy: retry_window_s 90.
    fake_llm.reset(latency_ms=20, refuse_from_request=60, refuse_s=10.0)
    policy = CallPolicy(max_concurrency=8)
    batch = asyncio.run(run_calls(openai_member(fake_llm.url), policy, make_requests(200),
                                  ResponseCache(tmp_path / "c.sqlite")))
    stats, server = batch.stats, fake_llm.stats()
    print(f"\n10 s refused outage, 200 calls: {stats.elapsed_s:.1f}s, outages ridden out {stats.outages}, "
          f"{stats.probes} probes, {stats.retries} attempts beyond one per call, "
          f"{server['total']} requests reached the server, at most {server['max_answers_per_body']} answer per body")
    assert all(c.ok for c in batch.completions), batch.failure_counts()
    assert batch.breaker is None and len(stats.outages) == 1 and stats.outages[0] >= 9.0
    assert server["max_answers_per_body"] == 1 and server["total"] == 200
    # While open, calls waited instead of spending attempts: the failed ones are the attempts that
    # opened it (the threshold, 8 = one per slot), those already past the breaker when it opened (at
    # most one per worker: twice as many workers as slots, so up to 2 per slot; a loaded machine
    # reaches it), and the probes. Nothing like one failed attempt per waiting call per backoff.
    assert 1 <= stats.probes <= 6 and stats.retries <= 3 * policy.max_concurrency + stats.probes


def test_an_outage_longer_than_the_window_fails_the_member_with_the_breakers_message(fake_llm):
    fake_llm.reset(latency_ms=20, refuse_from_request=30, refuse_s=6.0)
    policy = CallPolicy(max_concurrency=4, retry_window_s=2.0, retry=RetryPolicy(base_s=0.2, cap_s=1.0))
    start = time.monotonic()
    batch = asyncio.run(run_calls(openai_member(fake_llm.url), policy, make_requests(120), label="generations/m"))
    took = time.monotonic() - start
    print(f"\n6 s outage, 2 s window: failed after {took:.1f}s, {batch.stats.probes} probes")
    assert batch.provider_down and batch.breaker is not None
    assert batch.breaker.startswith("circuit breaker open: no answer for 2.")
    assert "after the provider stopped answering" in batch.breaker and "connection failed" in batch.breaker
    assert took < 5.0  # the window, not the outage, bounds the wait
    message = batch.failure_message()
    assert "Re-run the shard when the provider is back" in message and "failure rate" in message
    time.sleep(max(0.0, 6.5 - took))  # let the server listen again before the next test


def test_a_server_that_refused_json_schema_is_not_probed_again_in_the_next_run(fake_llm, cache_at: CacheAt):
    # llama-cpp-python's server refuses json_schema with a 500 and takes json_object with a schema.
    # The first run meets that refusal once; the second run (a new backend, as a new process has)
    # starts from json_object, read from the response cache's store (SQLite; PostgreSQL when configured).
    fake_llm.reset(llama_cpp=["llama"])
    location = cache_at()
    schema = {"type": "object", "properties": {"rating": {"type": "integer"}}, "required": ["rating"]}

    def run(offset: int) -> tuple[int, int]:
        backend = OpenAIChatBackend("smol", provider="openai_compatible", base_url=f"{fake_llm.url}/llama/v1",
                                    member="judge")
        requests = [dataclasses.replace(r, json_schema=schema) for r in make_requests(10, tag=f"run{offset}-")]
        before = sum(1 for b in fake_llm.bodies if (b["body"].get("response_format") or {}).get("type") == "json_schema")
        batch = asyncio.run(run_calls(backend, CallPolicy(max_concurrency=4), requests, ResponseCache(location)))
        assert all(c.ok and c.output_mode == "json_object" for c in batch.completions)
        refused = sum(1 for b in fake_llm.bodies if (b["body"].get("response_format") or {}).get("type") == "json_schema")
        return refused - before, batch.stats.calls

    first, second = run(0), run(100)
    print(f"\nrefused json_schema probes: first run {first[0]}, second run {second[0]} (calls {first[1]}, {second[1]})")
    assert first[0] == 1 and second[0] == 0


# -- interrupted runs ---------------------------------------------------------------------------------------


def test_sigterm_mid_run_fails_the_run_and_the_rerun_pays_only_for_what_is_missing(fake_llm, tmp_path):
    import signal

    from poll_assets_tests.test_faults import KEY_ENV, MEMBERS, http_panel_file

    n = 30
    fake_llm.reset(latency_ms=300, jitter_ms=100)
    path = http_panel_file(tmp_path, fake_llm, n, concurrency=3)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = cli_env(home, **{KEY_ENV: "fake-key"})
    argv = [sys.executable, "-m", "poll_assets.cli", "run", "--panel", str(path)]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while sum(fake_llm.stats()["outcomes"].values()) < 12:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the server never answered 12 requests"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    first = fake_llm.stats()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        statuses = [r.status for r in instance.get_runs()]
    needed = n * (len(MEMBERS["generators"]) + len(MEMBERS["judges"]))
    print(f"\nSIGTERM after 12 answers: exit {proc.returncode}, run status {[s.value for s in statuses]}, "
          f"{first['total']} requests sent and {first['max_answers_per_body']} answer per body at most")
    assert proc.returncode == 130, out[-3000:]
    assert statuses == [dg.DagsterRunStatus.FAILURE]  # not left STARTED
    assert "interrupted (Ctrl-C or SIGTERM)" in out and 0 < first["total"] < n * len(MEMBERS["generators"])

    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    total = fake_llm.stats()
    print(f"re-run: exit {again.returncode}; requests over both runs {total['total']} for the {needed} needed; "
          f"most requests of one body {total['max_repeats']}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert total["total"] == needed and total["max_repeats"] == 1


def test_a_cache_that_fills_up_mid_batch_stops_the_calls_and_says_which_cache_and_why(fake_llm, tmp_path):
    # A full disk, simulated: once 20 requests reached the server, SQLite may not grow the file any more
    # (max_page_count at its current size), so the next commit fails with "database or disk is full".
    import threading

    from poll_assets.llm.cache.response_cache import CacheError

    fake_llm.reset(latency_ms=50)
    path = tmp_path / "c.sqlite"
    cache = ResponseCache(path)

    def fill_the_disk() -> None:
        while fake_llm.stats()["total"] < 20:
            time.sleep(0.005)
        with cache.store._lock:  # the store's own connection: the one the writer thread commits on
            conn = cache.store._connection()
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")

    filler = threading.Thread(target=fill_the_disk, daemon=True)
    filler.start()
    try:
        asyncio.run(run_calls(openai_member(fake_llm.url), CallPolicy(max_concurrency=4),
                              make_requests(300, tag="a fairly long prompt to fill pages " * 20), cache,
                              label="generations/m"))
        raise AssertionError("the batch should have failed")
    except CacheError as exc:
        message = str(exc)
    filler.join(timeout=5)
    sent = fake_llm.stats()["total"]
    stored = len(ResponseCache(path))
    print(f"\ncache full after 20 requests: the batch stopped after {sent} of 300 requests; {stored} answers "
          f"stored; message: {message[:300]}")
    assert f"response cache {path}" in message and "database or disk is full" in message
    assert "generations/m: member 'm'" in message and "re-run the shard" in message
    assert sent < 300  # no call was started once the cache failed
    assert 0 < stored <= sent and f"{stored} of this batch's answers are stored" in message
