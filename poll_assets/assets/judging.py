"""Each judge's verdicts on every generation, with the UltraFeedback rubric: key, columns, checks."""


from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.assets.comparisons import compare, comparison_checks
from poll_assets.assets.keys import COMPARISON_COLUMNS, RATING_COLUMNS, generation_counts, generator_names, ratings_key
from poll_assets.engine.metadata import PENDING_CHECK, call_metadata, pending_check, pending_ids, with_repairs
from poll_assets.engine.previews import verdicts_preview
from poll_assets.engine.schema import schema
from poll_assets.engine.stage import MemberContext, RunSettings, run_stage_step, stage_multi_asset_kwargs
from poll_assets.engine.checks import STEP_INPUT, Finding, StageCheck, combined_check, examples, problems_finding, short_id
from poll_assets.code_versions import judge_version
from poll_assets.llm.base import CallRequest, Completion, Message
from poll_assets.llm.online.runner import CallStats
from poll_assets.pairwise import pairwise_prompt_version
from poll_assets.panel import Judging, Member, Thresholds
from poll_assets.parquet_values import is_missing, plain_list
from poll_assets.rubrics.ultrafeedback import Rubric, build_repair_messages, prompt_version, verdict_json_schema
from poll_assets.stage_requests import JudgeTask, plan_judge_task
from poll_assets.verdicts import (
    Verdict,
    failure_reason,
    merge_repair,
    parse_failure_rate,
    parse_failures_by_reason,
    parse_verdicts,
    reading_mode,
    reading_report,
    restore_order,
    unread_texts,
)

def _reads_as_json(completion: Completion) -> bool:
    # A provider that fell back to plain text may still have answered in JSON.
    return completion.structured or (completion.text or "").lstrip().startswith(("{", "```"))


def shown_verdicts(task: JudgeTask, completion: Completion, rubric: Rubric) -> list[Verdict]:
    """The verdicts of a judge's answer (or of its repair), in the order the texts were shown. Always
    read against the FIRST call's messages: a line repeating the prompt is echo, never a rating."""
    assert task.request is not None
    return parse_verdicts(completion.text or "", len(task.shown), rubric, structured=_reads_as_json(completion),
                          messages=task.request.message_dicts())


def in_generation_order(task: JudgeTask, shown: list[Verdict]) -> list[Verdict]:
    """Verdicts in shown order -> one per generation, in generation order (absent ones: generation failed)."""
    out = [Verdict.generation_failed() for _ in range(task.n_generations)]
    present = sorted(task.shown)  # the generations that exist, in their own order
    restored = restore_order(shown, [present.index(i) for i in task.shown])  # undo the shuffle
    for i, verdict in zip(present, restored):
        out[i] = verdict
    return out


def verdicts_for(task: JudgeTask, completion: Completion | None, rubric: Rubric) -> list[Verdict]:
    """Exactly one verdict per generation, in generation order, whatever the judge returned."""
    if task.request is None or completion is None:
        return [Verdict.generation_failed() for _ in range(task.n_generations)]
    if not completion.ok:
        return in_generation_order(task, [Verdict.judge_failed(str(completion.error)) for _ in task.shown])
    return in_generation_order(task, shown_verdicts(task, completion, rubric))


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
    reasons = parse_failures_by_reason(v for v in unrated if v is not None)
    if len(reasons) == 1:  # one reason: name it, it is what to fix (prompt, format, parser)
        reason = next(iter(reasons))
        example = next(v.error for v in unrated if v is not None and failure_reason(v) == reason)
        counts += f"; all {parse_failures} unreadable verdicts: {reason!r} (e.g. {example!r})"
    desc = (f"unrated verdict rate {rate:.3f} <= {max_rate} ({counts})" if passed
            else f"unrated verdict rate {rate:.3f} > max_parse_failure_rate {max_rate} ({counts})")
    return Finding(passed, desc, {"unrated_rate": float(rate), "failures": len(unrated), "judged": len(asked),
                                  "parse_failures": parse_failures, "judge_call_failures": call_failures,
                                  "threshold": float(max_rate),
                                  "parse_failures_by_reason": dg.MetadataValue.json(reasons)})


