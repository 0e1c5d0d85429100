"""The requests the two LLM stages send, built from a member's settings and a prompt (pure).

The generation and judging stages send exactly these requests, and the cost estimate counts them,
so both import them from here: below the stages, the estimate never imports a stage."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd

from poll_assets.llm.base import CallRequest, Message
from poll_assets.llm.context_fit import fit_request
from poll_assets.pairwise import Comparison, build_pairwise_messages, pairwise_json_schema, plan_pairs
from poll_assets.panel import Judging, Member
from poll_assets.rubrics.ultrafeedback import Rubric, build_judge_messages, verdict_json_schema
from poll_assets.verdicts import presentation_order


def generation_messages(member: Member, instruction: str) -> list[Message]:
    messages: list[Message] = []
    if member.system_prompt:
        messages.append({"role": "system", "content": member.system_prompt})
    messages.append({"role": "user", "content": instruction})
    return messages


def generator_requests(member: Member, instructions: Iterable[str]) -> list[CallRequest]:
    """One generator's requests, one per instruction, in order."""
    params = member.params.to_generation_params()
    return [CallRequest.build(generation_messages(member, text), params) for text in instructions]


@dataclass
class JudgeTask:
    """One judge call: the generations that exist for a prompt, in the order the judge sees them."""

    prompt_id: str
    n_generations: int
    shown: list[int]  # shown[k] = index (into generations) of the text shown at position k
    request: CallRequest | None  # None when no generation exists to judge
    truncated: list[int] = field(default_factory=list)  # generations cut to fit the judge's context


def plan_judge_task(row: pd.Series, member: Member, judging: Judging, rubric: Rubric) -> JudgeTask:
    """The judge call for one row of combined_generations: shuffled texts, prompt and schema."""
    generations = list(row["generations"])
    present = [i for i, g in enumerate(generations) if isinstance(g, str)]
    if not present:
        return JudgeTask(row["prompt_id"], len(generations), [], None)
    order = presentation_order(row["prompt_id"], member.name, len(present), judging.seed,
                               shuffle=judging.shuffle_positions)
    shown = [present[k] for k in order]
    limit = judging.max_rationale_chars
    schema = verdict_json_schema(rubric, len(shown), max_rationale_chars=limit)

    def build(texts: list[str]) -> CallRequest:
        messages = build_judge_messages(rubric, row["instruction"], texts, structured=True,
                                        system_prompt=member.system_prompt, max_rationale_chars=limit)
        return CallRequest.build(messages, member.params.to_generation_params(), json_schema=schema)

    request, cut = fit_request(build, [generations[i] for i in shown], member.context_window)
    return JudgeTask(row["prompt_id"], len(generations), shown, request, sorted(shown[k] for k in cut))


@dataclass
class ComparisonTask:
    """One pairwise judge call: generations `comparison.a` and `.b` of a prompt, `.first` shown as A."""

    prompt_id: str
    comparison: Comparison
    request: CallRequest
    material: tuple[str, str, str]  # the instruction and the two answers as shown: echo of them is never read


def plan_comparison_tasks(row: pd.Series, member: Member, judging: Judging, rubric: Rubric) -> list[ComparisonTask]:
    """The pairwise judge calls for one row of combined_generations (judging.mode 'pairwise'): every
    pair of the generations that exist (or each against `pairwise.against`), in both orders by default.
    The anchor is found by name in the row's `generators` (who wrote each answer, in panel order)."""
    generations = list(row["generations"])
    anchor = _anchor(row, judging.pairwise.against)
    present = [i for i, g in enumerate(generations) if isinstance(g, str)]
    plan = plan_pairs(present, anchor=anchor, both_orders=judging.pairwise.both_orders, seed=judging.seed,
                      key=f"{row['prompt_id']}/{member.name}")
    limit, params = judging.max_rationale_chars, member.params.to_generation_params()
    tasks = []
    for c in plan:
        first, second = generations[c.first], generations[c.second]
        messages = build_pairwise_messages(rubric.aspect, rubric.goal, row["instruction"], first, second, structured=True,
                                           system_prompt=member.system_prompt, max_rationale_chars=limit)
        request = CallRequest.build(messages, params, json_schema=pairwise_json_schema(limit))
        tasks.append(ComparisonTask(row["prompt_id"], c, request, (row["instruction"], first, second)))
    return tasks


def _anchor(row: pd.Series, against: str | None) -> int | None:
    """The index of the generation `pairwise.against` names, or None when every pair is compared."""
    if against is None:
        return None
    names = [str(g) for g in row["generators"]] if "generators" in row.index else []
    if against not in names:
        raise ValueError(f"judging.pairwise.against: {against!r} wrote no answer of prompt {row['prompt_id']} "
                         f"(its generators: {names or 'no generators column'})")
    return names.index(against)
