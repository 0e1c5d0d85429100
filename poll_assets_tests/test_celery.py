"""A shard whose steps execute on two Celery workers (dagster-celery, Redis broker on loopback),
sharing the PostgreSQL instance (deploy/dagster.yaml), the response cache in that same database
(`cache: {backend: instance}`) and Parquet on S3 (moto). One worker is killed with SIGKILL while
its step is calling the provider; the re-run pays for no call that was already answered.

`.ci/run` starts PostgreSQL and Redis and sets POLL_TEST_POSTGRES_URL and POLL_TEST_REDIS_URL;
without them these tests skip, saying which is missing."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import pytest

from poll_assets.io_manager import read_partition, stored_partitions
from poll_assets_tests.cache_backends import PostgresDatabases, pg_databases, stored_rows  # noqa: F401
from poll_assets_tests.dagster_dev import require
from poll_assets_tests.fake_llm_server import FakeLLMServer, canonical_hash
from poll_assets_tests.scaleout import API_KEY_ENV, S3_ENV, http_panel, s3_endpoint, s3_prefix  # noqa: F401

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Found version mismatch.*dagster-(postgres|celery):UserWarning"),
]

REPO = Path(__file__).resolve().parents[1]
REDIS_URL_ENV = "POLL_TEST_REDIS_URL"
PARTITION = "shard-00000"
N_PROMPTS = 24
MAX_CONCURRENCY = 2  # per member: the bound on calls a killed step can have in flight
GENERATORS = ("gen_0", "gen_1")
JUDGES = ("judge_0", "judge_1")


@pytest.fixture
def redis_url() -> str:
    url = os.environ.get(REDIS_URL_ENV)
    require(bool(url), f"{REDIS_URL_ENV} is not set: no Redis broker for the Celery workers (.ci/run sets it; "
                       "locally `export POLL_TEST_REDIS_URL=$(bash .ci/start_redis.sh)`)")
    try:
        import dagster_celery  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"dagster-celery is not installed ({exc}); .ci/run installs it with --no-deps", pytrace=False)
    return url  # type: ignore[return-value]


class Cluster:
    """The processes of one deployment: Celery workers and shard runs, sharing one environment."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path, self.env = tmp_path, env
        self.procs: list[subprocess.Popen] = []

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = (self.tmp_path / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = self.tmp_path / f"{name}.log"  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def worker(self, name: str) -> subprocess.Popen:
        # --pool solo: the step runs in the worker process itself, so SIGKILL to it kills the step.
        # -I: the definitions are loaded before the worker says it is ready, not in its first step.
        proc = self._start(name, [sys.executable, "-m", "celery", "-A", "dagster_celery.app", "worker", "-Q", "dagster",
                                  "--pool", "solo", "-n", f"{name}@%h", "-I", "celery_definitions",
                                  "--without-gossip", "--without-mingle", "-l", "INFO"])
        wait_until(lambda: b"ready." in proc.log_path.read_bytes(), 90, f"worker {name} to start", proc)
        return proc

    def run(self, name: str) -> subprocess.Popen:
        return self._start(name, [sys.executable, "-m", "poll_assets_tests.celery_run", PARTITION])

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) while waiting for {what}; log:\n"
                        f"{proc.log_path.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def quiet(fake: FakeLLMServer, for_s: float = 3.0) -> bool:
    """True once the fake server has had no request in flight and no new one for `for_s` seconds."""
    total = fake.total
    start = time.monotonic()
    while time.monotonic() - start < for_s:
        if fake.in_flight or fake.total != total:
            return False
        time.sleep(0.1)
    return True


def tag_of_body(fake: FakeLLMServer) -> dict[str, str]:
    return {canonical_hash(b["body"]): b["tag"] for b in list(fake.bodies)}


@pytest.fixture
def cluster(tmp_path: Path, redis_url: str, pg_databases: PostgresDatabases, s3_endpoint: str,
            fake_llm: FakeLLMServer) -> Iterator[tuple[Cluster, str, str]]:
    instance_db = pg_databases.new("poll_celery")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")  # the deployment's own file
    panel = http_panel(tmp_path, fake_llm.url, n_prompts=N_PROMPTS, shard_size=N_PROMPTS,
                       cache={"backend": "instance"}, max_concurrency=MAX_CONCURRENCY)
    storage = s3_prefix()
    db = urlsplit(instance_db)
    backend = redis_url.rsplit("/", 1)[0] + "/1"
    env = {
        **os.environ, **S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "deploy")]),
        "DAGSTER_HOME": str(home), "POLL_PANEL": str(panel), "POLL_STORAGE_DIR": storage, API_KEY_ENV: "sk-fake",
        "DAGSTER_PG_HOST": db.hostname, "DAGSTER_PG_PORT": str(db.port or 5432),
        "DAGSTER_PG_USER": db.username or "postgres", "DAGSTER_PG_PASSWORD": db.password or "",
        "DAGSTER_PG_DB": db.path.lstrip("/"),
        "POLL_CELERY_BROKER_URL": redis_url, "POLL_CELERY_BACKEND_URL": backend,
    }
    nodes = Cluster(tmp_path, env)
    try:
        yield nodes, instance_db, storage
    finally:
        nodes.stop()
        _flush_redis(redis_url, backend)


