"""Each judge's verdicts on every generation, with the UltraFeedback rubric."""


from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.assets.metadata import call_metadata, table_metadata
from poll_assets.assets.stage import MemberContext, run_stage_step, stage_multi_asset_kwargs
from poll_assets.llm.base import CallRequest, Completion
from poll_assets.panel import Member, Panel
from poll_assets.rubrics.ultrafeedback import Rubric, build_judge_messages, get_rubric, prompt_version, verdict_json_schema
from poll_assets.verdicts import Verdict, parse_verdicts, presentation_order


def ratings_key(member: Member) -> dg.AssetKey:
    return dg.AssetKey(["ratings", member.name])


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
    out = [Verdict(rating=None, rationale=None, error="generation failed") for _ in range(task.n_generations)]
    if task.request is None or completion is None:
        return out
    if not completion.ok:
        for i in task.shown:
            out[i] = Verdict(rating=None, rationale=None, error=f"judge call failed: {completion.error}")
        return out
    text = completion.text or ""
    # A provider that fell back to plain text may still have answered in JSON.
    structured = completion.output_mode != "text" or text.lstrip().startswith(("{", "```"))
    parsed = parse_verdicts(text, len(task.shown), rubric, structured=structured)
    for position, i in enumerate(task.shown):  # undo the shuffle: position k showed generation shown[k]
        out[i] = parsed[position]
    return out


def judge_code_version(member: Member, panel: Panel) -> str:
    rubric = get_rubric(panel.judging.aspect)
    return member.fingerprint(
        prompt_version(rubric, structured=True, system_prompt=member.system_prompt),
        panel.judging.model_dump_json(include={"shuffle_positions", "seed", "max_rationale_chars"}),
    )


def _description(member: Member, panel: Panel) -> str:
    rubric = get_rubric(panel.judging.aspect)
    return (
        f"Verdicts of judge `{member.name}` ({member.provider}: {member.model}) on every generation, "
        f"UltraFeedback {rubric.aspect} rubric v{rubric.version}: one rating (1-5 or None, with the reason) "
        "and one rationale per generation, aligned with `generations`; the raw judge output is kept."
    )


async def judge(work: MemberContext, combined_generations: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """One judge's verdicts on a shard: the body of its asset, shared by the per-member and the stage step."""
    member, panel = work.member, work.panel
    rubric = get_rubric(panel.judging.aspect)
    tasks = [plan_judge_task(row, member, panel, rubric) for _, row in combined_generations.iterrows()]
    requests = [t.request for t in tasks if t.request is not None]
    batch = await work.run_calls(requests)
    done = iter(batch.completions)
    rows = []
    parse_failures = judged = 0
    for task in tasks:
        completion = next(done) if task.request is not None else None
        verdicts = verdicts_for(task, completion, rubric)
        for i in task.shown:
            judged += 1
            parse_failures += verdicts[i].rating is None and verdicts[i].error != "N/A"
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
    df = pd.DataFrame(rows)
    if requests and batch.all_failed:
        raise dg.Failure(description=batch.failure_message(work.label))
    return dg.Output(
        df,
        metadata={
            **table_metadata(df),
            **call_metadata(batch.stats, member, panel),
            "rubric": f"{rubric.aspect} v{rubric.version}",
            "parse_failures": parse_failures,
            "parse_failure_rate": dg.MetadataValue.float(parse_failures / judged if judged else 0.0),
        },
    )


def build_ratings_asset(member: Member, panel: Panel, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """One step for one judge (used with `member_steps=True`, e.g. to run members as separate processes)."""
    return build_ratings_stage(panel, partitions_def, members=[member], name=f"ratings__{member.name}")


def build_ratings_stage(
    panel: Panel,
    partitions_def: dg.PartitionsDefinition,
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

    @dg.multi_asset(
        **stage_multi_asset_kwargs(
            name=name, panel=panel, members=stage_members, key_of=ratings_key, group="judging",
            code_version_of=lambda m: judge_code_version(m, panel), description_of=lambda m: _description(m, panel),
            input_name="combined_generations", default_pool="llm_judging", partitions_def=partitions_def,
        )
    )
    def _ratings(context: dg.AssetExecutionContext, combined_generations: pd.DataFrame) -> Iterator[Any]:
        yield from run_stage_step(context, panel, stage_members, ratings_key, combined_generations, judge)

    return _ratings

