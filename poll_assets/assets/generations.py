"""Each generator's answers, and all answers side by side in panel order: keys, columns, checks, lineage."""


import hashlib
import json
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.assets.keys import COMBINED_COLUMNS, COMBINED_KEY, GENERATION_COLUMNS, PROMPTS_KEY, PROMPT_COLUMNS, generation_key
from poll_assets.engine.metadata import PENDING_CHECK, call_metadata, pending_check, pending_ids
from poll_assets.engine.schema import column_of, column_of_each
from poll_assets.engine.shards import shard_events, shard_frames
from poll_assets.engine.stage import MemberContext, RunSettings, run_stage_step, stage_multi_asset_kwargs
from poll_assets.engine.checks import (
    STEP_INPUT, Finding, StageCheck, absent_ids, asset_check_specs, combined_check, examples, problems_finding, repeated_ids, short_id,
)
from poll_assets.panel import Member, Source, Thresholds
from poll_assets.parquet_values import is_missing, plain
from poll_assets.stage_requests import generator_requests
from poll_assets.prompt_source import load_source_column

def check_generation_rows(generations: pd.DataFrame, prompts: pd.DataFrame) -> Finding:
    """Exactly one row per prompt of the shard, none extra, none twice."""
    want, got = list(prompts["prompt_id"]), list(generations["prompt_id"])
    missing, extra, repeated = absent_ids(want, got), absent_ids(got, want), repeated_ids(got)
    problems = []
    if missing:
        problems.append(f"no row for prompts {examples(missing)}")
    if extra:
        problems.append(f"rows for prompts not in the shard: {examples(extra)}")
    if repeated:
        problems.append(f"prompts with more than one row: {examples(repeated)}")
    return problems_finding(problems, f"one row for each of {len(want)} prompts",
                            {"rows": len(got), "prompts": len(want), "missing": len(missing), "extra": len(extra)})


def check_generation_failures(generations: pd.DataFrame, max_rate: float) -> Finding:
    """Share of prompts without a generation (call failed or empty text) is at most `max_rate`."""
    failed = [
        short_id(pid)
        for pid, text, err in zip(generations["prompt_id"], generations["generation"], generations["error"])
        if not is_missing(err) or is_missing(text)
    ]
    rate = len(failed) / len(generations) if len(generations) else 0.0
    passed = rate <= max_rate
    desc = (
        f"failure rate {rate:.3f} <= {max_rate}"
        if passed
        else f"failure rate {rate:.3f} > max_generation_failure_rate {max_rate}; failed prompts: {examples(failed)}"
    )
    return Finding(passed, desc, {"failure_rate": float(rate), "failures": len(failed), "threshold": float(max_rate)})


GENERATIONS_CHECK = "generations_valid"


def generation_checks(thresholds: Thresholds) -> list[StageCheck]:
    """Every generator's checks; the step hands them the prompts it answered."""
    max_rate = thresholds.max_generation_failure_rate
    return [
        combined_check(GENERATIONS_CHECK, f"one_row_per_prompt: exactly one row for each prompt of the shard; "
                                          f"failure_rate: share of failed generations <= {max_rate}.", [
            StageCheck("one_row_per_prompt", "Exactly one row for each prompt of the shard.",
                       lambda df, given: check_generation_rows(df, given[STEP_INPUT]), needs=(STEP_INPUT,)),
            StageCheck("failure_rate", f"Share of failed generations <= {max_rate}.",
                       lambda df, _: check_generation_failures(df, max_rate)),
        ]),
        pending_check(),
    ]


# combined_generations is a reshaping of checked frames; pooled_ratings checks that it covers it.
COMBINED_CHECKS: list[StageCheck] = []


def combined_column_lineage(generators: Sequence[Member]) -> dg.TableColumnLineage:
    keys = [generation_key(g) for g in generators]
    each = lambda column: column_of_each(keys, GENERATION_COLUMNS, column)  # noqa: E731
    return COMBINED_COLUMNS.lineage({
        "prompt_id": [column_of(PROMPTS_KEY, PROMPT_COLUMNS, "prompt_id")],
        "instruction": [column_of(PROMPTS_KEY, PROMPT_COLUMNS, "instruction")],
        "generations": each("generation"),
        "generation_models": each("model_name"),
        "generators": each("generator"),
        "generation_call_ids": each("call_id"),
        "generation_errors": each("error"),
    })


SOURCE_FINISH = "source"  # finish_reason of an answer read from the prompt source, not generated


