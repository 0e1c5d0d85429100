"""Data-quality checks on every stage, as pure functions over DataFrames plus thin Dagster wrappers.

Each `check_*` function takes the stored frames and returns a `Finding` (passed, a sentence saying
what is wrong and where, and metadata). `build_asset_checks(panel)` wraps them as `@asset_check`s.
Checks that guard data downstream stages consume are blocking: when one fails, the run stops
before the next stage reads the bad shard. Agreement between judges only warns: low agreement is
worth a look but is not wrong data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from poll_assets.agreement import judge_agreement
from poll_assets.assets.generations import generation_key
from poll_assets.assets.judging import ratings_key
from poll_assets.panel import Panel
from poll_assets.partitions import build_partitions_def
from poll_assets.rubrics.ultrafeedback import get_rubric
from poll_assets.verdicts import NA

MAX_EXAMPLES = 5  # rows named in a failure message; the count is always exact


@dataclass(frozen=True)
class Finding:
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _seq(value: Any) -> list[Any]:
    """A list cell as a plain list (Parquet returns numpy arrays; missing cells are None/NaN)."""
    if value is None or (isinstance(value, float) and value != value):
        return []
    return [None if (isinstance(v, float) and v != v) else (v.item() if isinstance(v, np.generic) else v) for v in value]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _examples(items: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:MAX_EXAMPLES])
    return shown + (f", ... ({len(items)} in all)" if len(items) > MAX_EXAMPLES else "")


def _short(pid: Any) -> str:
    return str(pid)[:12]


# --- prompts -------------------------------------------------------------------------------------


def check_prompts(prompts: pd.DataFrame) -> Finding:
    """The shard has at least one prompt, every prompt has an id and text, and ids are unique."""
    problems = []
    if len(prompts) == 0:
        problems.append("the shard has no prompts")
    missing_ids = [i for i, v in enumerate(prompts.get("prompt_id", pd.Series(dtype=object))) if _missing(v) or v == ""]
    if missing_ids:
        problems.append(f"rows without prompt_id: {_examples(missing_ids)}")
    empty = [i for i, v in enumerate(prompts.get("instruction", pd.Series(dtype=object))) if _missing(v) or not str(v).strip()]
    if empty:
        problems.append(f"rows with an empty instruction: {_examples(empty)}")
    dupes = sorted({_short(p) for p in prompts["prompt_id"][prompts["prompt_id"].duplicated()]}) if len(prompts) else []
    if dupes:
        problems.append(f"repeated prompt_id: {_examples(dupes)}")
    return Finding(
        passed=not problems,
        description="; ".join(problems) or f"{len(prompts)} prompts, ids unique",
        metadata={"rows": len(prompts), "duplicate_ids": len(dupes), "empty_instructions": len(empty)},
    )


# --- generations ---------------------------------------------------------------------------------


def check_generation_rows(generations: pd.DataFrame, prompts: pd.DataFrame) -> Finding:
    """Exactly one row per prompt of the shard, none extra, none twice."""
    want = list(prompts["prompt_id"])
    got = list(generations["prompt_id"])
    missing = [_short(p) for p in want if p not in set(got)]
    extra = [_short(p) for p in got if p not in set(want)]
    repeated = sorted({_short(p) for p in pd.Series(got)[pd.Series(got).duplicated()]})
    problems = []
    if missing:
        problems.append(f"no row for prompts {_examples(missing)}")
    if extra:
        problems.append(f"rows for prompts not in the shard: {_examples(extra)}")
    if repeated:
        problems.append(f"prompts with more than one row: {_examples(repeated)}")
    return Finding(
        passed=not problems,
        description="; ".join(problems) or f"one row for each of {len(want)} prompts",
        metadata={"rows": len(got), "prompts": len(want), "missing": len(missing), "extra": len(extra)},
    )


def check_generation_failures(generations: pd.DataFrame, max_rate: float) -> Finding:
    """Share of prompts without a generation (call failed or empty text) is at most `max_rate`."""
    failed = [
        _short(pid)
        for pid, text, err in zip(generations["prompt_id"], generations["generation"], generations["error"])
        if not _missing(err) or _missing(text)
    ]
    rate = len(failed) / len(generations) if len(generations) else 0.0
    passed = rate <= max_rate
    desc = (
        f"failure rate {rate:.3f} <= {max_rate}"
        if passed
        else f"failure rate {rate:.3f} > max_generation_failure_rate {max_rate}; failed prompts: {_examples(failed)}"
    )
    return Finding(passed, desc, {"failure_rate": float(rate), "failures": len(failed), "threshold": float(max_rate)})


# --- ratings -------------------------------------------------------------------------------------


def check_ratings_valid(ratings: pd.DataFrame, combined: pd.DataFrame, scale: Sequence[int]) -> Finding:
    """One row per prompt of combined_generations; per row one rating, rationale and error per
    generation; every rating on the rubric's scale, or None with the reason in rating_errors."""
    allowed = set(scale)
    n_gen = {pid: len(_seq(g)) for pid, g in zip(combined["prompt_id"], combined["generations"])}
    problems: list[str] = []
    if list(ratings["prompt_id"]) != list(combined["prompt_id"]):
        problems.append(
            f"prompt ids differ from combined_generations ({len(ratings)} rows vs {len(combined)}, or another order)"
        )
    misaligned, off_scale, unexplained = [], [], []
    for pid, rs, rats, errs in zip(ratings["prompt_id"], ratings["ratings"], ratings["rationales"], ratings["rating_errors"]):
        rs, rats, errs = _seq(rs), _seq(rats), _seq(errs)
        expected = n_gen.get(pid)
        if expected is None or not (len(rs) == len(rats) == len(errs) == expected):
            misaligned.append(f"{_short(pid)} ({len(rs)} ratings, {expected} generations)")
            continue
        for k, (r, e) in enumerate(zip(rs, errs)):
            if r is None:
                if _missing(e) or not str(e).strip():
                    unexplained.append(f"{_short(pid)}[{k}]")
            elif r not in allowed or isinstance(r, bool):
                off_scale.append(f"{_short(pid)}[{k}]={r!r}")
    if misaligned:
        problems.append(f"ratings not aligned with generations: {_examples(misaligned)}")
    if off_scale:
        problems.append(f"ratings off the {min(allowed)}-{max(allowed)} scale: {_examples(off_scale)}")
    if unexplained:
        problems.append(f"missing ratings without a reason: {_examples(unexplained)}")
    return Finding(
        passed=not problems,
        description="; ".join(problems) or f"{len(ratings)} rows, every rating on the scale or explained",
        metadata={"misaligned_rows": len(misaligned), "off_scale": len(off_scale), "unexplained_none": len(unexplained)},
    )


