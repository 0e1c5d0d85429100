"""A judge's pairwise comparisons (judging.mode 'pairwise'): the columns of its asset, the calls and
their repairs, its checks, and its position figures. The asset keeps the key ratings/<judge>
(assets/judging.py picks this body or the rating one by the mode)."""


from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.assets.keys import COMPARISON_COLUMNS, comparison_answers
from poll_assets.engine.metadata import PENDING_CHECK, call_metadata, pending_check, pending_ids, with_repairs
from poll_assets.engine.stage import MemberContext
from poll_assets.engine.checks import STEP_INPUT, Finding, StageCheck, examples, problems_finding, short_id
from poll_assets.llm.base import CallRequest, Completion
from poll_assets.llm.online.runner import CallStats
from poll_assets.pairwise import (
    JUDGE_FAILED, Comparison, Preference, build_pairwise_repair, pairwise_json_schema, parse_preference, winner,
)
from poll_assets.panel import Judging, Thresholds
from poll_assets.parquet_values import is_missing, plain_list
from poll_assets.scoring.pooled_comparisons import position_figures
from poll_assets.rubrics.ultrafeedback import Rubric
from poll_assets.stage_requests import ComparisonTask, plan_comparison_tasks


@dataclass
class PairCall:
    """One comparison's call, its reading, and its repair."""

    task: ComparisonTask
    completion: Completion
    first: Preference
    preference: Preference
    repair: Completion | None = None
    conversation: list[dict[str, str]] = field(default_factory=list)


def read_call(task: ComparisonTask, completion: Completion) -> Preference:
    if not completion.ok:
        return Preference(None, error=f"{JUDGE_FAILED}: {completion.error}")
    return parse_preference(completion.text or "", material=task.material)


def _repair_request(call: PairCall, limit: int | None) -> CallRequest | None:
    """A re-ask for an answer that came back but could not be read; None for a read one or a failed call."""
    if call.preference.outcome is not None or not call.completion.ok or (call.repair is not None and not call.repair.ok):
        return None
    answer = (call.repair.text if call.repair else call.completion.text) or ""
    as_json = call.completion.structured or answer.lstrip().startswith(("{", "```"))
    messages = build_pairwise_repair(call.conversation or call.task.request.message_dicts(), answer,
                                     call.preference.error or "unreadable", structured=as_json, max_rationale_chars=limit)
    return CallRequest.build(messages, call.task.request.params, json_schema=pairwise_json_schema(limit) if as_json else None)


async def repair_comparisons(work: MemberContext, calls: list[PairCall], judging: Judging) -> list[CallStats]:
    """Up to `judging.repair_attempts` rounds of re-asks, each one `run_calls`; a repair fills, never overrides."""
    stats: list[CallStats] = []
    limit = judging.max_rationale_chars
    for _ in range(judging.repair_attempts):
        asks = [(c, r) for c in calls if (r := _repair_request(c, limit)) is not None]
        if not asks:
            break
        batch = await work.run_calls([r for _, r in asks])
        stats.append(batch.stats)
        for (call, request), completion in zip(asks, batch.completions):
            call.conversation, call.repair = request.message_dicts(), completion
            if completion.ok:
                again = parse_preference(completion.text or "", material=call.task.material)
                if again.outcome is not None:
                    call.preference = again
    return stats


def _side(comparison: Comparison, outcome: str | None) -> str | None:
    won = winner(comparison, outcome)  # type: ignore[arg-type]
    return None if won is None else "tie" if won == "tie" else "a" if won == comparison.a else "b"


def comparison_row(pid: str, calls: list[PairCall], judge: str, model: str) -> dict[str, Any]:
    failed = next((c.completion for c in calls if not c.completion.ok), None)
    return {
        "prompt_id": pid, "judge": judge, "model_name": model,
        "pair_a": [c.task.comparison.a for c in calls],
        "pair_b": [c.task.comparison.b for c in calls],
        "first_shown": [c.task.comparison.first for c in calls],
        "preferred": [_side(c.task.comparison, c.preference.outcome) for c in calls],
        "rationales": [c.preference.rationale for c in calls],
        "comparison_errors": [c.preference.error for c in calls],
        "raw_outputs": [c.completion.text for c in calls],
        "output_modes": [c.completion.output_mode for c in calls],
        "call_ids": [c.completion.call_id for c in calls],
        "repair_outputs": [c.repair.text if c.repair is not None and c.repair.ok else None for c in calls],
        "repaired_errors": [c.first.error if c.first.outcome is None and c.preference.outcome is not None else None
                            for c in calls],
        "input_tokens": sum(c.completion.input_tokens or 0 for c in calls),
        "output_tokens": sum(c.completion.output_tokens or 0 for c in calls),
        "error": failed.error if failed else None,
        "error_kind": failed.error_kind if failed else None,
    }


