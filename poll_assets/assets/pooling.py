"""The panel's pooled rating of every generation, and how far its judges agree: key, columns,
checks and column lineage of `pooled_ratings`."""


from collections.abc import Iterator, Sequence
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.agreement import agreement_metrics, judge_agreement
from poll_assets.assets.generations import COMBINED_COLUMNS, COMBINED_KEY, generation_counts
from poll_assets.assets.judging import RATING_COLUMNS, ratings_key
from poll_assets.assets.schema import column_of, column_of_each, schema
from poll_assets.assets.shards import shard_events, shard_frames
from poll_assets.checks import (
    STEP_INPUT, Finding, StageCheck, absent_ids, asset_check_specs, evaluate_checks, examples, problems_finding, short_id,
)
from poll_assets.code_versions import pooled_version
from poll_assets.panel import Panel
from poll_assets.parquet_values import is_missing, plain_list
from poll_assets.pooled_ratings import pool_ratings, self_family_mask
from poll_assets.rubrics.ultrafeedback import Rubric

POOLED_KEY = dg.AssetKey("pooled_ratings")
AGREEMENT = "agreement"  # the name under which the step hands its checks the agreement it computed
POOLED_COLUMNS = schema(
    POOLED_KEY.to_user_string(),
    ("prompt_id", "string", "the prompt"),
    ("instruction", "string", "the prompt text"),
    ("generations", "list<string>", "the answers, in panel order (as in combined_generations)"),
    ("generation_models", "list<string>", "the model behind each answer"),
    ("generation_call_ids", "list<string>", "the call id of each answer"),
    ("poll_ratings", "list<list<int>>", "judge x generation: every judge's rating of every answer, None where missing"),
    ("poll_rationales", "list<list<string>>", "judge x generation: the judges' rationales"),
    ("poll_models", "list<string>", "the judges' models, in panel order"),
    ("poll_call_ids", "list<string>", "the call id of each judge's verdict"),
    ("avg_poll_ratings", "list<float>", "the pooled rating of each answer; None below pooling.min_judges"),
    ("n_valid_judges", "list<int>", "how many ratings went into each pooled rating"),
)


def ratings_by_judge(pooled: pd.DataFrame, judge_names: Sequence[str]) -> dict[str, list[int | None]]:
    """Each judge's ratings of every generation of the frame, aligned across judges (from `poll_ratings`)."""
    flat: dict[str, list[int | None]] = {j: [] for j in judge_names}
    for matrix in pooled["poll_ratings"]:
        for name, row in zip(judge_names, plain_list(matrix)):
            flat[name].extend(plain_list(row))
    return flat


def pooled_agreement(pooled: pd.DataFrame, judge_names: Sequence[str], scale: Sequence[int]) -> dict[str, Any]:
    """Agreement between the judges over every generation of `pooled` (a shard, or every shard)."""
    return judge_agreement(ratings_by_judge(pooled, judge_names), value_domain=list(scale))


def check_pooled_coverage(pooled: pd.DataFrame, combined: pd.DataFrame, n_judges: int) -> Finding:
    """Every generation of every prompt has a pooled slot: one row per prompt, `avg_poll_ratings` as
    long as `generations`, and a judge x generation `poll_ratings` matrix. Generations no judge could
    rate are counted (`unrated`), not failed: the unrated-verdict checks already bound them."""
    problems: list[str] = []
    want, got = list(combined["prompt_id"]), list(pooled["prompt_id"])
    missing = absent_ids(want, got)
    if missing:
        problems.append(f"prompts without pooled ratings: {examples(missing)}")
    if len(got) != len(set(got)):
        problems.append("a prompt appears more than once")
    n_gen = generation_counts(combined)
    short_rows, unrated = [], 0
    for pid, avg, matrix, gens in zip(pooled["prompt_id"], pooled["avg_poll_ratings"], pooled["poll_ratings"], pooled["generations"]):
        avg, rows = plain_list(avg), [plain_list(r) for r in plain_list(matrix)] if not is_missing(matrix) else []
        expected = n_gen.get(pid, len(plain_list(gens)))
        if len(avg) != expected or len(rows) != n_judges or any(len(r) != expected for r in rows):
            short_rows.append(f"{short_id(pid)} ({len(avg)} pooled, {expected} generations, {len(rows)} judge rows)")
        unrated += sum(a is None and isinstance(g, str) for a, g in zip(avg, plain_list(gens)))
    if short_rows:
        problems.append(f"pooled ratings do not cover every generation: {examples(short_rows)}")
    return problems_finding(problems, f"{len(got)} prompts, every generation has a pooled slot",
                            {"prompts": len(got), "missing_prompts": len(missing), "short_rows": len(short_rows),
                             "unrated": unrated})


def check_agreement(alpha: float | None, min_agreement: float) -> Finding:
    if alpha is None:
        return Finding(True, "agreement undefined (one judge, too few items or no variance)", {"krippendorff_alpha": None})
    passed = alpha >= min_agreement
    desc = (
        f"Krippendorff alpha {alpha:.3f} >= {min_agreement}"
        if passed
        else f"Krippendorff alpha {alpha:.3f} < min_agreement {min_agreement}: the judges disagree more than the panel allows"
    )
    return Finding(passed, desc, {"krippendorff_alpha": float(alpha), "threshold": float(min_agreement)})


