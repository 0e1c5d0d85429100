"""The line grammar of a judge's text answer, shared by the prompt builder and the parser.

Keeping both sides here gives one guarantee the tests check: after `quote_lookalikes`, no line of
an untrusted text can be read by the parser as a heading or a field, because every such line is
prefixed with "> " and the parser never accepts a line that starts with ">".
"""

from __future__ import annotations

import re

FIELD_WORDS = r"rating|score|rationale|reasoning|reason|explanation|justification|type"
QUALIFIER = r"(?:(?:overall|final|total)\s+)?"  # "Overall rating: 4"

# Decoration the parser strips before a heading or a field: indentation, one bullet, markdown
# emphasis and heading marks. Deliberately excludes ">" (quoted material) and digits.
_DECO = r"[ \t]*(?:[-+\u2022][ \t]+)?[*_#]*[ \t]*"

HEADING_RE = re.compile(
    rf"^{_DECO}(?P<out>output\s+for\s+)?text\s*#?\s*(?P<k>\d+)(?P<rest>.*)$",
    re.IGNORECASE,
)
FIELD_RE = re.compile(
    rf"^{_DECO}{QUALIFIER}(?P<name>{FIELD_WORDS})(?:\s+for\s+text\s*#?\s*\d+)?[ \t]*[*_]*[ \t]*"
    r"(?:[:=][*_ \t]*|(?=[\d\[(]))(?P<value>.*)$",
    re.IGNORECASE,
)

# Superset of the two patterns above, for quoting: any prefix of non-word characters or "_".
_LOOKALIKE_RE = re.compile(
    rf"^[\W_]*(?:(?:output\s+for\s+)?text\s*#?\s*\d+|{QUALIFIER}(?:{FIELD_WORDS})(?![a-z])|<<<)",
    re.IGNORECASE,
)


def is_lookalike(line: str) -> bool:
    return bool(_LOOKALIKE_RE.match(line))


def quote_lookalikes(text: str) -> str:
    """Prefix answer-format look-alike lines with "> " so that they read as quoted material."""
    return "\n".join(f"> {line}" if is_lookalike(line) else line for line in text.split("\n"))
