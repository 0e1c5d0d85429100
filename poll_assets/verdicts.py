"""Reading a judge's answer into one Verdict per text, the repair re-ask's pure parts, and the
position-bias controls.

`parse_verdicts` holds these invariants (property-tested in test_verdict_invariants.py and, against
composed judge answers, in test_judge_fuzz.py; docs/verdicts.md states the rules in full):
I1 nothing inside a generation sets or changes a rating, at worst it removes one (None + reason);
I2 a rating goes to a text only through a reference resolved to exactly that text (any naming scheme,
   poll_assets.rubrics.text_names), or by position when the items carry no names, number exactly n
   and nothing marks another order (a ranking, "best first", places);
I3 an answer on another scale (a 0, a 7, "4/10", "Rating (1-10)") or numbering the texts from 0 gives
   None for every text, with the reason;
I4 exactly n verdicts, in the order the texts were shown, for ANY string: no exception escapes, no
   recursion deeper than MAX_JSON_DEPTH, O(length) work up to MAX_ANSWER_CHARS;
I5 only the final answer counts: reasoning sections and drafts are cut off (poll_assets.rubrics.reasoning).

Steps:
1. What the answer repeats from its prompt is removed (poll_assets.rubrics.echo): fenced regions, the
   prompt's template lines and, given `messages`/`generations`, every line of the instruction and texts.
   Then only the final answer is kept, and every reference to a text is rewritten to "Text k" (or the
   answer is refused when its names mix schemes or fall outside the n texts).
2. Text answers: lines are split with the project's one line rule and rewritten into canonical lines
   (tables, "Text 1: 4, Text 2: 2", "Rating for Text 3: 5", "... **Rating: 4**", "I rate it 4", XML-style
   tags), then cut into blocks at headings naming a text ("#### Output for Text k", "**Text k:**",
   "1. Text k", "### Response k"). Inside a block, Rating/Score, Rationale (Reason, Explanation, ...) and
   Type fields are read; a rating line that mentions another text is dropped. A bulleted "- **Text 4:**
   prose" is a mention when the answer has real headings. Several ratings for one text are kept only if
   they agree ("conflicting ratings" otherwise). Without any heading, exactly n rating lines are taken
   in order under I2's position rule (any number that agree for n == 1).
   Lines starting with ">" (quoted material) are never read, as text or as JSON.
3. JSON answers: every balanced JSON value in the answer is read (fences, prose and trailing commas
   tolerated); keys text_k / "Text k" / "k" (after renaming), list items with "text": k (any scheme),
   {"ratings": {...}}, case-insensitive and prefixed rating keys; an unnamed list only under I2's
   position rule. A truncated answer keeps every complete "text_k": {...}. Verdicts from several JSON
   values are merged like blocks (agreeing or None). A text answer falls back to JSON only when it
   mostly is JSON.

Ratings: integers on the scale, "4/5", words, labels or half of a compound label, stars; fractions,
ranges and unknown words are rejected with the reason. Honesty's N/A gives None with error "N/A".
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from poll_assets.rubrics.answer_format import (
    FIELD_RE,
    HEADING_RE,
    RATING_VALUE,
    TEXT_NAME,
    bracket_spans,
    decode_json,
    inline_rating,
    is_quoted,
    json_values,
    split_lines,
)
from poll_assets.rubrics.echo import QUOTED, VOID, strip_untrusted
from poll_assets.rubrics.reasoning import NO_FINAL, final_answer
from poll_assets.rubrics.text_names import NOUNS, name_value, resolve_names
from poll_assets.rubrics.ultrafeedback import Rubric

NA = "N/A"
JUDGE_FAILED = "judge call failed"
GENERATION_FAILED = "generation failed"
MAX_ANSWER_CHARS = 2_000_000  # longer answers are not read at all: the parser's time bound holds up to here
TOO_LONG = "the judge's answer is too long to read"
PARSER_ERROR = "the parser failed on this answer"


@dataclass
class Verdict:
    rating: int | None
    rationale: str | None
    type: str | None = None  # normalized type ids "1,3", "None" when the judge listed none
    error: str | None = None  # why rating is None
    # How the rating was tied to its text: "layout" (the asked names: Text k, text_k), "names" (another
    # naming scheme resolved to Text k), "position" (unnamed items, exactly n, no order marked). Not
    # stored with the verdict (to_dict leaves it out); the judging stage reports it as "parse_report".
    read_by: str | None = field(default=None, compare=False, repr=False)

    @property
    def kind(self) -> str:
        """ok | na | judge_failed | generation_failed | parse_failed."""
        if self.rating is not None:
            return "ok"
        if self.error == NA:
            return "na"
        if self.error and self.error.startswith(JUDGE_FAILED):
            return "judge_failed"
        if self.error and self.error.startswith(GENERATION_FAILED):
            return "generation_failed"
        return "parse_failed"

    @classmethod
    def judge_failed(cls, detail: str) -> "Verdict":
        return cls(None, None, error=f"{JUDGE_FAILED}: {detail}")

    @classmethod
    def generation_failed(cls, detail: str | None = None) -> "Verdict":
        return cls(None, None, error=GENERATION_FAILED + (f": {detail}" if detail else ""))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("read_by")
        return out


def parse_failure_rate(verdicts: list[Verdict]) -> float:
    """Share of verdicts the judge answered but that could not be read.

    Judge-call failures, failed generations and honesty's N/A are not parse failures and are left
    out of the denominator too; 0.0 when nothing was answered.
    """
    answered = [v for v in verdicts if v.kind in ("ok", "parse_failed")]
    if not answered:
        return 0.0
    return sum(v.kind == "parse_failed" for v in answered) / len(answered)


# ---------------------------------------------------------------------------------------------
# Ratings, types

_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
          "eight": 8, "nine": 9, "ten": 10}
_NUM_RE = re.compile(
    r"^(?P<num>\d+(?:\.\d+)?|" + "|".join(_WORDS) + r")\b"
    r"(?:\s*(?:/|out\s+of|of)\s*(?P<den>\d+(?:\.\d+)?|" + "|".join(_WORDS) + r")\b)?",
    re.IGNORECASE,
)
_RANGE_RE = re.compile(r"^\s*(?:-|\u2013|\u2014|to|or|and|,)\s*(?:\d|" + "|".join(_WORDS) + r")", re.IGNORECASE)
_NA_RE = re.compile(r"^(?:n\s*/\s*a|na|not\s+applicable)\b", re.IGNORECASE)
_STRIP = " \t*_`\"'[](){}<>.,;:!"
_SCALE_NOTE_RE = re.compile(r"^\s*[(\[]\s*(\d+)\s*(?:-|\u2013|to)\s*(\d+)\s*[)\]]\s*:?\s*")  # "Rating (1-5): 4"
_STATED_SCALE_RE = re.compile(r"\bscale\s+(?:of|from)\s+(?:(?P<lo>\d+)\s*(?:-|\u2013|to)\s*)?(?P<hi>\d+)", re.IGNORECASE)
_STARS_RE = re.compile(r"^(?P<full>[\u2605\u2b50]+)(?P<empty>[\u2606]*)")
OTHER_SCALE = "the answer uses another scale"


@dataclass(frozen=True)
class _Reading:
    rating: int | None
    error: str | None  # NA for honesty's N/A
    other_scale: bool = False  # the value shows the judge is not rating on the rubric's scale

    @property
    def usable(self) -> bool:
        return self.rating is not None or self.error == NA


def _num(token: str) -> float:
    word = _WORDS.get(token.lower())
    return float(word) if word is not None else float(token)


def _scale(rubric: Rubric) -> str:
    return f"{rubric.min_rating}-{rubric.max_rating}"


def _off_scale(shown: str, rubric: Rubric, other: bool = False) -> _Reading:
    return _Reading(None, f"rating {shown!r} is not on the {_scale(rubric)} scale", other)


def _read_number(text: str, shown: str, rubric: Rubric) -> _Reading | None:
    m = _NUM_RE.match(text)
    if not m:
        return None
    if _RANGE_RE.match(text[m.end():]):
        return _Reading(None, f"ambiguous rating {shown!r}")
    num = _num(m["num"])
    if m["den"] is not None and _num(m["den"]) != rubric.max_rating:
        return _off_scale(shown, rubric, other=True)
    if num.is_integer() and int(num) in rubric.ratings:
        return _Reading(int(num), None)
    return _off_scale(shown, rubric, other=num.is_integer())  # 0 or 7: another scale; 3.5: a fraction


def _read_label(text: str, shown: str, rubric: Rubric) -> _Reading:
    lowered = text.lower()
    # A label or one half of a compound label ("Correct but Uncertain"); the longest match wins.
    matches = [(len(part), r) for r, label in rubric.scale for part in {label, *label.split(" / ")}
               if lowered.startswith(part.strip().lower())]
    if matches:
        return _Reading(max(matches)[1], None)
    return _off_scale(shown, rubric)


def read_rating(value: object, rubric: Rubric) -> _Reading:
    """One rating value as the judge wrote it -> an integer on the scale, N/A, or the reason."""
    if value is None:
        return _Reading(None, NA) if rubric.allows_na else _Reading(None, "rating is null")
    if isinstance(value, bool):
        return _off_scale(json.dumps(value), rubric)
    if isinstance(value, (int, float)):
        value = repr(value)
    raw = str(value)
    note = _SCALE_NOTE_RE.match(raw)
    if note and (int(note[1]), int(note[2])) != (rubric.min_rating, rubric.max_rating):
        return _off_scale(raw.strip()[:40], rubric, other=True)  # "Rating (1-10): 4"
    raw = _SCALE_NOTE_RE.sub("", raw, count=1)
    stated = _STATED_SCALE_RE.search(raw)
    if stated and (int(stated["lo"] or rubric.min_rating), int(stated["hi"])) != (rubric.min_rating, rubric.max_rating):
        return _off_scale(raw.strip()[:40], rubric, other=True)  # "4 (on a scale of 1 to 10)"
    text = raw.strip(_STRIP)
    shown = raw.strip()[:40]
    if not text:
        return _Reading(None, "empty rating")
    if _NA_RE.match(text):
        return _Reading(None, NA) if rubric.allows_na else _Reading(None, f"N/A is not allowed for {rubric.aspect}")
    stars = _STARS_RE.match(text)
    if stars:
        full, total = len(stars["full"]), len(stars["full"]) + len(stars["empty"])
        if stars["empty"] and total != rubric.max_rating:
            return _off_scale(shown, rubric, other=True)
        return _Reading(full, None) if full in rubric.ratings else _off_scale(shown, rubric, other=True)
    got = _read_number(text, shown, rubric)
    return got if got is not None else _read_label(text, shown, rubric)


def read_type(value: object, rubric: Rubric) -> str | None:
    """Type ids as "1,3" (sorted, unique), "None" when the judge listed none, None if unreadable."""
    if not rubric.has_type or value is None:
        return None
    if isinstance(value, list):
        items: list[object] = value
    else:
        text = str(value).strip(_STRIP)
        if not text or re.fullmatch(r"none|n/?a|-+|\[\s*\]|no(?:ne)?\s+\w+.*", text, re.IGNORECASE):
            return "None"
        ids = re.findall(r"\d+", text)
        if not ids:
            lowered = text.lower()
            ids = [str(i) for i, label in rubric.type_labels if label.lower() in lowered]
        items = list(ids)
    out: set[int] = set()
    for item in items:
        try:
            num = int(str(item).strip(_STRIP))
        except ValueError:
            return None
        if num not in rubric.type_ids:
            return None
        out.add(num)
    return ",".join(str(i) for i in sorted(out)) if out else "None"


# Words that say a list is in some order other than the texts': a ranking, best first, places.
ORDER_MARK_RE = re.compile(
    r"\brank(?:ed|ing|ings|s)?\b|\b(?:best|worst|highest|lowest|strongest|weakest)[ \t\-]+(?:first|to|last)\b"
    r"|\bin\s+(?:descending|ascending|order\s+of)\b|\b(?:descending|ascending)\b|\bsorted\b|\bordered\s+by\b"
    r"|\b(?:1st|2nd|3rd|[4-9]th)\b|\b(?:first|second|third|last)\s+place\b|\bplace\s*[:#]|\bposition\s*[:#]"
    r"|\bwinner\b|\btop\s+(?:pick|choice)\b|#\s*1\b|\bbest\s*:|\bworst\s*:|\"(?:position|place|order)\"\s*:|\|\s*(?:position|place|order|standing)\s*\|",
    re.IGNORECASE,
)
# A word or sign every branch of ORDER_MARK_RE contains: an ASCII answer without any (lowered) is not searched.
_ORDER_MARK_WORDS = ("rank", "best", "worst", "highest", "lowest", "strongest", "weakest", "descending", "ascending",
                     "order", "sorted", "1st", "2nd", "3rd", "4th", "5th", "6th", "7th", "8th", "9th", "place",
                     "position", "winner", "top", "#", "standing")


def _order_mark(text: str) -> re.Match[str] | None:
    if text.isascii():
        lowered = text.lower()
        if not any(w in lowered for w in _ORDER_MARK_WORDS):
            return None
    return ORDER_MARK_RE.search(text)


class _Answer:
    """What one answer shows as a whole: another scale, texts numbered from 0."""

    def __init__(self, rubric: Rubric, n: int = 0):
        self.rubric = rubric
        self.n = n
        self.other_scale: list[str] = []
        self.from_zero = False
        self.no_position: str | None = None  # why ratings may not be taken in position order
        self.by_position = False  # some rating was taken by position

    def allow_position(self, text: str, named: bool) -> None:
        """Position order only for unnamed items with nothing marking another order (I2)."""
        if named:
            self.no_position = "the answer names texts, but its ratings are not tied to those names"
        elif (m := _order_mark(text)) is not None:
            self.no_position = f"unnamed ratings in an answer that marks an order ({m[0].strip()!r})"

    def read(self, value: object) -> _Reading:
        got = read_rating(value, self.rubric)
        if got.other_scale and got.error:
            self.other_scale.append(got.error)
        return got

    def name(self, k: int) -> int:
        if k == 0:
            self.from_zero = True
        return k

    def overrule(self, verdicts: list[Verdict]) -> list[Verdict]:
        """I3: another scale, or texts numbered from 0 -> no rating for any text, with the reason."""
        if self.from_zero:
            reason, example = "the answer numbers the texts from 0, so no rating can be attributed", ""
        elif self.other_scale:
            reason, example = OTHER_SCALE, f" ({self.other_scale[0]})"
        else:
            return verdicts
        out = []
        for v in verdicts:
            own = v.error if v.rating is None and v.error and v.error != NA else None
            out.append(Verdict(None, v.rationale, v.type, error=f"{reason}: {own}" if own else reason + example))
        return out


# ---------------------------------------------------------------------------------------------
# Text answers: first rewritten into canonical lines, then cut into blocks

_SEPARATORS = ":-\u2013\u2014.|)]("
# "4", "4/5", "4 out of 5", stars; optionally followed by " - prose" ("Text 1 - 4/5 - good").
_COMPACT_RATING_RE = re.compile(rf"[*_]*(?P<value>{RATING_VALUE})[*_]*[.!]?(?:\s+[-\u2013\u2014:|]\s+.*)?", re.IGNORECASE)
_TAG_RE = re.compile(rf"^\s*</?\s*(?:(?P<text>{TEXT_NAME}(?P<k>\d+))|(?P<field>rating|score|rationale|type))\s*>(?P<value>.*?)(?:</[^>]*>)?\s*$", re.IGNORECASE)
_FIELD_KIND = {"rating": "rating", "ratings": "rating", "score": "rating", "scores": "rating", "type": "type"}
# A rating said in a sentence about "it" / "this one" / a named text: "I would give it a 4", "I rate it 3/5".
_RATE_WORD_RE = re.compile(r"\b(?:rate|give|assign|score)\b", re.IGNORECASE)
_RATE_IT_RE = re.compile(
    rf"\bI(?:'d|\s+would|\s+will)?\s+(?:rate|give|assign|score)\s+(?:it|this(?:\s+(?:one|text|response|output|answer))?|{TEXT_NAME}\d+)"
    rf"\s+(?:(?:an?|as|at)\s+)?(?:(?:rating|score)\s+of\s+)?[*_]*(?P<value>{RATING_VALUE})[*_]*(?:\s*[.!,;]|\s*$)",
    re.IGNORECASE,
)
_BULLET_RE = re.compile(r"^[ \t]*(?:[-+*\u2022]|\d{1,2}[.)])[ \t]+")
_VALUE = r"(?:\d+(?:\s*/\s*\d+)?|[\u2605\u2b50]+[\u2606]*)"
_PAIR = rf"(?:output\s+for\s+)?{TEXT_NAME}(\d+)\s*(?:[:=\-\u2013]|\bis\b)?\s*(?:(?:rating|score)\s*[:=]?\s*)?({_VALUE})"
_MULTI_RE = re.compile(rf"^(?:(?:ratings?|scores?)\s*[:=\-]?\s*)?{_PAIR}(?:\s*(?:[,;|]|and)\s*{_PAIR})+\s*\.?$", re.IGNORECASE)
_NUMBER_LIST_RE = re.compile(r"^\d+(?:\s*[,;]\s*\d+)+\.?$")


_EMPHASIS = str.maketrans("", "", "*_`")
# Patterns used per line, compiled once (re's own cache costs a lookup per call).
_PAIR_RE = re.compile(_PAIR, re.IGNORECASE)
_NAMED_RE = re.compile(rf"\b{TEXT_NAME}(\d+)\b", re.IGNORECASE)
_DECORATED_RE = re.compile(r"^[ \t]*(?:\|[ \t]*)?(?:\d{1,2}[.)][ \t]+)?(?:[-+\u2022][ \t]+)?[*_#]")
_LABEL_SPLIT_RE = re.compile(r"\s+[-\u2013\u2014|:]\s+")
_NAMED_TAIL_RE = re.compile(rf"\b{TEXT_NAME}(\d+)\b(?P<tail>[^.;\n]*)", re.IGNORECASE)
_SAID_RE = re.compile(r"(?<![/\d.])\b(\d{1,2})\b(?!\.\d)")


def _plain(line: str) -> str:
    return line.translate(_EMPHASIS).strip()


def _field_kind(line: str) -> tuple[str, re.Match[str]] | None:
    m = FIELD_RE.match(line)
    return (_FIELD_KIND.get(m["name"].lower(), "rationale"), m) if m else None


def _canonical(line: str) -> list[str]:
    """One answer line -> the canonical lines it stands for (itself, most of the time)."""
    if is_quoted(line) or line == VOID:
        return [line]  # quoted material is never read
    plain = _plain(line).lstrip("-+\u2022 \t")
    if _MULTI_RE.match(plain):  # "Text 1: 4, Text 2: 2"
        return [x for k, v in _PAIR_RE.findall(plain) for x in (f"#### Output for Text {k}", f"Rating: {v}")]
    field = _field_kind(line)
    if field and field[1]["k"] is not None:  # "Rating for Text 3: 5" names its text
        return [f"#### Output for Text {field[1]['k']}", f"{field[1]['name']}: {field[1]['value']}"]
    if field and field[0] == "rating":
        value = _plain(field[1]["value"])
        if _NUMBER_LIST_RE.match(value):  # "Ratings: 4, 2, 5": n ratings in order
            return [f"Rating: {v}" for v in re.findall(r"\d+", value)]
        return [line]
    inline = inline_rating(line)
    if inline:  # "... prose. **Rating: 4**"; "Text 2: the rating is 3."
        named = HEADING_RE.match(_plain(inline["pre"]))
        if named and (named["rest"].lstrip(" \t")[:1] in tuple(_SEPARATORS) or not named["rest"].strip()):
            return [f"#### Output for Text {named['k']}", inline["pre"], f"Rating: {inline['value']}"]
        mentioned = {int(k) for k in _NAMED_RE.findall(inline["pre"])}
        if len(mentioned) == 1:  # "For Text 2, I would give a rating of 4.": a weak heading, a mention inside real blocks
            return [f"{_MENTION}{mentioned.pop()}", inline["pre"], f"Rating: {inline['value']}"]
        if mentioned:  # "Text 2 beats Text 3, which has a rating of 2": whose rating nobody can say
            return [inline["pre"]]
        return [inline["pre"], f"Rating: {inline['value']}"]
    said = _RATE_IT_RE.search(line) if _RATE_WORD_RE.search(line) else None
    if said:  # "Overall, I rate it 4." / "I'd give Text 2 a 4/5."
        mentioned = {int(k) for k in _NAMED_RE.findall(line)}
        if len(mentioned) > 1:
            return [line]  # whose rating it is, nobody can say
        value = f"Rating: {_plain(said['value'])}"
        return [f"{_MENTION}{mentioned.pop()}", line, value] if mentioned else [line, value]
    tag = _TAG_RE.match(line)
    if tag:  # <text_1> <rating>4</rating> </text_1>
        if tag["text"]:
            return [f"#### Output for Text {tag['k']}"] if not line.lstrip().startswith("</") else []
        return [f"{tag['field']}: {tag['value']}"] if not line.lstrip().startswith("</") else []
    return [line]


def _table(lines: list[str]) -> list[str] | None:
    """A markdown table with a rating column -> canonical lines, one block per row."""
    rows = [[c.strip(" *_`") for c in x.strip().strip("|").split("|")] for x in lines]
    header = [c.lower() for c in rows[0]]
    rating_col = next((i for i, c in enumerate(header) if re.search(r"rating|score", c)), None)
    if rating_col is None:
        return None
    # A column naming the texts wins over "#" / "No." / "id", which may hold ranks or positions.
    text_col = next((i for i, c in enumerate(header) if re.search(rf"\b(?:{NOUNS})", c)), None)
    if text_col is None:
        text_col = next((i for i, c in enumerate(header) if re.search(r"^#$|^no\.?$|^id$", c)), None)
    why_col = next((i for i, c in enumerate(header) if re.search(r"rationale|reason|explanation|justification|comment", c)), None)
    out: list[str] = []
    for row in rows[1:]:
        if all(re.fullmatch(r":?-{2,}:?|", c) for c in row) or len(row) <= rating_col:
            continue
        k = re.search(r"\d+", row[text_col]) if text_col is not None and len(row) > text_col else None
        if k:
            out.append(f"#### Output for Text {k[0]}")
        elif text_col is not None:
            out.append(VOID)  # a row naming its text in a way not understood: never read by position
        out.append(f"Rating: {row[rating_col]}")
        if why_col is not None and len(row) > why_col:
            out.append(f"Rationale: {row[why_col]}")
    return out


def canonical_lines(text: str) -> list[str]:
    """The answer's lines (the project's one line rule) with tables and one-line shapes rewritten."""
    out: list[str] = []
    lines = split_lines(text)
    i = 0
    while i < len(lines):
        j = i
        while j < len(lines) and lines[j].lstrip().startswith("|"):
            j += 1
        rewritten = _table(lines[i:j]) if j - i >= 2 else None
        if rewritten is not None:
            out += rewritten
            i = j
            continue
        for line in lines[i:max(j, i + 1)]:  # a table without a rating column is read line by line, once
            out += _canonical(line)
        i = max(j, i + 1)
    return out


_VOID_K = -1  # the block a VOID line opens: it belongs to no text
_MENTION = "\x00mention "  # canonical-only line: a rating line names text k in prose (never in real input)


def _is_label(text: str, rubric: Rubric) -> bool:
    lowered = text.strip(_STRIP).lower()
    return any(lowered == part.strip().lower() for _, label in rubric.scale for part in {label, *label.split(" / ")})


def _heading(line: str, rubric: Rubric) -> tuple[int, str | None, bool] | None:
    """(k, inline content, weak) when the line opens the block of text k.

    weak: a bulleted "- **Text 4:** prose" line, which is a mention inside another block whenever
    the answer also has real headings.
    """
    if line.startswith(_MENTION):
        return int(line[len(_MENTION):]), None, True
    if line == VOID:
        return _VOID_K, None, False
    m = HEADING_RE.match(line)
    if not m:
        return None
    decorated = bool(m["out"]) or bool(_DECORATED_RE.match(line))
    rest = m["rest"].lstrip(" \t*_")
    if rest and rest[0] not in _SEPARATORS:
        return None  # "Text 2 is better than..." is prose, not a heading
    inline = rest.lstrip(" \t*_" + _SEPARATORS).rstrip(" \t*_")
    k = int(m["k"])
    if inline and FIELD_RE.match(inline):
        return k, inline, False
    compact = _COMPACT_RATING_RE.fullmatch(inline) if inline else None
    if compact:
        return k, f"Rating: {compact['value']}", False
    label = _LABEL_SPLIT_RE.split(inline, maxsplit=1)[0] if inline else ""
    if label and _is_label(label, rubric):  # "Output for Text 1: Almost There", "Text 2: Partial Focus - misses"
        return k, f"Rating: {label}", False
    if inline and rest[0] == "(":
        return None  # "**Text 2** (rated 5) is stronger": prose about text 2 inside another block
    if inline and not decorated:
        return None  # a bare "Text 2: some sentence" in a rationale
    return k, inline or None, bool(inline) and bool(_BULLET_RE.match(line))


@dataclass
class _Block:
    k: int | None
    lines: list[str]


def _split_blocks(lines: list[str], answer: _Answer) -> list[_Block]:
    headings = [_heading(x, answer.rubric) for x in lines]
    strong = any(h is not None and not h[2] for h in headings)
    blocks = [_Block(None, [])]  # the preamble
    drop_rating = False  # the next rating line is about another text than the block's
    for line, h in zip(lines, headings):
        if h is None or (h[2] and strong):
            if line.startswith(_MENTION):
                drop_rating = h is not None and h[0] != blocks[-1].k
            elif drop_rating and (f := _field_kind(line)) and f[0] == "rating":
                drop_rating = False  # "compared with Text 2, whose rating is 5" inside text 1's block
            else:
                blocks[-1].lines.append(line)
            continue
        k, inline, _ = h
        blocks.append(_Block(k if k == _VOID_K else answer.name(k), [inline] if inline else []))
    return blocks


@dataclass
class _Fields:
    readings: list[_Reading]
    rationale: str | None
    type: str | None


def _read_fields(lines: list[str], answer: _Answer) -> _Fields:
    readings: list[_Reading] = []
    rationales: list[list[str]] = []
    types: list[str | None] = []
    current: str | None = None
    pending_rating = False
    after_rating = -1  # index of the first rationale that follows a rating
    for line in lines:
        field = _field_kind(line)
        if field:
            kind, m = field
            value = m["value"].strip()
            current, pending_rating = kind, False
            if kind == "rating":
                if value:
                    readings.append(answer.read(value))
                else:
                    pending_rating = True  # "Rating:" with the number on the next line
            elif kind == "type":
                types.append(read_type(value, answer.rubric))
            else:
                if readings and after_rating < 0:
                    after_rating = len(rationales)
                rationales.append([value] if value else [])
            continue
        if pending_rating and line.strip():
            readings.append(answer.read(line.strip()))
            pending_rating = False
            continue
        if current == "rationale":
            rationales[-1].append(line)
    if pending_rating:
        readings.append(_Reading(None, "empty rating"))
    # The rationale that explains the rating (helpfulness/truthfulness may also give one for the type).
    chosen = rationales[after_rating] if after_rating >= 0 else (rationales[0] if rationales else None)
    rationale = "\n".join(chosen).strip() if chosen is not None else None
    typ = next((t for t in types if t is not None), None)
    return _Fields(readings, rationale or None, typ)


def _resolve(k: int, readings: list[_Reading], n_blocks: int) -> _Reading:
    usable = [r for r in readings if r.usable]
    if not readings:
        return _Reading(None, f"no rating in the block for text {k}")
    if not usable:
        return readings[0]
    values = sorted({r.rating if r.rating is not None else NA for r in usable}, key=str)
    if len(values) > 1:
        where = f"{n_blocks} blocks" if n_blocks > 1 else "one block"
        return _Reading(None, f"conflicting ratings for text {k} in {where}: {', '.join(map(str, values))}")
    return usable[0]


def _verdict(reading: _Reading, fields: _Fields | None) -> Verdict:
    return Verdict(
        rating=reading.rating,
        rationale=fields.rationale if fields else None,
        type=fields.type if fields else None,
        error=reading.error,
    )


def _parse_text(text: str, n: int, answer: _Answer) -> list[Verdict]:
    # NUL is reserved for the parser's own marker lines (VOID, _MENTION).
    lines = canonical_lines("\n".join(x if x == VOID else x.replace("\x00", "") for x in split_lines(text)))
    blocks = _split_blocks(lines, answer)
    headed = [b for b in blocks if b.k is not None]
    if not headed:
        return _parse_headless(lines, n, answer)
    out: list[Verdict] = []
    for k in range(1, n + 1):
        mine = [b for b in headed if b.k == k]
        if not mine:
            out.append(Verdict(None, None, error=f"no block for text {k}"))
            continue
        parts = [_read_fields(b.lines, answer) for b in mine]
        reading = _resolve(k, [r for p in parts for r in p.readings], len(mine))
        merged = _Fields(
            [],
            next((p.rationale for p in parts if p.rationale), None),
            next((p.type for p in parts if p.type is not None), None),
        )
        out.append(_verdict(reading, merged))
    return _revised(lines, out)


# "Correction: Text 2 should be 4", "Actually, Text 1 deserves a 3": a rating changed in prose. Such a
# line is not read as a rating, but a text whose rating it contradicts is left unread.
_REVISION_RE = re.compile(
    r"\b(?:correct(?:ion|ed|ing)?|revis\w*|updat\w*|actually|should\s+(?:be|get|have|receive)|instead|"
    r"second\s+thought|reconsider\w*|adjust\w*|amend\w*|chang\w*|lower\w*|rais\w*|bump\w*)\b",
    re.IGNORECASE,
)


# A stem every branch of _REVISION_RE starts with: lines of an ASCII answer without any (lowered) are not searched.
_REVISION_STEMS = ("correct", "revis", "updat", "actually", "should", "instead", "second", "reconsider", "adjust",
                   "amend", "chang", "lower", "rais", "bump")


def _revised(lines: list[str], verdicts: list[Verdict]) -> list[Verdict]:
    whole = "\n".join(lines)
    if whole.isascii() and not any(stem in whole.lower() for stem in _REVISION_STEMS):
        return verdicts
    for line in lines:
        if is_quoted(line) or not _REVISION_RE.search(line):
            continue
        for m in _NAMED_TAIL_RE.finditer(line):
            k = int(m[1])
            said = {int(x) for x in _SAID_RE.findall(m["tail"])}
            if 1 <= k <= len(verdicts) and (v := verdicts[k - 1]).rating is not None and said - {v.rating}:
                why = f"the answer revises text {k}'s rating in prose ({line.strip()[:60]!r})"
                verdicts[k - 1] = Verdict(None, v.rationale, v.type, error=f"conflicting ratings: {why}")
    return verdicts


# A heading or a bold label line: "## Evaluation of (c)", "**Candidate X**", "### 1.": it names an item.
# Also a short label line: "Assistant B", "Model 2:", "Candidate #3". Two or more of them label the
# items (one alone may be a preamble: "Here are my ratings:").
_LABEL_LINE_RE = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]+\S|\*\*[^*\n]{1,80}\*\*:?[ \t]*$|__[^_\n]{1,80}__:?[ \t]*$"
    r"|[^\W\d_][\w'\- ]{0,30}[ \t]*#?[ \t]*(?:[A-Z]|\d{1,2})[ \t]*[:.)]?[ \t]*$|[^\n:]{1,40}:[ \t]*$)"
)


def _parse_headless(lines: list[str], n: int, answer: _Answer) -> list[Verdict]:
    starts = [i for i, line in enumerate(lines) if (f := _field_kind(line)) and f[0] == "rating"]
    if n == 1 and starts:
        fields = _read_fields(lines, answer)
        return [_verdict(_resolve(1, fields.readings, 1), fields)]
    if starts and len(starts) == n and answer.no_position:
        return [Verdict(None, None, error=answer.no_position) for _ in range(n)]
    if n > 1 and starts and len(starts) == n and sum(bool(_LABEL_LINE_RE.match(x)) for x in lines) >= 2:
        why = "ratings under headings that name no text the parser can resolve"
        return [Verdict(None, None, error=why) for _ in range(n)]  # the items carry names: not by position
    if starts and len(starts) == n:
        answer.by_position = n > 1
        bounds = [0, *starts[1:], len(lines)]
        out = []
        for k in range(n):
            fields = _read_fields(lines[bounds[k]:bounds[k + 1]], answer)
            out.append(_verdict(_resolve(k + 1, fields.readings, 1), fields))
        return out
    reason = (
        f"no 'Output for Text k' blocks, and {len(starts)} rating lines for {n} texts"
        if starts else "no 'Output for Text k' blocks and no ratings in the judge's answer"
    )
    return [Verdict(None, None, error=reason) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# JSON answers

class _Obj(dict):  # type: ignore[type-arg]
    """A JSON object that remembers repeated keys (json keeps only the last one)."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        self.pairs = pairs


