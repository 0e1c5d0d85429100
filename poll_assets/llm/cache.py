"""Interim: replaced by the persistent SQLite response cache."""

from __future__ import annotations

import dagster as dg


class ResponseCacheResource(dg.ConfigurableResource):
    path: str | None = None
    mode: str = "use"

    def get_cache(self) -> None:
        return None
