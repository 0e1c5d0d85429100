"""Each stage's code_version, derived from its settings dumped whole, less the settings named here
as unable to change what the stage stores (each with the reason). A field added to a settings model
is therefore in the code version until someone excludes it on purpose: a forgotten new setting marks
partitions stale instead of leaving stale partitions marked fresh. Pure: no Dagster, no panel file.

`test_code_versions.py` changes every field of every stage's settings and checks that exactly the
fields not named here change the version."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

from pydantic import BaseModel

# Member fields (generators and judges) that cannot change a member's answers.
MEMBER_EXCLUDED: Mapping[str, str] = {
    "name": "the asset key: a renamed member is a new asset",
    "family": "read by pooling's self-family control (in pooled_ratings' version), never sent to the model",
    "limits": "how fast and how often calls are tried, not what they answer",
    "api_key_env": "where the key is read from",
    "n_ctx": "the in-process model's context size; the response cache keys answers without it, so a re-run returns the same answers",
    "pool": "which Dagster pool the step waits in",
    "batch": "the transport (a batch API or online calls) of the same requests, answered into the same cache",
}

# Source fields that cannot change a stored shard of prompts.
SOURCE_EXCLUDED: Mapping[str, str] = {
    "num_examples": "adds or removes whole shards; the rows of a full shard stay the same",
    "shards_per_run": "how many shards one run carries, not what a shard holds",
}

# Judging fields that cannot change a judge's verdicts.
JUDGING_EXCLUDED_FOR_JUDGES: Mapping[str, str] = {
    "aspect": "in the rubric's prompt version, which the judge's version holds already",
    "exclude_self_family": "acts in pooling (in pooled_ratings' version), not on a verdict",
}

# Judging fields that cannot change pooled_ratings (they act on the verdicts, in the judges' versions).
JUDGING_EXCLUDED_FOR_POOLING: Mapping[str, str] = {
    "aspect": "reaches pooling through the ratings, whose judges' versions hold it",
    "shuffle_positions": "acts on the verdicts (the judges' versions)",
    "seed": "acts on the verdicts (the judges' versions)",
    "max_rationale_chars": "acts on the verdicts (the judges' versions)",
    "repair_attempts": "acts on the verdicts (the judges' versions)",
}


def settings_json(settings: BaseModel, excluded: Mapping[str, str] | None = None) -> str:
    """The settings as JSON, every field but the excluded ones, in the model's field order."""
    return settings.model_dump_json(exclude=set(excluded or ()))


def member_version(member: BaseModel, *extra: str) -> str:
    """Short hash of a member's settings (less MEMBER_EXCLUDED) and of any extra text (a prompt version)."""
    relevant = member.model_dump(exclude=set(MEMBER_EXCLUDED))
    blob = json.dumps([relevant, *extra], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prompts_version(source: BaseModel) -> str:
    return settings_json(source, SOURCE_EXCLUDED)


def judge_version(member: BaseModel, judging: BaseModel, prompt_version: str) -> str:
    """A judge's version: its own settings, its rubric's prompt version, and the judging settings."""
    return member_version(member, prompt_version, settings_json(judging, JUDGING_EXCLUDED_FOR_JUDGES))


def pooled_version(pooling: BaseModel, judging: BaseModel, families: Sequence[tuple[str, str]]) -> str:
    """pooled_ratings' version: the pooling settings, the judging settings pooling reads, and each
    member's family (the self-family control leaves a judge's ratings of its own family out)."""
    return settings_json(pooling) + settings_json(judging, JUDGING_EXCLUDED_FOR_POOLING) + json.dumps(list(families))


def pairs_version(binarization: BaseModel) -> str:
    return settings_json(binarization)
