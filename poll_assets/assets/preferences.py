"""The binarized preference set: chosen/rejected pairs ready for DPO. Key, columns, checks, lineage."""


from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.assets.keys import (
    COMBINED_COLUMNS, COMBINED_KEY, GENERATION_COLUMNS, PAIRS_KEY, PAIR_COLUMNS, POOLED_COLUMNS, POOLED_KEY, PROMPTS_KEY,
    PROMPT_COLUMNS, RATING_COLUMNS, generation_key, ratings_key, scores_column,
)
from poll_assets.engine.previews import chat_answer, pairs_preview, pairs_table
from poll_assets.engine.schema import column_of, column_of_each
from poll_assets.engine.shards import shard_events, shard_frames
from poll_assets.engine.totals import shard_totals
from poll_assets.scoring.binarize import binarize
from poll_assets.engine.checks import Finding, StageCheck, asset_check_specs, evaluate_checks, examples, problems_finding, short_id
from poll_assets.code_versions import pairs_version
from poll_assets.scoring.confidence import PairConfidence, comparison_confidence, confidence_cut, pair_confidence
from poll_assets.panel import Binarization, Jury
from poll_assets.parquet_values import is_missing, plain_list
from poll_assets.scoring.pooled_ratings import self_family_mask


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


@dataclass
class LeftOut:
    """What binarization did not write for a shard, by reason: prompts that end without any pair
    (ties, too few ratings, every pair contested), and pairs the confidence minimums cut."""

    prompts: dict[str, int] = field(default_factory=dict)
    pairs: dict[str, int] = field(default_factory=dict)

    def add_prompt(self, reason: str) -> None:
        self.prompts[reason] = self.prompts.get(reason, 0) + 1

    def add_pair(self, reason: str) -> None:
        self.pairs[reason] = self.pairs.get(reason, 0) + 1


LEFT_OUT = "left_out"  # the name under which the step hands its checks what it left out


def check_contested(left_out: LeftOut, cfg: Binarization) -> Finding:
    """No pair was left out by `min_judge_agreement` / `min_margin_low`; when some were, say how many
    and why. A warning: the pairs written are sound, but the set is smaller than the shard's prompts
    suggest, and a shard where most pairs are contested says the panel or rubric needs a look."""
    cut = sum(left_out.pairs.values())
    settings = f"min_judge_agreement={cfg.min_judge_agreement}, min_margin_low={cfg.min_margin_low}"
    meta = {"pairs_left_out": cut, **{f"left_out/{reason}": n for reason, n in left_out.pairs.items()}}
    if not cut:
        return Finding(True, f"no contested pair left out ({settings})", meta)
    by_count = sorted(left_out.pairs.items(), key=lambda kv: (-kv[1], kv[0]))
    reasons = "; ".join(f"{n} {reason}" for reason, n in by_count)
    return Finding(False, f"{cut} contested pair(s) left out ({settings}): {reasons}", meta)


PAIR_CHECKS = (
    StageCheck("chosen_beats_rejected", "chosen_rating > rejected_rating and chosen != rejected in every pair.",
               lambda df, _: check_pairs(df)),
)


def pair_checks(binarization: Binarization) -> list[StageCheck]:
    """The pairs' checks; the step hands the contested check what it left out."""
    return [
        *PAIR_CHECKS,
        StageCheck("contested_pairs", "Pairs left out by min_judge_agreement / min_margin_low, counted by reason "
                                      "(warning only).",
                   lambda df, given: check_contested(given[LEFT_OUT], binarization),
                   severity=dg.AssetCheckSeverity.WARN, needs=(LEFT_OUT,)),
    ]


def pairs_column_lineage(jury: Jury) -> dg.TableColumnLineage:
    """Pair columns back to where their values were first made (not only to pooled_ratings)."""
    judges = [ratings_key(j) for j in jury.judges]
    generators = [generation_key(g) for g in jury.generators]
    prompt = lambda column: [column_of(PROMPTS_KEY, PROMPT_COLUMNS, column)]  # noqa: E731
    combined = lambda column: [column_of(COMBINED_KEY, COMBINED_COLUMNS, column)]  # noqa: E731
    answer = prompt("instruction") + combined("generations")  # a chat: the prompt, then the answer
    rating = [column_of(POOLED_KEY, POOLED_COLUMNS, "avg_poll_ratings")]
    votes = column_of_each(judges, RATING_COLUMNS, "ratings")  # the confidence is read from each judge's ratings
    return PAIR_COLUMNS.lineage({
        "prompt": prompt("instruction"),
        "prompt_id": prompt("prompt_id"),
        "chosen": answer,
        "rejected": answer,
        "chosen_model": combined("generation_models"),
        "rejected_model": combined("generation_models"),
        "chosen_generator": combined("generators"),
        "rejected_generator": combined("generators"),
        "chosen_rating": rating,
        "rejected_rating": rating,
        "margin": rating,
        **{c: votes for c in ("judge_agreement", "judges_for", "judges_against", "judges_tied",
                              "margin_low", "margin_high")},
        "avg_poll_ratings": rating,
        "poll_ratings": votes,
        "poll_models": column_of_each(judges, RATING_COLUMNS, "model_name"),
        "chosen_call_id": column_of_each(generators, GENERATION_COLUMNS, "call_id"),
        "rejected_call_id": column_of_each(generators, GENERATION_COLUMNS, "call_id"),
        "rating_call_ids": column_of_each(judges, RATING_COLUMNS, "call_id"),
        "bt_strengths": [column_of(POOLED_KEY, POOLED_COLUMNS, "bt_strengths")],
        "win_counts": [column_of(POOLED_KEY, POOLED_COLUMNS, "win_counts")],
    })


def chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _pair_row(r: pd.Series, jury: Jury, chosen: int, rejected: int, margin: float,
              conf: PairConfidence) -> dict[str, object]:
    generations, avg = plain_list(r["generations"]), plain_list(r[scores_column(jury.judging)])
    models, call_ids = plain_list(r["generation_models"]), plain_list(r["generation_call_ids"])
    return {
        "prompt": r["instruction"],
        "prompt_id": r["prompt_id"],
        "chosen": chat(r["instruction"], generations[chosen]),
        "rejected": chat(r["instruction"], generations[rejected]),
        "chosen_model": models[chosen],
        "rejected_model": models[rejected],
        "chosen_generator": jury.generators[chosen].name,
        "rejected_generator": jury.generators[rejected].name,
        "chosen_rating": avg[chosen],
        "rejected_rating": avg[rejected],
        "margin": margin,
        "judge_agreement": conf.judge_agreement,
        "judges_for": conf.judges_for,
        "judges_against": conf.judges_against,
        "judges_tied": conf.judges_tied,
        "margin_low": conf.margin_low,
        "margin_high": conf.margin_high,
        "poll_ratings": [plain_list(x) for x in r["poll_ratings"]],
        "poll_models": plain_list(r["poll_models"]),
        "avg_poll_ratings": avg,
        "chosen_call_id": call_ids[chosen],
        "rejected_call_id": call_ids[rejected],
        "rating_call_ids": plain_list(r["poll_call_ids"]),
        "bt_strengths": plain_list(r.get("bt_strengths")) or None,
        "win_counts": plain_list(r.get("win_counts")) or None,
    }


def preference_rows(pooled: pd.DataFrame, jury: Jury, cfg: Binarization) -> tuple[list[dict[str, object]], LeftOut]:
    """Pairs for every prompt, each with the jury's confidence in it, and what was left out and why."""
    mask = (self_family_mask([j.family for j in jury.judges], [g.family for g in jury.generators])
            if jury.judging.exclude_self_family else None)
    rows: list[dict[str, object]] = []
    left_out = LeftOut()
    pairwise = jury.judging.mode == "pairwise"  # pairs come from the Bradley-Terry strengths
    score_column = scores_column(jury.judging)
    for _, r in pooled.iterrows():
        generations = plain_list(r["generations"])
        if len(generations) != len(jury.generators):  # stored under another panel: names would be wrong
            raise ValueError(f"pooled_ratings row {short_id(r['prompt_id'])} has {len(generations)} generations; "
                             f"the panel has {len(jury.generators)} generators: re-materialize it")
        scores = plain_list(r[score_column])
        result = binarize(scores, strategy=cfg.strategy, min_margin=cfg.min_margin,
                          seed=cfg.seed, key=r["prompt_id"], valid=[isinstance(g, str) for g in generations])
        ratings = [plain_list(x) for x in r["poll_ratings"]]
        weights = None if is_missing(r.get("judge_weights")) else [float(w) for w in plain_list(r["judge_weights"])]
        cuts: list[str] = []
        for chosen, rejected, margin in result.pairs:
            key = f"{r['prompt_id']}|{jury.generators[chosen].name}|{jury.generators[rejected].name}"
            conf = (comparison_confidence(plain_list(r["poll_comparisons"]), chosen, rejected, exclude=mask)
                    if pairwise else
                    pair_confidence(ratings, chosen, rejected, exclude=mask, method=jury.pooling.method, key=key,
                                    weights=weights))
            cut = confidence_cut(conf, min_judge_agreement=cfg.min_judge_agreement, min_margin_low=cfg.min_margin_low)
            if cut:
                left_out.add_pair(cut)
                cuts.append(cut)
            else:
                rows.append(_pair_row(r, jury, chosen, rejected, margin, conf))
        if not result.pairs or len(cuts) == len(result.pairs):
            left_out.add_prompt(result.reason or (cuts[0] if cuts else "no pair"))
    return rows, left_out


