"""Where submitted batches are recorded: a `batches` table in the response cache's SQLite file.

A batch id is committed the moment the provider returns it, before anything waits on it, so a run
killed while it waits finds its batches here when relaunched and resumes them instead of paying for
the same requests again. A row is keyed by the batch id and carries `chunk_key`, a hash of the
member and the sorted request keys it holds: the same requests map to the same batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from poll_assets.llm.cache.response_cache import BUSY_TIMEOUT_MS, CacheError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id     TEXT PRIMARY KEY,
    chunk_key    TEXT NOT NULL,
    member       TEXT NOT NULL,
    provider     TEXT NOT NULL,
    model        TEXT NOT NULL,
    request_keys TEXT NOT NULL,
    state        TEXT NOT NULL,
    counts       TEXT NOT NULL DEFAULT '{}',
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
)
"""
_INDEX = "CREATE INDEX IF NOT EXISTS batches_by_member ON batches (member, provider, model, state)"

OPEN = "open"  # submitted; results not yet downloaded
ENDED = "ended"  # results downloaded and written to the cache


def chunk_key(member: str, provider: str, model: str, keys: Iterable[str]) -> str:
    """The id of a set of requests for one member: the same requests give the same id."""
    blob = json.dumps([member, provider, model, sorted(keys)])
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class BatchRecord:
    batch_id: str
    chunk_key: str
    request_keys: tuple[str, ...]
    state: str
    created_at: float


class BatchStore:
    """The `batches` table of one cache file; safe across threads and processes (WAL, busy timeout)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().resolve()
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False,
                                       isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(_SCHEMA)
                conn.execute(_INDEX)
            except (sqlite3.Error, OSError) as exc:
                raise CacheError(f"response cache {self.path}: cannot open the batches table: {exc}") from exc
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        with self._lock:
            try:
                self._connection().execute(sql, args)  # autocommit: durable when this returns
            except sqlite3.Error as exc:
                raise CacheError(f"response cache {self.path}: cannot record a batch: {exc}") from exc

    def record(self, batch_id: str, member: str, provider: str, model: str, keys: list[str]) -> BatchRecord:
        """Commit a batch the provider just accepted, before anyone waits on it."""
        now = time.time()
        ck = chunk_key(member, provider, model, keys)
        self._write(
            "INSERT OR REPLACE INTO batches (batch_id, chunk_key, member, provider, model, request_keys, state, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (batch_id, ck, member, provider, model, json.dumps(sorted(keys)), OPEN, now, now),
        )
        return BatchRecord(batch_id, ck, tuple(sorted(keys)), OPEN, now)

    def close(self, batch_id: str, counts: dict[str, int]) -> None:
        """The batch's results are downloaded and in the cache: it is never resumed again."""
        self._write("UPDATE batches SET state = ?, counts = ?, updated_at = ? WHERE batch_id = ?",
                    (ENDED, json.dumps(counts), time.time(), batch_id))

    def open_batches(self, member: str, provider: str, model: str) -> list[BatchRecord]:
        """The member's batches submitted but not yet collected, oldest first."""
        with self._lock:
            try:
                rows = self._connection().execute(
                    "SELECT batch_id, chunk_key, request_keys, state, created_at FROM batches "
                    "WHERE member = ? AND provider = ? AND model = ? AND state = ? ORDER BY created_at",
                    (member, provider, model, OPEN),
                ).fetchall()
            except sqlite3.Error as exc:
                raise CacheError(f"response cache {self.path}: cannot read the batches table: {exc}") from exc
        return [BatchRecord(b, c, tuple(json.loads(k)), s, t) for b, c, k, s, t in rows]
