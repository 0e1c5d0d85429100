"""The prompt set, one shard per partition: its key, columns and checks."""


from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.assets.keys import PROMPTS_KEY, PROMPT_COLUMNS
from poll_assets.engine.shards import run_shards, shard_events
from poll_assets.engine.checks import Finding, StageCheck, asset_check_specs, evaluate_checks, examples, repeated_ids
from poll_assets.code_versions import prompts_version
from poll_assets.estimate import Estimate, format_estimate
from poll_assets.llm.cache.response_cache import ResponseCache
from poll_assets.panel import Source
from poll_assets.parquet_values import is_missing
from poll_assets.partitions import shard_bounds
from poll_assets.prompt_source import describe_source, load_instructions, select_shard
from poll_assets.run_liveness import RUN_PROCESS_KEY
from poll_assets.shard_cost import LEGACY_DEFAULT_SHARD_SIZE

def check_prompts(prompts: pd.DataFrame) -> Finding:
    """The shard has at least one prompt, every prompt has an id and text, and ids are unique."""
    problems = []
    if len(prompts) == 0:
        problems.append("the shard has no prompts")
    missing_ids = [i for i, v in enumerate(prompts.get("prompt_id", pd.Series(dtype=object))) if is_missing(v) or v == ""]
    if missing_ids:
        problems.append(f"rows without prompt_id: {examples(missing_ids)}")
    empty = [i for i, v in enumerate(prompts.get("instruction", pd.Series(dtype=object))) if is_missing(v) or not str(v).strip()]
    if empty:
        problems.append(f"rows with an empty instruction: {examples(empty)}")
    dupes = repeated_ids(prompts["prompt_id"]) if len(prompts) else []
    if dupes:
        problems.append(f"repeated prompt_id: {examples(dupes)}")
    return Finding(
        passed=not problems,
        description="; ".join(problems) or f"{len(prompts)} prompts, ids unique",
        metadata={"rows": len(prompts), "duplicate_ids": len(dupes), "empty_instructions": len(empty)},
    )


PROMPT_CHECKS = (
    StageCheck("prompts_valid", "At least one prompt; ids present and unique; no empty instruction.",
               lambda df, _: check_prompts(df)),
)


# What the shard's LLM calls will cost: (the shard's prompts, the response cache, the shard) -> the
# estimate. pipeline.py binds `estimate.estimate_prompts` to the panel; the prompts see no more of it.
ShardEstimate = Callable[[pd.DataFrame, ResponseCache, str], Estimate]


SHARD_SIZE_KEY = "shard_size"


def shard_size_conflict(stored: int | None, source: Source) -> str | None:
    """Why the shards already stored cannot be continued with this panel's shard size, or None.
    Only a size the cost model chose can conflict: an explicit `source.shard_size` is the user's
    decision. Shards stored before the size was recorded were made when unset meant 50."""
    if not source.shard_size_chosen:
        return None
    was = stored if stored is not None else LEGACY_DEFAULT_SHARD_SIZE
    if was == source.shard_size:
        return None
    return (f"the stored prompts were sharded {was} rows per shard"
            f"{'' if stored is not None else ' (made before the size was recorded, when an unset shard_size meant 50)'}, "
            f"but this panel leaves source.shard_size unset and the shard cost model now chooses {source.shard_size}: "
            f"the same partition keys would hold other rows. Set `source.shard_size: {was}` in the panel to go on "
            f"with the stored shards, or point DAGSTER_HOME and the storage at a new place to start over")


def check_stored_shard_size(context: dg.AssetExecutionContext, source: Source) -> None:
    """Refuse to re-key a dataset silently (see shard_size_conflict); the newest stored shard tells."""
    records = context.instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=PROMPTS_KEY), limit=1).records
    if not records:
        return
    value = records[0].asset_materialization.metadata.get(SHARD_SIZE_KEY) if records[0].asset_materialization else None
    stored = int(value.value) if value is not None else None
    problem = shard_size_conflict(stored, source)
    if problem:
        raise dg.Failure(description=f"prompts: {problem}")
    if stored is not None and stored != source.shard_size:
        context.log.warning(f"prompts: source.shard_size is {source.shard_size}, the stored shards have {stored} rows "
                            "each: the same partition keys now hold other rows")


