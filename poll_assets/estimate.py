"""What a partition will cost, before any model is called: calls per member, input tokens counted
from the prompts the stages would build, expected output tokens, what the response cache already
holds, and the bill online and through a batch API.

Tokens are counted without a tokenizer (`llm.tokens`: a token per digit, the other characters / 4,
a few per message, the JSON schema included); docs/calls.md gives its measured error.
Judges' prompts hold the generations: an answer already in the response cache is used as it is,
and one not yet made is stood in for by a filler of the generator's expected output length.

Repair re-asks are counted apart, as an upper bound: a judge answer can cost at most
`judging.repair_attempts` repair calls, so each judge call still to make is counted with that many
repairs, each at its largest (every text unread with a long reason, every answer of the expected
length, the conversation growing by one turn a round). A judge whose answers all read costs none of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from poll_assets.llm.base import CallRequest, Completion, request_key
from poll_assets.llm.cache.response_cache import ResponseCache
from poll_assets.llm.pricing import Price
from poll_assets.llm.tokens import request_input_tokens
from poll_assets.panel import Judging, Jury, Member, Source
from poll_assets.partitions import shard_bounds
from poll_assets.prompt_source import load_instructions, select_shard
from poll_assets.rubrics.ultrafeedback import Rubric, build_repair_messages, get_rubric, verdict_json_schema
from poll_assets.pairwise import build_pairwise_repair, pairwise_json_schema
from poll_assets.stage_requests import JudgeTask, generator_requests, plan_comparison_tasks, plan_judge_task

_FILLER = "abc "  # four characters: one estimated token per repeat
_REASON_TOKENS = 30  # a repair names each unread text's reason; the parser's reasons stay well under 120 characters


@dataclass
class MemberEstimate:
    """One member's calls for a partition. Token and dollar figures are for the calls not cached."""

    member: str
    role: str  # "generator" or "judge"
    provider: str
    model: str
    calls: int
    cached_calls: int  # already answered in the response cache: free
    input_tokens: int
    output_tokens: int
    output_basis: str  # where output_tokens comes from
    online_usd: float | None = None  # None: the panel states no price for the model
    batch_usd: float | None = None  # None: no batch rate known for it
    note: str = ""
    # Repair re-asks (judges only), an upper bound: at most judging.repair_attempts per judge call to make.
    repair_calls: int = 0
    repair_input_tokens: int = 0
    repair_output_tokens: int = 0
    repair_online_usd: float | None = None
    repair_batch_usd: float | None = None

    @property
    def to_call(self) -> int:
        return self.calls - self.cached_calls


@dataclass
class ModeCost:
    """The judging stage of one mode, per prompt: judge calls (every judge) and their bill, uncached."""

    mode: str
    prompts: int
    judge_calls: int
    input_tokens: int
    output_tokens: int
    online_usd: float | None
    batch_usd: float | None

    def per_prompt(self, value: float | None) -> float | None:
        return None if value is None or not self.prompts else value / self.prompts


@dataclass
class Estimate:
    partitions: list[str]
    members: list[MemberEstimate] = field(default_factory=list)
    modes: list[ModeCost] = field(default_factory=list)  # the judging cost in each mode, this panel's first

    def total(self, name: str) -> float | None:
        """Sum of a dollar column; None when some member has no figure for it."""
        values = [getattr(m, name) for m in self.members]
        return None if any(v is None for v in values) else float(sum(values))

    def repair_total(self, name: str) -> float | None:
        """Sum of a repair dollar column over the judges that may repair; None when one has no figure."""
        values = [getattr(m, f"repair_{name}") for m in self.members if m.repair_calls]
        return None if any(v is None for v in values) else float(sum(values))

    def to_dict(self) -> dict[str, Any]:
        return {"partitions": self.partitions, "members": [asdict(m) for m in self.members],
                "online_usd": self.total("online_usd"), "batch_usd": self.total("batch_usd"),
                "repair_calls_at_most": sum(m.repair_calls for m in self.members),
                "repair_online_usd_at_most": self.repair_total("online_usd"),
                "repair_batch_usd_at_most": self.repair_total("batch_usd"),
                "judging_by_mode": [asdict(m) for m in self.modes]}


