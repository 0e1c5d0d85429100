"""Each generator's answers, and all answers side by side in panel order."""


from collections.abc import Iterator
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.assets.metadata import call_metadata, table_metadata
from poll_assets.assets.stage import MemberContext, run_stage_step, stage_multi_asset_kwargs
from poll_assets.lineage import combined_column_lineage
from poll_assets.llm.base import CallRequest, Message
from poll_assets.panel import Member, Panel
from poll_assets.parquet_values import plain

GENERATION_COLUMNS = [
    "prompt_id", "generation", "model_name", "generator", "finish_reason", "input_tokens", "output_tokens",
    "latency_s", "served_model", "request_id", "call_id", "cached", "error",
]


def generation_messages(member: Member, instruction: str) -> list[Message]:
    messages: list[Message] = []
    if member.system_prompt:
        messages.append({"role": "system", "content": member.system_prompt})
    messages.append({"role": "user", "content": instruction})
    return messages


def generation_key(member: Member) -> dg.AssetKey:
    return dg.AssetKey(["generations", member.name])


async def generate(work: MemberContext, prompts: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """One generator's answers to a shard: the body of its asset, shared by the per-member and the stage step."""
    member, panel = work.member, work.panel
    params = member.params.to_generation_params()
    requests = [CallRequest.build(generation_messages(member, text), params) for text in prompts["instruction"]]
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
        }
        for pid, c in zip(prompts["prompt_id"], batch.completions)
    ]
    df = pd.DataFrame(rows, columns=GENERATION_COLUMNS)
    if len(df) and batch.all_failed:
        raise dg.Failure(description=batch.failure_message(work.label))
    failures = int(df["error"].notna().sum())
    return dg.Output(
        df,
        metadata={
            **table_metadata(df),
            **call_metadata(batch.stats, member, panel),
            "failure_rate": dg.MetadataValue.float(failures / len(df) if len(df) else 0.0),
        },
    )


def _description(member: Member) -> str:
    return f"Answers from generator `{member.name}` ({member.provider}: {member.model}), one row per prompt."


def build_generation_asset(member: Member, panel: Panel, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """One step for one generator (used with `member_steps=True`, e.g. to run members as separate processes)."""
    return build_generation_stage(panel, partitions_def, members=[member], name=f"generations__{member.name}")


def build_generation_stage(
    panel: Panel,
    partitions_def: dg.PartitionsDefinition,
    members: list[Member] | None = None,
    name: str = "generations",
) -> dg.AssetsDefinition:
    """Every generator's asset in ONE step, whose members call their providers at the same time.

    Dagster runs the steps of an in-process run one after another, so one step per generator would
    make the stage take the sum of the members' times instead of the slowest one. Each generator is
    still its own asset (own node, key, code_version, metadata) and can be materialized alone
    (`can_subset`). A member whose calls all fail does not hold back the others: their outputs are
    stored first, then the step fails and names the member(s). Each generator's checks run on its
    frame right after its output is stored, and only when that member ran and the check is selected.
    """
    # `members`: a subset, e.g. one member per step (`member_steps=True`); default all of them.
    stage_members = members if members is not None else panel.generators

    @dg.multi_asset(
        **stage_multi_asset_kwargs(
            name=name, panel=panel, members=stage_members, key_of=generation_key, group="generation",
            code_version_of=lambda m: m.fingerprint(), description_of=_description, input_name="prompts",
            default_pool="llm_generation", partitions_def=partitions_def,
        )
    )
    def _generations(context: dg.AssetExecutionContext, prompts: pd.DataFrame) -> Iterator[Any]:
        yield from run_stage_step(context, panel, stage_members, generation_key, prompts, generate)

    return _generations


def build_combined_asset(panel: Panel, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    ins = {f"gen_{m.name}": dg.AssetIn(key=generation_key(m)) for m in panel.generators}
    ins["prompts"] = dg.AssetIn("prompts")

    @dg.asset(
        name="combined_generations",
        ins=ins,
        group_name="generation",
        kinds={"pandas"},
        partitions_def=partitions_def,
        code_version="1",
        description=(
            "For each prompt, `generations` and `generation_models` in panel order "
            f"({', '.join(m.name for m in panel.generators)}); a failed generation is None with its error kept."
        ),
    )
    def combined_generations(context: dg.AssetExecutionContext, prompts: pd.DataFrame, **generations: pd.DataFrame) -> dg.Output[pd.DataFrame]:
        frames = [generations[f"gen_{m.name}"].set_index("prompt_id") for m in panel.generators]
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
        df = pd.DataFrame(rows)
        return dg.Output(df, metadata={**table_metadata(df), "dagster/column_lineage": combined_column_lineage(panel)})

    return combined_generations
