"""The line grammar of a judge's text answer, shared by the prompt builder and the parser.

Keeping both sides here gives two guarantees the tests check:
- one line rule (`split_lines`, str.splitlines semantics: \\n, \\r, \\r\\n, \\v, \\f, \\x1c-\\x1e,
  U+0085, U+2028, U+2029) is used to quote texts and to read answers, so the two never disagree
  about where a line starts; texts are normalized to "\\n" before they are fenced;
- after `quote_lookalikes`, no line of an untrusted text can be read by the parser as a heading,
  a field, an inline rating or verdict-shaped JSON, because every such line is prefixed with "> " and the parser never
  accepts a line that starts with ">".
"""

from __future__ import annotations

import json
import re
from typing import Any

FIELD_WORDS = r"ratings?|scores?|rationale|reasoning|reason|explanation|justification|type"
QUALIFIER = r"(?:(?:overall|final|total)\s+)?"  # "Overall rating: 4"

# How an answer names text k: "Text 3", "Text #3", "text_3", "Response 3", "Output 3", "Answer 3".
TEXT_NAME = r"(?:text|response|output|answer)[ \t]*[#_\-]?[ \t]*"

# Decoration the parser strips before a heading or a field: indentation, a list number ("1.",
# "2)"), one bullet, markdown emphasis and heading marks, a table bar. Deliberately excludes ">"
# (quoted material).
_DECO = r"[ \t]*(?:\|[ \t]*)?(?:\d{1,2}[.)][ \t]+)?(?:[-+\u2022][ \t]+)?(?:[*_#]+[ \t]*)*"

HEADING_RE = re.compile(
    rf"^{_DECO}(?P<out>(?:output|response|evaluation|assessment)\s+(?:for|of)\s+)?"
    rf"{TEXT_NAME}(?P<k>\d+)(?P<rest>.*)$",
    re.IGNORECASE,
)
FIELD_RE = re.compile(
    rf"^{_DECO}{QUALIFIER}(?P<name>{FIELD_WORDS})(?:\s+(?:for|of)\s+{TEXT_NAME}(?P<k>\d+))?[ \t]*[*_]*[ \t]*"
    r"(?:[:=][*_ \t]*|[ \t]+[-\u2013\u2014][ \t]+|(?=[\d\[(\u2605\u2b50]))(?P<value>.*)$",
    re.IGNORECASE,
)
# A rating as judges write it after a name or at the end of a line: 4, 4.0, 4/5, "4 out of 5", [[4]],
# stars, optionally "(Almost There)" or "points"/"stars" after it.
RATING_VALUE = (
    r"(?:\[\[[ \t]*\d+(?:\.0)?[ \t]*\]\]|\d+(?:\.0)?(?:[ \t]*(?:/|out[ \t]+of)[ \t]*\d+)?|[\u2605\u2b50]+\u2606*)"
    r"(?:[ \t]+(?:points?|stars?))?(?:[ \t]*\([A-Za-z' /]{2,60}\))?"
)
# "... the text meets every restriction. **Rating: 4**": a rating closing a prose line.
INLINE_RATING_RE = re.compile(
    rf"^(?![ \t]*>)(?P<pre>.*?\S)[ \t]+[*_]*{QUALIFIER}(?:rating|score)[*_]*[ \t]*(?:[:=]|[ \t]+(?:is|of))[*_ \t]*"
    rf"(?P<value>{RATING_VALUE})[*_]*\.?[ \t]*$",
    re.IGNORECASE,
)

# Superset of the patterns above, for quoting: any prefix of non-word characters, "_" or a list
# number, then a text name, a field word or a fence marker.
_LOOKALIKE_RE = re.compile(
    rf"^[\W_]*(?:\d{{1,2}}[.)][\W_]*)?(?:(?:\w+\s+(?:for|of)\s+)?{TEXT_NAME}\d+|{QUALIFIER}(?:{FIELD_WORDS})(?![a-z])|<<<)",
    re.IGNORECASE,
)


# JSON the parser could read: a bracket or brace on a line that also holds a number or a verdict word.
_JSON_CONTENT_RE = re.compile(r"\d|rating|score|text", re.IGNORECASE)
# A line that is only a piece of JSON ("[", "5,", "null", "}"): lines of a multi-line JSON value.
_JSON_PIECE_RE = re.compile(r"(?:[\s\[\]{},:\"\d.+\-]|null|true|false)*(?:[\[\]{}\d]|null)(?:[\s\[\]{},:\"\d.+\-]|null|true|false)*", re.IGNORECASE)


def split_lines(text: str) -> list[str]:
    """The one line rule of the project: every line break str.splitlines knows."""
    return text.splitlines()


