"""What every response-cache store shares: the row it stores and the error it raises. `cache` (the
SQLite store and the cache) and `cache_pg` (the PostgreSQL store) both import this module, so the
cache can pick the PostgreSQL store without the two importing each other."""

from __future__ import annotations


class CacheError(RuntimeError):
    """The cache file cannot be opened, read or written; the message names the file."""


Row = tuple[str, str, str, str, float]  # key, provider, model, completion JSON, created_at (time.time())
