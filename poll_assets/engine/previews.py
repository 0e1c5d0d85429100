"""Markdown previews for the UI: a few preference pairs, a few of a judge's verdicts.

Pure functions over the stored frames; the assets put their result in their materialization
metadata (`dg.MetadataValue.md`). Every cell is one line: line breaks and runs of spaces become one
space, long text is cut to a limit and the cut marked with `…`, and then every character markdown
would read as markup (`*`, `_`, `|`, backticks, `<`, `#`, ...) is escaped, so model text renders as
the model wrote it. The pairs get two tables: a narrow one that fits the UI's width where the
metadata is shown, and the full one as a second entry, opened with *Show Markdown*.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pandas as pd

from poll_assets.engine.checks import short_id
from poll_assets.parquet_values import is_missing, plain_list

ANSWER_CHARS = 160
TEXT_CHARS = 100
PROMPT_CHARS = 48  # the narrow preview's prompt column
# ASCII punctuation that markdown (CommonMark and GFM tables) may read as markup; a backslash makes
# each one literal. `+`, `-`, `.` and digits only start list blocks, which a table cell cannot hold.
_MARKUP = re.compile(r"([\\`*_{}\[\]<>|~&!#])")


class Markdown(str):
    """Text that is markdown on purpose (e.g. a bold total): a table cell keeps it as it is."""


def md_escape(text: str) -> str:
    """`text` rendered literally by markdown: every markup character backslash-escaped."""
    return _MARKUP.sub(r"\\\1", text)


def cut(text: str, limit: int) -> str:
    """`text` on one line, at most `limit` characters; a cut is marked with `…`."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: max(limit - 1, 0)].rstrip() + "…"


def md_cell(value: Any, limit: int = TEXT_CHARS) -> str:
    """`value` as the text of one markdown table cell, at most `limit` characters before escaping."""
    if is_missing(value):
        return ""
    if isinstance(value, Markdown):
        return cut(value, limit)
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return md_escape(cut(text, limit))


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


def _number(value: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if is_missing(value) else fmt.format(float(value))


def judges_text(r: Any) -> str:
    """'2 of 3 (1 tied)': how many of the judges that rated both answers prefer chosen."""
    n = int(r.judges_for) + int(r.judges_against) + int(r.judges_tied)
    if n == 0:
        return "no judge rated both"
    tied = f" ({int(r.judges_tied)} tied)" if r.judges_tied else ""
    return f"{int(r.judges_for)} of {n}{tied}"


def margin_text(r: Any) -> str:
    """'2.00 [1.00, 3.00]': the pooled margin and its 95 % interval (no interval below 2 judges)."""
    interval = "" if is_missing(r.margin_low) else f" [{_number(r.margin_low)}, {_number(r.margin_high)}]"
    return f"{_number(r.margin)}{interval}"


_EMPTY = "\n\n_no pairs in this shard_"


def pairs_preview(pairs: pd.DataFrame, n: int = 5) -> str:
    """The first `n` pairs, narrow enough for the UI's metadata panel: the prompt, which generator
    won over which, how many judges agree, and the margin with its interval."""
    rows = [(r.prompt, f"{r.chosen_generator} > {r.rejected_generator}", judges_text(r), margin_text(r))
            for r in pairs.head(n).itertuples(index=False)]
    table = md_table(("prompt", "chosen > rejected", "judges for", "margin [95% CI]"), rows, (PROMPT_CHARS, 48, 24, 24))
    return table if rows else table + _EMPTY


def pairs_table(pairs: pd.DataFrame, n: int = 20, answer_chars: int = ANSWER_CHARS) -> str:
    """The first `n` pairs with every column a reader needs to judge them (behind *Show Markdown*)."""
    rows = [
        (short_id(r.prompt_id), r.prompt, r.chosen_generator, r.rejected_generator, r.chosen_model, r.rejected_model,
         f"{md_cell(r.chosen_rating)} vs {md_cell(r.rejected_rating)}", margin_text(r), judges_text(r),
         chat_answer(r.chosen), chat_answer(r.rejected))
        for r in pairs.head(n).itertuples(index=False)
    ]
    headers = ("id", "prompt", "chosen generator", "rejected generator", "chosen model", "rejected model", "ratings",
               "margin [95% CI]", "judges for", "chosen answer", "rejected answer")
    table = md_table(headers, rows, (12, TEXT_CHARS, 40, 40, 60, 60, 20, 24, 24, answer_chars, answer_chars))
    more = f"\n\n_first {n} of {len(pairs)} pairs_" if len(pairs) > n else ""
    return (table + more) if rows else table + _EMPTY


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
