"""What the LLM assets report beyond their columns: their kinds, and the cost of their calls.

Row counts and column schemas come from each stage's `ColumnSchema` (assets/schema.py)."""

from __future__ import annotations

from typing import Any

import dagster as dg

from poll_assets.llm.providers import provider_spec
from poll_assets.llm.runner import CallStats
from poll_assets.panel import Member, Panel

def member_kinds(member: Member) -> set[str]:
    """Dagster kind tags shown on the member's node of the asset graph."""
    return {provider_spec(member.provider).kind, "pandas"}


def call_metadata(stats: CallStats, member: Member, panel: Panel) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "llm/calls": stats.calls,
        "llm/cache_hits": stats.cache_hits,
        "llm/failures": stats.failures,
        "llm/retries": stats.retries,
        "llm/input_tokens": stats.input_tokens,
        "llm/output_tokens": stats.output_tokens,
        "llm/model": member.model,
        "llm/provider": member.provider,
    }
    price = panel.prices.get(member.model)
    cost = stats.cost_usd(price)
    if cost is not None:
        meta["llm/cost_usd"] = dg.MetadataValue.float(round(cost, 6))
    if stats.batches:  # batch mode: the provider's batch ids, their requests by status, the batch price
        meta["llm/batches"] = dg.MetadataValue.json(stats.batches)
        batch_cost = price.batch_cost_usd(stats.input_tokens, stats.output_tokens) if price else None
        if batch_cost is not None:
            meta["llm/batch_cost_usd"] = dg.MetadataValue.float(round(batch_cost, 6))
    return meta
