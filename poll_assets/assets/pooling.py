"""The panel's pooled rating of every generation, and how far its judges agree."""


from collections.abc import Iterator
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.agreement import agreement_metrics, judge_agreement
from poll_assets.assets.judging import ratings_key
from poll_assets.assets.metadata import table_metadata
from poll_assets.checks import asset_check_specs, evaluate_checks
from poll_assets.lineage import pooled_column_lineage
from poll_assets.panel import Panel
from poll_assets.parquet_values import plain_list
from poll_assets.pooling import pool_ratings, self_family_mask
from poll_assets.rubrics.ultrafeedback import get_rubric


def build_pooled_asset(panel: Panel, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    ins = {f"ratings_{j.name}": dg.AssetIn(key=ratings_key(j)) for j in panel.judges}
    ins["combined_generations"] = dg.AssetIn("combined_generations")
    generator_families = [g.family for g in panel.generators]
    judge_families = [j.family for j in panel.judges]
    settings = panel.pooling.model_dump_json() + panel.judging.model_dump_json(include={"exclude_self_family"})

    @dg.asset(
        name="pooled_ratings",
        ins=ins,
        group_name="judging",
        kinds={"pandas"},
        partitions_def=partitions_def,
        check_specs=asset_check_specs(panel, dg.AssetKey("pooled_ratings"), partitions_def),
        code_version=settings,
        description=(
            f"PoLL: each generation's {panel.pooling.method} rating over the judges "
            f"({', '.join(j.name for j in panel.judges)}) that gave a valid one; None below "
            f"{panel.pooling.min_judges} valid judge(s). Inter-judge agreement is in the metadata."
        ),
    )
    def pooled_ratings(
        context: dg.AssetExecutionContext, combined_generations: pd.DataFrame, **ratings: pd.DataFrame
    ) -> Iterator[Any]:
        by_judge = [ratings[f"ratings_{j.name}"].set_index("prompt_id") for j in panel.judges]
        mask = self_family_mask(judge_families, generator_families) if panel.judging.exclude_self_family else None
        rows = []
        flat: dict[str, list[int | None]] = {j.name: [] for j in panel.judges}
        excluded = 0
        for _, row in combined_generations.iterrows():
            pid = row["prompt_id"]
            matrix = [plain_list(frame.loc[pid, "ratings"]) for frame in by_judge]
            pooled = pool_ratings(
                matrix, method=panel.pooling.method, min_judges=panel.pooling.min_judges, exclude=mask
            )
            excluded += pooled.excluded
            for j, judge in enumerate(panel.judges):
                flat[judge.name].extend(matrix[j])
            rows.append(
                {
                    "prompt_id": pid,
                    "instruction": row["instruction"],
                    "generations": plain_list(row["generations"]),
                    "generation_models": plain_list(row["generation_models"]),
                    "generation_call_ids": plain_list(row["generation_call_ids"]),
                    "poll_ratings": matrix,
                    "poll_rationales": [plain_list(frame.loc[pid, "rationales"]) for frame in by_judge],
                    "poll_models": [j.model for j in panel.judges],
                    "poll_call_ids": [frame.loc[pid, "call_id"] for frame in by_judge],
                    "avg_poll_ratings": pooled.avg,
                    "n_valid_judges": pooled.n_valid,
                }
            )
        df = pd.DataFrame(rows)
        agreement = judge_agreement(flat, value_domain=list(get_rubric(panel.judging.aspect).ratings))
        meta: dict[str, Any] = {
            **table_metadata(df), "dagster/column_lineage": pooled_column_lineage(panel), "self_family_excluded": excluded,
        }
        alpha = agreement.get("krippendorff_alpha")
        meta["agreement/krippendorff_alpha"] = dg.MetadataValue.float(alpha) if alpha is not None else dg.MetadataValue.null()
        meta["agreement/pairwise"] = dg.MetadataValue.json(agreement)
        meta.update(agreement_metrics(agreement))  # each pairwise figure a number, so the UI plots it
        unrated = sum(v is None for avg in df["avg_poll_ratings"] for v in avg) if len(df) else 0
        meta["unrated_generations"] = unrated
        context.log.info(f"pooled {len(df)} prompts; Krippendorff alpha={alpha}")
        yield dg.Output(df, metadata=meta)
        yield from evaluate_checks(panel, context.asset_key, df, combined_generations, context.selected_asset_check_keys)

    return pooled_ratings
