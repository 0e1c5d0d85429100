"""The response cache in PostgreSQL: the same rows, modes and lease as the SQLite file, shared by
workers on several machines (the Dagster instance's own database, or any other).

Two tables, prefixed so they sit beside Dagster's in the instance database: `poll_llm_completions`
and `poll_llm_claims`. A claim's expiry is read and set with the server's clock, so workers whose
clocks drift apart still agree on when a dead claimant's claim has expired. An answer's `created_at`
is the writer's clock, as in SQLite (mode "refresh" compares it with its own start time).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extras

from poll_assets.llm.cache.rows import CacheError, Row

COMPLETIONS = "poll_llm_completions"
CLAIMS = "poll_llm_claims"
NOTES = "poll_llm_notes"
_SCHEMA_LOCK_ID = 0x706F6C6C  # pg_advisory_xact_lock id: concurrent first runs create the tables once
_NOW = "extract(epoch from clock_timestamp())"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {COMPLETIONS} (
    key        TEXT PRIMARY KEY,
    provider   TEXT NOT NULL,
    model      TEXT NOT NULL,
    completion TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS {CLAIMS} (
    key        TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS {NOTES} (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
)
"""


def redacted(url: str) -> str:
    """host:port/db of a PostgreSQL URL: what messages show (never a user's password)."""
    parts = urlsplit(url)
    return f"postgresql://{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