# strict=False: llama.cpp's JSON grammar lets raw newlines into strings, which strict JSON forbids.
_DECODER = json.JSONDecoder(object_pairs_hook=_Obj, strict=False)
_TEXT_KEY_RE = re.compile(r"^\s*(?:(?:text|response|output|answer)[\s_\-#]*)?(\d+)\s*$", re.IGNORECASE)
_KEY_SCAN_RE = re.compile(r'"(?:text[ _\-]?)?(\d+)"\s*:\s*(?=\{)', re.IGNORECASE)
_LIST_KEYS = ("verdicts", "ratings", "results", "evaluations", "texts", "outputs", "responses", "scores")
_NAME_KEYS = ("text", "text_id", "text_number", "id", "index", "response", "output", "answer", "name",
              "response_id", "output_id", "completion", "label", "candidate")
_NAMES_A_TEXT_RE = re.compile(rf'"\s*{TEXT_NAME}\d+\s*"\s*:', re.IGNORECASE)


_RATING_KEY_RE = re.compile(r"^(?:(?:overall|final|total|the)[ _\-]?)?(?:rating|score)(?:[ _\-]?(?:value|1_?5|\(1-5\)))?$")


def _rating_of(obj: dict[str, Any]) -> tuple[bool, Any]:
    """The item's rating under any key judges use: rating, Score, overall_rating, final-score."""
    for key, value in obj.items():
        if isinstance(key, str) and _RATING_KEY_RE.match(key.strip().lower()):
            return True, value
    return False, None


