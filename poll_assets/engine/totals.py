"""A shard's LLM totals: calls, cache hits, failures, tokens and cost over its generator and judge
assets, for the `preference_pairs` materialization.

The numbers are the `llm/*` entries each member's asset recorded (`assets/metadata.call_metadata`),
read from the instance: the latest materialization of each member's asset for the same partition,
that is, the calls behind the data the pairs were built from. `sum_call_metadata` is pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from poll_assets.engine.previews import Markdown, md_table

COUNTS = ("calls", "cache_hits", "failures", "input_tokens", "output_tokens")
NOT_PRICED = "not priced"  # what a cost without a price shows: a blank read as "free" or "missing"


def sum_call_metadata(per_member: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Any]:
    """Totals over members, from each member's `llm/*` numbers (plain values; None = no materialization
    of that member for the shard). Cost sums the members with a price and says how many had one."""
    totals: dict[str, Any] = {f"shard/{c}": 0 for c in COUNTS}
    cost, priced, missing = 0.0, 0, []
    for name, meta in per_member.items():
        if meta is None:
            missing.append(name)
            continue
        for c in COUNTS:
            totals[f"shard/{c}"] += int(meta.get(f"llm/{c}") or 0)
        if meta.get("llm/cost_usd") is not None:
            cost += float(meta["llm/cost_usd"])
            priced += 1
    present = len(per_member) - len(missing)
    totals["shard/cost_usd"] = round(cost, 6) if priced else None
    totals["shard/priced_members"] = f"{priced} of {present}"
    totals["shard/members_without_data"] = missing
    return totals


def latest_call_metadata(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str) -> dict[str, Any] | None:
    """The `llm/*` metadata (plain values) of the latest materialization of `key` for `partition`."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1).records
    if not records or records[0].asset_materialization is None:
        return None
    meta = records[0].asset_materialization.metadata
    return {k: v.value for k, v in meta.items() if k.startswith("llm/")}


def shard_totals(instance: dg.DagsterInstance, member_keys: Mapping[str, dg.AssetKey], partition: str) -> dict[str, Any]:
    """Totals of the shard over the given members' assets, as metadata entries, plus a table per member."""
    per_member = {name: latest_call_metadata(instance, key, partition) for name, key in member_keys.items()}
    totals = sum_call_metadata(per_member)
    entries: dict[str, Any] = {k: v for k, v in totals.items() if not isinstance(v, list) and v is not None}
    cost = totals["shard/cost_usd"]
    entries["shard/cost_usd"] = dg.MetadataValue.float(cost) if cost is not None else dg.MetadataValue.text(NOT_PRICED)
    entries["shard/members_without_data"] = dg.MetadataValue.json(totals["shard/members_without_data"])
    entries["shard/llm_table"] = dg.MetadataValue.md(_member_table(per_member, totals))
    return entries


def _member_table(per_member: Mapping[str, Mapping[str, Any] | None], totals: Mapping[str, Any]) -> str:
    headers: Sequence[str] = ("member", *COUNTS, "cost_usd")
    cost = lambda value: NOT_PRICED if value is None else value  # noqa: E731
    rows = [(name, *(meta.get(f"llm/{c}") for c in COUNTS), cost(meta.get("llm/cost_usd"))) if meta is not None
            else (name, *(["no data"] + [None] * len(COUNTS)))
            for name, meta in per_member.items()]
    rows.append((Markdown("**total**"), *(totals[f"shard/{c}"] for c in COUNTS), cost(totals["shard/cost_usd"])))
    return md_table(headers, rows, [40] * len(headers))
