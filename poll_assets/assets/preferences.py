"""The binarized preference set: chosen/rejected pairs ready for DPO. Key, columns, checks, lineage."""


from collections.abc import Iterator
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.assets.generations import COMBINED_COLUMNS, COMBINED_KEY, GENERATION_COLUMNS, generation_key
from poll_assets.assets.judging import RATING_COLUMNS, ratings_key
from poll_assets.assets.pooling import POOLED_COLUMNS, POOLED_KEY
from poll_assets.assets.previews import chat_answer, pairs_preview
from poll_assets.assets.prompts import PROMPT_COLUMNS, PROMPTS_KEY
from poll_assets.assets.schema import column_of, column_of_each, schema
from poll_assets.assets.shards import shard_events, shard_frames
from poll_assets.assets.totals import shard_totals
from poll_assets.binarize import binarize
from poll_assets.checks import Finding, StageCheck, asset_check_specs, evaluate_checks, examples, problems_finding, short_id
from poll_assets.code_versions import pairs_version
from poll_assets.panel import Panel
from poll_assets.parquet_values import is_missing, plain_list

PAIRS_KEY = dg.AssetKey("preference_pairs")
PAIR_COLUMNS = schema(
    PAIRS_KEY.to_user_string(),
    ("prompt", "string", "the prompt text"),
    ("prompt_id", "string", "the prompt's id"),
    ("chosen", "list<struct<role,content>>", "the chat: the prompt, then the preferred answer"),
    ("rejected", "list<struct<role,content>>", "the chat: the prompt, then the other answer"),
    ("chosen_model", "string", "the model that wrote the chosen answer"),
    ("rejected_model", "string", "the model that wrote the rejected answer"),
    ("chosen_rating", "float", "the chosen answer's pooled rating"),
    ("rejected_rating", "float", "the rejected answer's pooled rating"),
    ("margin", "float", "chosen_rating - rejected_rating, > 0"),
    ("poll_ratings", "list<list<int>>", "judge x generation: every rating of the prompt's answers"),
    ("poll_models", "list<string>", "the judges' models, in panel order"),
    ("avg_poll_ratings", "list<float>", "the pooled rating of every answer of the prompt"),
    ("chosen_call_id", "string", "the call that wrote the chosen answer"),
    ("rejected_call_id", "string", "the call that wrote the rejected answer"),
    ("rating_call_ids", "list<string>", "the judge calls behind the ratings, in panel order"),
    ("bt_strengths", "list<float>", "pairwise mode: every answer's Bradley-Terry strength, the score pairs are "
     "formed from (chosen_rating/rejected_rating are then strengths); None in rating mode"),
    ("win_counts", "list<float>", "pairwise mode: every answer's wins over the judges and both orders (a tie: half)"),
)


def check_pairs(pairs: pd.DataFrame) -> Finding:
    """In every pair the chosen answer is rated strictly higher and differs from the rejected one."""
    not_higher, same = [], []
    for i, r in enumerate(pairs.itertuples(index=False)):
        if is_missing(r.chosen_rating) or is_missing(r.rejected_rating) or not r.chosen_rating > r.rejected_rating:
            not_higher.append(f"row {i} ({short_id(r.prompt_id)}: {r.chosen_rating} vs {r.rejected_rating})")
        if chat_answer(r.chosen) == chat_answer(r.rejected) or r.chosen_call_id == r.rejected_call_id:
            same.append(f"row {i} ({short_id(r.prompt_id)})")
    problems = []
    if not_higher:
        problems.append(f"chosen_rating not above rejected_rating: {examples(not_higher)}")
    if same:
        problems.append(f"chosen is the same answer as rejected: {examples(same)}")
    return problems_finding(problems, f"{len(pairs)} pairs, chosen above rejected in each",
                            {"pairs": len(pairs), "not_higher": len(not_higher), "identical": len(same)})


PAIR_CHECKS = (
    StageCheck("chosen_beats_rejected", "chosen_rating > rejected_rating and chosen != rejected in every pair.",
               lambda df, _: check_pairs(df)),
)