def _get(obj: dict[str, Any], *names: str) -> tuple[bool, Any]:
    """Case-insensitive lookup: ("Rating": 4 is a rating too)."""
    for key, value in obj.items():
        if isinstance(key, str) and key.strip().lower() in names:
            return True, value
    return False, None


def _json_values(text: str) -> list[tuple[Any, int, int]]:
    """Every top-level JSON object or array in the text (trailing commas forgiven), with its span."""
    return json_values(text, _DECODER)[0]


@dataclass
class _Claims:
    """Verdict items found in JSON: by the text they name, or by position (unnamed)."""

    named: dict[int, list[Any]]
    positional: list[Any]

    def add(self, k: int, item: Any) -> None:
        self.named.setdefault(k, []).append(item)


def _item_name(item: Any, n: int) -> int | None:
    if not isinstance(item, dict):
        return None
    found, value = _get(item, *_NAME_KEYS)
    return name_value(value, n) if found else None


def _claims_from_list(items: list[Any], claims: _Claims, answer: _Answer) -> None:
    names = [_item_name(i, answer.n) for i in items]
    if any(k is not None for k in names):
        for k, item in zip(names, items):
            if k is not None:
                claims.add(answer.name(k), item)
        return
    if any(isinstance(i, dict) and any(isinstance(key, str) and _ID_KEY_RE.search(key.lower()) for key in i) for i in items):
        answer.no_position = answer.no_position or "the JSON items carry names the parser cannot resolve"
        return  # {"response_index": 0, ...}: named, but not in a way we can tie to a text
    if all(isinstance(i, (dict, int, float, str)) or i is None for i in items):
        claims.positional.append(items)