def repair_figures(ratings: pd.DataFrame) -> dict[str, Any]:
    """A judge's parse failures before and after its repair re-asks, read back from its stored frame (so
    the asset metadata and the dataset card say the same): totals, rates, counts by reason, repair
    calls asked and failed, texts recovered. Frames stored before repairs existed count as unrepaired."""
    before: list[Verdict] = []
    after: list[Verdict] = []
    modes: list[str] = []  # how each rating was tied to its text (parse report)
    none = [None] * len(ratings)  # a column absent from an older frame
    for rs, errs, fixed, raw, shown in zip(ratings["ratings"], ratings["rating_errors"],
                                          ratings.get("repaired_errors", none), ratings.get("raw_output", none),
                                          ratings["shown_order"]):  # columns, not iterrows: no Series per row
        rs, errs, fixed, shown = plain_list(rs), plain_list(errs), plain_list(fixed), plain_list(shown)
        mode = reading_mode(raw if isinstance(raw, str) else None, len(shown))
        for i in shown:
            if i >= len(rs) or i >= len(errs):
                continue  # misaligned: ratings_valid names it
            now = Verdict(rs[i], None, error=errs[i])
            after.append(now)
            repaired = i < len(fixed) and not is_missing(fixed[i])
            before.append(Verdict(None, None, error=fixed[i]) if repaired else now)
            modes.append("repair" if repaired else mode)
    outputs = [o for cell in ratings.get("repair_outputs", pd.Series(dtype=object)) for o in plain_list(cell)]
    by_before, by_after = parse_failures_by_reason(before), parse_failures_by_reason(after)
    return {
        "parse_failures_before": sum(by_before.values()),
        "parse_failures_after": sum(by_after.values()),
        "parse_failure_rate_before": parse_failure_rate(before),
        "parse_failure_rate_after": parse_failure_rate(after),
        "by_reason_before": by_before,
        "by_reason_after": {r: by_after.get(r, 0) for r in [*by_before, *by_after]},
        "repairs_asked": len(outputs),
        "repair_call_failures": sum(is_missing(o) for o in outputs),
        "texts_recovered": sum(a.kind == "parse_failed" and b.kind in ("ok", "na") for a, b in zip(before, after)),
        **fit_figures(ratings),
        "reading": reading_report(modes, after),
    }


def fit_figures(ratings: pd.DataFrame) -> dict[str, int]:
    """Texts cut to fit the judge's context, and answers cut off at its token limit (0 for frames
    stored before these columns existed)."""
    cut = ratings["truncated_texts"] if "truncated_texts" in ratings else pd.Series(dtype=object)
    finish = ratings["finish_reason"] if "finish_reason" in ratings else pd.Series(dtype=object)
    return {"texts_cut_to_fit": sum(len(plain_list(c)) for c in cut),
            "answers_cut_at_token_limit": int((finish == "length").sum())}


def repair_metadata(figures: dict[str, Any]) -> dict[str, Any]:
    """`repair_figures` as flat asset metadata: `parse_failures_before/<reason>` and `.../after/<reason>` numbers."""
    meta: dict[str, Any] = {
        "parse_failures_before": figures["parse_failures_before"],
        "parse_failures_after": figures["parse_failures_after"],
        "parse_failure_rate_before": dg.MetadataValue.float(figures["parse_failure_rate_before"]),
        "repairs_asked": figures["repairs_asked"],
        "repair_call_failures": figures["repair_call_failures"],
        "texts_recovered": figures["texts_recovered"],
        "texts_cut_to_fit": figures["texts_cut_to_fit"],
        "answers_cut_at_token_limit": figures["answers_cut_at_token_limit"],
    }
    meta.update({f"parse_failures_before/{r}": n for r, n in figures["by_reason_before"].items()})
    meta.update({f"parse_failures_after/{r}": n for r, n in figures["by_reason_after"].items()})
    meta["parse_report"] = dg.MetadataValue.json(figures["reading"])  # layout / names / position / unread by reason
    return meta


RATINGS_CHECK = "ratings_valid"


def rating_checks(thresholds: Thresholds, rubric: Rubric) -> list[StageCheck]:
    """Every judge's checks; the step hands them the combined_generations it judged."""
    max_rate = thresholds.max_parse_failure_rate
    on_scale = (f"Ratings on the {rubric.min_rating}-{rubric.max_rating} scale or None with a reason, "
                "one per generation.")
    unrated = f"Share of verdicts without a rating (unreadable answer or failed judge call) <= {max_rate}."
    return [
        combined_check(RATINGS_CHECK, f"ratings_on_scale: {on_scale} unrated_verdict_rate: {unrated}", [
            StageCheck("ratings_on_scale", on_scale,
                       lambda df, given: check_ratings_valid(df, given[STEP_INPUT], rubric.ratings), needs=(STEP_INPUT,)),
            StageCheck("unrated_verdict_rate", unrated, lambda df, _: check_unrated_verdicts(df, max_rate)),
        ]),
        pending_check(),
    ]


