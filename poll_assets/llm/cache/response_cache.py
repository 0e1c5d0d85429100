"""The response cache: one row per successful call, keyed by `request_key`, in a SQLite file (the
default, `SqliteStore`) or a PostgreSQL database shared by several machines (`cache_pg.PostgresStore`).
`ResponseCache` holds everything both share (modes, the writer thread, the lease's polling); a
store holds only its database's SQL.

Every call is committed moments after it completes, so a run killed halfway keeps what it already
paid for (all but the last few milliseconds' answers) and a re-run requests only what is missing (failed calls are never stored, so
they are requested again). WAL mode lets parallel partition runs read and write the same file.

Async callers hand completions to one writer thread (`submit`), which commits whatever has queued
up in one transaction. Compared with a thread hop and a commit per call this costs the event loop
almost nothing, and a busy file (another process holding the write lock) never stalls the loop.

A lease (`claim`, `renew`, `release`, `wait_for`, and `claim_or_wait` on top; `claim_many` and
`release_many` for a whole batch in one transaction) makes a request paid once across processes and runs: the first process to claim a key calls the provider, the others
poll for its answer. A claim expires unless its owner renews it (a heartbeat every ttl/3 while the
call is in flight), so a claimant killed with SIGKILL blocks the others for one ttl at most. We chose
the heartbeat over "ttl = attempt timeout + margin" because a call's length is not bounded by one
attempt: retries and back-off can stretch it to minutes, and a waiter must not take over a call that
is still alive. The answer is written and the claim deleted in one transaction, so a waiter never
sees a released claim without the answer that ended it.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import json
import os
import queue
import socket
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Literal, Protocol

from poll_assets.llm.base import Completion
from poll_assets.llm.cache.rows import CacheError, Row

CacheMode = Literal["use", "bypass", "refresh"]
CACHE_MODES: tuple[str, ...] = ("use", "bypass", "refresh")
CACHE_FILE_NAME = "llm_cache.sqlite"

# Another process may hold the write lock for a moment; wait rather than fail.
BUSY_TIMEOUT_MS = 30_000
_LOOKUP_CHUNK = 500  # stays well under SQLite's bound-parameter limit
PG_URL_PREFIXES = ("postgresql://", "postgres://")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    key        TEXT PRIMARY KEY,
    provider   TEXT NOT NULL,
    model      TEXT NOT NULL,
    completion TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    key        TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS notes (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at REAL NOT NULL
)
"""

DEFAULT_CLAIM_TTL_S = 30.0  # renewed every ttl/3, so a dead claimant blocks others for 30 s at most
DEFAULT_POLL_S = 0.2

_COMPLETION_ORDER = tuple(f.name for f in dataclasses.fields(Completion))
_COMPLETION_FIELDS = frozenset(_COMPLETION_ORDER)


def default_cache_path() -> Path:
    """`$DAGSTER_HOME/llm_cache.sqlite`, or `./.dagster_home/llm_cache.sqlite` when DAGSTER_HOME is unset."""
    home = os.environ.get("DAGSTER_HOME")
    base = Path(home).expanduser() if home else Path.cwd() / ".dagster_home"
    return base / CACHE_FILE_NAME


def _completion_from_json(blob: str) -> Completion:
    data: dict[str, Any] = json.loads(blob)
    # Ignore fields a newer or older Completion does not have, so old caches stay readable.
    return Completion(**{k: v for k, v in data.items() if k in _COMPLETION_FIELDS})


def _answers(blobs: dict[str, str]) -> dict[str, Completion]:
    """Stored rows as completions marked as served from the cache."""
    found = {key: _completion_from_json(blob) for key, blob in blobs.items()}
    for key, c in found.items():
        c.cached, c.call_id = True, key
    return found