# A JSON key that names an item (unknown to _NAME_KEYS): such items are never read by position.
_ID_KEY_RE = re.compile(
    r"(?:^|[_\- ])(?:id|idx|index|num|number|no|name|label|key|letter|text|response|output|answer|candidate|option"
    r"|completion|generation|model|assistant|item)(?:$|[_\- ])"
)


def _claims_from_value(value: Any, claims: _Claims, answer: _Answer) -> None:
    if isinstance(value, list):
        _claims_from_list(value, claims, answer)
        return
    if not isinstance(value, dict):
        return
    pairs = value.pairs if isinstance(value, _Obj) else list(value.items())
    keyed = [(int(m[1]), v) for key, v in pairs if isinstance(key, str) and (m := _TEXT_KEY_RE.match(key))]
    if keyed:
        for k, item in keyed:
            claims.add(answer.name(k), item)
        return
    if any(isinstance(v, dict) and _rating_of(v)[0] for _, v in pairs) and not any(
        isinstance(key, str) and key.strip().lower() in _LIST_KEYS for key, _ in pairs
    ):
        answer.no_position = "the JSON items carry names the parser cannot resolve"  # keys we cannot resolve
    for key, inner in pairs:
        if isinstance(key, str) and key.strip().lower() in _LIST_KEYS and isinstance(inner, (list, dict)):
            _claims_from_value(inner, claims, answer)
            return
    if _rating_of(value)[0]:
        k = _item_name(value, answer.n)
        if k is not None:
            claims.add(answer.name(k), value)
        else:
            claims.positional.append([value])
    elif len(pairs) == 1 and isinstance(pairs[0][1], (dict, list)):
        _claims_from_value(pairs[0][1], claims, answer)  # {"evaluation": {"text_1": ...}}


