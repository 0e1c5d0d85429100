"""Steps that take a range of shards: each shard is still stored, described and checked as its own
partition.

A backfill runs up to `source.shards_per_run` shards per run (the assets' BackfillPolicy, see
`partitions.backfill_policy`). In such a run every step gets all the range's shards at once: an
input arrives as {shard: frame} (one shard: the frame itself), the step makes one frame per shard
and returns them as one {shard: frame} output, which the IO manager writes one file per shard.
Each shard's metadata goes to that shard's materialization, and each shard's check results are
recorded against that shard. A run of one shard takes the same path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import dagster as dg
import pandas as pd

# Not exported by dagster 1.13: the link from a check evaluation to the materialization it checked,
# which AssetCheckResult only fills in for a run of one partition.
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

from poll_assets.engine.checks import examples

# What a step made for one shard: its output (value and metadata) and its check results.
ShardResult = tuple[dg.Output[Any], Sequence[dg.AssetCheckResult]]


def run_shards(context: dg.AssetExecutionContext) -> list[str]:
    """The shards this run materializes, in partition order."""
    return list(context.partition_keys)


def shard_frames(context: dg.AssetExecutionContext, name: str, value: Any) -> dict[str, pd.DataFrame]:
    """An input of the step as {shard: frame} for every shard of the run. A shard the upstream
    asset has not stored is an error naming the input and the shards."""
    shards = run_shards(context)
    frames = value if isinstance(value, dict) else {shards[0]: value}
    missing = [s for s in shards if s not in frames]
    if missing:
        raise dg.Failure(description=f"input {name}: nothing stored for shards {examples(missing)}; "
                                     "materialize them upstream first")
    return {s: frames[s] for s in shards}


def shard_output(
    context: dg.AssetExecutionContext, key: dg.AssetKey, outputs: Mapping[str, dg.Output[Any]],
    output_name: str | None = None,
) -> dg.Output[Any]:
    """One output for the run's shards: {shard: frame}, with each shard's metadata on that shard's
    materialization. One shard: its output as it is."""
    named = {"output_name": output_name} if output_name else {}
    if len(outputs) == 1:
        (out,) = outputs.values()
        return dg.Output(out.value, metadata=out.metadata, **named)
    for shard, out in outputs.items():
        context.add_asset_metadata(out.metadata, asset_key=key, partition_key=shard)
    return dg.Output({shard: out.value for shard, out in outputs.items()}, **named)


def shard_check_results(
    context: dg.AssetExecutionContext, key: dg.AssetKey, results: Mapping[str, Iterable[dg.AssetCheckResult]]
) -> Iterator[dg.Output[None] | dg.AssetCheckResult | dg.AssetCheckEvaluation]:
    """The check results of each shard, recorded against that shard. Yield them after the output:
    they point at the materialization it made. One shard: Dagster fills the partition in itself."""
    if len(results) == 1:
        yield from (r for rs in results.values() for r in rs)
        return
    evaluations = [(shard, r) for shard, rs in results.items() for r in rs]
    targets = _latest_materializations(context, key, list(results))
    specs = {dg.AssetCheckKey(key, r.check_name) for _, r in evaluations}
    for check_key in sorted(specs, key=str):  # what Dagster yields for an AssetCheckResult: the check ran
        yield dg.Output(None, output_name=context.assets_def.get_output_name_for_asset_check_key(check_key))
    blocking = {spec.key: spec.blocking for spec in context.assets_def.check_specs}
    for shard, r in evaluations:
        yield dg.AssetCheckEvaluation(
            asset_key=key, check_name=r.check_name, passed=r.passed, metadata=r.metadata,
            target_materialization_data=targets.get(shard), severity=r.severity, description=r.description,
            blocking=blocking.get(dg.AssetCheckKey(key, r.check_name)), partition=shard,
        )


def shard_events(
    context: dg.AssetExecutionContext, key: dg.AssetKey, made: Mapping[str, ShardResult],
    output_name: str | None = None,
) -> Iterator[Any]:
    """What a step yields for one asset over the run's shards: the output, then every shard's checks."""
    yield shard_output(context, key, {s: out for s, (out, _) in made.items()}, output_name)
    yield from shard_check_results(context, key, {s: checks for s, (_, checks) in made.items()})


def _latest_materializations(
    context: dg.AssetExecutionContext, key: dg.AssetKey, shards: list[str]
) -> dict[str, AssetCheckEvaluationTargetMaterializationData]:
    """The newest materialization of each shard (one query for the range)."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=shards), limit=len(shards)
    ).records
    latest: dict[str, AssetCheckEvaluationTargetMaterializationData] = {}
    for rec in records:  # newest first
        shard = rec.partition_key
        if shard is not None and shard not in latest:
            latest[shard] = AssetCheckEvaluationTargetMaterializationData(
                storage_id=rec.storage_id, run_id=rec.run_id, timestamp=rec.timestamp
            )
    return latest
