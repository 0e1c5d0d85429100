"""Only the final answer counts: a reasoning model's draft is cut off before the answer is read.

- `<think>`, `<thinking>`, `<reasoning>`, `<reflection>`, `<scratchpad>`, `<analysis>`, `<thought>`
  sections are removed; an answer that opens one and never closes it has no final answer;
- text before a lone closing tag (a template that ate the opening one) is a draft too;
- an answer that drafts in prose ("Let me think...", "First pass:", "Initial ratings") is read only
  from its last "Final answer" / "Final ratings" heading on, or, without one, from its last JSON
  value; with neither it is read whole (a draft and a revision that disagree rate nothing).
A text the final answer leaves out stays unread: nothing is taken from the draft.
Every search is a linear scan (str.find, anchored line patterns): the cost is O(length).
"""

from __future__ import annotations

import json
import re

from poll_assets.rubrics.answer_format import json_values

_TAGS = ("think", "thinking", "reasoning", "reflection", "scratchpad", "analysis", "thought", "thoughts")
_OPEN_RE = re.compile(r"<(" + "|".join(_TAGS) + r")(?:\s[^<>]*)?>", re.IGNORECASE)
NO_FINAL = "a reasoning section without a final answer"
_DECODER = json.JSONDecoder(strict=False)

_DRAFT_RE = re.compile(
    r"^[\W_]*(?:let\s+me\s+(?:think|reason|analy[sz]e|work|consider|go\s+through|evaluate|look|start|draft)"
    r"|let'?s\s+(?:think|reason|analy[sz]e|work|consider|go\s+through|evaluate|look|start)|thinking\b|reasoning\s*:"
    r"|(?:my\s+)?(?:first|initial|provisional|tentative|draft|preliminary)\s+(?:pass|thoughts?|ratings?|scores?|draft|assessment|take|impressions?)"
    r"|draft\b|scratch|hmm+\b|okay,?\s+so\b|ok,?\s+so\b|alright,?\s+(?:let|so)\b|wait\b|on\s+second\s+thought|step\s+1\b)",
    re.IGNORECASE | re.MULTILINE,
)
_FINAL_RE = re.compile(
    r"^[\W_]*(?:(?:my|the|here\s+(?:is|are)\s+(?:my|the))\s+)?final\s+(?:answer|ratings|verdicts?|scores|evaluations?|assessments?|output|results?|json|response)"
    r"\b[^\n]*$|^[\W_]*(?:answer|output|result)[\W_]*:[\W_]*$",
    re.IGNORECASE | re.MULTILINE,
)


def _drop_sections(text: str) -> tuple[str, str | None]:
    out: list[str] = []
    pos = 0
    lowered = text.lower()
    while True:
        m = _OPEN_RE.search(text, pos)
        if not m:
            break
        close = lowered.find(f"</{m[1].lower()}>", m.end())
        if close < 0:
            return "", f"{NO_FINAL}: <{m[1]}> is never closed"
        out.append(text[pos:m.start()])
        pos = close + len(m[1]) + 3
    out.append(text[pos:])
    rest = "".join(out)
    lone = max((rest.lower().rfind(f"</{t}>") for t in _TAGS), default=-1)
    if lone >= 0:  # the opening tag was never written: everything before the close is the draft
        rest = rest[rest.index(">", lone) + 1:]
    return rest, None


def final_answer(text: str) -> tuple[str, str | None]:
    """(the part of the answer that counts, None) or ("", why there is no final answer)."""
    rest, why = _drop_sections(text)
    if why:
        return "", why
    draft = _DRAFT_RE.search(rest)
    if not draft:
        return rest, None
    finals = list(_FINAL_RE.finditer(rest, draft.start()))
    if finals:
        last = finals[-1]
        line = last[0]
        value = line.split(":", 1)[1] if ":" in line else ""
        return value + rest[last.end():], None
    later = [start for _, start, _ in json_values(rest[draft.start():], _DECODER)[0]]
    if later:
        return rest[draft.start() + later[-1]:], None
    return rest, None  # no final answer marked: read whole, where a draft and a revision disagree nothing is rated