def _json_reading(k: int, item: Any, answer: _Answer) -> tuple[_Reading, str | None, str | None]:
    if isinstance(item, dict):
        found, rating = _rating_of(item)
        reading = answer.read(rating) if found else _Reading(None, f"no rating in the JSON verdict for text {k}")
        _, why = _get(item, "rationale", "reason", "reasoning", "explanation", "justification")
        _, typ = _get(item, "type", "types")
        return reading, why if isinstance(why, str) and why.strip() else None, read_type(typ, answer.rubric)
    if isinstance(item, (list, tuple)):
        return _Reading(None, f"the JSON verdict for text {k} is not an object"), None, None
    return answer.read(item), None, None  # a bare rating: {"text_1": 4} or [4, 2]


def _verdicts_from_claims(claims: _Claims, n: int, answer: _Answer, cut: str) -> list[Verdict]:
    named = dict(claims.named)
    if not named and answer.no_position and claims.positional:
        return [Verdict(None, None, error=answer.no_position) for _ in range(n)]
    if not named:
        full = [p for p in claims.positional if len(p) == n]
        if not full:
            sizes = sorted({len(p) for p in claims.positional})
            why = f"{' or '.join(map(str, sizes))} unnamed verdicts for {n} texts"
            return [Verdict(None, None, error=why) for _ in range(n)]
        answer.by_position = n > 1
        for items in full:
            for k, item in enumerate(items, start=1):
                named.setdefault(k, []).append(item)
    out = []
    for k in range(1, n + 1):
        if k not in named:
            out.append(Verdict(None, None, error=f"{cut} for text {k}"))
            continue
        read = [_json_reading(k, item, answer) for item in named[k]]
        reading = _resolve(k, [r for r, _, _ in read], len(read)) if len(read) > 1 else read[0][0]
        why = next((w for _, w, _ in read if w), None)
        typ = next((t for _, _, t in read if t is not None), None)
        out.append(Verdict(reading.rating, why, typ, error=reading.error))
    return out