def judge_code_version(member: Member, judging: Judging, rubric: Rubric) -> str:
    """The member's settings, its exact prompt (the rubric's, or the pairwise one in that mode), and the
    judging settings (the mode among them) less the named exclusions."""
    if judging.mode == "pairwise":
        prompt = f"{rubric.version}/{pairwise_prompt_version(structured=True, system_prompt=member.system_prompt)}"
    else:
        prompt = prompt_version(rubric, structured=True, system_prompt=member.system_prompt)
    return judge_version(member, judging, prompt)


def _description(member: Member, rubric: Rubric, mode: str = "rating") -> str:
    if mode == "pairwise":
        return (f"Pairwise comparisons by judge `{member.name}` ({member.provider}: {member.model}) of every prompt's "
                f"answers, two at a time, on {rubric.aspect}: per comparison the pair, the answer shown first, the "
                "preference (a, b, tie, or None with the reason) and the rationale; position figures in the metadata.")
    return (
        f"Verdicts of judge `{member.name}` ({member.provider}: {member.model}) on every generation, "
        f"UltraFeedback {rubric.aspect} rubric (version {rubric.version}): one rating (1-5 or None, with the reason) "
        "and one rationale per generation, aligned with `generations`; the raw judge output is kept."
    )


@dataclass
class JudgeCall:
    """One judge call's verdicts in shown order, after any repair, and the repair calls made for it."""

    task: JudgeTask
    completion: Completion | None  # None when no generation exists to judge
    first: list[Verdict]  # the first answer's verdicts (shown order)
    verdicts: list[Verdict]  # the same, filled by the repairs
    repairs: list[Completion] = field(default_factory=list)
    conversation: list[Message] | None = None  # the last repair's messages, continued by the next round

    def repaired_errors(self) -> list[str | None]:
        """Per generation: the first answer's reason for a text a repair filled, else None."""
        out: list[str | None] = [None] * self.task.n_generations
        for i, a, b in zip(self.task.shown, self.first, self.verdicts):
            if a.kind == "parse_failed" and b.kind in ("ok", "na"):
                out[i] = a.error
        return out


def first_reading(task: JudgeTask, completion: Completion | None, rubric: Rubric) -> JudgeCall:
    verdicts = verdicts_for(task, completion, rubric)
    shown = [verdicts[i] for i in task.shown]
    return JudgeCall(task, completion, shown, list(shown))


def repair_request(call: JudgeCall, rubric: Rubric, max_rationale_chars: int | None) -> CallRequest | None:
    """The next repair re-ask of a call that answered but left texts unread for a parse reason; None when
    there is nothing to ask (a failed call, every text read, or the last repair call failed)."""
    unread = unread_texts(call.verdicts)
    first, request = call.completion, call.task.request
    if not unread or first is None or request is None or not first.ok or (call.repairs and not call.repairs[-1].ok):
        return None
    as_json = _reads_as_json(first)  # ask in the shape the judge answered in (text blocks from a text-only one)
    answer = (call.repairs[-1].text if call.repairs else first.text) or ""
    messages = build_repair_messages(call.conversation or request.message_dicts(), answer, unread, rubric,
                                     structured=as_json, max_rationale_chars=max_rationale_chars)
    schema = (verdict_json_schema(rubric, len(call.task.shown), only=sorted(unread), max_rationale_chars=max_rationale_chars)
              if as_json else None)
    return CallRequest.build(messages, request.params, json_schema=schema)


async def repair_calls(work: MemberContext, calls: list[JudgeCall], judging: Judging, rubric: Rubric) -> list[CallStats]:
    """Up to `judging.repair_attempts` rounds of repair re-asks, each round one `run_calls` (cached,
    limited, retried, counted like any call). A repair fills unread texts, never overrides a rating."""
    stats: list[CallStats] = []
    limit = judging.max_rationale_chars
    for _ in range(judging.repair_attempts):
        asks = [(c, r) for c in calls if (r := repair_request(c, rubric, limit)) is not None]
        if not asks:
            break
        batch = await work.run_calls([r for _, r in asks])
        stats.append(batch.stats)
        for (call, request), completion in zip(asks, batch.completions):
            call.conversation = request.message_dicts()
            call.repairs.append(completion)
            if completion.ok:  # a failed repair leaves the verdicts as they were
                call.verdicts = merge_repair(call.verdicts, shown_verdicts(call.task, completion, rubric))
    return stats