def expected_output(member: Member, cache: ResponseCache | None) -> tuple[float, str]:
    """Output tokens per call, and where the figure comes from: the mean of the answers this member
    paid for in the response cache; else of any answers of its provider's model (a generator and a
    judge of one model write very different lengths, so this is the second choice; caches written
    before answers named their member have only this); else its max_new_tokens (an upper bound)."""
    if cache is not None:
        seen, mean = cache.output_tokens_seen(member.provider, member.model, member=member.name)
        if seen:
            return min(mean, member.params.max_new_tokens), f"mean of {seen} cached answers of this member"
        seen, mean = cache.output_tokens_seen(member.provider, member.model)
        if seen:
            return (min(mean, member.params.max_new_tokens),
                    f"mean of {seen} cached answers of {member.model} (none yet of this member)")
    return float(member.params.max_new_tokens), "max_new_tokens bound (no cached answers yet)"


def _cached(member: Member, requests: Sequence[CallRequest], cache: ResponseCache | None) -> dict[int, Completion]:
    """The requests (by index) the response cache already answers."""
    if cache is None or not cache.reads or not requests:
        return {}
    keys = [request_key(member.provider, member.model, member.base_url, r) for r in requests]
    found = cache.get_many(keys)
    return {i: found[k] for i, k in enumerate(keys) if k in found}


def _member_estimate(member: Member, role: str, price: Price | None, requests: Sequence[CallRequest],
                     cache: ResponseCache | None, note: str = "", *, hits_free: bool = True) -> MemberEstimate:
    """`hits_free` False: every request priced as if uncached (the cache still gives output lengths)."""
    hits = _cached(member, requests, cache) if hits_free else {}
    todo = [r for i, r in enumerate(requests) if i not in hits]
    per_call, basis = expected_output(member, cache)
    est = MemberEstimate(member.name, role, member.provider, member.model, len(requests), len(hits),
                         sum(request_input_tokens(r) for r in todo), round(per_call * len(todo)), basis, note=note)
    if price is not None:
        est.online_usd = price.cost_usd(est.input_tokens, est.output_tokens)
        est.batch_usd = price.batch_cost_usd(est.input_tokens, est.output_tokens)
    return est


def _likely_generations(generators: Sequence[Member], prompts: pd.DataFrame, cache: ResponseCache | None) -> tuple[pd.DataFrame, int, int]:
    """combined_generations as it will likely be: cached answers where there are some, fillers of
    the expected length elsewhere; and (answers from the cache, all answers)."""
    columns, from_cache = [], 0
    for g in generators:
        requests = generator_requests(g, prompts["instruction"])
        hits = _cached(g, requests, cache)
        filler = _FILLER * max(1, round(expected_output(g, cache)[0]))
        columns.append([hits[i].text if i in hits and hits[i].text else filler for i in range(len(requests))])
        from_cache += len(hits)
    generations = [list(row) for row in zip(*columns)] if columns else [[] for _ in range(len(prompts))]
    combined = pd.DataFrame({"prompt_id": list(prompts["prompt_id"]), "instruction": list(prompts["instruction"]),
                             "generations": generations, "generators": [[g.name for g in generators]] * len(prompts)})
    return combined, from_cache, len(generators) * len(prompts)


def estimate_prompts(jury: Jury, prices: Mapping[str, Price | None], prompts: pd.DataFrame, cache: ResponseCache | None,
                     rubric: Rubric | None = None, partitions: Sequence[str] = (), *,
                     compare_modes: bool = True) -> Estimate:
    """The estimate for one frame of prompts (one partition, or several concatenated): the calls of
    the jury's generators and judges, priced with `prices` (by member name, `Panel.member_prices`).
    `compare_modes` also prices judging in both modes, building every judge prompt twice more (in
    pairwise mode one per comparison): what `poll-assets estimate` prints, too costly for every shard."""
    judging = jury.judging
    rubric = rubric or get_rubric(judging.aspect)
    out = Estimate(list(partitions))
    for g in jury.generators:
        if g.source_column is not None:  # answers read from the prompt source: no call, nothing to pay
            out.members.append(MemberEstimate(g.name, "generator", g.provider, g.model, 0, 0, 0, 0,
                                              f"no call: answers from source column {g.source_column!r}",
                                              online_usd=0.0, batch_usd=0.0))
            continue
        out.members.append(_member_estimate(g, "generator", prices.get(g.name), generator_requests(g, prompts["instruction"]),
                                            cache))
    combined, known, total = _likely_generations(jury.generators, prompts, cache)
    note = f"judge prompts built with {known} of {total} generations from the cache, the rest at their expected length"
    for j in jury.judges:
        out.members.append(_judge_estimate(j, judging, prices.get(j.name), rubric, combined, cache, note))
    other = "rating" if judging.mode == "pairwise" else "pairwise"
    for mode in (judging.mode, other) if compare_modes else ():
        in_mode = judging.model_copy(update={"mode": mode})
        judges = [_judge_estimate(j, in_mode, prices.get(j.name), rubric, combined, cache, note, hits_free=False)
                  for j in jury.judges]
        out.modes.append(_mode_cost(mode, len(prompts), judges))
    return out


