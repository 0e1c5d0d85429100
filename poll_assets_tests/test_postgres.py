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


@pytest.mark.slow
def test_materialization_is_recorded_in_postgres(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg2
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    # The deployment's own instance file (deploy/dagster.yaml), pointed at the test server
    # through the variables it reads.
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