def position_metadata(frame: pd.DataFrame) -> dict[str, Any]:
    """A judge's position consistency and first-position rate, as numbers the UI plots over shards."""
    fig = position_figures(comparison_answers(frame))
    num = lambda x: dg.MetadataValue.float(x) if x is not None else dg.MetadataValue.null()  # noqa: E731
    return {"position/consistency": num(fig.consistency), "position/pairs_both_orders": fig.pairs_both_orders,
            "position/first_position_rate": num(fig.first_position_rate), "position/decisive_answers": fig.decisive_answers,
            "position/tie_rate": num(fig.tie_rate), "comparisons/read": fig.read_answers}


def check_comparisons(frame: pd.DataFrame, combined: pd.DataFrame | None, max_rate: float) -> Finding:
    """One row per prompt of combined_generations (same order); per row the comparison lists aligned;
    every comparison has a preference or a reason; the share unread is at most `max_rate`."""
    asked = unread = 0
    unexplained: list[str] = []
    misaligned = [short_id(pid) for pid, *cols in zip(frame["prompt_id"], *(frame[c] for c in (
        "pair_a", "pair_b", "first_shown", "preferred", "comparison_errors"))) if len({len(plain_list(c)) for c in cols}) > 1]
    for pid, prefs, errs in zip(frame["prompt_id"], frame["preferred"], frame["comparison_errors"]):
        for k, (p, e) in enumerate(zip(plain_list(prefs), plain_list(errs))):
            asked += 1
            if is_missing(p):
                unread += 1
                if is_missing(e) or not str(e).strip():
                    unexplained.append(f"{short_id(pid)}[{k}]")
    rate = unread / asked if asked else 0.0
    problems = [f"unread comparison rate {rate:.3f} > max_parse_failure_rate {max_rate}"] if rate > max_rate else []
    if unexplained:
        problems.append(f"comparisons without a preference or a reason: {examples(unexplained)}")
    if misaligned:
        problems.append(f"comparison lists of unequal length: {examples(misaligned)}")
    if combined is not None and list(frame["prompt_id"]) != list(combined["prompt_id"]):
        problems.append(f"prompt ids differ from combined_generations ({len(frame)} rows vs {len(combined)}, or another order)")
    return problems_finding(problems, f"{asked - unread} of {asked} comparisons read (unread rate {rate:.3f} <= {max_rate})",
                            {"comparisons": asked, "unread": unread, "unread_rate": float(rate), "threshold": float(max_rate)})


def comparison_checks(thresholds: Thresholds) -> list[StageCheck]:
    max_rate = thresholds.max_parse_failure_rate
    return [StageCheck("unread_comparison_rate",
                       f"Every comparison has a preference or a reason; the share unread is <= {max_rate}.",
                       lambda df, given: check_comparisons(df, given[STEP_INPUT], max_rate), needs=(STEP_INPUT,)),
            pending_check()]


async def compare(work: MemberContext, combined_generations: pd.DataFrame, *, judging: Judging,
                  rubric: Rubric) -> dg.Output[pd.DataFrame]:
    """One judge's comparisons on a shard: every planned pair of every prompt, in one `run_calls`."""
    member = work.member
    per_prompt = [(row["prompt_id"], plan_comparison_tasks(row, member, judging, rubric)) for _, row in combined_generations.iterrows()]
    tasks = [t for _, ts in per_prompt for t in ts]
    batch = await work.run_calls([t.request for t in tasks])
    if tasks and batch.provider_down:
        raise dg.Failure(description=batch.failure_message(work.label))
    calls = [PairCall(t, c, p, p) for t, c in zip(tasks, batch.completions) for p in [read_call(t, c)]]
    repair_stats = await repair_comparisons(work, calls, judging)
    done = iter(calls)
    rows = [comparison_row(pid, [next(done) for _ in ts], member.name, member.model) for pid, ts in per_prompt]
    df = COMPARISON_COLUMNS.frame(rows)
    return dg.Output(df, metadata={
        **COMPARISON_COLUMNS.output_metadata(df),
        **call_metadata(with_repairs(batch.stats, repair_stats), member, work.price),
        "judging/mode": "pairwise",
        "comparisons": len(calls),
        "parse_failures": sum(c.preference.outcome is None and c.completion.ok for c in calls),
        "parse_failures_before_repair": sum(c.first.outcome is None and c.completion.ok for c in calls),
        "judge_call_failures": sum(not c.completion.ok for c in calls),
        PENDING_CHECK: len(pending_ids(df)),
        **position_metadata(df),
    })
