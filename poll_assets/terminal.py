"""Text from prompts and answers, made safe to print on a terminal."""

from __future__ import annotations

import re

# C0 controls but newline and tab, DEL, C1 controls (0x9b alone starts an ANSI sequence on some
# terminals), and the bidirectional overrides that can make printed text read differently.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    """`text` with every control character shown as a `\\uXXXX` escape, so an ANSI sequence in a
    prompt is printed, not obeyed. The escape is also valid inside a JSON string."""
    return _CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