def parse_failure_rate(ratings: pd.DataFrame) -> tuple[float, int, int]:
    """(rate, failures, judged) over the generations the judge was shown. A None rating counts as a
    failure unless the rubric's N/A explains it; the asset's own metadata counts the same way."""
    failures = judged = 0
    for rs, errs, shown in zip(ratings["ratings"], ratings["rating_errors"], ratings["shown_order"]):
        rs, errs = _seq(rs), _seq(errs)
        for i in _seq(shown):
            judged += 1
            if i >= len(rs) or i >= len(errs):  # misaligned row: ratings_valid names it; count it here too
                failures += 1
            else:
                failures += rs[i] is None and errs[i] != NA
    return (failures / judged if judged else 0.0), failures, judged


def check_parse_failures(ratings: pd.DataFrame, max_rate: float) -> Finding:
    rate, failures, judged = parse_failure_rate(ratings)
    passed = rate <= max_rate
    desc = (
        f"parse failure rate {rate:.3f} <= {max_rate} ({failures}/{judged})"
        if passed
        else f"parse failure rate {rate:.3f} > max_parse_failure_rate {max_rate} ({failures} of {judged} verdicts)"
    )
    return Finding(passed, desc, {"parse_failure_rate": float(rate), "failures": failures, "judged": judged, "threshold": float(max_rate)})