def _scan_keys(text: str, answer: _Answer) -> _Claims:
    """Every complete `"text_k": {...}` object, for answers cut off or broken elsewhere."""
    claims = _Claims({}, [])
    spans, _ = bracket_spans(text)
    for m in _KEY_SCAN_RE.finditer(text):
        end = spans.get(m.end())
        ok, value = decode_json(text[m.end():end], _DECODER) if end else (False, None)
        if ok:
            claims.add(answer.name(int(m[1])), value)
    return claims


def _scan_objects(text: str, answer: _Answer) -> _Claims:
    """Every flat object holding a rating, when no text key was found at all."""
    claims = _Claims({}, [])
    unnamed = []
    for m in re.finditer(r"\{[^{}]*\}", text):
        ok, value = decode_json(m.group(0), _DECODER)
        if ok and isinstance(value, dict) and _rating_of(value)[0]:
            k = _item_name(value, answer.n)
            if k is not None:
                claims.add(answer.name(k), value)
            elif _KEYED_BEFORE_RE.search(text, max(0, m.start() - 200), m.start()):
                answer.no_position = "the JSON items carry names the parser cannot resolve"  # {"response_b": {...}}
            else:
                unnamed.append(value)
    claims.positional = [unnamed] if unnamed else []
    return claims


_KEYED_BEFORE_RE = re.compile(r'"[^"\n]{1,60}"\s*:\s*$')


