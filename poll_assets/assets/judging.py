"""Each judge's verdicts on every generation, with the UltraFeedback rubric: key, columns, checks."""


from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.assets.generations import generation_counts
from poll_assets.assets.metadata import call_metadata
from poll_assets.assets.previews import verdicts_preview
from poll_assets.assets.schema import schema
from poll_assets.assets.stage import MemberContext, run_stage_step, stage_multi_asset_kwargs
from poll_assets.checks import STEP_INPUT, Finding, StageCheck, examples, problems_finding, short_id
from poll_assets.llm.base import CallRequest, Completion
from poll_assets.panel import Member, Panel
from poll_assets.parquet_values import is_missing, plain_list
from poll_assets.rubrics.ultrafeedback import Rubric, build_judge_messages, prompt_version, verdict_json_schema
from poll_assets.verdicts import Verdict, parse_failure_rate, parse_verdicts, presentation_order, restore_order

RATINGS_PREFIX = "ratings"  # ratings/<member>
RATING_COLUMNS = schema(
    f"{RATINGS_PREFIX}/<j>",
    ("prompt_id", "string", "the prompt judged"),
    ("judge", "string", "the panel member that judged"),
    ("model_name", "string", "the judge's model"),
    ("ratings", "list<int>", "one rating per generation, in generation order; None with the reason in rating_errors"),
    ("rationales", "list<string>", "the judge's rationale for each generation"),
    ("rating_types", "list<string>", "the aspect's type for each generation (helpfulness, truthfulness), else None"),
    ("rating_errors", "list<string>", "why a rating is None: unreadable, N/A, judge call failed, generation failed"),
    ("shown_order", "list<int>", "the generations in the order the judge saw them (position-bias control)"),
    ("raw_output", "string", "the judge's answer as returned"),
    ("output_mode", "string", "how the answer was constrained: json_schema, json_object, tool_use, grammar, text, "
     "or text_fallback (a paid answer without the structured part, read as text)"),
    ("call_id", "string", "hash of the request; the response cache's key"),
    ("input_tokens", "int", "prompt tokens of the judge call"),
    ("output_tokens", "int", "answer tokens of the judge call"),
    ("error", "string", "why the judge call failed; None on success"),
)


def ratings_key(member: Member) -> dg.AssetKey:
    return dg.AssetKey([RATINGS_PREFIX, member.name])


@dataclass
class JudgeTask:
    """One judge call: the generations that exist for a prompt, in the order the judge sees them."""

    prompt_id: str
    n_generations: int
    shown: list[int]  # shown[k] = index (into generations) of the text shown at position k
    request: CallRequest | None  # None when no generation exists to judge


def plan_judge_task(
    row: pd.Series, member: Member, panel: Panel, rubric: Rubric
) -> JudgeTask:
    generations = list(row["generations"])
    present = [i for i, g in enumerate(generations) if isinstance(g, str)]
    if not present:
        return JudgeTask(row["prompt_id"], len(generations), [], None)
    order = presentation_order(
        row["prompt_id"], member.name, len(present), panel.judging.seed, shuffle=panel.judging.shuffle_positions
    )
    shown = [present[k] for k in order]
    limit = panel.judging.max_rationale_chars
    messages = build_judge_messages(
        rubric,
        row["instruction"],
        [generations[i] for i in shown],
        structured=True,
        system_prompt=member.system_prompt,
        max_rationale_chars=limit,
    )
    schema = verdict_json_schema(rubric, len(shown), max_rationale_chars=limit)
    request = CallRequest.build(messages, member.params.to_generation_params(), json_schema=schema)
    return JudgeTask(row["prompt_id"], len(generations), shown, request)


def verdicts_for(task: JudgeTask, completion: Completion | None, rubric: Rubric) -> list[Verdict]:
    """Exactly one verdict per generation, in generation order, whatever the judge returned."""
    out = [Verdict.generation_failed() for _ in range(task.n_generations)]
    if task.request is None or completion is None:
        return out
    if not completion.ok:
        for i in task.shown:
            out[i] = Verdict.judge_failed(str(completion.error))
        return out
    text = completion.text or ""
    # A provider that fell back to plain text may still have answered in JSON.
    structured = completion.structured or text.lstrip().startswith(("{", "```"))
    parsed = parse_verdicts(text, len(task.shown), rubric, structured=structured)
    present = sorted(task.shown)  # the generations that exist, in their own order
    restored = restore_order(parsed, [present.index(i) for i in task.shown])  # undo the shuffle
    for i, verdict in zip(present, restored):
        out[i] = verdict
    return out


