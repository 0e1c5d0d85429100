"""Data-quality checks on every stage, as pure functions over DataFrames plus thin Dagster glue.

Each `check_*` function takes frames and returns a `Finding` (passed, a sentence saying what is
wrong and where, and metadata). The checks run inside the step that makes the asset they check, on
the frame it just made: `asset_check_specs(panel, key)` gives the specs the asset declares, and
`evaluate_checks(...)` the results the step yields after its output. A separate check step would
cost its own step events and a reload of the asset (and sometimes a second one) from Parquet.

Checks that guard data downstream stages consume are blocking: when one fails, the step fails
after storing its output, so the next stage never reads the bad shard. Agreement between judges
only warns: low agreement is worth a look but is not wrong data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
import warnings
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.agreement import judge_agreement
from poll_assets.panel import Panel
from poll_assets.parquet_values import is_missing, plain_list
from poll_assets.rubrics.ultrafeedback import get_rubric
from poll_assets.verdicts import NA

MAX_EXAMPLES = 5  # rows named in a failure message; the count is always exact


@dataclass(frozen=True)
class Finding:
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _examples(items: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:MAX_EXAMPLES])
    return shown + (f", ... ({len(items)} in all)" if len(items) > MAX_EXAMPLES else "")


def _absent(ids: Sequence[Any], among: Sequence[Any]) -> list[str]:
    """Short forms of the ids in `ids` that `among` lacks, in order (the set is built once)."""
    present = set(among)
    return [_short(p) for p in ids if p not in present]


def _generation_counts(combined: pd.DataFrame) -> dict[Any, int]:
    """How many generations each prompt of combined_generations has."""
    return {pid: len(plain_list(g)) for pid, g in zip(combined["prompt_id"], combined["generations"])}


def _short(pid: Any) -> str:
    return str(pid)[:12]


# --- prompts -------------------------------------------------------------------------------------


def check_prompts(prompts: pd.DataFrame) -> Finding:
    """The shard has at least one prompt, every prompt has an id and text, and ids are unique."""
    problems = []
    if len(prompts) == 0:
        problems.append("the shard has no prompts")
    missing_ids = [i for i, v in enumerate(prompts.get("prompt_id", pd.Series(dtype=object))) if is_missing(v) or v == ""]
    if missing_ids:
        problems.append(f"rows without prompt_id: {_examples(missing_ids)}")
    empty = [i for i, v in enumerate(prompts.get("instruction", pd.Series(dtype=object))) if is_missing(v) or not str(v).strip()]
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
    missing = _absent(want, got)
    extra = _absent(got, want)
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
        if not is_missing(err) or is_missing(text)
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
    n_gen = _generation_counts(combined)
    problems: list[str] = []
    if list(ratings["prompt_id"]) != list(combined["prompt_id"]):
        problems.append(
            f"prompt ids differ from combined_generations ({len(ratings)} rows vs {len(combined)}, or another order)"
        )
    misaligned, off_scale, unexplained = [], [], []
    for pid, rs, rats, errs in zip(ratings["prompt_id"], ratings["ratings"], ratings["rationales"], ratings["rating_errors"]):
        rs, rats, errs = plain_list(rs), plain_list(rats), plain_list(errs)
        expected = n_gen.get(pid)
        if expected is None or not (len(rs) == len(rats) == len(errs) == expected):
            misaligned.append(f"{_short(pid)} ({len(rs)} ratings, {expected} generations)")
            continue
        for k, (r, e) in enumerate(zip(rs, errs)):
            if r is None:
                if is_missing(e) or not str(e).strip():
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
        rs, errs = plain_list(rs), plain_list(errs)
        for i in plain_list(shown):
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
    missing = _absent(want, got)
    if missing:
        problems.append(f"prompts without pooled ratings: {_examples(missing)}")
    if len(got) != len(set(got)):
        problems.append("a prompt appears more than once")
    n_gen = _generation_counts(combined)
    short_rows, unrated = [], 0
    for pid, avg, matrix, gens in zip(pooled["prompt_id"], pooled["avg_poll_ratings"], pooled["poll_ratings"], pooled["generations"]):
        avg, rows = plain_list(avg), [plain_list(r) for r in plain_list(matrix)] if not is_missing(matrix) else []
        expected = n_gen.get(pid, len(plain_list(gens)))
        if len(avg) != expected or len(rows) != n_judges or any(len(r) != expected for r in rows):
            short_rows.append(f"{_short(pid)} ({len(avg)} pooled, {expected} generations, {len(rows)} judge rows)")
        unrated += sum(a is None and isinstance(g, str) for a, g in zip(avg, plain_list(gens)))
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
        for name, row in zip(judge_names, plain_list(matrix)):
            flat[name].extend(plain_list(row))
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
    msgs = plain_list(messages)
    return msgs[-1].get("content") if msgs and isinstance(msgs[-1], dict) else None


def check_pairs(pairs: pd.DataFrame) -> Finding:
    """In every pair the chosen answer is rated strictly higher and differs from the rejected one."""
    not_higher, same = [], []
    for i, r in enumerate(pairs.itertuples(index=False)):
        if is_missing(r.chosen_rating) or is_missing(r.rejected_rating) or not r.chosen_rating > r.rejected_rating:
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


def _result(
    finding: Finding,
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
    *,
    asset_key: dg.AssetKey | None = None,
    check_name: str | None = None,
) -> dg.AssetCheckResult:
    # A step that makes several assets must say which asset and check each result is for.
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=check_name,
        passed=finding.passed,
        severity=severity,
        description=finding.description,
        metadata={k: (dg.MetadataValue.null() if v is None else v) for k, v in finding.metadata.items()},
    )


@dataclass(frozen=True)
class _CheckDef:
    """One check of one asset: `run` gets the asset's frame, and the `other` frame when `needs_other`."""

    name: str
    description: str
    run: Callable[..., Finding]
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR
    needs_other: bool = False

    @property
    def blocking(self) -> bool:
        return self.severity == dg.AssetCheckSeverity.ERROR