def _mode_cost(mode: str, prompts: int, judges: Sequence[MemberEstimate]) -> ModeCost:
    """Every judge call of a mode priced uncached, without repairs (what a fresh run of that mode costs)."""
    online, batch = [m.online_usd for m in judges], [m.batch_usd for m in judges]
    return ModeCost(mode, prompts, sum(m.calls for m in judges), sum(m.input_tokens for m in judges),
                    sum(m.output_tokens for m in judges), None if None in online else float(sum(online)),  # type: ignore[arg-type]
                    None if None in batch else float(sum(batch)))  # type: ignore[arg-type]


def _judge_estimate(j: Member, judging: Judging, price: Price | None, rubric: Rubric, combined: pd.DataFrame,
                    cache: ResponseCache | None, note: str, *, hits_free: bool = True) -> MemberEstimate:
    """One judge's calls in `judging.mode`: one per prompt (rating), or one per comparison (pairwise)."""
    if judging.mode == "pairwise":
        comparisons = [t for _, row in combined.iterrows() for t in plan_comparison_tasks(row, j, judging, rubric)]
        requests = [t.request for t in comparisons]
        est = _member_estimate(j, "judge", price, requests, cache, note, hits_free=hits_free)
        answered = _cached(j, requests, cache)
        _add_pairwise_repairs(est, j, judging, price, [r for i, r in enumerate(requests) if i not in answered], cache)
        return est
    tasks = [t for _, row in combined.iterrows() if (t := plan_judge_task(row, j, judging, rubric)).request is not None]
    requests = [t.request for t in tasks if t.request is not None]  # all of them: tasks holds only calls
    est = _member_estimate(j, "judge", price, requests, cache, note, hits_free=hits_free)
    answered = _cached(j, requests, cache)
    _add_repairs(est, j, judging, price, rubric, [t for i, t in enumerate(tasks) if i not in answered], cache)
    return est


def _add_pairwise_repairs(est: MemberEstimate, judge: Member, judging: Judging, price: Price | None,
                          requests: Sequence[CallRequest], cache: ResponseCache | None) -> None:
    """At most `repair_attempts` re-asks per comparison still to make, each with the longest reason."""
    per_call, _ = expected_output(judge, cache)
    answer, reason = _FILLER * max(1, round(per_call)), _FILLER * _REASON_TOKENS
    limit = judging.max_rationale_chars
    repairs = []
    for request in requests:
        messages = request.message_dicts()
        for _ in range(judging.repair_attempts):
            messages = build_pairwise_repair(messages, answer, reason, structured=True, max_rationale_chars=limit)
            repairs.append(CallRequest.build(messages, request.params, json_schema=pairwise_json_schema(limit)))
    _set_repairs(est, price, repairs, per_call)


def repair_requests_at_most(task: JudgeTask, rubric: Rubric, rounds: int, answer_tokens: float,
                            max_rationale_chars: int | None) -> list[CallRequest]:
    """The repair re-asks one judge call can cost, each at its largest: every text unread, every
    answer (the first and each repair's) of the expected length, one more turn per round."""
    assert task.request is not None
    answer = _FILLER * max(1, round(answer_tokens))
    unread = {k: _FILLER * _REASON_TOKENS for k in range(1, len(task.shown) + 1)}
    schema = verdict_json_schema(rubric, len(task.shown), only=sorted(unread), max_rationale_chars=max_rationale_chars)
    messages, out = task.request.message_dicts(), []
    for _ in range(rounds):
        messages = build_repair_messages(messages, answer, unread, rubric, structured=True,
                                         max_rationale_chars=max_rationale_chars)
        out.append(CallRequest.build(messages, task.request.params, json_schema=schema))
    return out


def _add_repairs(est: MemberEstimate, judge: Member, judging: Judging, price: Price | None, rubric: Rubric,
                 tasks: Sequence[JudgeTask], cache: ResponseCache | None) -> None:
    """The repair figures of a judge: at most `repair_attempts` repairs for each judge call to make."""
    per_call, _ = expected_output(judge, cache)
    rounds, limit = judging.repair_attempts, judging.max_rationale_chars
    repairs = [r for t in tasks for r in repair_requests_at_most(t, rubric, rounds, per_call, limit)]
    _set_repairs(est, price, repairs, per_call)


