"""The panel's pooled rating of every generation, and how far its judges agree: key, columns,
checks and column lineage of `pooled_ratings`."""


import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.assets.keys import (
    COMBINED_COLUMNS, COMBINED_KEY, COMPARISON_COLUMNS, POOLED_COLUMNS, POOLED_KEY, RATING_COLUMNS, comparison_answers,
    generation_counts, ratings_key, scores_column,
)
from poll_assets.scoring.agreement import agreement_metrics, judge_agreement
from poll_assets.scoring.calibration import Calibration, JurySpec, RunRatings, calibrate, calibration_markdown, calibration_numbers, pooling_weights
from poll_assets.engine.schema import column_of, column_of_each
from poll_assets.engine.shards import shard_events, shard_frames
from poll_assets.engine.checks import (
    STEP_INPUT, Finding, StageCheck, absent_ids, asset_check_specs, evaluate_checks, examples, problems_finding, short_id,
)
from poll_assets.code_versions import pooled_version
from poll_assets.scoring.gold import GoldLabelError, GoldSet, load_gold
from poll_assets.scoring.pairwise_calibration import calibrate_pairwise
from poll_assets.panel import Gold, Jury, Thresholds
from poll_assets.parquet_values import is_missing, plain_list
from poll_assets.scoring.pooled_comparisons import encode_answer, pairwise_summary, pool_comparisons, position_markdown, stored_answers
from poll_assets.scoring.pooled_ratings import pool_ratings, self_family_mask
from poll_assets.rubrics.ultrafeedback import Rubric

AGREEMENT = "agreement"  # the name under which the step hands its checks the agreement it computed


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


def check_pooled_coverage(pooled: pd.DataFrame, combined: pd.DataFrame, n_judges: int,
                          scores: str = "avg_poll_ratings") -> Finding:
    """Every generation of every prompt has a pooled slot: one row per prompt, `avg_poll_ratings` (`scores`:
    `bt_strengths` in pairwise mode) as long as `generations`, and a judge x generation `poll_ratings` matrix. Generations no judge could
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
    for pid, avg, matrix, gens in zip(pooled["prompt_id"], pooled[scores], pooled["poll_ratings"], pooled["generations"]):
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


def pooled_checks(jury: Jury, t: Thresholds) -> list[StageCheck]:
    """The step hands these the combined_generations it read and the agreement it computed."""
    return [
        StageCheck("covers_every_generation", "A pooled rating slot for every generation of every prompt.",
                   lambda df, given: check_pooled_coverage(df, given[STEP_INPUT], len(jury.judges), scores_column(jury.judging)),
                   needs=(STEP_INPUT,)),
        StageCheck("judge_agreement", f"Krippendorff alpha between judges >= {t.min_agreement} (warning only).",
                   lambda df, given: check_agreement(given[AGREEMENT].get("krippendorff_alpha"), t.min_agreement),
                   severity=dg.AssetCheckSeverity.WARN, needs=(AGREEMENT,)),
    ]


def pooled_column_lineage(jury: Jury) -> dg.TableColumnLineage:
    judges = [ratings_key(j) for j in jury.judges]
    combined = lambda column: [column_of(COMBINED_KEY, COMBINED_COLUMNS, column)]  # noqa: E731
    if jury.judging.mode == "pairwise":
        compared = column_of_each(judges, COMPARISON_COLUMNS, "preferred")
        return POOLED_COLUMNS.lineage({
            **{c: combined(c) for c in ("prompt_id", "instruction", "generations", "generation_models", "generation_call_ids")},
            "poll_models": column_of_each(judges, COMPARISON_COLUMNS, "model_name"),
            **{c: compared for c in ("bt_strengths", "win_counts", "n_comparisons", "n_valid_judges", "poll_comparisons")},
        })
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


def jury_spec(jury: Jury, gold: Gold | None) -> JurySpec:
    """How the jury pools, for the calibration and for weighted pooling (`gold`: the panel's gold
    settings, whose seed draws the prompt folds of fitted weights)."""
    mask = (self_family_mask([j.family for j in jury.judges], [g.family for g in jury.generators])
            if jury.judging.exclude_self_family else None)
    return JurySpec(judges=tuple(j.name for j in jury.judges), generators=tuple(g.name for g in jury.generators),
                    method=jury.pooling.method, min_judges=jury.pooling.min_judges,
                    exclude=tuple(tuple(row) for row in mask) if mask else None, weights=jury.pooling.weights,
                    folds=jury.pooling.folds, seed=gold.seed if gold else 0)


def run_ratings(pooled: pd.DataFrame, jury: Jury) -> RunRatings:
    """The judges' ratings of a pooled frame (a shard, or every shard) as the calibration reads them."""
    return RunRatings.from_lists(list(pooled["prompt_id"]), list(pooled["instruction"]),
                                 [[plain_list(r) for r in plain_list(m)] for m in pooled["poll_ratings"]],
                                 len(jury.judges), len(jury.generators))