def normalize_breaks(text: str) -> str:
    """Every line break -> "\\n", so a fenced text has exactly the lines the parser will see."""
    return "\n".join(split_lines(text))


# The words INLINE_RATING_RE needs, under the same case folding: a line without either is not
# tried (the full pattern costs ~100 us on a 2,000-character line; judge prompts quote long answers).
_RATING_WORD_RE = re.compile(r"rating|score", re.IGNORECASE)


def _has_rating_word(line: str) -> bool:
    if line.isascii():  # str.lower is exact for ASCII, and far faster than a case-blind search
        low = line.lower()
        return "rating" in low or "score" in low
    return _RATING_WORD_RE.search(line) is not None  # re's own folding (e.g. U+017F matches "s")


def inline_rating(line: str) -> re.Match[str] | None:
    """INLINE_RATING_RE's match on `line`, trying it only where one of its words occurs."""
    return INLINE_RATING_RE.match(line) if _has_rating_word(line) else None


def is_lookalike(line: str) -> bool:
    return bool(
        _LOOKALIKE_RE.match(line)
        or inline_rating(line)
        or (("[" in line or "{" in line) and _JSON_CONTENT_RE.search(line))
        or _JSON_PIECE_RE.fullmatch(line)
        or line.lstrip().startswith("|")  # a table row: the parser reads tables with a rating column
    )


def is_quoted(line: str) -> bool:
    """Quoted material: the parser reads no heading, field, table row or JSON from such a line."""
    return line.lstrip().startswith(">")


def quote_lookalikes(text: str) -> str:
    """Prefix answer-format look-alike lines with "> " so that they read as quoted material."""
    return "\n".join(f"> {line}" if is_lookalike(line) else line for line in split_lines(text))


# ---------------------------------------------------------------------------------------------
# JSON values inside free text, in bounded time and depth
#
# json's decoder recurses once per nesting level and an error message counts lines up to the error,
# so trying it from every bracket of a long answer costs O(length^2) and deep nesting raises
# RecursionError. Instead one iterative pass pairs every bracket with its closer (strings tracked
# inside brackets only), and only balanced spans at most MAX_JSON_DEPTH deep are decoded, each as its
# own slice. A span that fails is retried at its inner brackets, so every character is decoded at
# most MAX_JSON_DEPTH times.

MAX_JSON_DEPTH = 32
_PAIRS = {"]": "[", "}": "{"}
_JSON_TOKEN_RE = re.compile(r'[\[\]{}"\\]')
_TRAILING_COMMA_RE = re.compile(r",(\s*[}\]])")


def bracket_spans(text: str) -> tuple[dict[int, int], bool]:
    """Opener index -> index after its closer, for balanced [..] and {..} at most MAX_JSON_DEPTH deep.

    The flag says whether some balanced span was left out for being deeper than that.
    """
    spans: dict[int, int] = {}
    stack: list[list[int]] = []  # [opener index, deepest level below it (relative)]
    in_string, skip_to, too_deep = False, -1, False
    for m in _JSON_TOKEN_RE.finditer(text):
        i, c = m.start(), m[0]
        if i < skip_to:
            continue
        if in_string:
            if c == "\\":
                skip_to = i + 2
            elif c == '"':
                in_string = False
            continue
        if c == '"':
            in_string = bool(stack)  # quotes in prose outside any bracket are not JSON strings
        elif c in "[{":
            stack.append([i, 1])
        elif c in "]}":
            if not stack or text[stack[-1][0]] != _PAIRS[c]:
                stack.clear()  # a mismatched closer: whatever is open cannot be JSON
                continue
            start, depth = stack.pop()
            if depth <= MAX_JSON_DEPTH:
                spans[start] = i + 1
            else:
                too_deep = True
            if stack:
                stack[-1][1] = max(stack[-1][1], depth + 1)
    return spans, too_deep


def decode_json(text: str, decoder: json.JSONDecoder) -> tuple[bool, Any]:
    """(True, value) when `text` is one JSON value (trailing commas forgiven), else (False, None)."""
    for candidate in (text, _TRAILING_COMMA_RE.sub(r"\1", text)):
        try:
            return True, decoder.decode(candidate)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
            continue
    return False, None


def json_values(
    text: str, decoder: json.JSONDecoder, *, nested: bool = False
) -> tuple[list[tuple[Any, int, int]], bool]:
    """Every outermost (or, nested=True, every) JSON object or array in the text, with its span,
    and the too-deep flag."""
    spans, too_deep = bracket_spans(text)
    out: list[tuple[Any, int, int]] = []
    covered = -1
    for start in sorted(spans):
        if start < covered and not nested:
            continue
        end = spans[start]
        ok, value = decode_json(text[start:end], decoder)
        if ok and isinstance(value, (dict, list)):
            out.append((value, start, end))
            covered = end
    return out, too_deep