# --- pooled ratings ------------------------------------------------------------------------------


def check_pooled_coverage(pooled: pd.DataFrame, combined: pd.DataFrame, n_judges: int) -> Finding:
    """Every generation of every prompt has a pooled slot: one row per prompt, `avg_poll_ratings` as
    long as `generations`, and a judge × generation `poll_ratings` matrix. Generations no judge could
    rate are counted (`unrated`), not failed: the parse-failure checks already bound them."""
    problems: list[str] = []
    want, got = list(combined["prompt_id"]), list(pooled["prompt_id"])
    missing = [_short(p) for p in want if p not in set(got)]
    if missing:
        problems.append(f"prompts without pooled ratings: {_examples(missing)}")
    if len(got) != len(set(got)):
        problems.append("a prompt appears more than once")
    n_gen = {pid: len(_seq(g)) for pid, g in zip(combined["prompt_id"], combined["generations"])}
    short_rows, unrated = [], 0
    for pid, avg, matrix, gens in zip(pooled["prompt_id"], pooled["avg_poll_ratings"], pooled["poll_ratings"], pooled["generations"]):
        avg, rows = _seq(avg), [_seq(r) for r in _seq(matrix)] if not _missing(matrix) else []
        expected = n_gen.get(pid, len(_seq(gens)))
        if len(avg) != expected or len(rows) != n_judges or any(len(r) != expected for r in rows):
            short_rows.append(f"{_short(pid)} ({len(avg)} pooled, {expected} generations, {len(rows)} judge rows)")
        unrated += sum(a is None and isinstance(g, str) for a, g in zip(avg, _seq(gens)))
    if short_rows:
        problems.append(f"pooled ratings do not cover every generation: {_examples(short_rows)}")
    return Finding(
        passed=not problems,
        description="; ".join(problems) or f"{len(got)} prompts, every generation has a pooled slot",
        metadata={"prompts": len(got), "missing_prompts": len(missing), "short_rows": len(short_rows), "unrated": unrated},
    )


def pooled_alpha(pooled: pd.DataFrame, judge_names: Sequence[str], scale: Sequence[int]) -> float | None:
    """Krippendorff's alpha over all generations of the shard, recomputed from `poll_ratings`."""
    flat: dict[str, list[int | None]] = {j: [] for j in judge_names}
    for matrix in pooled["poll_ratings"]:
        for name, row in zip(judge_names, _seq(matrix)):
            flat[name].extend(_seq(row))
    if len(flat) < 2:
        return None
    return judge_agreement(flat, value_domain=list(scale)).get("krippendorff_alpha")


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


# --- preference pairs ----------------------------------------------------------------------------


def _answer(messages: Any) -> Any:
    msgs = _seq(messages)
    return msgs[-1].get("content") if msgs and isinstance(msgs[-1], dict) else None


def check_pairs(pairs: pd.DataFrame) -> Finding:
    """In every pair the chosen answer is rated strictly higher and differs from the rejected one."""
    not_higher, same = [], []
    for i, r in enumerate(pairs.itertuples(index=False)):
        if _missing(r.chosen_rating) or _missing(r.rejected_rating) or not r.chosen_rating > r.rejected_rating:
            not_higher.append(f"row {i} ({_short(r.prompt_id)}: {r.chosen_rating} vs {r.rejected_rating})")
        if _answer(r.chosen) == _answer(r.rejected) or r.chosen_call_id == r.rejected_call_id:
            same.append(f"row {i} ({_short(r.prompt_id)})")
    problems = []
    if not_higher:
        problems.append(f"chosen_rating not above rejected_rating: {_examples(not_higher)}")
    if same:
        problems.append(f"chosen is the same answer as rejected: {_examples(same)}")
    return Finding(
        passed=not problems,
        description="; ".join(problems) or f"{len(pairs)} pairs, chosen above rejected in each",
        metadata={"pairs": len(pairs), "not_higher": len(not_higher), "identical": len(same)},
    )