def confidence_metadata(df: pd.DataFrame, left_out: LeftOut) -> dict[str, Any]:
    """The shard's per-pair confidence as numbers the UI plots, and what was left out."""
    agreement = df["judge_agreement"].dropna() if len(df) else pd.Series(dtype=float)
    low = df["margin_low"].dropna() if len(df) else pd.Series(dtype=float)
    number = lambda v: dg.MetadataValue.float(float(v)) if v is not None else dg.MetadataValue.null()  # noqa: E731
    return {
        "confidence/mean_judge_agreement": number(agreement.mean() if len(agreement) else None),
        "confidence/unanimous_pairs": int((agreement == 1.0).sum()),
        "confidence/pairs_without_interval": int(len(df) - len(low)),
        "confidence/mean_margin_low": number(low.mean() if len(low) else None),
        "dropped_prompts": dg.MetadataValue.json(left_out.prompts),
        "ties_dropped": left_out.prompts.get("tie", 0),
        "contested_pairs_left_out": sum(left_out.pairs.values()),
        "contested_left_out_by_reason": dg.MetadataValue.json(left_out.pairs),
    }


def build_preferences_asset(jury: Jury, cfg: Binarization, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """`jury`: whose pooled ratings the pairs come from; `cfg`: the panel's `binarization:`."""
    checks = pair_checks(cfg)
    member_keys = {k.to_user_string(): k for k in [*map(generation_key, jury.generators), *map(ratings_key, jury.judges)]}
    contested = (f" Pairs below min_judge_agreement={cfg.min_judge_agreement} or min_margin_low={cfg.min_margin_low} "
                 "are left out and counted." if cfg.min_judge_agreement is not None or cfg.min_margin_low is not None
                 else "")

    @dg.asset(
        key=PAIRS_KEY,
        ins={"pooled_ratings": dg.AssetIn(key=POOLED_KEY)},
        group_name="preferences",
        kinds={"pandas", "parquet"},
        partitions_def=partitions_def,
        check_specs=asset_check_specs(checks, PAIRS_KEY, partitions_def),
        metadata=PAIR_COLUMNS.definition_metadata(),
        code_version=pairs_version(cfg),
        description=(
            f"Chosen/rejected pairs ({cfg.strategy}) in distilabel's FormatTextGenerationDPO schema, plus the PoLL "
            "columns, each pair's judge agreement and margin interval, and the ids of the calls behind each pair. "
            f"Ties are dropped and counted.{contested}"
        ),
    )
    def preference_pairs(context: dg.AssetExecutionContext, pooled_ratings: Any) -> Iterator[Any]:
        # `pooled_ratings`: one shard's frame, or {shard: frame} in a run of several shards
        made = {}
        for shard, pooled in shard_frames(context, "pooled_ratings", pooled_ratings).items():
            rows, left_out = preference_rows(pooled, jury, cfg)
            df = PAIR_COLUMNS.frame(rows)
            context.log.info(f"{shard}: {len(df)} preference pairs from {len(pooled)} prompts; prompts without a "
                             f"pair: {left_out.prompts or 'none'}; contested pairs left out: {left_out.pairs or 'none'}")
            out = dg.Output(
                df,
                metadata={
                    **PAIR_COLUMNS.output_metadata(df),
                    "dagster/column_lineage": pairs_column_lineage(jury),
                    "pairs": len(df),
                    "prompts": len(pooled),
                    **confidence_metadata(df, left_out),
                    "preview": dg.MetadataValue.md(pairs_preview(df)),
                    "pairs_table": dg.MetadataValue.md(pairs_table(df)),
                    **shard_totals(context.instance, member_keys, shard),
                },
            )
            given = {LEFT_OUT: left_out}
            made[shard] = (out, evaluate_checks(checks, PAIRS_KEY, df, given, selected=context.selected_asset_check_keys))
        yield from shard_events(context, PAIRS_KEY, made)

    return preference_pairs


AGREEMENT_BINS = ((1.0, 1.0, "every judge"), (0.75, 1.0, "3/4 or more"), (0.5, 0.75, "1/2 to 3/4"), (0.0, 0.5, "under 1/2"))


def pair_quality(jury: Jury, cfg: Binarization, pairs: pd.DataFrame, pooled: pd.DataFrame) -> dict[str, Any]:
    """The dataset card's view of the pairs' confidence: how the judge agreement and the margin's lower
    bound are spread over the written pairs, and what binarization left out (recomputed from the
    stored pooled ratings with the panel's settings, so it covers every stored shard)."""
    _, left_out = preference_rows(pooled, jury, cfg)
    share = pairs["judge_agreement"] if "judge_agreement" in pairs else pd.Series(dtype=float)
    low = pairs["margin_low"] if "margin_low" in pairs else pd.Series(dtype=float)
    spread = {label: int(((share == 1.0) if lo == hi else ((share >= lo) & (share < hi))).sum())
              for lo, hi, label in AGREEMENT_BINS}
    return {
        "settings": {"min_judge_agreement": cfg.min_judge_agreement, "min_margin_low": cfg.min_margin_low},
        "pairs": len(pairs),
        "judge_agreement": {**spread, "no judge rated both": int(share.isna().sum())},
        "mean_judge_agreement": float(share.mean()) if share.notna().any() else None,
        "margin_low": {"above 0": int((low > 0).sum()), "0 or below": int((low <= 0).sum()),
                       "no interval (under 2 judges)": int(low.isna().sum())},
        "left_out": {"prompts_without_pair": left_out.prompts, "contested_pairs": left_out.pairs},
    }