def check_ratings_valid(ratings: pd.DataFrame, combined: pd.DataFrame, scale: Sequence[int]) -> Finding:
    """One row per prompt of combined_generations; per row one rating, rationale and error per
    generation; every rating on the rubric's scale, or None with the reason in rating_errors."""
    allowed, n_gen = set(scale), generation_counts(combined)
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
            misaligned.append(f"{short_id(pid)} ({len(rs)} ratings, {expected} generations)")
            continue
        for k, (r, e) in enumerate(zip(rs, errs)):
            if r is None:
                if is_missing(e) or not str(e).strip():
                    unexplained.append(f"{short_id(pid)}[{k}]")
            elif r not in allowed or isinstance(r, bool):
                off_scale.append(f"{short_id(pid)}[{k}]={r!r}")
    if misaligned:
        problems.append(f"ratings not aligned with generations: {examples(misaligned)}")
    if off_scale:
        problems.append(f"ratings off the {min(allowed)}-{max(allowed)} scale: {examples(off_scale)}")
    if unexplained:
        problems.append(f"missing ratings without a reason: {examples(unexplained)}")
    return problems_finding(problems, f"{len(ratings)} rows, every rating on the scale or explained",
                            {"misaligned_rows": len(misaligned), "off_scale": len(off_scale),
                             "unexplained_none": len(unexplained)})


def asked_verdicts(ratings: pd.DataFrame) -> list[Verdict | None]:
    """The verdicts a judge was asked for (one per generation it was shown), read back from its
    frame; None where a row is misaligned (`ratings_valid` names it)."""
    asked: list[Verdict | None] = []
    for rs, errs, shown in zip(ratings["ratings"], ratings["rating_errors"], ratings["shown_order"]):
        rs, errs = plain_list(rs), plain_list(errs)
        asked += [Verdict(rs[i], None, error=errs[i]) if i < len(rs) and i < len(errs) else None
                  for i in plain_list(shown)]
    return asked


def check_unrated_verdicts(ratings: pd.DataFrame, max_rate: float) -> Finding:
    """Share of the verdicts asked for that have no rating is at most `max_rate`. Unrated: the answer
    could not be read (a parse failure) or the judge call failed; the rubric's N/A is a rating."""
    asked = asked_verdicts(ratings)
    unrated = [v for v in asked if v is None or v.kind not in ("ok", "na")]
    parse_failures = sum(v is not None and v.kind == "parse_failed" for v in unrated)
    call_failures = sum(v is not None and v.kind == "judge_failed" for v in unrated)
    rate = len(unrated) / len(asked) if asked else 0.0
    passed = rate <= max_rate
    counts = (f"{len(unrated)} of {len(asked)} verdicts: {parse_failures} unreadable, "
              f"{call_failures} from failed judge calls")
    desc = (f"unrated verdict rate {rate:.3f} <= {max_rate} ({counts})" if passed
            else f"unrated verdict rate {rate:.3f} > max_parse_failure_rate {max_rate} ({counts})")
    return Finding(passed, desc, {"unrated_rate": float(rate), "failures": len(unrated), "judged": len(asked),
                                  "parse_failures": parse_failures, "judge_call_failures": call_failures,
                                  "threshold": float(max_rate)})


def rating_checks(panel: Panel, rubric: Rubric) -> list[StageCheck]:
    """Every judge's checks; the step hands them the combined_generations it judged."""
    max_rate = panel.thresholds.max_parse_failure_rate
    return [
        StageCheck("ratings_valid",
                   f"Ratings on the {rubric.min_rating}-{rubric.max_rating} scale or None with a reason, one per generation.",
                   lambda df, given: check_ratings_valid(df, given[STEP_INPUT], rubric.ratings), needs=(STEP_INPUT,)),
        StageCheck("unrated_verdict_rate",
                   f"Share of verdicts without a rating (unreadable answer or failed judge call) <= {max_rate}.",
                   lambda df, _: check_unrated_verdicts(df, max_rate)),
    ]


def judge_code_version(member: Member, panel: Panel, rubric: Rubric) -> str:
    return member.fingerprint(
        prompt_version(rubric, structured=True, system_prompt=member.system_prompt),
        panel.judging.model_dump_json(include={"shuffle_positions", "seed", "max_rationale_chars"}),
    )