class PostgresStore:
    """One connection per process (reopened after a fork), shared by its threads under a lock;
    every method is one transaction, committed before it returns."""

    def __init__(self, url: str, connect_timeout_s: int = 10) -> None:
        self.url = url
        self.label = redacted(url)
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = -1

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed or self._pid != os.getpid():
            # After a fork the inherited connection is the parent's: open our own, never close theirs
            # (psycopg2 does not end a session from a process other than the one that opened it).
            try:
                conn = psycopg2.connect(self.url, connect_timeout=self.connect_timeout_s,
                                        application_name="poll-assets response cache")
                with conn, conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_ID,))
                    cur.execute(_SCHEMA)
            except psycopg2.Error as exc:
                raise CacheError(f"response cache {self.label}: cannot open: {_reason(exc)}") from exc
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    @contextmanager
    def _transaction(self, what: str) -> Iterator[Any]:
        """A cursor in one transaction, committed on exit; a database error becomes a CacheError."""
        with self._lock:
            conn = self._connection()
            try:
                with conn, conn.cursor() as cur:
                    yield cur
            except psycopg2.Error as exc:
                if conn.closed:  # the server went away: reconnect on the next call
                    self._conn = None
                raise CacheError(f"response cache {self.label}: {what} failed: {_reason(exc)}") from exc

    def _run(self, what: str, sql: str, params: Any = None) -> Any:
        """Execute one statement in its own transaction; its rows, or its rowcount."""
        with self._transaction(what) as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description is not None else cur.rowcount

    def read(self, keys: list[str]) -> dict[str, str]:
        rows = self._run("read", f"SELECT key, completion FROM {COMPLETIONS} WHERE key = ANY(%s)", (keys,))
        return dict(rows)

    def present(self, keys: list[str]) -> int:
        return int(self._run("read", f"SELECT COUNT(*) FROM {COMPLETIONS} WHERE key = ANY(%s)", (keys,))[0][0])

    def write(self, rows: list[Row], releases: list[tuple[str, str]]) -> None:
        # One key twice in one INSERT ... ON CONFLICT is an error in PostgreSQL: the later row wins,
        # as it would in SQLite's INSERT OR REPLACE.
        latest = list({row[0]: row for row in rows}.values())
        with self._transaction("write") as cur:
            psycopg2.extras.execute_values(
                cur,
                f"INSERT INTO {COMPLETIONS} (key, provider, model, completion, created_at) VALUES %s "
                "ON CONFLICT (key) DO UPDATE SET provider = EXCLUDED.provider, model = EXCLUDED.model, "
                "completion = EXCLUDED.completion, created_at = EXCLUDED.created_at",
                latest,
            )
            if releases:
                psycopg2.extras.execute_values(
                    cur, f"DELETE FROM {CLAIMS} c USING (VALUES %s) AS r(key, owner) "
                         "WHERE c.key = r.key AND c.owner = r.owner", releases)

    def note(self, key: str) -> str | None:
        rows = self._run("read", f"SELECT value FROM {NOTES} WHERE key = %s", (key,))
        return rows[0][0] if rows else None

    def set_note(self, key: str, value: str) -> None:
        self._run("write", f"INSERT INTO {NOTES} (key, value, updated_at) VALUES (%s, %s, {_NOW}) "
                           "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at",
                  (key, value))

    def claim(self, key: str, owner: str, ttl_s: float) -> bool:
        # One statement: PostgreSQL's upsert either inserts or updates a row that exists, so two
        # workers can never both win; a claim is taken over only once its expiry has passed.
        changed = self._run(
            "claim",
            f"INSERT INTO {CLAIMS} (key, owner, expires_at) VALUES (%s, %s, {_NOW} + %s) "
            f"ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at "
            f"WHERE {CLAIMS}.expires_at < {_NOW} OR {CLAIMS}.owner = EXCLUDED.owner",
            (key, owner, ttl_s),
        )
        return changed == 1

    def renew(self, key: str, owner: str, ttl_s: float) -> bool:
        sql = f"UPDATE {CLAIMS} SET expires_at = {_NOW} + %s WHERE key = %s AND owner = %s"
        return self._run("claim renewal", sql, (ttl_s, key, owner)) == 1

    def release(self, key: str, owner: str) -> None:
        self._run("claim release", f"DELETE FROM {CLAIMS} WHERE key = %s AND owner = %s", (key, owner))

    def claim_many(self, keys: list[str], owner: str, ttl_s: float, since: float) -> tuple[set[str], dict[str, str]]:
        # Keys come sorted and are inserted in that order, so two workers claiming overlapping sets
        # take their row locks in one order and cannot deadlock.
        with self._transaction("claim") as cur:
            cur.execute(
                f"INSERT INTO {CLAIMS} (key, owner, expires_at) "
                f"SELECT k, %s, {_NOW} + %s FROM unnest(%s::text[]) WITH ORDINALITY AS t(k, n) ORDER BY n "
                f"ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at "
                f"WHERE {CLAIMS}.expires_at < {_NOW} OR {CLAIMS}.owner = EXCLUDED.owner RETURNING key",
                (owner, ttl_s, keys),
            )
            mine = {k for (k,) in cur.fetchall()}
            cur.execute(f"SELECT key, completion FROM {COMPLETIONS} WHERE key = ANY(%s) AND created_at >= %s",
                        (keys, since if since != float("-inf") else -1e308))
            answers = dict(cur.fetchall())
            answered = sorted(mine & answers.keys())
            if answered:
                cur.execute(f"DELETE FROM {CLAIMS} WHERE owner = %s AND key = ANY(%s)", (owner, answered))
        return mine - answers.keys(), answers

    def release_many(self, keys: list[str], owner: str) -> None:
        self._run("claim release", f"DELETE FROM {CLAIMS} WHERE owner = %s AND key = ANY(%s)", (owner, keys))

    def output_tokens(self, provider: str, model: str, member: str | None = None) -> tuple[int, float]:
        sql = (f"SELECT COUNT(*), AVG((completion::jsonb ->> 'output_tokens')::float) "
               f"FROM {COMPLETIONS} WHERE provider = %s AND model = %s")
        params: tuple[str, ...] = (provider, model)
        if member is not None:
            sql, params = sql + " AND completion::jsonb ->> 'member' = %s", (*params, member)
        rows = self._run("read", sql, params)
        count, mean = rows[0]
        return int(count), float(mean or 0.0)

    def states(self, keys: list[str], since: float) -> tuple[set[str], dict[str, str]]:
        # One statement reads both tables in one snapshot.
        rows = self._run(
            "read",
            f"SELECT k.key, EXISTS (SELECT 1 FROM {CLAIMS} c WHERE c.key = k.key AND c.expires_at >= {_NOW}), "
            f"(SELECT a.completion FROM {COMPLETIONS} a WHERE a.key = k.key AND a.created_at >= %s) "
            "FROM unnest(%s::text[]) AS k(key)",
            (since if since != float("-inf") else -1e308, keys),
        )
        held = {key for key, is_held, _ in rows if is_held}
        return held, {key: blob for key, _, blob in rows if blob is not None}

    def count(self) -> int:
        return int(self._run("count", f"SELECT COUNT(*) FROM {COMPLETIONS}")[0][0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def _reason(exc: psycopg2.Error) -> str:
    """The server's message, first line only (psycopg2 appends context that may repeat the URL)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def instance_database_url(instance: Any) -> str:
    """The PostgreSQL URL of a Dagster instance's run storage (deploy/dagster.yaml), for
    `cache: {backend: instance}`; a clear error when the instance is not on PostgreSQL."""
    storage = getattr(instance, "run_storage", None)
    url = getattr(storage, "postgres_url", None)
    if not url:
        raise CacheError(
            "response cache: panel setting `cache: {backend: instance}` needs the Dagster instance's storage in "
            f"PostgreSQL (see deploy/dagster.yaml), but this instance stores runs in {type(storage).__name__}; "
            "use `cache: {url_env: ...}` or the default SQLite file instead"
        )
    # dagster-postgres may name the SQLAlchemy driver (postgresql+psycopg2://); libpq wants the plain scheme.
    scheme, rest = url.split("://", 1)
    return f"postgresql://{rest}" if scheme.startswith("postgres") else url