def pool_shard(spec: JurySpec, jury: Jury, combined: pd.DataFrame, ratings: Sequence[pd.DataFrame],
               gold: GoldSet | None = None) -> tuple[pd.DataFrame, int, str | None]:
    """The pooled frame of a shard from combined_generations and each judge's frame (panel order), how
    many ratings the self-family mask left out, and (method weighted) where the weights came from."""
    by_judge = [frame.set_index("prompt_id") for frame in ratings]
    pids = list(combined["prompt_id"])
    matrices = [[plain_list(frame.loc[pid, "ratings"]) for frame in by_judge] for pid in pids]
    weights_of, source = (lambda p: None), None
    if jury.pooling.method == "weighted":
        run = RunRatings.from_lists(pids, list(combined["instruction"]), matrices, len(jury.judges), len(jury.generators))
        weights_of, info = pooling_weights(run, gold, spec)
        source = info["source"]
    mask = [list(row) for row in spec.exclude] if spec.exclude else None
    rows, excluded = [], 0
    for p, (_, row) in enumerate(combined.iterrows()):
        pid, matrix = row["prompt_id"], matrices[p]
        weights = weights_of(p)
        pooled = pool_ratings(matrix, method=jury.pooling.method, min_judges=jury.pooling.min_judges, exclude=mask,
                              weights=weights)
        excluded += pooled.excluded
        rows.append({
            **_prompt_cells(row),
            "poll_ratings": matrix,
            "poll_rationales": [plain_list(frame.loc[pid, "rationales"]) for frame in by_judge],
            "poll_models": [j.model for j in jury.judges],
            "poll_call_ids": [frame.loc[pid, "call_id"] for frame in by_judge],
            "avg_poll_ratings": pooled.avg,
            "n_valid_judges": pooled.n_valid,
            "judge_weights": None if weights is None else [float(w) for w in weights],
            "bt_strengths": None, "win_counts": None, "n_comparisons": None, "poll_comparisons": None,
        })
    return POOLED_COLUMNS.frame(rows), excluded, source


def _prompt_cells(row: pd.Series) -> dict[str, Any]:
    """The cells a pooled row carries over from combined_generations, in both judging modes."""
    return {
        "prompt_id": row["prompt_id"],
        "instruction": row["instruction"],
        "generations": plain_list(row["generations"]),
        "generation_models": plain_list(row["generation_models"]),
        "generation_call_ids": plain_list(row["generation_call_ids"]),
    }


def pool_comparison_shard(spec: JurySpec, jury: Jury, combined: pd.DataFrame,
                          frames: Sequence[pd.DataFrame]) -> tuple[pd.DataFrame, int]:
    """Pairwise mode: the pooled frame of a shard from each judge's comparisons (panel order): per
    prompt, Bradley-Terry strengths and win counts over every judge and both orders; no ratings."""
    by_judge = [frame.set_index("prompt_id") for frame in frames]
    mask = spec.exclude
    rows, excluded = [], 0
    for _, row in combined.iterrows():
        pid, n = row["prompt_id"], len(plain_list(row["generations"]))
        answers = [comparison_answers(frame.loc[[pid]].reset_index()) for frame in by_judge]
        pooled = pool_comparisons(n, [[x[1:] for x in judge] for judge in answers],
                                  [list(r) for r in mask] if mask else None)
        excluded += pooled.excluded
        rows.append({
            **_prompt_cells(row),
            "poll_ratings": [[None] * n for _ in by_judge],
            "poll_rationales": [[None] * n for _ in by_judge],
            "poll_models": [j.model for j in jury.judges],
            "poll_call_ids": [None for _ in by_judge],
            "avg_poll_ratings": [None] * n,
            "n_valid_judges": pooled.n_judges,
            "bt_strengths": pooled.strengths, "win_counts": pooled.wins, "n_comparisons": pooled.comparisons,
            "poll_comparisons": [[encode_answer(x[1:]) for x in judge] for judge in answers],
        })
    return POOLED_COLUMNS.frame(rows), excluded


