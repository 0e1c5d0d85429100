"""The response cache's two databases for the cache and lease tests: a SQLite file, and a fresh
PostgreSQL database on the server named by POLL_TEST_POSTGRES_URL (`.ci/run` starts one; locally
`url="$(bash .ci/start_postgres.sh)"`). Without that variable the PostgreSQL cases skip, saying so
(and fail under CI=true, where a skip would hide a broken .ci/run)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from poll_assets_tests.dagster_dev import require

PG_URL_ENV = "POLL_TEST_POSTGRES_URL"
PG_SKIP_REASON = f"{PG_URL_ENV} is not set: no PostgreSQL server for the PostgreSQL cache (CI sets it; see .ci/run)"

CacheAt = Callable[..., str]  # cache_at(name="c") -> a location for ResponseCache: a file or a URL


class PostgresDatabases:
    """Creates throwaway databases on one server and drops them all at the end."""

    def __init__(self, server_url: str) -> None:
        import psycopg2

        self.server_url = server_url
        try:
            self.admin = psycopg2.connect(server_url, connect_timeout=10)
        except psycopg2.OperationalError as exc:
            host = urlsplit(server_url)
            pytest.fail(f"{PG_URL_ENV}: cannot connect to {host.hostname}:{host.port}: {exc}", pytrace=False)
        self.admin.autocommit = True
        self.created: list[str] = []

    def new(self, prefix: str = "poll_cache") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with self.admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return urlunsplit(urlsplit(self.server_url)._replace(path=f"/{name}"))

    def drop_all(self) -> None:
        with self.admin.cursor() as cur:
            for name in self.created:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.admin.close()


def postgres_server_url() -> str:
    """The server's URL; skips (fails under CI=true, where .ci/run sets it) when it is unset."""
    url = os.environ.get(PG_URL_ENV)
    require(bool(url), PG_SKIP_REASON)
    return url  # type: ignore[return-value]


@pytest.fixture
def pg_databases() -> Iterator[PostgresDatabases]:
    dbs = PostgresDatabases(postgres_server_url())
    try:
        yield dbs
    finally:
        dbs.drop_all()


@pytest.fixture(params=["sqlite", "postgres"])
def cache_at(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CacheAt]:
    """`cache_at(name)`: where the cache called `name` lives for this test, in each database in
    turn. The same name gives the same cache; a PostgreSQL cache is its own database."""
    if request.param == "sqlite":
        yield lambda name="c": str(tmp_path / f"{name}.sqlite")
        return
    dbs = PostgresDatabases(postgres_server_url())
    urls: dict[str, str] = {}

    def at(name: str = "c") -> str:
        if name not in urls:
            urls[name] = dbs.new()
        return urls[name]

    try:
        yield at
    finally:
        dbs.drop_all()


def stored_rows(location: str) -> int:
    """Rows in the completions table, read over a connection of its own (not the cache's); 0
    before the cache has created its table."""
    if location.startswith("postgresql://"):
        import psycopg2

        from poll_assets.llm.cache.postgres import COMPLETIONS

        conn = psycopg2.connect(location)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT to_regclass(%s) IS NOT NULL", (COMPLETIONS,))
                if not cur.fetchone()[0]:
                    return 0
                cur.execute(f"SELECT COUNT(*) FROM {COMPLETIONS}")
                return int(cur.fetchone()[0])
        finally:
            conn.close()
    import sqlite3

    if not Path(location).exists():
        return 0
    with sqlite3.connect(location) as conn:
        try:
            return conn.execute("SELECT COUNT(*) FROM completions").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return 0
            raise