# What each stage's `other` frame is, for the checks that compare two frames. The asset steps have
# these as inputs already (a generator answers the prompts; judges and pooling read combined_generations).
OTHER_INPUT = {"generations": "prompts", "ratings": "combined_generations", "pooled_ratings": "combined_generations"}


def _check_defs(panel: Panel, key: dg.AssetKey) -> list[_CheckDef]:
    """The checks of the asset `key`; thresholds come from `panel.thresholds`.

    Dispatches on the key's first part (`generations/<member>`, `ratings/<member>`, or a stage name)
    rather than importing the key builders: the asset modules import this one."""
    t = panel.thresholds
    stage = key.path[0]
    if stage == "prompts":
        return [_CheckDef("prompts_valid", "At least one prompt; ids present and unique; no empty instruction.",
                          check_prompts)]
    if stage == "generations":
        return [
            _CheckDef("one_row_per_prompt", "Exactly one row for each prompt of the shard.",
                      check_generation_rows, needs_other=True),
            _CheckDef("failure_rate", f"Share of failed generations <= {t.max_generation_failure_rate}.",
                      lambda df: check_generation_failures(df, t.max_generation_failure_rate)),
        ]
    if stage == "ratings":
        rubric = get_rubric(panel.judging.aspect)
        return [
            _CheckDef("ratings_valid",
                      f"Ratings on the {rubric.min_rating}-{rubric.max_rating} scale or None with a reason, one per generation.",
                      lambda df, combined: check_ratings_valid(df, combined, rubric.ratings), needs_other=True),
            _CheckDef("parse_failure_rate", f"Share of unparseable verdicts <= {t.max_parse_failure_rate}.",
                      lambda df: check_parse_failures(df, t.max_parse_failure_rate)),
        ]
    if stage == "pooled_ratings":
        scale = get_rubric(panel.judging.aspect).ratings
        judge_names = [j.name for j in panel.judges]
        return [
            _CheckDef("covers_every_generation", "A pooled rating slot for every generation of every prompt.",
                      lambda df, combined: check_pooled_coverage(df, combined, len(panel.judges)), needs_other=True),
            _CheckDef("judge_agreement", f"Krippendorff alpha between judges >= {t.min_agreement} (warning only).",
                      lambda df: check_agreement(pooled_alpha(df, judge_names, scale), t.min_agreement),
                      severity=dg.AssetCheckSeverity.WARN),
        ]
    if stage == "preference_pairs":
        return [_CheckDef("chosen_beats_rejected", "chosen_rating > rejected_rating and chosen != rejected in every pair.",
                          check_pairs)]
    if stage == "combined_generations":  # a reshaping of checked frames; pooled_ratings checks its coverage
        return []
    raise ValueError(f"poll_assets.checks: no checks are defined for asset {key.to_user_string()!r}")


def asset_check_specs(
    panel: Panel, key: dg.AssetKey, partitions_def: dg.PartitionsDefinition | None = None
) -> list[dg.AssetCheckSpec]:
    """The check specs to declare on the asset `key` (`check_specs=` of its @asset / @multi_asset).

    Partitioned like the asset, so each evaluation is recorded against the shard the step made.
    Dagster 1.13 calls a partitioned check spec "preview" and warns once per spec on every load;
    only that warning is silenced, here where the spec is made."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Specifying a partitions_def on an AssetCheckSpec", dg.PreviewWarning)
        return [
            dg.AssetCheckSpec(d.name, asset=key, description=d.description, blocking=d.blocking,
                              partitions_def=partitions_def)
            for d in _check_defs(panel, key)
        ]


def evaluate_checks(
    panel: Panel,
    key: dg.AssetKey,
    value: pd.DataFrame,
    other: pd.DataFrame | None = None,
    selected: AbstractSet[dg.AssetCheckKey] | None = None,
) -> list[dg.AssetCheckResult]:
    """Run the checks of `key` on the frame its step just made (and `other`, the input named in
    `OTHER_INPUT`), keeping only the `selected` checks when given. Yield these after the asset's
    output: Dagster stores the output first, and fails the step after it when a blocking one fails."""
    results = []
    for d in _check_defs(panel, key):
        if selected is not None and dg.AssetCheckKey(key, d.name) not in selected:
            continue
        if d.needs_other:
            if other is None:
                raise ValueError(
                    f"check {key.to_user_string()}:{d.name} compares with {OTHER_INPUT[key.path[0]]}, but no frame was given"
                )
            finding = d.run(value, other)
        else:
            finding = d.run(value)
        results.append(_result(finding, d.severity, asset_key=key, check_name=d.name))
    return results