def source_answer_rows(member: Member, prompts: pd.DataFrame, answers: list[str | None]) -> list[dict[str, Any]]:
    """The rows of a `dataset` generator: its answers as read from the source column, each saying so
    (no call: no tokens, no latency, not cached; its id names the column and the prompt)."""
    rows = []
    for pid, answer in zip(prompts["prompt_id"], answers):
        call_id = hashlib.sha256(json.dumps(["source_column", member.source_column, pid]).encode()).hexdigest()
        rows.append({
            "prompt_id": pid, "generation": answer, "model_name": member.model, "generator": member.name,
            "finish_reason": SOURCE_FINISH, "input_tokens": 0, "output_tokens": 0, "latency_s": 0.0,
            "served_model": f"source column {member.source_column!r}", "request_id": None, "call_id": call_id,
            "cached": False, "error": None if answer is not None else f"no answer in source column {member.source_column!r}",
            "error_kind": None if answer is not None else "bad_request",  # an empty cell stays empty on a re-run
        })
    return rows


def read_source_answers(work: MemberContext, prompts: pd.DataFrame, source: Source | None,
                        base_dir: Path | None) -> dg.Output[pd.DataFrame]:
    """A `dataset` generator's shard: answers from its column of the prompt source, no call made."""
    member = work.member
    if source is None or base_dir is None:
        raise dg.Failure(description=f"{work.label}: a `dataset` generator needs the prompt source and the panel "
                                     "file's folder to find it (build the stage with source and base_dir)")
    answers = load_source_column(source, base_dir, str(member.source_column),
                                 [int(r) for r in prompts["source_row"]])
    df = GENERATION_COLUMNS.frame(source_answer_rows(member, prompts, answers))
    missing = int(df["error"].notna().sum())
    work.log(f"{work.label}: {len(df) - missing} answers read from source column {member.source_column!r}, no call made")
    return dg.Output(df, metadata={
        **GENERATION_COLUMNS.output_metadata(df),
        "llm/calls": 0,
        "llm/source_column": str(member.source_column),
        "llm/cost": dg.MetadataValue.text("no call: answers read from the prompt source"),
        "failure_rate": dg.MetadataValue.float(missing / len(df) if len(df) else 0.0),
        PENDING_CHECK: 0,
    })


async def generate(work: MemberContext, prompts: pd.DataFrame, *, source: Source | None = None,
                   base_dir: Path | None = None) -> dg.Output[pd.DataFrame]:
    """One generator's answers to a shard: the body of its asset, shared by the per-member and the stage step.
    A `dataset` generator reads them from its column of the prompt `source` instead (`base_dir`: the panel
    file's folder)."""
    member = work.member
    if member.source_column is not None:
        return read_source_answers(work, prompts, source, base_dir)
    requests = generator_requests(member, prompts["instruction"])
    batch = await work.run_calls(requests)
    rows = [
        {
            "prompt_id": pid,
            "generation": c.text if c.ok else None,
            "model_name": member.model,
            "generator": member.name,
            "finish_reason": c.finish_reason,
            "input_tokens": c.input_tokens,
            "output_tokens": c.output_tokens,
            "latency_s": c.latency_s,
            "served_model": c.model,
            "request_id": c.request_id,
            "call_id": c.call_id,
            "cached": c.cached,
            "error": c.error,
            "error_kind": c.error_kind,
        }
        for pid, c in zip(prompts["prompt_id"], batch.completions)
    ]
    df = GENERATION_COLUMNS.frame(rows)
    if len(df) and batch.provider_down:
        raise dg.Failure(description=batch.failure_message(work.label))
    failures = int(df["error"].notna().sum())
    return dg.Output(
        df,
        metadata={
            **GENERATION_COLUMNS.output_metadata(df),
            **call_metadata(batch.stats, member, work.price),
            "failure_rate": dg.MetadataValue.float(failures / len(df) if len(df) else 0.0),
            PENDING_CHECK: len(pending_ids(df)),
        },
    )


def _description(member: Member) -> str:
    return f"Answers from generator `{member.name}` ({member.provider}: {member.model}), one row per prompt."


def build_generation_asset(member: Member, source: Source, thresholds: Thresholds, run: RunSettings,
                           partitions_def: dg.PartitionsDefinition, base_dir: Path | None = None) -> dg.AssetsDefinition:
    """One step for one generator (used with `member_steps=True`, e.g. to run members as separate processes)."""
    return build_generation_stage([member], source, thresholds, run, partitions_def, name=f"generations__{member.name}",
                                  base_dir=base_dir)


