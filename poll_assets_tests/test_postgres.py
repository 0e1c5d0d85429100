"""Instance storage on a real PostgreSQL server (dagster-postgres), with the deployment's own
deploy/dagster.yaml: run, event and schedule storage in Postgres. `.ci/run` starts a throwaway
server and sets POLL_TEST_POSTGRES_URL; locally, `url="$(bash .ci/start_postgres.sh)"` does too."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import dagster as dg
import pytest

from poll_assets.panel import load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets_tests.dagster_dev import FAST_PANEL, REPO_ROOT, require
from poll_assets_tests.fake_panel import scripted_resources, write_panel
from poll_assets_tests.instance import make_dagster_home

# dagster-postgres 0.29.27 is the newest release; it works with dagster 1.13.28 but warns that
# the versions differ (there is no 0.29.28 on PyPI).
pytestmark = pytest.mark.filterwarnings("ignore:Found version mismatch.*dagster-postgres:UserWarning")

URL_ENV = "POLL_TEST_POSTGRES_URL"
DEPLOY_YAML = REPO_ROOT / "deploy" / "dagster.yaml"
PARTITION = "shard-00001"


def _redacted(url: str) -> str:
    """host:port/db only; a password in the URL never reaches a message."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}{parts.path}"


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh database on the server named by POLL_TEST_POSTGRES_URL, dropped afterwards, so
    the assertions below see this test's run and nothing else."""
    url = os.environ.get(URL_ENV)
    require(bool(url), f"{URL_ENV} is not set; start a server with `bash .ci/start_postgres.sh`")
    try:
        import dagster_postgres  # noqa: F401
        import psycopg2
    except ImportError as exc:
        require(False, f"dagster-postgres is not installed ({exc})")
    parts = urlsplit(url)
    db = f"poll_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg2.connect(url, connect_timeout=10)
    except psycopg2.OperationalError as exc:
        pytest.fail(f"{URL_ENV}: cannot connect to PostgreSQL at {_redacted(url)}: {exc}", pytrace=False)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{db}"')
    try:
        yield urlunsplit(parts._replace(path=f"/{db}"))
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()


