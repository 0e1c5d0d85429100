"""Which database the response cache uses: the panel's `cache` settings, the resource built from
them, and the Dagster instance's own PostgreSQL database (`cache: {backend: instance}`)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from poll_assets.llm.base import Completion
from poll_assets.llm.cache.response_cache import CacheError, SqliteStore
from poll_assets.llm.cache.postgres import PostgresStore
from poll_assets.llm.resources import ResponseCacheResource
from poll_assets.panel import PanelConfigError
from poll_assets.pipeline import build_resources
from poll_assets_tests.cache_backends import PostgresDatabases, pg_databases, stored_rows  # noqa: F401 (a fixture)
from poll_assets_tests.fake_panel import write_panel
from poll_assets_tests.instance import make_dagster_home

SECRET_URL = "postgresql://poll:pw-canary-77@127.0.0.1:1/cache_db"


def cache_resource(tmp_path: Path, settings: dict) -> ResponseCacheResource:
    panel, _ = write_panel(tmp_path, extra={"cache": settings})
    return build_resources(panel, str(tmp_path / "storage"))["response_cache"]


def test_sqlite_stays_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    res = cache_resource(tmp_path, {"mode": "use"})
    assert res.backend == "sqlite" and isinstance(res.get_cache().store, SqliteStore)
    assert res.get_cache().path == (tmp_path / "home" / "llm_cache.sqlite").resolve()


def test_url_env_selects_postgres_and_keeps_the_password_out_of_config(tmp_path, monkeypatch):
    monkeypatch.setenv("POLL_CACHE_URL", SECRET_URL)
    res = cache_resource(tmp_path, {"url_env": "POLL_CACHE_URL", "mode": "refresh"})
    assert res.backend == "postgres" and isinstance(res.url, dg.EnvVar)
    assert "pw-canary" not in repr(res)
    cache = res.get_cache()
    assert isinstance(cache.store, PostgresStore) and cache.mode == "refresh"
    assert "pw-canary" not in repr(cache) and cache.store.label == "postgresql://127.0.0.1:1/cache_db"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"url": SECRET_URL}, "holds a password.*url_env"),
        ({"url": "mysql://h/db"}, "must start with postgresql://"),
        ({"url": "postgresql://h/db", "url_env": "X"}, "not both"),
        ({"backend": "postgres"}, "needs `url` or `url_env`"),
        ({"backend": "instance", "url": "postgresql://h/db"}, "takes no url"),
        ({"url": "postgresql://h/db", "path": "c.sqlite"}, "cache.path is the SQLite file"),
    ],
)
def test_bad_cache_settings_are_named(tmp_path, settings, message):
    with pytest.raises(PanelConfigError, match=message) as err:
        write_panel(tmp_path, extra={"cache": settings})
    assert "pw-canary" not in str(err.value)


def test_unset_url_env_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("POLL_CACHE_URL_UNSET", raising=False)
    with pytest.raises(ValueError, match="POLL_CACHE_URL_UNSET is not set"):
        cache_resource(tmp_path, {"url_env": "POLL_CACHE_URL_UNSET"})


def test_instance_backend_needs_an_instance_on_postgres(tmp_path, dagster_home):
    res = cache_resource(tmp_path, {"backend": "instance"})
    with pytest.raises(CacheError, match=r"backend: instance.*SqliteRunStorage"):
        res.get_cache()


def test_instance_backend_shares_the_instance_database(tmp_path, monkeypatch, pg_databases: PostgresDatabases):
    url = pg_databases.new()
    # The driver named, as deploy/dagster.yaml does (SQLAlchemy 2.1 maps a bare scheme to psycopg 3).
    driver_url = url.replace("postgresql://", "postgresql+psycopg2://", 1)
    home = make_dagster_home(tmp_path / "home", f"storage:\n  postgres:\n    postgres_url: {driver_url}\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    res = cache_resource(tmp_path, {"backend": "instance"})
    cache = res.get_cache()
    assert isinstance(cache.store, PostgresStore)
    assert cache.put("k", Completion(text="shared", finish_reason="stop"), "fake", "m")
    assert stored_rows(url) == 1  # in the instance's own database, beside Dagster's tables