def build_prompts_asset(source: Source, base_dir: Path, partitions_def: dg.PartitionsDefinition,
                        estimate: ShardEstimate | None = None, overhead: float | None = None) -> dg.AssetsDefinition:
    """The prompts of each shard, read from `source` (a path in it is relative to `base_dir`, the
    panel file's folder); `estimate`: what each shard's calls will cost, shown in its metadata;
    `overhead`: the shard cost model's overhead share at this shard size, shown too."""

    @dg.asset(
        key=PROMPTS_KEY,
        group_name="prompts",
        kinds={"huggingface", "pandas"},
        partitions_def=partitions_def,
        check_specs=asset_check_specs(PROMPT_CHECKS, PROMPTS_KEY, partitions_def),
        required_resource_keys={"response_cache", RUN_PROCESS_KEY},  # the cache read-only: what the estimate finds cached
        metadata=PROMPT_COLUMNS.definition_metadata(),
        code_version=prompts_version(source),
        description=(
            f"Prompts from {describe_source(source, base_dir)}, one shard of {source.shard_size} rows per partition. "
            "Each row gets prompt_id = sha256(instruction); empty and repeated instructions are dropped and counted."
        ),
    )
    def prompts(context: dg.AssetExecutionContext) -> Iterator[Any]:
        check_stored_shard_size(context, source)
        bounds = {shard: shard_bounds(shard, source) for shard in run_shards(context)}
        # read once, up to the run's last row (a repeat is judged against every earlier row)
        instructions = load_instructions(source, base_dir, max(end for _, end in bounds.values()))
        made = {}
        shard_size_metadata = {SHARD_SIZE_KEY: source.shard_size, "shard_size_from": source.shard_size_origin}
        if overhead is not None:
            shard_size_metadata["shard_overhead_share"] = dg.MetadataValue.float(round(overhead, 4))
        for shard, (start, end) in bounds.items():
            selection = select_shard(instructions, start, end)
            if selection.dropped_empty or selection.dropped_duplicate:
                context.log.warning(
                    f"{shard}, rows {start}-{end - 1}: dropped {selection.dropped_empty} empty and "
                    f"{selection.dropped_duplicate} duplicate instructions"
                )
            out = dg.Output(
                selection.rows,
                metadata={
                    **PROMPT_COLUMNS.output_metadata(selection.rows),
                    "source_rows": f"{start}-{end - 1}",
                    **shard_size_metadata,
                    "dropped_empty": selection.dropped_empty,
                    "dropped_duplicate": selection.dropped_duplicate,
                    "preview": dg.MetadataValue.md(prompts_preview(selection.rows)),
                    **(estimate_metadata(estimate, selection.rows, context, shard) if estimate else {}),
                },
            )
            made[shard] = (out, evaluate_checks(PROMPT_CHECKS, PROMPTS_KEY, selection.rows,
                                                selected=context.selected_asset_check_keys))
        yield from shard_events(context, PROMPTS_KEY, made)

    return prompts


def estimate_metadata(estimate: ShardEstimate, rows: pd.DataFrame, context: dg.AssetExecutionContext,
                      shard: str) -> dict[str, Any]:
    """What the shard's LLM calls will cost (`poll-assets estimate`), shown before any of them is made.
    An estimate that cannot be made is logged, never a reason to fail the prompts."""
    try:
        est = estimate(rows, context.resources.response_cache.get_cache(), shard)
    except Exception as exc:  # noqa: BLE001 - an estimate is advice; the prompts are the product
        context.log.warning(f"no cost estimate for partition {shard}: {type(exc).__name__}: {exc}")
        return {}
    meta: dict[str, Any] = {
        "estimate/calls": sum(m.calls for m in est.members),
        "estimate/cached_calls": sum(m.cached_calls for m in est.members),
        "estimate/input_tokens": sum(m.input_tokens for m in est.members),
        "estimate/output_tokens": sum(m.output_tokens for m in est.members),
        "estimate/repair_calls_at_most": sum(m.repair_calls for m in est.members),  # judging.repair_attempts x judge calls
        "estimate": dg.MetadataValue.md(f"```\n{format_estimate(est)}\n```"),
    }
    for name in ("online_usd", "batch_usd"):
        total = est.total(name)
        if total is not None:
            meta[f"estimate/{name}"] = dg.MetadataValue.float(round(total, 6))
        repairs = est.repair_total(name)
        if repairs is not None and meta["estimate/repair_calls_at_most"]:
            meta[f"estimate/repair_{name}_at_most"] = dg.MetadataValue.float(round(repairs, 6))
    return meta


def prompts_preview(rows: pd.DataFrame, n: int = 5, id_chars: int = 10) -> str:
    """A markdown table of the first prompts, instruction first and the id cut to a prefix (the full
    64-character id came first and pushed the instruction out of the UI's view)."""
    head = rows.head(n)
    short = head["prompt_id"].str[:id_chars]
    return head.drop(columns="prompt_id").assign(id=short).to_markdown(index=False)