def _deploy_home(tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The deployment's own instance file (deploy/dagster.yaml) in a fresh DAGSTER_HOME, pointed at
    the test server through the variables it reads."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY_YAML, home / "dagster.yaml")
    parts = urlsplit(postgres_url)
    for var, value in {
        "DAGSTER_PG_HOST": parts.hostname, "DAGSTER_PG_PORT": str(parts.port or 5432),
        "DAGSTER_PG_USER": parts.username or "postgres", "DAGSTER_PG_PASSWORD": parts.password or "",
        "DAGSTER_PG_DB": parts.path.lstrip("/"),
    }.items():
        monkeypatch.setenv(var, value)
    return home


@pytest.mark.slow
def test_materialization_is_recorded_in_postgres(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg2
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    home = _deploy_home(tmp_path, postgres_url, monkeypatch)
    panel, path = load_panel(FAST_PANEL)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"), cache_path=str(tmp_path / "cache.sqlite"))
    job = defs.resolve_job_def(JOB_NAME)
    # Every asset the shard job materializes (preference_dataset belongs to publish_job).
    asset_keys = sorted(job.asset_layer.selected_asset_keys, key=lambda k: k.to_user_string())
    assert len(asset_keys) == 4 + len(panel.generators) + len(panel.judges)

    with dg.DagsterInstance.from_config(str(home)) as instance:
        # The instance really is on Postgres, not on the SQLite default.
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 2

        result = job.execute_in_process(partition_key=PARTITION, instance=instance, raise_on_error=False)
        assert result.success, f"run {result.run_id} failed on the Postgres instance"

        run = instance.get_run_by_id(result.run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags.get("dagster/partition") == PARTITION
        for key in asset_keys:
            assert instance.get_materialized_partitions(key) == {PARTITION}, key.to_user_string()
        latest = instance.get_latest_materialization_event(dg.AssetKey("preference_pairs"))
        assert latest is not None and latest.run_id == result.run_id
        assert latest.asset_materialization.partition == PARTITION

    # And straight from the database, without Dagster in between.
    with psycopg2.connect(postgres_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT status, pipeline_name FROM runs WHERE run_id = %s", (result.run_id,))
        assert cur.fetchall() == [("SUCCESS", JOB_NAME)]
        cur.execute(
            "SELECT asset_key, partition FROM event_logs WHERE run_id = %s AND dagster_event_type = 'ASSET_MATERIALIZATION'",
            (result.run_id,),
        )
        rows = cur.fetchall()
    assert sorted(rows) == sorted((key.to_string(), PARTITION) for key in asset_keys)
    conn.close()


def test_sqlite_event_logs_store_a_batch_one_event_at_a_time(tmp_path: Path) -> None:
    # Dagster's SQLite event logs keep EventLogStorage.store_event_batch (a loop of store_event), so
    # the CLI leaves DAGSTER_EVENT_BATCH_SIZE alone on them.
    from poll_assets.cli import EVENT_BATCH_ENV, enable_event_batching, event_log_batches

    with dg.DagsterInstance.local_temp(str(make_dagster_home(tmp_path / "home"))) as instance:
        assert not event_log_batches(instance)
        before = os.environ.get(EVENT_BATCH_ENV)
        assert not enable_event_batching(instance)
        assert os.environ.get(EVENT_BATCH_ENV) == before


@pytest.mark.slow
def test_postgres_instance_batches_a_shard_ranges_event_writes(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg2
    from dagster_postgres import PostgresEventLogStorage

    from poll_assets.cli import EVENT_BATCH_ENV, EVENT_BATCH_SIZE, enable_event_batching, event_log_batches

    home = _deploy_home(tmp_path, postgres_url, monkeypatch)
    monkeypatch.setenv(EVENT_BATCH_ENV, "unset below")  # restored after the test
    monkeypatch.delenv(EVENT_BATCH_ENV)
    batches: list[list[str]] = []
    store_batch = PostgresEventLogStorage.store_event_batch

    def spy(self: PostgresEventLogStorage, events: list) -> None:
        batches.append([e.get_dagster_event().event_type_value for e in events])
        store_batch(self, events)

    monkeypatch.setattr(PostgresEventLogStorage, "store_event_batch", spy)
    panel, path = write_panel(tmp_path, n_prompts=6, shard_size=2)  # 3 shards in one run
    shards = ["shard-00000", "shard-00001", "shard-00002"]
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"), cache_path=str(tmp_path / "c.sqlite"),
                             resource_overrides=scripted_resources(panel))
    job = defs.resolve_implicit_global_asset_job_def()
    keys = [k for k in job.asset_layer.selected_asset_keys if k != dg.AssetKey("preference_dataset")]
    tags = {"dagster/asset_partition_range_start": shards[0], "dagster/asset_partition_range_end": shards[-1]}

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert event_log_batches(instance)
        monkeypatch.setenv(EVENT_BATCH_ENV, "lots")
        with pytest.raises(SystemExit, match="DAGSTER_EVENT_BATCH_SIZE='lots' is not a whole number"):
            enable_event_batching(instance)
        monkeypatch.delenv(EVENT_BATCH_ENV)
        assert enable_event_batching(instance) and os.environ[EVENT_BATCH_ENV] == str(EVENT_BATCH_SIZE)
        result = job.execute_in_process(instance=instance, tags=tags, raise_on_error=False)
        assert result.success
        for key in keys:
            assert set(shards) <= instance.get_materialized_partitions(key), key.to_user_string()
            latest = instance.get_latest_materialization_event(key)
            assert latest is not None and latest.run_id == result.run_id
        logged = len(instance.all_logs(result.run_id))

    # every asset's materializations of the range went to the database as one batch
    materialization_batches = [b for b in batches if set(b) == {"ASSET_MATERIALIZATION"}]
    assert sorted(len(b) for b in materialization_batches) == [len(shards)] * len(keys)
    # and every event is stored, one row each
    with psycopg2.connect(postgres_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT asset_key, partition FROM event_logs WHERE run_id = %s "
                    "AND dagster_event_type = 'ASSET_MATERIALIZATION'", (result.run_id,))
        stored = sorted(cur.fetchall())
        cur.execute("SELECT count(*) FROM event_logs WHERE run_id = %s", (result.run_id,))
        (total,) = cur.fetchone()
    conn.close()
    assert stored == sorted((k.to_string(), s) for k in keys for s in shards)
    assert total == logged