def pooled_checks(panel: Panel) -> list[StageCheck]:
    """The step hands these the combined_generations it read and the agreement it computed."""
    t = panel.thresholds
    return [
        StageCheck("covers_every_generation", "A pooled rating slot for every generation of every prompt.",
                   lambda df, given: check_pooled_coverage(df, given[STEP_INPUT], len(panel.judges)),
                   needs=(STEP_INPUT,)),
        StageCheck("judge_agreement", f"Krippendorff alpha between judges >= {t.min_agreement} (warning only).",
                   lambda df, given: check_agreement(given[AGREEMENT].get("krippendorff_alpha"), t.min_agreement),
                   severity=dg.AssetCheckSeverity.WARN, needs=(AGREEMENT,)),
    ]


def pooled_column_lineage(panel: Panel) -> dg.TableColumnLineage:
    judges = [ratings_key(j) for j in panel.judges]
    combined = lambda column: [column_of(COMBINED_KEY, COMBINED_COLUMNS, column)]  # noqa: E731
    each_judge = lambda column: column_of_each(judges, RATING_COLUMNS, column)  # noqa: E731
    return POOLED_COLUMNS.lineage({
        **{c: combined(c) for c in ("prompt_id", "instruction", "generations", "generation_models", "generation_call_ids")},
        "poll_ratings": each_judge("ratings"),
        "poll_rationales": each_judge("rationales"),
        "poll_models": each_judge("model_name"),
        "poll_call_ids": each_judge("call_id"),
        "avg_poll_ratings": each_judge("ratings"),
        "n_valid_judges": each_judge("ratings"),
    })


def pool_shard(panel: Panel, combined: pd.DataFrame, ratings: Sequence[pd.DataFrame]) -> tuple[pd.DataFrame, int]:
    """The pooled frame of a shard from combined_generations and each judge's frame (panel order),
    and how many ratings the self-family mask left out."""
    by_judge = [frame.set_index("prompt_id") for frame in ratings]
    mask = (self_family_mask([j.family for j in panel.judges], [g.family for g in panel.generators])
            if panel.judging.exclude_self_family else None)
    rows, excluded = [], 0
    for _, row in combined.iterrows():
        pid = row["prompt_id"]
        matrix = [plain_list(frame.loc[pid, "ratings"]) for frame in by_judge]
        pooled = pool_ratings(matrix, method=panel.pooling.method, min_judges=panel.pooling.min_judges, exclude=mask)
        excluded += pooled.excluded
        rows.append({
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
        })
    return POOLED_COLUMNS.frame(rows), excluded


def _pooled_metadata(panel: Panel, df: pd.DataFrame, excluded: int, agreement: dict[str, Any]) -> dict[str, Any]:
    alpha = agreement.get("krippendorff_alpha")
    return {
        **POOLED_COLUMNS.output_metadata(df),
        "dagster/column_lineage": pooled_column_lineage(panel),
        "self_family_excluded": excluded,
        "agreement/krippendorff_alpha": dg.MetadataValue.float(alpha) if alpha is not None else dg.MetadataValue.null(),
        "agreement/pairwise": dg.MetadataValue.json(agreement),
        **agreement_metrics(agreement),  # each pairwise figure a number, so the UI plots it
        "unrated_generations": sum(v is None for avg in df["avg_poll_ratings"] for v in avg) if len(df) else 0,
    }


def build_pooled_asset(panel: Panel, partitions_def: dg.PartitionsDefinition, rubric: Rubric) -> dg.AssetsDefinition:
    ins = {f"ratings_{j.name}": dg.AssetIn(key=ratings_key(j)) for j in panel.judges}
    ins["combined_generations"] = dg.AssetIn(key=COMBINED_KEY)
    settings = pooled_version(panel.pooling, panel.judging, [(m.name, m.family) for m in panel.members])
    checks = pooled_checks(panel)
    judge_names = [j.name for j in panel.judges]

    @dg.asset(
        key=POOLED_KEY,
        ins=ins,
        group_name="judging",
        kinds={"pandas"},
        partitions_def=partitions_def,
        check_specs=asset_check_specs(checks, POOLED_KEY, partitions_def),
        metadata=POOLED_COLUMNS.definition_metadata(),
        code_version=settings,
        description=(
            f"PoLL: each generation's {panel.pooling.method} rating over the judges "
            f"({', '.join(judge_names)}) that gave a valid one; None below "
            f"{panel.pooling.min_judges} valid judge(s). Inter-judge agreement is in the metadata."
        ),
    )
    def pooled_ratings(context: dg.AssetExecutionContext, combined_generations: Any, **ratings: Any) -> Iterator[Any]:
        # each input: one shard's frame, or {shard: frame} in a run of several shards
        combined = shard_frames(context, "combined_generations", combined_generations)
        judged = {j: shard_frames(context, f"ratings_{j}", ratings[f"ratings_{j}"]) for j in judge_names}
        made = {}
        for shard, shard_combined in combined.items():
            df, excluded = pool_shard(panel, shard_combined, [judged[j][shard] for j in judge_names])
            agreement = pooled_agreement(df, judge_names, rubric.ratings)
            context.log.info(f"{shard}: pooled {len(df)} prompts; Krippendorff alpha={agreement.get('krippendorff_alpha')}")
            given = {STEP_INPUT: shard_combined, AGREEMENT: agreement}
            made[shard] = (dg.Output(df, metadata=_pooled_metadata(panel, df, excluded, agreement)),
                           evaluate_checks(checks, POOLED_KEY, df, given, context.selected_asset_check_keys))
        yield from shard_events(context, POOLED_KEY, made)

    return pooled_ratings