def _set_repairs(est: MemberEstimate, price: Price | None, repairs: Sequence[CallRequest], per_call: float) -> None:
    est.repair_calls = len(repairs)
    est.repair_input_tokens = sum(request_input_tokens(r) for r in repairs)
    est.repair_output_tokens = round(per_call * len(repairs))
    if price is not None:
        est.repair_online_usd = price.cost_usd(est.repair_input_tokens, est.repair_output_tokens)
        est.repair_batch_usd = price.batch_cost_usd(est.repair_input_tokens, est.repair_output_tokens)


def partition_prompts(source: Source, base_dir: Path, key: str) -> pd.DataFrame:
    """The prompts of one partition, read as the `prompts` asset reads them (`base_dir`: the panel
    file's folder)."""
    start, end = shard_bounds(key, source)
    return select_shard(load_instructions(source, base_dir, end), start, end).rows


def format_estimate(est: Estimate) -> str:
    """A plain-text table of the estimate, one line per member, then the totals."""
    def usd(v: float | None) -> str:
        return "n/a" if v is None else f"${v:,.4f}"

    head = f"{'member':<16} {'role':<9} {'calls':>6} {'cached':>6} {'input tok':>10} {'output tok':>10} {'online':>11} {'batch':>11}  output tokens from"
    lines = [f"estimate for {', '.join(est.partitions) or 'the given prompts'} (no model called; uncached prices)", head]
    for m in est.members:
        lines.append(f"{m.member:<16} {m.role:<9} {m.calls:>6} {m.cached_calls:>6} {m.input_tokens:>10,} "
                     f"{m.output_tokens:>10,} {usd(m.online_usd):>11} {usd(m.batch_usd):>11}  {m.output_basis}")
    calls = sum(m.calls for m in est.members)
    cached = sum(m.cached_calls for m in est.members)
    lines.append(f"{'total':<26} {calls:>6} {cached:>6} {sum(m.input_tokens for m in est.members):>10,} "
                 f"{sum(m.output_tokens for m in est.members):>10,} {usd(est.total('online_usd')):>11} "
                 f"{usd(est.total('batch_usd')):>11}")
    lines += _repair_lines(est, usd)
    lines += _mode_lines(est, usd)
    notes = sorted({m.note for m in est.members if m.note})
    unpriced = sorted({m.model for m in est.members if m.online_usd is None})
    lines += [f"note: {n}" for n in notes]
    if unpriced:
        lines.append(f"note: no price in the panel's prices: for {unpriced}")
    if cached:
        lines.append(f"note: {cached} calls are answered in the response cache and cost nothing")
    return "\n".join(lines)


def _mode_lines(est: Estimate, usd: Any) -> list[str]:
    """Judging per prompt in each mode (uncached, without repairs): the choice of mode, priced."""
    if not est.modes or not est.modes[0].prompts:
        return []  # no prompt: nothing per prompt to say
    cells = [f"{m.mode}{' (this panel)' if k == 0 else ''}: {m.per_prompt(m.judge_calls):g} calls, "
             f"{m.per_prompt(m.input_tokens):,.0f} input + {m.per_prompt(m.output_tokens):,.0f} output tokens at most, "
             f"{usd(m.per_prompt(m.online_usd))} online, {usd(m.per_prompt(m.batch_usd))} batch"
             for k, m in enumerate(est.modes)]
    return ["judging per prompt, every judge, uncached: " + "; ".join(cells)]


def _repair_lines(est: Estimate, usd: Any) -> list[str]:
    """The repair re-asks, at most, and the bill with them, at most."""
    judges = [m for m in est.members if m.repair_calls]
    if not judges:
        return []
    calls = sum(m.repair_calls for m in judges)
    online, batch = est.repair_total("online_usd"), est.repair_total("batch_usd")

    def plus(base: float | None, extra: float | None) -> float | None:
        return None if base is None or extra is None else base + extra

    return [
        f"{'repairs, at most':<26} {calls:>6} {'':>6} {sum(m.repair_input_tokens for m in judges):>10,} "
        f"{sum(m.repair_output_tokens for m in judges):>10,} {usd(online):>11} {usd(batch):>11}",
        f"{'total with repairs, at most':<40} {'':>10} {'':>10} "
        f"{usd(plus(est.total('online_usd'), online)):>11} {usd(plus(est.total('batch_usd'), batch)):>11}",
        "note: repairs are an upper bound: judging.repair_attempts re-asks for every judge call to make "
        "(by judge: " + ", ".join(f"{m.member} {m.repair_calls}" for m in judges) + "); a judge whose "
        "answers all read makes none",
    ]


__all__ = ["Estimate", "MemberEstimate", "estimate_prompts", "format_estimate", "partition_prompts"]