# --- Dagster wrappers ----------------------------------------------------------------------------


def _result(finding: Finding, severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=finding.passed,
        severity=severity,
        description=finding.description,
        metadata={k: (dg.MetadataValue.null() if v is None else v) for k, v in finding.metadata.items()},
    )


def _check(
    asset: dg.AssetKey | str,
    name: str,
    description: str,
    fn: Callable[..., dg.AssetCheckResult],
    *,
    blocking: bool = True,
    other: str | None = None,
    partitions_def: dg.PartitionsDefinition | None = None,
) -> dg.AssetChecksDefinition:
    """One @asset_check on `asset`; `fn` gets the asset's frame, then `other`'s frame when given."""
    key = dg.AssetKey.from_coercible(asset)
    # Partitioned like the asset, so a check reads (and judges) exactly the shard its run made.
    opts: dict[str, Any] = {
        "asset": key, "name": name, "description": description, "blocking": blocking, "partitions_def": partitions_def,
    }
    if other is None:

        @dg.asset_check(**opts)
        def _alone(asset_value: pd.DataFrame) -> dg.AssetCheckResult:
            return fn(asset_value)

        return _alone

    @dg.asset_check(**opts, additional_ins={"other_value": dg.AssetIn(key=dg.AssetKey.from_coercible(other))})
    def _with_other(asset_value: pd.DataFrame, other_value: pd.DataFrame) -> dg.AssetCheckResult:
        return fn(asset_value, other_value)

    return _with_other


def build_asset_checks(panel: Panel) -> list[dg.AssetChecksDefinition]:
    """Every check of the panel's graph; thresholds come from `panel.thresholds`."""
    t = panel.thresholds
    check = functools.partial(_check, partitions_def=build_partitions_def(panel.source))
    rubric = get_rubric(panel.judging.aspect)
    scale = rubric.ratings
    judge_names = [j.name for j in panel.judges]
    checks = [
        check("prompts", "prompts_valid", "At least one prompt; ids present and unique; no empty instruction.",
               lambda p: _result(check_prompts(p))),
    ]
    for g in panel.generators:
        key = generation_key(g)
        checks += [
            check(key, "one_row_per_prompt", "Exactly one row for each prompt of the shard.",
                   lambda df, prompts: _result(check_generation_rows(df, prompts)), other="prompts"),
            check(key, "failure_rate", f"Share of failed generations <= {t.max_generation_failure_rate}.",
                   lambda df: _result(check_generation_failures(df, t.max_generation_failure_rate))),
        ]
    for j in panel.judges:
        key = ratings_key(j)
        checks += [
            check(key, "ratings_valid",
                   f"Ratings on the {rubric.min_rating}-{rubric.max_rating} scale or None with a reason, one per generation.",
                   lambda df, combined: _result(check_ratings_valid(df, combined, scale)),
                   other="combined_generations"),
            check(key, "parse_failure_rate", f"Share of unparseable verdicts <= {t.max_parse_failure_rate}.",
                   lambda df: _result(check_parse_failures(df, t.max_parse_failure_rate))),
        ]
    checks += [
        check("pooled_ratings", "covers_every_generation", "A pooled rating slot for every generation of every prompt.",
               lambda df, combined: _result(check_pooled_coverage(df, combined, len(panel.judges))),
               other="combined_generations"),
        check("pooled_ratings", "judge_agreement",
               f"Krippendorff alpha between judges >= {t.min_agreement} (warning only).",
               lambda df: _result(check_agreement(pooled_alpha(df, judge_names, scale), t.min_agreement),
                                  dg.AssetCheckSeverity.WARN),
               blocking=False),
        check("preference_pairs", "chosen_beats_rejected", "chosen_rating > rejected_rating and chosen != rejected in every pair.",
               lambda df: _result(check_pairs(df))),
    ]
    return checks
