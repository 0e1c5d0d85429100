"""Judging rubrics. Only UltraFeedback's aspects for now; `get_rubric` is the entry point."""

from poll_assets.rubrics.answer_format import quote_lookalikes
from poll_assets.rubrics.ultrafeedback import (
    DEFAULT_ASPECT,
    DEFAULT_MAX_RATIONALE_CHARS,
    DEFAULT_SYSTEM_PROMPT,
    RUBRICS,
    Rubric,
    build_judge_messages,
    build_repair_messages,
    fence_nonce,
    get_rubric,
    prompt_nonce,
    prompt_version,
    verdict_json_schema,
)

__all__ = [
    "DEFAULT_ASPECT",
    "DEFAULT_MAX_RATIONALE_CHARS",
    "DEFAULT_SYSTEM_PROMPT",
    "RUBRICS",
    "Rubric",
    "build_judge_messages",
    "build_repair_messages",
    "fence_nonce",
    "get_rubric",
    "prompt_nonce",
    "prompt_version",
    "quote_lookalikes",
    "verdict_json_schema",
]
