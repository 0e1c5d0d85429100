"""What the LLM assets report beyond their columns: their kinds, the cost and pace of their calls,
and the rows still pending (failed for a transient reason, so the next run calls them again).

Row counts and column schemas come from each stage's `ColumnSchema` (assets/schema.py)."""

from __future__ import annotations

from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.checks import Finding, StageCheck, examples, short_id
from poll_assets.llm.base import RETRYABLE_KINDS
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
        "llm/rate_limited": stats.rate_limited,  # 429s
        "llm/concurrency": dg.MetadataValue.float(stats.concurrency),  # where the AIMD window settled
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
