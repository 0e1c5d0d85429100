"""What the LLM assets report beyond their columns: their kinds, the cost and pace of their calls,
and the rows still pending (failed for a transient reason, so the next run calls them again).

Row counts and column schemas come from each stage's `ColumnSchema` (engine/schema.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.engine.checks import Finding, StageCheck, examples, short_id
from poll_assets.llm.base import RETRYABLE_KINDS
from poll_assets.llm.pricing import Price
from poll_assets.llm.providers.registry import provider_spec
from poll_assets.llm.online.runner import CallStats
from poll_assets.panel import Member

def member_kinds(member: Member) -> set[str]:
    """Dagster kind tags shown on the member's node of the asset graph."""
    return {provider_spec(member.provider).kind, "pandas"}


def call_metadata(stats: CallStats, member: Member, price: Price | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "llm/calls": stats.calls,
        "llm/cache_hits": stats.cache_hits,
        "llm/failures": stats.failures,
        "llm/retries": stats.retries,
        "llm/rate_limited": stats.rate_limited,  # 429s
        "llm/concurrency": dg.MetadataValue.float(stats.concurrency),  # where the AIMD window settled
        "llm/outages_ridden_out": len(stats.outages),  # the breaker opened, probed, and the provider came back
        "llm/input_tokens": stats.input_tokens,
        "llm/cached_input_tokens": stats.cached_input_tokens,
        "llm/cache_write_tokens": stats.cache_write_tokens,
        "llm/output_tokens": stats.output_tokens,
        "llm/model": member.model,
        "llm/provider": member.provider,
    }
    if stats.batches:  # batch mode: the provider's batch ids, their requests by status
        meta["llm/batches"] = dg.MetadataValue.json(stats.batches)
    if price is not None:
        meta.update(cost_metadata(stats, price))
    else:  # said, not left blank: a missing cost reads as "free" or as "lost"
        meta["llm/cost"] = dg.MetadataValue.text("not priced")
    return meta


def cost_metadata(stats: CallStats, price: Price) -> dict[str, Any]:
    """What the fresh calls cost (prompt-cache and batch rates applied), what they would have cost
    online and uncached, and the difference."""
    paid = stats.paid_usd(price) or 0.0
    online = stats.cost_usd(price) or 0.0
    meta: dict[str, Any] = {
        "llm/cost_usd": dg.MetadataValue.float(round(paid, 6)),
        "llm/cost_online_uncached_usd": dg.MetadataValue.float(round(online, 6)),
        "llm/saving_usd": dg.MetadataValue.float(round(online - paid, 6)),
    }
    if online > 0:
        meta["llm/saving_fraction"] = dg.MetadataValue.float(round(1 - paid / online, 4))
    batch_cost = price.batch_cost_usd(stats.batch_usage.input_tokens, stats.batch_usage.output_tokens)
    if stats.batches and batch_cost is not None:  # the batch calls at the batch price, uncached
        meta["llm/batch_cost_usd"] = dg.MetadataValue.float(round(batch_cost, 6))
    return meta


PENDING_CHECK = "pending_rows"


def pending_ids(frame: pd.DataFrame) -> list[Any]:
    """Prompt ids of the rows whose call failed for a transient reason (overloaded, down, timed out,
    rate limited): work still to do, which the next run of the shard calls again. A refusal
    (bad_request) would fail the same way again, so it is a failure but not pending."""
    return [pid for pid, kind in zip(frame["prompt_id"], frame["error_kind"]) if kind in RETRYABLE_KINDS]


def check_pending_rows(frame: pd.DataFrame) -> Finding:
    """No row is pending. A blocking check: a shard with gaps is not done, so its children wait
    (a run with pending rows fails rather than passing as a success) until a re-run fills them."""
    pending = pending_ids(frame)
    if not pending:
        return Finding(True, "no pending rows", {PENDING_CHECK: 0})
    return Finding(False, f"{len(pending)} of {len(frame)} rows pending (their calls failed for a transient "
                          f"reason; the next run of this shard calls them again): {examples([short_id(p) for p in pending])}",
                   {PENDING_CHECK: len(pending)})


def pending_check() -> StageCheck:
    """The pending-rows check every LLM member's asset carries; the re-run condition acts on it."""
    return StageCheck(PENDING_CHECK, "No row whose call failed for a transient reason (those are re-run).",
                      lambda df, _: check_pending_rows(df))


def with_repairs(first: CallStats, repairs: list[CallStats]) -> CallStats:
    """The stage's call figures: the judge calls and their repairs together."""
    total = replace(first, batches=list(first.batches))
    for s in repairs:
        for name in ("calls", "cache_hits", "failures", "input_tokens", "output_tokens", "retries", "elapsed_s"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        total.batches += s.batches
    return total
