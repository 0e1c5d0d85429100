"""The prompt set, one shard per partition."""


from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.assets.metadata import table_metadata
from poll_assets.checks import asset_check_specs, evaluate_checks
from poll_assets.panel import Panel
from poll_assets.partitions import shard_bounds
from poll_assets.prompt_source import describe_source, load_instructions, select_shard


def build_prompts_asset(panel: Panel, panel_path: Path, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    source = panel.source
    base_dir = panel_path.parent

    @dg.asset(
        name="prompts",
        group_name="prompts",
        kinds={"huggingface", "pandas"},
        partitions_def=partitions_def,
        check_specs=asset_check_specs(panel, dg.AssetKey("prompts"), partitions_def),
        code_version=source.model_dump_json(include={"repo_id", "data_files", "split", "revision", "subset", "column_mapping", "shard_size"}),
        description=(
            f"Prompts from {describe_source(source, base_dir)}, one shard of {source.shard_size} rows per partition. "
            "Each row gets prompt_id = sha256(instruction); empty and repeated instructions are dropped and counted."
        ),
    )
    def prompts(context: dg.AssetExecutionContext) -> Iterator[Any]:
        start, end = shard_bounds(context.partition_key, source)
        selection = select_shard(load_instructions(source, base_dir, end), start, end)
        if selection.dropped_empty or selection.dropped_duplicate:
            context.log.warning(
                f"rows {start}-{end - 1}: dropped {selection.dropped_empty} empty and "
                f"{selection.dropped_duplicate} duplicate instructions"
            )
        yield dg.Output(
            selection.rows,
            metadata={
                **table_metadata(selection.rows),
                "source_rows": f"{start}-{end - 1}",
                "dropped_empty": selection.dropped_empty,
                "dropped_duplicate": selection.dropped_duplicate,
                "preview": dg.MetadataValue.md(prompts_preview(selection.rows)),
            },
        )
        yield from evaluate_checks(panel, context.asset_key, selection.rows, selected=context.selected_asset_check_keys)

    return prompts


def prompts_preview(rows: pd.DataFrame, n: int = 5, id_chars: int = 10) -> str:
    """A markdown table of the first prompts, instruction first and the id cut to a prefix (the full
    64-character id came first and pushed the instruction out of the UI's view)."""
    head = rows.head(n)
    short = head["prompt_id"].str[:id_chars]
    return head.drop(columns="prompt_id").assign(id=short).to_markdown(index=False)