def _parse_json(text: str, n: int, answer: _Answer) -> list[Verdict] | None:
    text = "\n".join(x for x in split_lines(text) if not is_quoted(x))
    claims = _Claims({}, [])
    for value, _, _ in _json_values(text):
        _claims_from_value(value, claims, answer)
    if _NAMES_A_TEXT_RE.search(text) or QUOTED in text:
        claims.positional = []  # I2: an answer that names texts (or pasted one) is never read by position
    if answer.no_position and claims.positional and not claims.named:
        return [Verdict(None, None, error=answer.no_position) for _ in range(n)]
    cut = "JSON answer cut off or invalid before the verdict"
    if not claims.named:
        scanned = _scan_keys(text, answer)
        if scanned.named:
            return _verdicts_from_claims(scanned, n, answer, cut)
    if claims.named or claims.positional:
        return _verdicts_from_claims(claims, n, answer, "no verdict in the JSON answer")
    if re.search(r"[\[{]", text) and QUOTED not in text:
        scanned = _scan_objects(text, answer)
        if scanned.named or scanned.positional:
            return _verdicts_from_claims(scanned, n, answer, cut)
    return None


# ---------------------------------------------------------------------------------------------


def _mostly_json(text: str) -> bool:
    """A text answer that is JSON (at least half of it), not prose quoting some JSON."""
    unquoted = "\n".join(x for x in split_lines(text) if not is_quoted(x))
    covered = sum(end - start for _, start, end in _json_values(unquoted))
    return covered * 2 >= len(unquoted.strip())


def _usable(verdicts: list[Verdict]) -> bool:
    return any(v.rating is not None or v.error == NA for v in verdicts)


def _parse(text: str, n: int, answer: _Answer, structured: bool) -> list[Verdict]:
    if structured:
        got = _parse_json(text, n, answer)
        if got is not None:
            return got
        got = _parse_text(text, n, answer)
        if _usable(got):
            return got
        return [Verdict(None, None, error="no JSON object in the judge's answer") for _ in range(n)]
    got = _parse_text(text, n, answer)
    if not _usable(got) and _mostly_json(text):
        as_json = _parse_json(text, n, _Answer(answer.rubric))
        if as_json is not None and _usable(as_json):
            return as_json
    return got


def parse_verdicts(
    text: str | None,
    n: int,
    rubric: Rubric,
    *,
    structured: bool,
    messages: list[dict[str, str]] | None = None,
    generations: list[str] | None = None,
) -> list[Verdict]:
    """Exactly n verdicts, in the order the texts were shown, whatever the judge wrote.

    `messages` (the judge's prompt as sent) and/or `generations` (the texts as shown) let the parser
    remove everything the answer repeats from them before reading it (see
    poll_assets.rubrics.echo); without them only the prompt's fixed template and fenced regions
    are removed.
    """
    if n < 0:
        raise ValueError(f"parse_verdicts: n must be >= 0, got {n}")
    if text is None or not text.strip():
        return [Verdict(None, None, error="empty judge answer") for _ in range(n)]
    if len(text) > MAX_ANSWER_CHARS:
        return [Verdict(None, None, error=f"{TOO_LONG} ({len(text):,} > {MAX_ANSWER_CHARS:,} characters)") for _ in range(n)]
    own = strip_untrusted(text, rubric, n, messages=messages, generations=generations)
    if not own.strip():
        return [Verdict(None, None, error="the judge's answer only repeats its prompt") for _ in range(n)]
    try:
        return _read_own(own, n, rubric, structured)
    except Exception as exc:  # a bug must cost the call's ratings, never the run: unread, with the reason
        return [Verdict(None, None, error=f"{PARSER_ERROR}: {type(exc).__name__}") for _ in range(n)]


def _read_own(own: str, n: int, rubric: Rubric, structured: bool) -> list[Verdict]:
    final, why = final_answer(own)
    if why:
        return [Verdict(None, None, error=why) for _ in range(n)]
    names = resolve_names(final, n)
    if names.problem:
        return [Verdict(None, None, error=names.problem) for _ in range(n)]
    answer = _Answer(rubric, n)
    answer.allow_position(names.text, names.named)
    got = answer.overrule(_parse(names.text, n, answer, structured))
    mode = "position" if answer.by_position else ("names" if names.text != final else "layout")
    for v in got:
        if v.rating is not None or v.error == NA:
            v.read_by = mode
    return got