def build_generation_stage(
    generators: Sequence[Member],
    source: Source,
    thresholds: Thresholds,
    run: RunSettings,
    partitions_def: dg.PartitionsDefinition,
    name: str = "generations",
    base_dir: Path | None = None,
) -> dg.AssetsDefinition:
    """Every generator's asset in ONE step, whose members call their providers at the same time.

    Dagster runs the steps of an in-process run one after another, so one step per generator would
    make the stage take the sum of the members' times instead of the slowest one. Each generator is
    still its own asset (own node, key, code_version, metadata) and can be materialized alone
    (`can_subset`). A member whose calls all fail does not hold back the others: their outputs are
    stored first, then the step fails and names the member(s). Each generator's checks run on its
    frame right after its output is stored, and only when that member ran and the check is selected.
    """
    # `generators`: the panel's, or one of them per step (`member_steps=True`). `source`: where a
    # `dataset` generator reads its answers (`base_dir`: the panel file's folder, where it is found).
    stage_checks = generation_checks(thresholds)

    @dg.multi_asset(
        **stage_multi_asset_kwargs(
            name=name, members=generators, key_of=generation_key, group="generation",
            code_versions={m.name: m.fingerprint() for m in generators},
            descriptions={m.name: _description(m) for m in generators}, input_name="prompts",
            default_pool="llm_generation", partitions_def=partitions_def,
            checks=stage_checks, columns=GENERATION_COLUMNS,
        )
    )
    def _generations(context: dg.AssetExecutionContext, prompts: Any) -> Iterator[Any]:
        # `prompts`: one shard's frame, or {shard: frame} in a run of several shards
        yield from run_stage_step(context, run, generators, generation_key, prompts,
                                  partial(generate, source=source, base_dir=base_dir), stage_checks, input_name="prompts")

    return _generations


def combine_shard(prompts: pd.DataFrame, member_frames: list[pd.DataFrame]) -> pd.DataFrame:
    """One row per prompt of the shard with every generator's answer, in panel order."""
    frames = [f.set_index("prompt_id") for f in member_frames]
    rows = []
    for pid, instruction in zip(prompts["prompt_id"], prompts["instruction"]):
        picked = [f.loc[pid] for f in frames]
        rows.append(
            {
                "prompt_id": pid,
                "instruction": instruction,
                "generations": [plain(r["generation"]) for r in picked],
                "generation_models": [r["model_name"] for r in picked],
                "generators": [r["generator"] for r in picked],
                "generation_call_ids": [r["call_id"] for r in picked],
                "generation_errors": [plain(r["error"]) for r in picked],
            }
        )
    return COMBINED_COLUMNS.frame(rows)


def build_combined_asset(generators: Sequence[Member], partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    ins = {f"gen_{m.name}": dg.AssetIn(key=generation_key(m)) for m in generators}
    ins["prompts"] = dg.AssetIn(key=PROMPTS_KEY)

    @dg.asset(
        key=COMBINED_KEY,
        ins=ins,
        metadata=COMBINED_COLUMNS.definition_metadata(),
        check_specs=asset_check_specs(COMBINED_CHECKS, COMBINED_KEY, partitions_def),
        group_name="generation",
        kinds={"pandas"},
        partitions_def=partitions_def,
        code_version="1",
        description=(
            "For each prompt, `generations` and `generation_models` in panel order "
            f"({', '.join(m.name for m in generators)}); a failed generation is None with its error kept."
        ),
    )
    def combined_generations(context: dg.AssetExecutionContext, prompts: Any, **generations: Any) -> Iterator[Any]:
        # each input: one shard's frame, or {shard: frame} in a run of several shards
        prompt_frames = shard_frames(context, "prompts", prompts)
        member_frames = {m.name: shard_frames(context, f"gen_{m.name}", generations[f"gen_{m.name}"])
                         for m in generators}
        made = {}
        for shard, shard_prompts in prompt_frames.items():
            df = combine_shard(shard_prompts, [member_frames[m.name][shard] for m in generators])
            out = dg.Output(df, metadata={**COMBINED_COLUMNS.output_metadata(df),
                                          "dagster/column_lineage": combined_column_lineage(generators)})
            made[shard] = (out, [])
        yield from shard_events(context, COMBINED_KEY, made)

    return combined_generations