def pooled_calibration(jury: Jury, settings: Gold, pooled: pd.DataFrame, gold: GoldSet, scale: Sequence[int]) -> Calibration:
    """The calibration of `pooled` (one shard, or every stored shard) against the gold labels, with the
    panel's bootstrap settings (`settings`: its `gold:`): the one function behind the shard metadata,
    the dataset card and the CLI."""
    spec = jury_spec(jury, settings)
    if jury.judging.mode == "pairwise":
        return calibrate_pairwise(list(pooled["prompt_id"]), list(pooled["instruction"]),
                                  [stored_answers(c) for c in pooled["poll_comparisons"]], gold,
                                  [j.name for j in jury.judges], [g.name for g in jury.generators], spec.exclude,
                                  resamples=settings.bootstrap_resamples, seed=settings.seed, level=settings.confidence_level)
    return calibrate(run_ratings(pooled, jury), gold, spec, scale, resamples=settings.bootstrap_resamples,
                     seed=settings.seed, level=settings.confidence_level)


def calibration_metadata(jury: Jury, settings: Gold, df: pd.DataFrame, gold: GoldSet, scale: Sequence[int]) -> dict[str, Any]:
    """The shard's calibration against the gold labels: the table (markdown), its figures as numbers the
    UI plots over time, and the whole result as JSON."""
    cal = pooled_calibration(jury, settings, df, gold, scale)
    return {
        "calibration": dg.MetadataValue.md(calibration_markdown(cal)),
        "calibration/verdict": " ".join(cal.verdict),
        "calibration/result": dg.MetadataValue.json(cal.to_dict()),
        "gold/labels_in_shard": cal.counts["rating_labels"] + cal.counts["preference_labels"],
        "gold/labels_unknown_generator": cal.counts["labels_unknown_generator"],
        **calibration_numbers(cal),
    }


def leaderboard_metadata(summary: dict[str, Any]) -> dict[str, Any]:
    """The leaderboard as UI metadata: the table, and each generator's strength and interval as numbers
    (the UI plots numeric metadata over materializations)."""
    meta: dict[str, Any] = {"leaderboard": dg.MetadataValue.md(summary["leaderboard_markdown"]),
                            "position_bias": dg.MetadataValue.md(position_markdown(summary["position"]))}
    for row in summary["leaderboard"]:
        for field, value in (("strength", row["strength"]), ("low", row["low"]), ("high", row["high"]),
                             ("win_rate", row["win_rate"])):
            if value is not None:
                meta[f"leaderboard/{row['name']}/{field}"] = dg.MetadataValue.float(float(value))
    return meta


SHARD_LEADERBOARD_RESAMPLES = 200  # per shard: enough for a rough interval, cheap (a shard has ~50 prompts)


def shard_pairwise_metadata(spec: JurySpec, jury: Jury, df: pd.DataFrame) -> dict[str, Any]:
    """Pairwise mode: the shard's leaderboard and the judges' position figures, as a table and as numbers."""
    summary = pairwise_summary(list(df["prompt_id"]), list(df["poll_comparisons"]), [j.name for j in jury.judges],
                               [g.name for g in jury.generators], spec.exclude,
                               resamples=SHARD_LEADERBOARD_RESAMPLES, seed=jury.judging.seed)
    meta = leaderboard_metadata(summary)
    for judge, figures in summary["position"].items():
        for name in ("consistency", "first_position_rate"):
            if figures[name] is not None:
                meta[f"position/{judge}/{name}"] = dg.MetadataValue.float(float(figures[name]))
    return meta


def read_gold(location: str | None, scale: Sequence[int]) -> GoldSet | None:
    """The panel's gold labels (`location`: its gold file, when it has one), read once per step (a
    remote file is first read here, not at load)."""
    if location is None:
        return None
    try:
        return load_gold(location, scale)
    except GoldLabelError as exc:
        raise dg.Failure(f"gold.path: {exc}") from None


