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
from dataclasses import dataclass
from functools import lru_cache

from poll_assets.rubrics.answer_format import is_lookalike, json_values, split_lines
from poll_assets.rubrics.ultrafeedback import Rubric, build_judge_messages, fence_nonce

_MARKER_RE = re.compile(r"^\s*<<<\s*(BEGIN|END)\s+(INSTRUCTION|TEXT\s*\d+)\s+([0-9a-f]{12})\s*>>>\s*$", re.IGNORECASE)
_VERDICT_SHAPED_RE = re.compile(r"\d").search
_VERDICT_WORD_RE = re.compile(r"text|response|output|answer|rating|score|[{\[<]", re.IGNORECASE).search
QUOTED = "[quoted]"
VOID = "\x00void"  # stands for a removed answer-like line; NUL never survives in the judge's own lines


_NON_KEY_RE = re.compile(r"[\W_]+")
# For ASCII, [\W_] is exactly "not alphanumeric" and casefold is lower: bytes.translate does both at once.
_ASCII_NON_KEY = bytes(c for c in range(128) if not chr(c).isalnum())
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e"  # the ASCII ones str.splitlines knows
_ASCII_NON_KEY_BUT_BREAKS = bytes(c for c in _ASCII_NON_KEY if chr(c) not in _LINE_BREAKS)


def line_key(line: str) -> str:
    """A line compared without case, markdown, quote marks, spaces or punctuation."""
    if line.isascii():
        return line.encode("ascii").lower().translate(None, _ASCII_NON_KEY).decode("ascii")
    return _NON_KEY_RE.sub("", line.casefold())


def _line_keys(content: str) -> set[str]:
    """{line_key(x) for x in split_lines(content)} less "", an ASCII content keyed in one pass (the
    breaks are kept, so the lines are the same; a line with an empty key may merge into a break)."""
    if content.isascii():
        keys = set(content.encode("ascii").lower().translate(None, _ASCII_NON_KEY_BUT_BREAKS).decode("ascii").splitlines())
    else:
        keys = {line_key(x) for x in split_lines(content)}
    keys.discard("")
    return keys


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
        m = _MARKER_RE.match(line) if "<<<" in line else None  # the marker's literal: a cheap pre-test
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


_DECODER = json.JSONDecoder(strict=False)


def _json_fragments(line: str) -> list[str]:
    """The JSON values written inside one line of a text, as they were written (bounded depth)."""
    return [line[start:end] for _, start, end in json_values(line, _DECODER, nested=True)[0]]


@dataclass(frozen=True)
class _Material:
    """What a prompt offers to be echoed, built once per prompt (a repair's answer is read against it too)."""

    keys: frozenset[str]  # keys of every line of the messages and generations
    candidates: frozenset[str]  # the lines (quote marks dropped) and JSON values in them, 6 characters or more


def _fragment_like(s: str) -> bool:
    return is_lookalike(s) or bool(_VERDICT_SHAPED_RE(s) and _VERDICT_WORD_RE(s))


@lru_cache(maxsize=256)
def _material(contents: tuple[str, ...]) -> _Material:
    keys: set[str] = set()
    candidates: set[str] = set()
    for content in contents:
        keys |= _line_keys(content)
        for x in split_lines(content):
            candidates.add(x.strip().lstrip("> \t").strip())
            if "[" in x or "{" in x:  # a JSON value starts at one of them
                candidates.update(_json_fragments(x))
    return _Material(frozenset(keys), frozenset(s for s in candidates if len(s) >= 6))


def _contents(messages: list[dict[str, str]] | None, generations: list[str] | None) -> tuple[str, ...]:
    return (*[m.get("content") or "" for m in messages or []], *[g for g in generations or [] if isinstance(g, str)])


def _can_occur(fragment: str, text: str) -> bool:
    """Whether replacing `fragment` in `text` can change it, after other fragments were replaced by QUOTED:
    only if it is in `text` already, or could overlap an inserted QUOTED."""
    return fragment in text or "[" in fragment or "]" in fragment or fragment in QUOTED


def strip_untrusted(
    answer: str,
    rubric: Rubric,
    n: int,
    *,
    messages: list[dict[str, str]] | None = None,
    generations: list[str] | None = None,
) -> str:
    """The judge's answer without anything it repeats from its prompt (see the module docstring)."""
    material = _material(_contents(messages, generations))
    template = _template_keys(rubric, n)  # "" is in neither set
    lines = _drop_fenced(split_lines(answer), fence_nonce(messages) if messages else None)
    # A repeated answer-like line becomes VOID, which the parser reads as the heading of a block that
    # belongs to no text: a removed heading must not merge two blocks into one.
    kept = []
    for x in lines:
        key = line_key(x)
        if key in template or key in material.keys:
            if is_lookalike(x):
                kept.append(VOID)
        else:
            kept.append(x)
    text = "\n".join(kept)
    # Longest first, equal lengths alphabetically: the result never depends on a set's order.
    fragments = sorted((s for s in material.candidates if _can_occur(s, text) and _fragment_like(s)),
                       key=lambda s: (-len(s), s))
    for fragment in fragments:
        text = text.replace(fragment, QUOTED)
    return text