def _description(member: Member, rubric: Rubric) -> str:
    return (
        f"Verdicts of judge `{member.name}` ({member.provider}: {member.model}) on every generation, "
        f"UltraFeedback {rubric.aspect} rubric v{rubric.version}: one rating (1-5 or None, with the reason) "
        "and one rationale per generation, aligned with `generations`; the raw judge output is kept."
    )


async def judge(work: MemberContext, combined_generations: pd.DataFrame, *, rubric: Rubric) -> dg.Output[pd.DataFrame]:
    """One judge's verdicts on a shard: the body of its asset, shared by the per-member and the stage step."""
    member, panel = work.member, work.panel
    tasks = [plan_judge_task(row, member, panel, rubric) for _, row in combined_generations.iterrows()]
    requests = [t.request for t in tasks if t.request is not None]
    batch = await work.run_calls(requests)
    done = iter(batch.completions)
    rows = []
    asked: list[Verdict] = []  # the verdicts the judge was asked for: one per generation shown
    for task in tasks:
        completion = next(done) if task.request is not None else None
        verdicts = verdicts_for(task, completion, rubric)
        asked += [verdicts[i] for i in task.shown]
        rows.append(
            {
                "prompt_id": task.prompt_id,
                "judge": member.name,
                "model_name": member.model,
                "ratings": [v.rating for v in verdicts],
                "rationales": [v.rationale for v in verdicts],
                "rating_types": [v.type for v in verdicts],
                "rating_errors": [v.error for v in verdicts],
                "shown_order": task.shown,
                "raw_output": completion.text if completion else None,
                "output_mode": completion.output_mode if completion else None,
                "call_id": completion.call_id if completion else None,
                "input_tokens": completion.input_tokens if completion else 0,
                "output_tokens": completion.output_tokens if completion else 0,
                "error": completion.error if completion else None,
            }
        )
    df = RATING_COLUMNS.frame(rows)
    if requests and batch.all_failed:
        raise dg.Failure(description=batch.failure_message(work.label))
    return dg.Output(
        df,
        metadata={
            **RATING_COLUMNS.output_metadata(df),
            **call_metadata(batch.stats, member, panel),
            "rubric": f"{rubric.aspect} v{rubric.version}",
            "parse_failures": sum(v.kind == "parse_failed" for v in asked),
            "parse_failure_rate": dg.MetadataValue.float(parse_failure_rate(asked)),
            "judge_call_failures": sum(v.kind == "judge_failed" for v in asked),
            "preview": dg.MetadataValue.md(verdicts_preview(df, [g.name for g in panel.generators])),
        },
    )


def build_ratings_asset(
    member: Member, panel: Panel, partitions_def: dg.PartitionsDefinition, rubric: Rubric
) -> dg.AssetsDefinition:
    """One step for one judge (used with `member_steps=True`, e.g. to run members as separate processes)."""
    return build_ratings_stage(panel, partitions_def, rubric, members=[member], name=f"ratings__{member.name}")


def build_ratings_stage(
    panel: Panel,
    partitions_def: dg.PartitionsDefinition,
    rubric: Rubric,
    members: list[Member] | None = None,
    name: str = "ratings",
) -> dg.AssetsDefinition:
    """Every judge's asset in ONE step, the judges calling at the same time (see assets/stage.py).

    Each judge stays its own asset and can be materialized alone; a failing judge does not hold back
    the others, whose outputs are stored before the step fails. Each judge's checks run on its
    frame right after its output is stored, and only when that judge ran and the check is selected.
    """
    # `members`: a subset, e.g. one member per step (`member_steps=True`); default all of them.
    stage_members = members if members is not None else panel.judges
    stage_checks = rating_checks(panel, rubric)

    @dg.multi_asset(
        **stage_multi_asset_kwargs(
            name=name, panel=panel, members=stage_members, key_of=ratings_key, group="judging",
            code_version_of=lambda m: judge_code_version(m, panel, rubric), description_of=lambda m: _description(m, rubric),
            input_name="combined_generations", default_pool="llm_judging", partitions_def=partitions_def,
            checks=stage_checks, columns=RATING_COLUMNS,
        )
    )
    def _ratings(context: dg.AssetExecutionContext, combined_generations: pd.DataFrame) -> Iterator[Any]:
        work = partial(judge, rubric=rubric)
        yield from run_stage_step(context, panel, stage_members, ratings_key, combined_generations, work, stage_checks)

    return _ratings

