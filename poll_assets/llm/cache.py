"""The response cache: one SQLite row per successful call, keyed by `request_key`.

Every call is committed moments after it completes, so a run killed halfway keeps what it already
paid for (all but the last few milliseconds' answers) and a re-run requests only what is missing (failed calls are never stored, so
they are requested again). WAL mode lets parallel partition runs read and write the same file.

Async callers hand completions to one writer thread (`submit`), which commits whatever has queued
up in one transaction. Compared with a thread hop and a commit per call this costs the event loop
almost nothing, and a busy file (another process holding the write lock) never stalls the loop.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import json
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from poll_assets.llm.base import Completion

CacheMode = Literal["use", "bypass", "refresh"]
CACHE_MODES: tuple[str, ...] = ("use", "bypass", "refresh")
CACHE_FILE_NAME = "llm_cache.sqlite"

# Another process may hold the write lock for a moment; wait rather than fail.
BUSY_TIMEOUT_MS = 30_000
_LOOKUP_CHUNK = 500  # stays well under SQLite's bound-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    key        TEXT PRIMARY KEY,
    provider   TEXT NOT NULL,
    model      TEXT NOT NULL,
    completion TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""

_COMPLETION_FIELDS = frozenset(f.name for f in dataclasses.fields(Completion))


class CacheError(RuntimeError):
    """The cache file cannot be opened, read or written; the message names the file."""


def default_cache_path() -> Path:
    """`$DAGSTER_HOME/llm_cache.sqlite`, or `./.dagster_home/llm_cache.sqlite` when DAGSTER_HOME is unset."""
    home = os.environ.get("DAGSTER_HOME")
    base = Path(home).expanduser() if home else Path.cwd() / ".dagster_home"
    return base / CACHE_FILE_NAME


def _completion_from_json(blob: str) -> Completion:
    data: dict[str, Any] = json.loads(blob)
    # Ignore fields a newer or older Completion does not have, so old caches stay readable.
    return Completion(**{k: v for k, v in data.items() if k in _COMPLETION_FIELDS})


@dataclasses.dataclass(frozen=True)
class _Write:
    key: str
    completion: Completion
    provider: str
    model: str


@dataclasses.dataclass(frozen=True)
class _Flush:
    done: threading.Event


def _row(key: str, completion: Completion, provider: str, model: str) -> tuple[str, str, str, str, float]:
    record = dataclasses.replace(completion, cached=False, call_id=key)
    blob = json.dumps(record.to_dict(), ensure_ascii=False, default=str)
    return (key, provider, model, blob, time.time())


class ResponseCache:
    """A process- and thread-safe store of completed calls.

    mode "use" reads and writes, "refresh" writes without reading (re-requests everything and
    overwrites), "bypass" does neither. The async methods run SQLite in a worker thread so a
    busy file never stalls the event loop.
    """

    def __init__(self, path: str | os.PathLike[str], mode: CacheMode = "use") -> None:
        if mode not in CACHE_MODES:
            raise ValueError(f"cache mode {mode!r} is not one of {list(CACHE_MODES)}")
        self.path = Path(path).expanduser().resolve()
        self.mode: CacheMode = mode
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._queue: queue.SimpleQueue[_Write | _Flush] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_pid = -1
        self._write_error: CacheError | None = None
        self.written = 0  # completions committed by the writer thread

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r}, mode={self.mode!r})"

    @property
    def reads(self) -> bool:
        return self.mode == "use"

    @property
    def writes(self) -> bool:
        return self.mode in ("use", "refresh")

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork; reopen in a child process.
        if self._conn is None or self._pid != os.getpid():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(
                    self.path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False, isolation_level=None
                )
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA journal_mode=WAL")
                # In WAL mode NORMAL survives a killed process; only an OS crash may lose the last commits.
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(_SCHEMA)
            except (sqlite3.Error, OSError) as exc:
                raise CacheError(f"response cache {self.path}: cannot open: {exc}") from exc
            self._conn = conn
            self._pid = os.getpid()
        return self._conn

    def get(self, key: str) -> Completion | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, Completion]:
        """Cached completions for the keys that have one (marked `cached=True`); empty unless mode is "use"."""
        if not self.reads:
            return {}
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Completion] = {}
        with self._lock:
            conn = self._connection()
            try:
                for i in range(0, len(wanted), _LOOKUP_CHUNK):
                    chunk = wanted[i : i + _LOOKUP_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    rows = conn.execute(f"SELECT key, completion FROM completions WHERE key IN ({marks})", chunk)
                    for key, blob in rows:
                        found[key] = _completion_from_json(blob)
            except sqlite3.Error as exc:
                raise CacheError(f"response cache {self.path}: read failed: {exc}") from exc
        for key, c in found.items():
            c.cached = True
            c.call_id = key
        return found

    def put(self, key: str, completion: Completion, provider: str, model: str) -> bool:
        """Store one successful completion, committed at once. Failures are not stored. Returns True if written."""
        if not self.writes or not completion.ok:
            return False
        self._insert([_row(key, completion, provider, model)])
        return True

    def _insert(self, rows: list[tuple[str, str, str, str, float]]) -> None:
        with self._lock:
            conn = self._connection()
            try:
                with conn:  # one transaction for the whole group
                    conn.execute("BEGIN")
                    conn.executemany(
                        "INSERT OR REPLACE INTO completions (key, provider, model, completion, created_at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        rows,
                    )
            except sqlite3.Error as exc:
                raise CacheError(f"response cache {self.path}: write failed: {exc}") from exc

    # -- the writer thread ----------------------------------------------------------------------

    def submit(self, key: str, completion: Completion, provider: str, model: str) -> bool:
        """Queue one successful completion for the writer thread; returns at once.

        Returns True if it will be written. `flush` waits until everything queued is committed.
        """
        if not self.writes or not completion.ok:
            return False
        self._ensure_writer()
        self._queue.put(_Write(key, completion, provider, model))
        return True

    def flush(self, timeout_s: float | None = None) -> int:
        """Wait until every submitted completion is committed; returns how many the writer has committed.

        Raises CacheError if a write failed (the completions stay in the run's outputs; only the
        cache misses them, so a re-run would request them again).
        """
        if self._writer is not None and self._writer_pid == os.getpid() and self._writer.is_alive():
            done = threading.Event()
            self._queue.put(_Flush(done))
            if not done.wait(timeout_s):
                raise CacheError(f"response cache {self.path}: writes did not finish within {timeout_s:g}s")
        if self._write_error is not None:
            err, self._write_error = self._write_error, None
            raise err
        return self.written

    def _ensure_writer(self) -> None:
        # Threads do not survive a fork: a child process starts its own writer.
        if self._writer is None or self._writer_pid != os.getpid() or not self._writer.is_alive():
            if self._writer_pid != os.getpid():
                self._queue = queue.SimpleQueue()
            self._writer = threading.Thread(target=self._write_loop, name=f"response-cache-writer:{self.path.name}", daemon=True)
            self._writer_pid = os.getpid()
            self._writer.start()
            _WITH_WRITERS.add(self)

    def _write_loop(self) -> None:
        while True:
            items = [self._queue.get()]
            while True:  # take everything already queued, so one commit covers the group
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [_row(i.key, i.completion, i.provider, i.model) for i in items if isinstance(i, _Write)]
            if rows:
                try:
                    self._insert(rows)
                    self.written += len(rows)
                except CacheError as exc:
                    self._write_error = exc
            for item in items:
                if isinstance(item, _Flush):
                    item.done.set()

    async def aget_many(self, keys: Iterable[str]) -> dict[str, Completion]:
        if not self.reads:
            return {}
        return await asyncio.to_thread(self.get_many, list(keys))

    async def aflush(self) -> int:
        return await asyncio.to_thread(self.flush)

    def __len__(self) -> int:
        with self._lock:
            conn = self._connection()
            return int(conn.execute("SELECT COUNT(*) FROM completions").fetchone()[0])

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


_WITH_WRITERS: "weakref.WeakSet[ResponseCache]" = weakref.WeakSet()


@atexit.register
def _flush_all_at_exit() -> None:
    # The writer is a daemon thread, which the interpreter abandons at exit: commit what is queued first.
    for cache in list(_WITH_WRITERS):
        try:
            cache.flush(timeout_s=30)
        except CacheError:
            pass