_ASKED_NAME_RE = re.compile(rf"\b{TEXT_NAME}\d+\b", re.IGNORECASE)


def reading_mode(answer: str | None, n: int) -> str:
    """How an answer ties its ratings to texts, from its text alone (no rubric needed, so a stored
    answer can be re-examined): "layout" (Text k / text_k as asked), "names" (another naming scheme),
    "position" (no names), or "none" (no final answer, or names that do not resolve)."""
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return "none"
    final, why = final_answer(answer)
    names = resolve_names(final, n) if not why else None
    if names is None or names.problem:
        return "none"
    if names.text != final:
        return "names"
    return "layout" if _ASKED_NAME_RE.search(final) else "position"


def reading_report(read_by: Iterable[str | None], verdicts: Iterable[Verdict]) -> dict[str, int]:
    """How a judge's verdicts were read: by the asked layout, by names, by position (or by a repair),
    unread by reason. `read_by` holds one mode per verdict (Verdict.read_by or reading_mode)."""
    counts: Counter[str] = Counter()
    for mode, v in zip(read_by, verdicts):
        if v.kind in ("ok", "na"):
            counts[f"read_by_{mode or 'unknown'}"] += 1
        elif (reason := failure_reason(v)) is not None:
            counts[f"unread/{reason}"] += 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------------------------------------
# Parse failures and the repair re-ask (pure parts; the judging asset calls them)

# A parse failure: the judge answered, but a text's rating could not be read from the answer.
# Failed judge calls, failed generations and honesty's N/A are not parse failures.
_REASONS = (  # (substring of the error, reason class), first match wins
    ("empty judge answer", "empty answer"),
    (TOO_LONG, "answer too long"),
    (PARSER_ERROR, "parser error"),
    (NO_FINAL, "no final answer"),
    ("more than one scheme", "texts named ambiguously"),
    ("may be a letter or a roman", "texts named ambiguously"),
    ("that is not among the", "texts named ambiguously"),
    ("but its ratings are not tied", "ratings not tied to names"),
    ("carry names the parser cannot resolve", "ratings not tied to names"),
    ("marks an order", "unnamed ratings in another order"),
    ("under headings that name no text", "ratings not tied to names"),
    ("nested deeper", "JSON nested too deep"),
    ("only repeats its prompt", "echo only"),
    ("numbers the texts from 0", "texts numbered from 0"),
    (OTHER_SCALE, "another scale"),
    ("conflicting ratings", "conflicting ratings"),
    ("unnamed verdicts for", "unnamed ratings, wrong count"),
    ("rating lines for", "unnamed ratings, wrong count"),
    ("no 'Output for Text k' blocks and no ratings", "no ratings"),
    ("no JSON object", "no JSON"),
    ("cut off or invalid", "JSON cut off or invalid"),
    ("no block for text", "text not rated"),
    ("no verdict in the JSON answer", "text not rated"),
    ("no rating in the", "text not rated"),
    ("empty rating", "text not rated"),
    ("ambiguous rating", "ambiguous rating"),
    ("is not allowed for", "N/A not allowed"),
    ("is not on the", "rating off the scale"),
    ("is not an object", "JSON verdict malformed"),
)


def failure_reason(verdict: Verdict) -> str | None:
    """The reason class of a parse failure ("conflicting ratings", ...), None if not a parse failure."""
    if verdict.kind != "parse_failed":
        return None
    error = (verdict.error or "").split(" (repair: ")[0]  # a failed repair keeps the first reason
    return next((reason for part, reason in _REASONS if part in error), "other")


def parse_failures_by_reason(verdicts: Iterable[Verdict]) -> dict[str, int]:
    """How many texts could not be read, by reason class, most frequent first."""
    counts = Counter(r for v in verdicts if (r := failure_reason(v)) is not None)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def unread_texts(verdicts: list[Verdict]) -> dict[int, str]:
    """1-based text number -> error, for the texts a repair should ask about (parse failures only)."""
    return {k: v.error or "no rating" for k, v in enumerate(verdicts, start=1) if v.kind == "parse_failed"}


def merge_repair(first: list[Verdict], repair: list[Verdict]) -> list[Verdict]:
    """The first answer's verdicts, with parse failures filled from the repair answer.

    A repair fills a text only if the first answer left it unread and the repair gives a rating
    (or honesty's N/A); it never replaces a rating, an N/A, or a failed call or generation. A text
    still unread keeps the first reason, with the repair's appended.
    """
    if len(first) != len(repair):
        raise ValueError(f"merge_repair: {len(first)} first verdicts but {len(repair)} repair verdicts")
    out = []
    for a, b in zip(first, repair):
        if a.kind != "parse_failed":
            out.append(a)
        elif b.kind in ("ok", "na"):
            out.append(b)
        else:
            out.append(Verdict(None, a.rationale, a.type, error=f"{a.error} (repair: {b.error})"))
    return out


def repair_summary(first: list[Verdict], merged: list[Verdict]) -> dict[str, Any]:
    """Per judge call: texts asked again, texts recovered, and parse failures by reason before/after."""
    asked = len(unread_texts(first))
    return {
        "repair_asked": asked,
        "repair_recovered": sum(a.kind == "parse_failed" and b.kind in ("ok", "na") for a, b in zip(first, merged)),
        "parse_failures_before": parse_failures_by_reason(first),
        "parse_failures_after": parse_failures_by_reason(merged),
    }


# ---------------------------------------------------------------------------------------------
# Position bias


def presentation_order(prompt_id: str, judge: str, n: int, seed: int, shuffle: bool = True) -> list[int]:
    """The order texts are shown to one judge for one prompt: order[k] = original index at position k.

    Deterministic in (prompt_id, judge, seed), so re-runs and caches see the same prompt, while
    different judges and prompts see different orders.
    """
    order = list(range(n))
    if shuffle and n > 1:
        digest = hashlib.sha256(json.dumps([seed, prompt_id, judge]).encode("utf-8")).digest()
        random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


def restore_order(shown: list[Verdict], order: list[int]) -> list[Verdict]:
    """Verdicts given in presentation order -> verdicts in the generations' original order."""
    if sorted(order) != list(range(len(order))):
        raise ValueError(f"order {order} is not a permutation of 0..{len(order) - 1}")
    if len(shown) != len(order):
        raise ValueError(f"{len(shown)} verdicts for an order of {len(order)} texts")
    restored: list[Verdict | None] = [None] * len(order)
    for position, original in enumerate(order):
        restored[original] = shown[position]
    return [v for v in restored if v is not None]