def rating_row(call: JudgeCall, member: Member) -> dict[str, Any]:
    task, completion = call.task, call.completion
    verdicts = in_generation_order(task, call.verdicts)
    return {
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
        "error_kind": completion.error_kind if completion else None,
        "repair_outputs": [c.text if c.ok else None for c in call.repairs],
        "repair_call_ids": [c.call_id for c in call.repairs],
        "repaired_errors": call.repaired_errors(),
        "truncated_texts": task.truncated,
        "finish_reason": completion.finish_reason if completion else None,
    }


async def judge(work: MemberContext, combined_generations: pd.DataFrame, *, judging: Judging,
                rubric: Rubric) -> dg.Output[pd.DataFrame]:
    """One judge's verdicts on a shard: the body of its asset, shared by the per-member and the stage step."""
    member = work.member
    tasks = [plan_judge_task(row, member, judging, rubric) for _, row in combined_generations.iterrows()]
    requests = [t.request for t in tasks if t.request is not None]
    batch = await work.run_calls(requests)
    done = iter(batch.completions)
    calls = [first_reading(t, next(done) if t.request is not None else None, rubric) for t in tasks]
    if requests and batch.provider_down:
        raise dg.Failure(description=batch.failure_message(work.label))
    repair_stats = await repair_calls(work, calls, judging, rubric)
    df = RATING_COLUMNS.frame([rating_row(c, member) for c in calls])
    asked = [v for c in calls for v in c.verdicts]  # the verdicts the judge was asked for: one per generation shown
    return dg.Output(
        df,
        metadata={
            **RATING_COLUMNS.output_metadata(df),
            **call_metadata(with_repairs(batch.stats, repair_stats), member, work.price),
            "rubric": f"{rubric.aspect} (version {rubric.version})",
            "parse_failures": sum(v.kind == "parse_failed" for v in asked),
            "parse_failure_rate": dg.MetadataValue.float(parse_failure_rate(asked)),
            "judge_call_failures": sum(v.kind == "judge_failed" for v in asked),
            PENDING_CHECK: len(pending_ids(df)),
            **repair_metadata(repair_figures(df)),
            "preview": dg.MetadataValue.md(verdicts_preview(df, generator_names(combined_generations))),
        },
    )


def build_ratings_asset(member: Member, judging: Judging, thresholds: Thresholds, rubric: Rubric, run: RunSettings,
                        partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """One step for one judge (used with `member_steps=True`, e.g. to run members as separate processes)."""
    return build_ratings_stage([member], judging, thresholds, rubric, run, partitions_def, name=f"ratings__{member.name}")


def build_ratings_stage(
    judges: Sequence[Member],
    judging: Judging,
    thresholds: Thresholds,
    rubric: Rubric,
    run: RunSettings,
    partitions_def: dg.PartitionsDefinition,
    name: str = "ratings",
) -> dg.AssetsDefinition:
    """Every judge's asset in ONE step, the judges calling at the same time (see engine/stage.py).

    Each judge stays its own asset and can be materialized alone; a failing judge does not hold back
    the others, whose outputs are stored before the step fails. Each judge's checks run on its
    frame right after its output is stored, and only when that judge ran and the check is selected.
    """
    # `judges`: the panel's, or one of them per step (`member_steps=True`). `run`: what the engine
    # needs of the panel (every member, the budget, the prices, the call policies); the judging
    # settings are bound into the work handed to the engine, and act in `judge` (or `compare`).
    pairwise = judging.mode == "pairwise"
    stage_checks = comparison_checks(thresholds) if pairwise else rating_checks(thresholds, rubric)
    versions = {m.name: judge_code_version(m, judging, rubric) for m in judges}
    descriptions = {m.name: _description(m, rubric, judging.mode) for m in judges}

    @dg.multi_asset(
        **stage_multi_asset_kwargs(
            name=name, members=judges, key_of=ratings_key, group="judging",
            code_versions=versions, descriptions=descriptions,
            input_name="combined_generations", default_pool="llm_judging", partitions_def=partitions_def,
            checks=stage_checks, columns=COMPARISON_COLUMNS if pairwise else RATING_COLUMNS,
        )
    )
    def _ratings(context: dg.AssetExecutionContext, combined_generations: Any) -> Iterator[Any]:
        # `combined_generations`: one shard's frame, or {shard: frame} in a run of several shards
        work = partial(compare if pairwise else judge, judging=judging, rubric=rubric)
        yield from run_stage_step(context, run, judges, ratings_key, combined_generations, work, stage_checks,
                                  input_name="combined_generations")

    return _ratings

