"""The binarized preference set: chosen/rejected pairs ready for DPO."""


from collections.abc import Iterator
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.assets.metadata import table_metadata
from poll_assets.binarize import binarize
from poll_assets.checks import asset_check_specs, evaluate_checks
from poll_assets.lineage import pairs_column_lineage
from poll_assets.panel import Panel
from poll_assets.parquet_values import plain_list

PAIR_COLUMNS = [
    "prompt", "prompt_id", "chosen", "rejected", "chosen_model", "rejected_model", "chosen_rating",
    "rejected_rating", "margin", "poll_ratings", "poll_models", "avg_poll_ratings",
    "chosen_call_id", "rejected_call_id", "rating_call_ids",
]


def chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def preference_rows(pooled: pd.DataFrame, panel: Panel) -> tuple[list[dict[str, object]], dict[str, int]]:
    """Pairs for every prompt, and why prompts without a pair were dropped."""
    cfg = panel.binarization
    rows: list[dict[str, object]] = []
    dropped: dict[str, int] = {}
    for _, r in pooled.iterrows():
        generations = plain_list(r["generations"])
        avg = plain_list(r["avg_poll_ratings"])
        result = binarize(
            avg,
            strategy=cfg.strategy,
            min_margin=cfg.min_margin,
            seed=cfg.seed,
            key=r["prompt_id"],
            valid=[isinstance(g, str) for g in generations],
        )
        if not result.pairs:
            dropped[result.reason or "no pair"] = dropped.get(result.reason or "no pair", 0) + 1
        models = plain_list(r["generation_models"])
        call_ids = plain_list(r["generation_call_ids"])
        for chosen, rejected, margin in result.pairs:
            rows.append(
                {
                    "prompt": r["instruction"],
                    "prompt_id": r["prompt_id"],
                    "chosen": chat(r["instruction"], generations[chosen]),
                    "rejected": chat(r["instruction"], generations[rejected]),
                    "chosen_model": models[chosen],
                    "rejected_model": models[rejected],
                    "chosen_rating": avg[chosen],
                    "rejected_rating": avg[rejected],
                    "margin": margin,
                    "poll_ratings": [plain_list(x) for x in r["poll_ratings"]],
                    "poll_models": plain_list(r["poll_models"]),
                    "avg_poll_ratings": avg,
                    "chosen_call_id": call_ids[chosen],
                    "rejected_call_id": call_ids[rejected],
                    "rating_call_ids": plain_list(r["poll_call_ids"]),
                }
            )
    return rows, dropped


def build_preferences_asset(panel: Panel, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    cfg = panel.binarization

    @dg.asset(
        name="preference_pairs",
        ins={"pooled_ratings": dg.AssetIn("pooled_ratings")},
        group_name="preferences",
        kinds={"pandas", "parquet"},
        partitions_def=partitions_def,
        check_specs=asset_check_specs(panel, dg.AssetKey("preference_pairs"), partitions_def),
        code_version=cfg.model_dump_json(),
        description=(
            f"Chosen/rejected pairs ({cfg.strategy}) in distilabel's FormatTextGenerationDPO schema, plus the PoLL "
            "columns and the ids of the calls behind each pair. Ties are dropped and counted."
        ),
    )
    def preference_pairs(context: dg.AssetExecutionContext, pooled_ratings: pd.DataFrame) -> Iterator[Any]:
        rows, dropped = preference_rows(pooled_ratings, panel)
        df = pd.DataFrame(rows, columns=PAIR_COLUMNS)
        context.log.info(f"{len(df)} preference pairs from {len(pooled_ratings)} prompts; dropped: {dropped or 'none'}")
        yield dg.Output(
            df,
            metadata={
                **table_metadata(df),
                "dagster/column_lineage": pairs_column_lineage(panel),
                "pairs": len(df),
                "prompts": len(pooled_ratings),
                "dropped_prompts": dg.MetadataValue.json(dropped),
                "ties_dropped": dropped.get("tie", 0),
            },
        )
        yield from evaluate_checks(panel, context.asset_key, df, selected=context.selected_asset_check_keys)

    return preference_pairs
