"""Markdown previews for the UI: a few preference pairs, a few of a judge's verdicts.

Pure functions over the stored frames; the assets put their result in their materialization
metadata (`dg.MetadataValue.md`). Every cell is one line: `|` is escaped, line breaks and runs of
spaces become one space, and long text is cut to a limit, ending with `…`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from poll_assets.checks import short_id
from poll_assets.parquet_values import is_missing, plain_list

ANSWER_CHARS = 160
TEXT_CHARS = 100


def md_cell(value: Any, limit: int = TEXT_CHARS) -> str:
    """`value` as the text of one markdown table cell, at most `limit` characters."""
    if is_missing(value):
        return ""
    if isinstance(value, float):
        text = f"{value:g}"
    else:
        text = " ".join(str(value).split())
    if len(text) > limit:
        text = text[: max(limit - 1, 0)].rstrip() + "…"
    return text.replace("|", "\\|")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], limits: Sequence[int] | None = None) -> str:
    """A markdown table; cell k of every row is cut to `limits[k]` characters."""
    limits = limits or [TEXT_CHARS] * len(headers)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(md_cell(v, n) for v, n in zip(row, limits)) + " |" for row in rows]
    return "\n".join(lines)


def chat_answer(messages: Any) -> Any:
    """The last message's content of a chat (a pair's `chosen` or `rejected`)."""
    msgs = plain_list(messages)
    return msgs[-1].get("content") if msgs and isinstance(msgs[-1], dict) else None


def pairs_preview(pairs: pd.DataFrame, n: int = 5, answer_chars: int = ANSWER_CHARS) -> str:
    """The first `n` preference pairs: prompt, chosen and rejected generator, ratings, margin, answers."""
    rows = [
        (short_id(r.prompt_id), r.prompt, r.chosen_model, r.rejected_model,
         f"{md_cell(r.chosen_rating)} vs {md_cell(r.rejected_rating)}", r.margin,
         chat_answer(r.chosen), chat_answer(r.rejected))
        for r in pairs.head(n).itertuples(index=False)
    ]
    headers = ("id", "prompt", "chosen model", "rejected model", "ratings", "margin", "chosen answer", "rejected answer")
    table = md_table(headers, rows, (12, TEXT_CHARS, 60, 60, 20, 10, answer_chars, answer_chars))
    return table if rows else table + "\n\n_no pairs in this shard_"


def verdicts_preview(ratings: pd.DataFrame, generators: Sequence[str], n: int = 6, max_unrated: int = 2,
                     rationale_chars: int = ANSWER_CHARS) -> str:
    """A few of a judge's verdicts, one row per (prompt, text): up to `max_unrated` without a rating
    (with their reason) and rated ones up to `n`, in shard order. `generators`: who wrote each text."""
    rated, unrated = [], []
    for r in ratings.itertuples(index=False):
        scores, rationales, errors = plain_list(r.ratings), plain_list(r.rationales), plain_list(r.rating_errors)
        for k, score in enumerate(scores):
            text = generators[k] if k < len(generators) else f"text {k + 1}"
            row = (len(rated) + len(unrated), short_id(r.prompt_id), text, score,
                   rationales[k] if k < len(rationales) else None, errors[k] if k < len(errors) else None)
            (unrated if score is None else rated).append(row)
    if not rated and not unrated:
        return "_no verdicts in this shard_"
    shown_unrated = unrated[:max_unrated]
    chosen = sorted(shown_unrated + rated[: n - len(shown_unrated)])
    headers = ("prompt", "text (generator)", "rating", "rationale", "why unrated")
    return md_table(headers, [row[1:] for row in chosen], (12, 40, 6, rationale_chars, 80))