def default_owner() -> str:
    """A claim owner unique to this process and call site: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class CallLease(Protocol):
    """What `claim_or_wait` needs from a store to pay each request once across processes.

    `ResponseCache` implements it over either store (SQLite or PostgreSQL): a claim is one
    INSERT ... ON CONFLICT DO UPDATE ... WHERE expired, the answer and the release are one
    transaction, and `wait_for` polls.
    """

    @property
    def reads(self) -> bool: ...

    @property
    def writes(self) -> bool: ...

    def claim_many(self, keys: list[str], owner: str, ttl_s: float = DEFAULT_CLAIM_TTL_S,
                   since: float | None = None) -> tuple[set[str], dict[str, Completion]]: ...

    def release_many(self, keys: list[str], owner: str) -> None: ...

    def claim_state(self, key: str, since: float | None = None) -> tuple[Completion | None, bool]: ...

    def claim(self, key: str, owner: str, ttl_s: float) -> bool: ...

    def renew(self, key: str, owner: str, ttl_s: float) -> bool: ...

    def release(self, key: str, owner: str) -> None: ...

    def submit(
        self, key: str, completion: Completion, provider: str, model: str, release_owner: str | None = None,
        member: str | None = None,
    ) -> bool: ...

    async def wait_for(
        self, key: str, *, since: float | None = None, poll_s: float = DEFAULT_POLL_S, timeout_s: float | None = None
    ) -> Completion | None: ...


@dataclasses.dataclass(frozen=True)
class _Write:
    key: str
    completion: Completion
    provider: str
    model: str
    release_owner: str | None = None
    member: str | None = None


@dataclasses.dataclass(frozen=True)
class _Flush:
    done: threading.Event


def _row(key: str, completion: Completion, provider: str, model: str, member: str | None = None) -> Row:
    # The same JSON as dataclasses.asdict gives, without its deep copy of every value (80 µs a row).
    data = {name: getattr(completion, name) for name in _COMPLETION_ORDER}
    data["cached"], data["call_id"] = False, key
    if member:  # which panel member paid for it, for the estimate's per-member mean (not a Completion field)
        data["member"] = member
    return (key, provider, model, json.dumps(data, ensure_ascii=False, default=str), time.time())


class CacheStore(Protocol):
    """Where a `ResponseCache` keeps its rows: the SQL of one database, and nothing else.

    `SqliteStore` (below) is the default; `poll_assets.llm.cache.postgres.PostgresStore` is the other.
    Every method raises `CacheError` naming `label` when the database fails."""

    label: str  # the file, or host:port/db: for messages (never a password)

    def read(self, keys: list[str]) -> dict[str, str]: ...  # key -> stored completion JSON

    def present(self, keys: list[str]) -> int: ...  # how many of the keys have a stored completion

    def write(self, rows: list[Row], releases: list[tuple[str, str]]) -> None: ...  # rows and releases, one transaction

    def claim(self, key: str, owner: str, ttl_s: float) -> bool: ...

    def renew(self, key: str, owner: str, ttl_s: float) -> bool: ...

    def release(self, key: str, owner: str) -> None: ...

    # One transaction: claim every key free or expired (or already owner's), read the answers stored
    # since `since`, release the claims of the answered keys; (keys now owner's and unanswered, answers).
    def claim_many(self, keys: list[str], owner: str, ttl_s: float, since: float) -> tuple[set[str], dict[str, str]]: ...

    def release_many(self, keys: list[str], owner: str) -> None: ...

    def states(self, keys: list[str], since: float) -> tuple[set[str], dict[str, str]]: ...  # held keys, answers

    def count(self) -> int: ...

    def note(self, key: str) -> str | None: ...  # a small fact learned about a server (see ResponseCache.remembered)

    def set_note(self, key: str, value: str) -> None: ...

    # answers and their mean output tokens, for one provider's model (and one member's answers only)
    def output_tokens(self, provider: str, model: str, member: str | None = None) -> tuple[int, float]: ...

    def close(self) -> None: ...


class SqliteStore:
    """The response cache in one SQLite file (WAL mode), shared by the processes of one machine."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().resolve()
        self.label = str(self.path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork; reopen in a child process.
        if self._conn is None or self._pid != os.getpid():
            self._conn = self._open()
            self._pid = os.getpid()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        # Two processes opening a new file at once can see "database is locked" from the switch to WAL,
        # which SQLite reports at once instead of waiting on the busy timeout: try again for a while.
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(
                    self.path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False, isolation_level=None
                )
                try:
                    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                    conn.execute("PRAGMA journal_mode=WAL")
                    # In WAL mode NORMAL survives a killed process; only an OS crash may lose the last commits.
                    conn.execute("PRAGMA synchronous=NORMAL")
                    conn.executescript(_SCHEMA)
                except sqlite3.Error:
                    conn.close()
                    raise
                return conn
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise CacheError(f"response cache {self.path}: cannot open: {exc}") from exc
                time.sleep(0.05)
            except (sqlite3.Error, OSError) as exc:
                raise CacheError(f"response cache {self.path}: cannot open: {exc}") from exc

    def read(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        with self._lock:
            conn = self._connection()
            try:
                for i in range(0, len(keys), _LOOKUP_CHUNK):
                    chunk = keys[i : i + _LOOKUP_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    found.update(conn.execute(f"SELECT key, completion FROM completions WHERE key IN ({marks})", chunk))
            except sqlite3.Error as exc:
                raise CacheError(f"response cache {self.path}: read failed: {exc}") from exc
        return found

    def present(self, keys: list[str]) -> int:
        count = 0
        with self._lock:
            conn = self._connection()
            try:
                for i in range(0, len(keys), _LOOKUP_CHUNK):
                    chunk = keys[i : i + _LOOKUP_CHUNK]
                    sql = f"SELECT COUNT(*) FROM completions WHERE key IN ({','.join('?' * len(chunk))})"
                    count += conn.execute(sql, chunk).fetchone()[0]
            except sqlite3.Error as exc:
                raise CacheError(f"response cache {self.path}: read failed: {exc}") from exc
        return count

    def write(self, rows: list[Row], releases: list[tuple[str, str]]) -> None:
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
                    conn.executemany("DELETE FROM claims WHERE key = ? AND owner = ?", releases)
            except sqlite3.Error as exc:
                raise CacheError(f"response cache {self.path}: write failed: {exc}") from exc

    def note(self, key: str) -> str | None:
        with self._lock:
            try:
                row = self._connection().execute("SELECT value FROM notes WHERE key = ?", (key,)).fetchone()
            except sqlite3.Error as exc:
                raise CacheError(f"response cache {self.path}: read failed: {exc}") from exc
        return row[0] if row else None

    def set_note(self, key: str, value: str) -> None:
        with self._lock:
            try:
                self._connection().execute("INSERT OR REPLACE INTO notes (key, value, updated_at) VALUES (?, ?, ?)",
                                           (key, value, time.time()))
            except sqlite3.Error as exc:
                raise CacheError(f"response cache {self.path}: write failed: {exc}") from exc

    def _claim_sql(self, sql: str, params: tuple[Any, ...]) -> int:
        with self._lock:
            conn = self._connection()
            try:
                return conn.execute(sql, params).rowcount
            except sqlite3.Error as exc:
                raise CacheError(f"response cache {self.path}: claim table failed: {exc}") from exc

    def claim(self, key: str, owner: str, ttl_s: float) -> bool:
        # One statement, so two processes can never both win: an insert, or a take-over of a
        # claim whose expiry has passed.
        now = time.time()
        changed = self._claim_sql(
            "INSERT INTO claims (key, owner, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at "
            "WHERE claims.expires_at < ? OR claims.owner = excluded.owner",
            (key, owner, now + ttl_s, now),
        )
        return changed == 1

    def renew(self, key: str, owner: str, ttl_s: float) -> bool:
        sql = "UPDATE claims SET expires_at = ? WHERE key = ? AND owner = ?"
        return self._claim_sql(sql, (time.time() + ttl_s, key, owner)) == 1

    def release(self, key: str, owner: str) -> None:
        self._claim_sql("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner))

    def claim_many(self, keys: list[str], owner: str, ttl_s: float, since: float) -> tuple[set[str], dict[str, str]]:
        now = time.time()
        mine: set[str] = set()
        answers: dict[str, str] = {}
        with self._lock:
            conn = self._connection()
            try:
                with conn:
                    conn.execute("BEGIN IMMEDIATE")  # the write lock first: no other claimant between our reads
                    conn.executemany(
                        "INSERT INTO claims (key, owner, expires_at) VALUES (?, ?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at "
                        "WHERE claims.expires_at < ? OR claims.owner = excluded.owner",
                        [(key, owner, now + ttl_s, now) for key in keys],
                    )
                    for i in range(0, len(keys), _LOOKUP_CHUNK):
                        chunk = keys[i : i + _LOOKUP_CHUNK]
                        marks = ",".join("?" * len(chunk))
                        sql = f"SELECT key FROM claims WHERE owner = ? AND key IN ({marks})"
                        mine.update(k for (k,) in conn.execute(sql, (owner, *chunk)))
                        sql = f"SELECT key, completion FROM completions WHERE created_at >= ? AND key IN ({marks})"
                        answers.update(conn.execute(sql, (since, *chunk)))
                    conn.executemany("DELETE FROM claims WHERE key = ? AND owner = ?",
                                     [(k, owner) for k in answers if k in mine])
            except sqlite3.Error as exc:
                raise CacheError(f"response cache {self.path}: claim table failed: {exc}") from exc
        return mine - answers.keys(), answers

    def release_many(self, keys: list[str], owner: str) -> None:
        with self._lock:
            conn = self._connection()
            try:
                with conn:
                    conn.execute("BEGIN")
                    conn.executemany("DELETE FROM claims WHERE key = ? AND owner = ?", [(k, owner) for k in keys])
            except sqlite3.Error as exc:
                raise CacheError(f"response cache {self.path}: claim table failed: {exc}") from exc

    def output_tokens(self, provider: str, model: str, member: str | None = None) -> tuple[int, float]:
        sql = ("SELECT COUNT(*), AVG(json_extract(completion, '$.output_tokens')) FROM completions "
               "WHERE provider = ? AND model = ?")
        params: tuple[str, ...] = (provider, model)
        if member is not None:
            sql, params = sql + " AND json_extract(completion, '$.member') = ?", (*params, member)
        with self._lock:
            try:
                count, mean = self._connection().execute(sql, params).fetchone()
            except sqlite3.Error as exc:
                raise CacheError(f"response cache {self.path}: read failed: {exc}") from exc
        return int(count), float(mean or 0.0)

    def states(self, keys: list[str], since: float) -> tuple[set[str], dict[str, str]]:
        held: set[str] = set()
        answers: dict[str, str] = {}
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN")  # one snapshot for both tables
                try:
                    for i in range(0, len(keys), _LOOKUP_CHUNK):
                        chunk = keys[i : i + _LOOKUP_CHUNK]
                        marks = ",".join("?" * len(chunk))
                        sql = f"SELECT key FROM claims WHERE expires_at >= ? AND key IN ({marks})"
                        held.update(k for (k,) in conn.execute(sql, (time.time(), *chunk)))
                        sql = f"SELECT key, completion FROM completions WHERE created_at >= ? AND key IN ({marks})"
                        answers.update(conn.execute(sql, (since, *chunk)))
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise CacheError(f"response cache {self.path}: read failed: {exc}") from exc
        return held, answers

    def count(self) -> int:
        with self._lock:
            conn = self._connection()
            return int(conn.execute("SELECT COUNT(*) FROM completions").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def open_store(location: str | os.PathLike[str] | CacheStore) -> CacheStore:
    """A store for `location`: a PostgreSQL URL (postgresql://...), a SQLite file path, or a store."""
    if not isinstance(location, (str, os.PathLike)):
        return location
    if isinstance(location, str) and location.startswith(PG_URL_PREFIXES):
        from poll_assets.llm.cache.postgres import PostgresStore

        return PostgresStore(location)
    return SqliteStore(location)


class ResponseCache:
    """A process- and thread-safe store of completed calls, in SQLite (a path) or PostgreSQL (a URL).

    mode "use" reads and writes, "refresh" writes without reading (re-requests everything and
    overwrites), "bypass" does neither. The async methods run the database in a worker thread so
    a busy database never stalls the event loop.
    """

    def __init__(self, location: str | os.PathLike[str] | CacheStore, mode: CacheMode = "use") -> None:
        if mode not in CACHE_MODES:
            raise ValueError(f"cache mode {mode!r} is not one of {list(CACHE_MODES)}")
        self.store = open_store(location)
        self.path: Path | None = getattr(self.store, "path", None)  # the SQLite file; None for PostgreSQL
        self.mode: CacheMode = mode
        self._queue: queue.SimpleQueue[_Write | _Flush] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_pid = -1
        self._write_error: CacheError | None = None
        self.written = 0  # completions committed by the writer thread
        self._pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Poller] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"ResponseCache({self.store.label!r}, mode={self.mode!r})"

    @property
    def reads(self) -> bool:
        return self.mode == "use"

    @property
    def writes(self) -> bool:
        return self.mode in ("use", "refresh")

    def get(self, key: str) -> Completion | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, Completion]:
        """Cached completions for the keys that have one (marked `cached=True`); empty unless mode is "use"."""
        if not self.reads:
            return {}
        return _answers(self.store.read(list(dict.fromkeys(keys))))

    def put(self, key: str, completion: Completion, provider: str, model: str, member: str | None = None) -> bool:
        """Store one successful completion, committed at once. Failures are not stored. Returns True if written."""
        if not self.writes or not completion.ok:
            return False
        self.store.write([_row(key, completion, provider, model, member)], [])
        return True

    # -- the lease: one call per request across processes -----------------------------------------

    def claim(self, key: str, owner: str, ttl_s: float = DEFAULT_CLAIM_TTL_S) -> bool:
        """Take the lease on `key` for `ttl_s` seconds: True if it is free, expired, or already `owner`'s."""
        return self.store.claim(key, owner, ttl_s)

    def renew(self, key: str, owner: str, ttl_s: float = DEFAULT_CLAIM_TTL_S) -> bool:
        """Push the expiry of `owner`'s claim on `key` to now + ttl_s; False if the claim is no longer theirs."""
        return self.store.renew(key, owner, ttl_s)

    def release(self, key: str, owner: str) -> None:
        """Give the lease up without an answer (the call failed): a waiter may claim it and call."""
        self.store.release(key, owner)

    def claim_many(self, keys: list[str], owner: str, ttl_s: float = DEFAULT_CLAIM_TTL_S,
                   since: float | None = None) -> tuple[set[str], dict[str, Completion]]:
        """Claim many keys for `owner` in one transaction: (the keys now `owner`'s, the answers already
        stored). A key free, expired or already `owner`'s is claimed; one another owner holds live is
        in neither part (its owner is calling; wait for it). A key with an answer stored since `since`
        comes back as that answer, its claim released in the same transaction."""
        unique = sorted(set(keys))  # one order for every claimant: PostgreSQL's row locks cannot deadlock
        mine, blobs = self.store.claim_many(unique, owner, ttl_s, since if since is not None else float("-inf"))
        return mine, _answers(blobs)

    def release_many(self, keys: list[str], owner: str) -> None:
        """Give up `owner`'s claims on `keys` (those it still holds) in one transaction."""
        if keys:
            self.store.release_many(sorted(set(keys)), owner)

    def claim_state(self, key: str, since: float | None = None) -> tuple[Completion | None, bool]:
        """(the stored answer, whether a live claim is held), read whatever the mode.

        `since` ignores answers written before that time (mode "refresh" waits for a new one)."""
        return self.claim_states([key], since)[key]

    def claim_states(self, keys: list[str], since: float | None = None) -> dict[str, tuple[Completion | None, bool]]:
        """`claim_state` for many keys, read in one snapshot (one read transaction)."""
        held, blobs = self.store.states(keys, since if since is not None else float("-inf"))
        answers = _answers(blobs)
        return {k: (answers.get(k), k in held) for k in keys}

    async def wait_for(
        self, key: str, *, since: float | None = None, poll_s: float = DEFAULT_POLL_S, timeout_s: float | None = None
    ) -> Completion | None:
        """Wait until the claimant's answer is stored (returned) or its claim is gone or expired
        without one (None: the caller may claim the key and call). `timeout_s` bounds the wait.

        Every key this process waits for is polled by one task per event loop, in one query per
        `poll_s`, so a thousand waiting calls cost one read every `poll_s`, not a thousand."""
        loop = asyncio.get_running_loop()
        poller = self._pollers.get(loop)
        if poller is None:
            poller = self._pollers[loop] = _Poller(self, poll_s)
        future = poller.add(key, since)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except asyncio.TimeoutError:
            return None

    # -- the writer thread ----------------------------------------------------------------------

    def submit(
        self, key: str, completion: Completion, provider: str, model: str, release_owner: str | None = None,
        member: str | None = None,
    ) -> bool:
        """Queue one successful completion for the writer thread; returns at once.

        Returns True if it will be written. `flush` waits until everything queued is committed.
        With `release_owner`, that owner's claim on `key` is deleted in the same transaction as
        the answer is written, so waiters see the answer and the release together.
        """
        if not self.writes or not completion.ok:
            return False
        self._ensure_writer()
        self._queue.put(_Write(key, completion, provider, model, release_owner, member))
        return True

    @property
    def write_failed(self) -> bool:
        """A write failed since the last flush: answers given to the cache now may not be kept."""
        return self._write_error is not None

    def flush(self, timeout_s: float | None = None) -> int:
        """Wait until every submitted completion is committed; returns how many the writer has committed.

        Raises CacheError if a write failed (the completions stay in the run's outputs; only the
        cache misses them, so a re-run would request them again).
        """
        if self._writer is not None and self._writer_pid == os.getpid() and self._writer.is_alive():
            done = threading.Event()
            self._queue.put(_Flush(done))
            if not done.wait(timeout_s):
                raise CacheError(f"response cache {self.store.label}: writes did not finish within {timeout_s:g}s")
        if self._write_error is not None:
            err, self._write_error = self._write_error, None
            raise err
        return self.written

    def _ensure_writer(self) -> None:
        # Threads do not survive a fork: a child process starts its own writer.
        if self._writer is None or self._writer_pid != os.getpid() or not self._writer.is_alive():
            if self._writer_pid != os.getpid():
                self._queue = queue.SimpleQueue()
            self._writer = threading.Thread(target=self._write_loop, name="response-cache-writer", daemon=True)
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
            writes = [i for i in items if isinstance(i, _Write)]
            rows = [_row(i.key, i.completion, i.provider, i.model, i.member) for i in writes]
            if rows:
                try:
                    self.store.write(rows, [(i.key, i.release_owner) for i in writes if i.release_owner])
                    self.written += len(rows)
                except CacheError as exc:
                    self._write_error = exc
            for item in items:
                if isinstance(item, _Flush):
                    item.done.set()

    async def aholds_all(self, keys: Iterable[str]) -> bool:
        """Whether every key has a stored answer (mode "use"): a count, with no answer read or decoded."""
        if not self.reads:
            return False
        unique = list(dict.fromkeys(keys))
        return await asyncio.to_thread(self.store.present, unique) == len(unique)

    async def aget_many(self, keys: Iterable[str]) -> dict[str, Completion]:
        if not self.reads:
            return {}
        return await asyncio.to_thread(self.get_many, list(keys))

    async def aflush(self) -> int:
        return await asyncio.to_thread(self.flush)

    def output_tokens_seen(self, provider: str, model: str, member: str | None = None) -> tuple[int, float]:
        """(answers stored, their mean output tokens) for one provider's model, or for the answers one
        panel member paid for: what a cost estimate expects it to write per call."""
        return self.store.output_tokens(provider, model, member)

    def remembered(self, key: str) -> str | None:
        """A fact an earlier run learned about a server (e.g. the structured-output form it takes);
        None when unknown or when the cache is bypassed."""
        return self.store.note(key) if self.writes else None

    def remember(self, key: str, value: str) -> None:
        """Keep a fact learned about a server for later runs (nothing when the cache is bypassed)."""
        if self.writes:
            self.store.set_note(key, value)

    def __len__(self) -> int:
        return self.store.count()

    def close(self) -> None:
        self.flush()
        self.store.close()


class _Poller:
    """Polls the keys one event loop waits for, all in one query, and wakes their waiters."""

    def __init__(self, cache: ResponseCache, poll_s: float) -> None:
        self.cache = cache
        self.poll_s = poll_s
        self.waiting: dict[tuple[str, float | None], list[asyncio.Future[Completion | None]]] = {}
        self.task: asyncio.Task[None] | None = None

    def add(self, key: str, since: float | None) -> asyncio.Future[Completion | None]:
        future: asyncio.Future[Completion | None] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault((key, since), []).append(future)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())
        return future

    async def _run(self) -> None:
        while self.waiting:
            by_since: dict[float | None, list[str]] = {}
            for key, since in list(self.waiting):
                by_since.setdefault(since, []).append(key)
            try:
                for since, keys in by_since.items():
                    states = await asyncio.to_thread(self.cache.claim_states, keys, since)
                    self._wake(states, since)
            except CacheError as exc:
                for futures in self.waiting.values():
                    for f in futures:
                        if not f.done():
                            f.set_exception(exc)
                self.waiting.clear()
                return
            self.waiting = {k: [f for f in fs if not f.done()] for k, fs in self.waiting.items()}
            self.waiting = {k: fs for k, fs in self.waiting.items() if fs}
            if self.waiting:
                await asyncio.sleep(self.poll_s)

    def _wake(self, states: dict[str, tuple[Completion | None, bool]], since: float | None) -> None:
        for key, (answer, held) in states.items():
            if answer is None and held:
                continue
            for future in self.waiting.pop((key, since), []):
                if not future.done():
                    future.set_result(dataclasses.replace(answer) if answer is not None else None)


async def _heartbeat(cache: CallLease, key: str, owner: str, ttl_s: float) -> None:
    while True:
        await asyncio.sleep(ttl_s / 3)
        await asyncio.to_thread(cache.renew, key, owner, ttl_s)


async def claim_or_wait(
    cache: CallLease,
    key: str,
    call: Callable[[], Awaitable[Completion]],
    provider: str,
    model: str,
    *,
    owner: str | None = None,
    ttl_s: float = DEFAULT_CLAIM_TTL_S,
    poll_s: float = DEFAULT_POLL_S,
) -> Completion:
    """The answer to `key`, paid at most once across every process sharing the cache file.

    Call this after the cache lookup missed and before taking a concurrency slot. Whoever claims
    the key runs `call` (renewing the claim while it runs) and stores a successful answer together
    with the release; the others wait for that answer. A claim released without one (the call
    failed) or expired (its owner died) is claimed by the next waiter, which calls itself. With
    mode "bypass" there is nothing to share and `call` runs directly.
    """
    if not cache.writes:
        return await call()
    owner = owner or default_owner()
    since = None if cache.reads else time.time()  # "refresh" wants an answer newer than this wait
    while True:
        if await asyncio.to_thread(cache.claim, key, owner, ttl_s):
            answer, _ = await asyncio.to_thread(cache.claim_state, key, since)
            if answer is not None:  # stored between our lookup and our claim
                await asyncio.to_thread(cache.release, key, owner)
                return answer
            return await call_holding(cache, key, owner, ttl_s, call, provider, model)
        answer = await cache.wait_for(key, since=since, poll_s=poll_s)
        if answer is not None:
            return answer


async def call_holding(
    cache: CallLease,
    key: str,
    owner: str,
    ttl_s: float,
    call: Callable[[], Awaitable[Completion]],
    provider: str,
    model: str,
    member: str | None = None,
) -> Completion:
    """Run `call` while holding `owner`'s claim on `key` (renewed by a heartbeat); store a successful
    answer together with the release, or release without one so a waiter takes over at once."""
    beat = asyncio.create_task(_heartbeat(cache, key, owner, ttl_s))
    stored = False
    try:
        result = await call()
        stored = cache.submit(key, result, provider, model, release_owner=owner, member=member)
        return result
    finally:
        beat.cancel()
        if not stored:  # failed or cancelled: let a waiter take over now rather than at expiry
            await asyncio.shield(asyncio.to_thread(cache.release, key, owner))


_WITH_WRITERS: "weakref.WeakSet[ResponseCache]" = weakref.WeakSet()


@atexit.register
def _flush_all_at_exit() -> None:
    # The writer is a daemon thread, which the interpreter abandons at exit: commit what is queued first.
    for cache in list(_WITH_WRITERS):
        try:
            cache.flush(timeout_s=30)
        except CacheError:
            pass