def _pooled_metadata(jury: Jury, df: pd.DataFrame, excluded: int, agreement: dict[str, Any],
                     weights_source: str | None) -> dict[str, Any]:
    alpha = agreement.get("krippendorff_alpha")
    return {
        **({"pooling/weights_source": weights_source} if weights_source else {}),
        **POOLED_COLUMNS.output_metadata(df),
        "dagster/column_lineage": pooled_column_lineage(jury),
        "self_family_excluded": excluded,
        "agreement/krippendorff_alpha": dg.MetadataValue.float(alpha) if alpha is not None else dg.MetadataValue.null(),
        "agreement/pairwise": dg.MetadataValue.json(agreement),
        **agreement_metrics(agreement),  # each pairwise figure a number, so the UI plots it
        "unrated_generations": sum(v is None for avg in df[scores_column(jury.judging)] for v in avg) if len(df) else 0,
    }


def pooling_version(jury: Jury, gold: Gold | None, gold_location: str | None) -> str:
    """The pooled ratings' code version: the settings pooling reads (code_versions.pooled_version), and
    for fitted weights the gold file they are fitted on."""
    version = pooled_version(jury.pooling, jury.judging, [(m.name, m.family) for m in jury.members])
    if jury.pooling.weights == "fit" and gold_location and gold:
        local = not gold.is_remote and Path(gold_location).is_file()
        digest = hashlib.sha256(Path(gold_location).read_bytes()).hexdigest()[:12] if local else gold_location
        version += f"gold={digest};seed={gold.seed}"
    return version


def build_pooled_asset(jury: Jury, gold: Gold | None, thresholds: Thresholds, partitions_def: dg.PartitionsDefinition,
                       rubric: Rubric, gold_location: str | None = None) -> dg.AssetsDefinition:
    """`jury`: who judges whom and how they pool; `gold`: the panel's gold settings and `gold_location`
    its gold file (gold.location), when it has them."""
    ins = {f"ratings_{j.name}": dg.AssetIn(key=ratings_key(j)) for j in jury.judges}
    ins["combined_generations"] = dg.AssetIn(key=COMBINED_KEY)
    version = pooling_version(jury, gold, gold_location)
    checks = pooled_checks(jury, thresholds)
    judge_names = [j.name for j in jury.judges]
    spec = jury_spec(jury, gold)
    gold_location = gold_location if gold else None

    @dg.asset(
        key=POOLED_KEY,
        ins=ins,
        group_name="judging",
        kinds={"pandas"},
        partitions_def=partitions_def,
        check_specs=asset_check_specs(checks, POOLED_KEY, partitions_def),
        metadata=POOLED_COLUMNS.definition_metadata(),
        code_version=version,
        description=(
            f"PoLL: each generation's {jury.pooling.method} rating over the judges "
            f"({', '.join(judge_names)}) that gave a valid one; None below "
            f"{jury.pooling.min_judges} valid judge(s). Inter-judge agreement is in the metadata"
            + (", and the calibration of every judge and of the jury against the gold labels." if gold else ".")
        ),
    )
    def pooled_ratings(context: dg.AssetExecutionContext, combined_generations: Any, **ratings: Any) -> Iterator[Any]:
        # each input: one shard's frame, or {shard: frame} in a run of several shards
        combined = shard_frames(context, "combined_generations", combined_generations)
        judged = {j: shard_frames(context, f"ratings_{j}", ratings[f"ratings_{j}"]) for j in judge_names}
        labels = read_gold(gold_location, rubric.ratings)
        made = {}
        for shard, shard_combined in combined.items():
            frames = [judged[j][shard] for j in judge_names]
            if jury.judging.mode == "pairwise":
                (df, excluded), weights_source = pool_comparison_shard(spec, jury, shard_combined, frames), None
            else:
                df, excluded, weights_source = pool_shard(spec, jury, shard_combined, frames, labels)
            agreement = pooled_agreement(df, judge_names, rubric.ratings)
            context.log.info(f"{shard}: pooled {len(df)} prompts; Krippendorff alpha={agreement.get('krippendorff_alpha')}")
            if weights_source and not weights_source.startswith(("given", "fitted")):
                context.log.warning(f"{shard}: pooling.weights: {weights_source}")
            metadata = _pooled_metadata(jury, df, excluded, agreement, weights_source)
            if jury.judging.mode == "pairwise":
                metadata.update(shard_pairwise_metadata(spec, jury, df))
            if gold is not None and labels is not None:
                metadata.update(calibration_metadata(jury, gold, df, labels, rubric.ratings))
            given = {STEP_INPUT: shard_combined, AGREEMENT: agreement}
            made[shard] = (dg.Output(df, metadata=metadata),
                           evaluate_checks(checks, POOLED_KEY, df, given, context.selected_asset_check_keys))
        yield from shard_events(context, POOLED_KEY, made)

    return pooled_ratings