def _flush_redis(*urls: str) -> None:
    import redis

    for url in urls:  # the next test must not receive this one's leftover tasks
        redis.Redis.from_url(url).flushdb()


def test_a_shard_runs_over_two_celery_workers_and_a_killed_worker_pays_nothing_twice(cluster, fake_llm):
    nodes, instance_db, storage = cluster
    fake_llm.reset(latency_ms=500, jitter_ms=50)  # a generator step lasts ~6 s
    first = nodes.worker("w1")
    nodes.worker("w2")
    run1 = nodes.run("run1")

    # Both generator steps are calling at the same time: each is on its own worker.
    both_busy = lambda: all(fake_llm.by_tag[g] >= 3 for g in GENERATORS)  # noqa: E731
    wait_until(both_busy, 180, "both generator steps to be calling", run1)
    assert all(fake_llm.by_tag[g] < N_PROMPTS for g in GENERATORS)  # neither had finished: they overlapped
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    before_kill = dict(fake_llm.by_body)
    in_flight_at_kill = fake_llm.in_flight

    # The surviving worker finishes its step; the run then waits for the dead worker's step, which
    # never reports back, so the run is interrupted (the executor revokes its tasks).
    wait_until(lambda: quiet(fake_llm), 120, "the surviving worker's calls to end")
    run1.send_signal(signal.SIGTERM)
    run1.wait(timeout=60)
    assert run1.returncode != 0

    nodes.worker("w3")  # two workers again
    run2 = nodes.run("run2")
    run2.wait(timeout=300)
    assert run2.returncode == 0, run2.log_path.read_text(errors="replace")[-4000:]

    # Nothing completed was paid twice. The only repeats are requests the killed step had sent
    # and not yet stored when it died: at most its member's max_concurrency, all of that member.
    stats = fake_llm.stats()
    tags = tag_of_body(fake_llm)
    repeated = {b: n for b, n in stats["by_body"].items() if n > 1}
    assert all(n == 2 for n in repeated.values())
    assert set(repeated) <= set(before_kill)
    assert len(repeated) <= MAX_CONCURRENCY
    assert len({tags[b] for b in repeated}) <= 1 and {tags[b] for b in repeated} <= set(GENERATORS)
    distinct = {t: sum(1 for b in stats["by_body"] if tags[b] == t) for t in (*GENERATORS, *JUDGES)}
    assert distinct == {t: N_PROMPTS for t in (*GENERATORS, *JUDGES)}
    assert stats["total"] == 4 * N_PROMPTS + len(repeated)
    print(f"requests: {stats['total']} for {4 * N_PROMPTS} distinct; repeated after the kill: {len(repeated)} "
          f"(in flight at the server just after the kill: {in_flight_at_kill}); by tag {stats['by_tag']}")

    # The answers are in the instance's own database, the shard's files in the bucket, and the
    # re-run's steps ran on live workers only. Which of the two takes which step is Celery's
    # choice: the re-run's steps are quick (their calls are cached), so one worker may take all.
    assert stored_rows(instance_db) == 4 * N_PROMPTS
    from poll_assets_tests.scaleout import forget_s3_listings

    forget_s3_listings()
    pairs = read_partition(storage, dg.AssetKey("preference_pairs"), PARTITION)
    assert pairs is not None and len(pairs) > 0
    for member in GENERATORS:
        assert stored_partitions(storage, dg.AssetKey(["generations", member])) == [PARTITION]
    run2_id = re.search(r"^([0-9a-f-]{36}) success$", run2.log_path.read_text(errors="replace"), re.M).group(1)
    workers = _workers_of(nodes.env, run2_id)
    assert workers and workers <= {"w2", "w3"}, workers


def _workers_of(env: dict[str, str], run_id: str) -> set[str]:
    """The Celery workers that ran the run's steps, from its engine events in the instance."""
    import json

    code = (
        "import json, sys, dagster as dg\n"
        "with dg.DagsterInstance.get() as i:\n"
        "    names = set()\n"
        f"    for e in i.all_logs({run_id!r}):\n"
        "        md = (e.dagster_event.engine_event_data.metadata if e.dagster_event and e.dagster_event.is_engine_event else {})\n"
        "        if 'Celery worker' in md: names.add(md['Celery worker'].value.split('@')[0])\n"
        "    print(json.dumps(sorted(names)))\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))
