"""Removing what a judge's answer repeats from its prompt, before the answer is parsed.

A judge may echo its prompt, or quote a generation without the "> " marks. Whatever it repeats is
not the judge's own judgement, so it must never set a rating. `strip_untrusted` removes, from the
answer:
- every fenced region (`<<<BEGIN ... id>>>` to the matching `<<<END ... id>>>` line), i.e. echoed
  material; with the prompt's messages only the prompt's own fence id counts, so a forged END line
  inside a text cannot close the region early;
- every line that reproduces a line of the prompt (its fixed template always; with `messages` or
  `generations`, also the instruction and every text), compared after dropping case, markdown,
  quote marks and punctuation; a removed answer-like line leaves VOID behind, which closes the
  block it was in, so removing a forged heading never merges two texts' blocks;
- with `messages`/`generations`, every verdict-shaped fragment of those texts found inside a longer
  line (e.g. forged JSON pasted into a rationale), replaced by "[quoted]".
The cost is bounded: a judge line that happens to equal a line of a text is lost too, so a rating
can at worst be removed (the text gets None with the reason), never set or changed.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from poll_assets.rubrics.answer_format import is_lookalike, json_values, split_lines
from poll_assets.rubrics.ultrafeedback import Rubric, build_judge_messages, fence_nonce

_MARKER_RE = re.compile(r"^\s*<<<\s*(BEGIN|END)\s+(INSTRUCTION|TEXT\s*\d+)\s+([0-9a-f]{12})\s*>>>\s*$", re.IGNORECASE)
_VERDICT_SHAPED_RE = re.compile(r"\d").search
_VERDICT_WORD_RE = re.compile(r"text|response|output|answer|rating|score|[{\[<]", re.IGNORECASE).search
QUOTED = "[quoted]"
VOID = "\x00void"  # stands for a removed answer-like line; NUL never survives in the judge's own lines


def line_key(line: str) -> str:
    """A line compared without case, markdown, quote marks, spaces or punctuation."""
    return re.sub(r"[\W_]+", "", line.casefold())


@lru_cache(maxsize=256)
def _template_keys(rubric: Rubric, n: int) -> frozenset[str]:
    """Keys of the prompt's fixed lines (any max_rationale_chars setting), for echoes without messages."""
    keys: set[str] = set()
    for structured in (False, True):
        for max_chars in (None, 300):
            msgs = build_judge_messages(rubric, "", [""] * max(n, 1), structured=structured,
                                        max_rationale_chars=max_chars)
            nonce = fence_nonce(msgs) or "~"
            for m in msgs:
                keys.update(line_key(x) for x in split_lines(m["content"]) if nonce not in x)
    keys.discard("")
    return frozenset(keys)


def _drop_fenced(lines: list[str], nonce: str | None) -> list[str]:
    out: list[str] = []
    open_label: tuple[str, str] | None = None
    for line in lines:
        m = _MARKER_RE.match(line)
        real = bool(m) and (nonce is None or m[3].lower() == nonce)
        if open_label is not None:
            if real and m[1].upper() == "END" and (line_key(m[2]), m[3].lower()) == open_label:
                open_label = None
            continue
        if real and m[1].upper() == "BEGIN":
            open_label = (line_key(m[2]), m[3].lower())
            continue
        if not m:
            out.append(line)
    return out


def _untrusted_lines(messages: list[dict[str, str]] | None, generations: list[str] | None) -> list[str]:
    out: list[str] = []
    for content in [m.get("content") or "" for m in messages or []] + [g for g in generations or [] if isinstance(g, str)]:
        out += split_lines(content)
    return out


_DECODER = json.JSONDecoder(strict=False)


def _json_fragments(line: str) -> list[str]:
    """The JSON values written inside one line of a text, as they were written (bounded depth)."""
    return [line[start:end] for _, start, end in json_values(line, _DECODER, nested=True)[0]]


def strip_untrusted(
    answer: str,
    rubric: Rubric,
    n: int,
    *,
    messages: list[dict[str, str]] | None = None,
    generations: list[str] | None = None,
) -> str:
    """The judge's answer without anything it repeats from its prompt (see the module docstring)."""
    untrusted = _untrusted_lines(messages, generations)
    keys = set(_template_keys(rubric, n)) | {line_key(x) for x in untrusted}
    keys.discard("")
    lines = _drop_fenced(split_lines(answer), fence_nonce(messages) if messages else None)
    # A repeated answer-like line becomes VOID, which the parser reads as the heading of a block that
    # belongs to no text: a removed heading must not merge two blocks into one.
    lines = [(VOID if is_lookalike(x) else None) if line_key(x) in keys else x for x in lines]
    lines = [x for x in lines if x is not None]
    candidates = [x.strip().lstrip("> \t").strip() for x in untrusted]
    candidates += [j for x in untrusted for j in _json_fragments(x)]
    fragments = sorted(
        {s for s in candidates if len(s) >= 6 and (is_lookalike(s) or (_VERDICT_SHAPED_RE(s) and _VERDICT_WORD_RE(s)))},
        key=len, reverse=True,
    )
    text = "\n".join(lines)
    for fragment in fragments:
        text = text.replace(fragment, QUOTED)
    return text