def pairs_column_lineage(panel: Panel) -> dg.TableColumnLineage:
    """Pair columns back to where their values were first made (not only to pooled_ratings)."""
    judges = [ratings_key(j) for j in panel.judges]
    generators = [generation_key(g) for g in panel.generators]
    prompt = lambda column: [column_of(PROMPTS_KEY, PROMPT_COLUMNS, column)]  # noqa: E731
    combined = lambda column: [column_of(COMBINED_KEY, COMBINED_COLUMNS, column)]  # noqa: E731
    answer = prompt("instruction") + combined("generations")  # a chat: the prompt, then the answer
    rating = [column_of(POOLED_KEY, POOLED_COLUMNS, "avg_poll_ratings")]
    return PAIR_COLUMNS.lineage({
        "prompt": prompt("instruction"),
        "prompt_id": prompt("prompt_id"),
        "chosen": answer,
        "rejected": answer,
        "chosen_model": combined("generation_models"),
        "rejected_model": combined("generation_models"),
        "chosen_rating": rating,
        "rejected_rating": rating,
        "margin": rating,
        "avg_poll_ratings": rating,
        "poll_ratings": column_of_each(judges, RATING_COLUMNS, "ratings"),
        "poll_models": column_of_each(judges, RATING_COLUMNS, "model_name"),
        "chosen_call_id": column_of_each(generators, GENERATION_COLUMNS, "call_id"),
        "rejected_call_id": column_of_each(generators, GENERATION_COLUMNS, "call_id"),
        "rating_call_ids": column_of_each(judges, RATING_COLUMNS, "call_id"),
        "bt_strengths": [column_of(POOLED_KEY, POOLED_COLUMNS, "bt_strengths")],
        "win_counts": [column_of(POOLED_KEY, POOLED_COLUMNS, "win_counts")],
    })


def chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def preference_rows(pooled: pd.DataFrame, panel: Panel) -> tuple[list[dict[str, object]], dict[str, int]]:
    """Pairs for every prompt, and why prompts without a pair were dropped."""
    cfg = panel.binarization
    rows: list[dict[str, object]] = []
    dropped: dict[str, int] = {}
    for _, r in pooled.iterrows():
        generations = plain_list(r["generations"])
        strengths = plain_list(r.get("bt_strengths"))  # pairwise mode: pairs come from the strengths
        avg = strengths if panel.judging.mode == "pairwise" else plain_list(r["avg_poll_ratings"])
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
                    "bt_strengths": strengths or None,
                    "win_counts": plain_list(r.get("win_counts")) or None,
                }
            )
    return rows, dropped


def build_preferences_asset(panel: Panel, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    cfg = panel.binarization
    member_keys = {k.to_user_string(): k for k in [*map(generation_key, panel.generators), *map(ratings_key, panel.judges)]}

    @dg.asset(
        key=PAIRS_KEY,
        ins={"pooled_ratings": dg.AssetIn(key=POOLED_KEY)},
        group_name="preferences",
        kinds={"pandas", "parquet"},
        partitions_def=partitions_def,
        check_specs=asset_check_specs(PAIR_CHECKS, PAIRS_KEY, partitions_def),
        metadata=PAIR_COLUMNS.definition_metadata(),
        code_version=pairs_version(cfg),
        description=(
            f"Chosen/rejected pairs ({cfg.strategy}) in distilabel's FormatTextGenerationDPO schema, plus the PoLL "
            "columns and the ids of the calls behind each pair. Ties are dropped and counted."
        ),
    )
    def preference_pairs(context: dg.AssetExecutionContext, pooled_ratings: Any) -> Iterator[Any]:
        # `pooled_ratings`: one shard's frame, or {shard: frame} in a run of several shards
        made = {}
        for shard, pooled in shard_frames(context, "pooled_ratings", pooled_ratings).items():
            rows, dropped = preference_rows(pooled, panel)
            df = PAIR_COLUMNS.frame(rows)
            context.log.info(f"{shard}: {len(df)} preference pairs from {len(pooled)} prompts; dropped: {dropped or 'none'}")
            out = dg.Output(
                df,
                metadata={
                    **PAIR_COLUMNS.output_metadata(df),
                    "dagster/column_lineage": pairs_column_lineage(panel),
                    "pairs": len(df),
                    "prompts": len(pooled),
                    "dropped_prompts": dg.MetadataValue.json(dropped),
                    "ties_dropped": dropped.get("tie", 0),
                    "preview": dg.MetadataValue.md(pairs_preview(df)),
                    **shard_totals(context.instance, member_keys, shard),
                },
            )
            made[shard] = (out, evaluate_checks(PAIR_CHECKS, PAIRS_KEY, df, selected=context.selected_asset_check_keys))
        yield from shard_events(context, PAIRS_KEY, made)

    return preference_pairs
