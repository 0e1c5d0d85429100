"""Reading a judge's answer into one Verdict per text, and the position-bias controls.

`parse_verdicts` always returns exactly n verdicts, in the order the texts were shown. A text the
judge did not rate gets rating None and the reason in `error`. Rules, in the order they apply:

Text answers (`structured=False`)
- Blocks start at a heading line for text k: `#### Output for Text k`, `**Text k:**`, `Text k`
  (markdown marks, bullets and a trailing colon are tolerated). Anything before the first heading
  is ignored; headings for k outside 1..n start a block that is ignored.
- Inside a block, `Rating:` / `Score:` (also `**Rating:** 4`, `Rating: 4/5`, `Rating: four`,
  `Rating: Almost There` by label) gives the rating; `Rationale:` (or Reason/Explanation/
  Justification) the rationale, blank lines included; `Type:` the type ids.
- Several ratings for one text, in one block or in duplicated blocks: kept if they all agree,
  otherwise the text gets None ("conflicting ratings"). A duplicated or echoed block therefore can
  spoil a rating, never change it to another value.
- Lines starting with ">" are never read as headings or fields: that is how texts quoted into the
  prompt are marked (see poll_assets.rubrics.answer_format).
- No headings at all: when the answer has exactly n rating lines they are taken in order (and for
  n == 1 any rating lines at all); otherwise every text gets None.
- A text answer that contains no heading and no rating but a JSON object is read as JSON.

JSON answers (`structured=True`)
- The first JSON value in the answer is read (code fences and trailing text are ignored). Keys
  `text_1`..`text_n` map to texts; a list (top level, or under "verdicts"/"ratings"/"results")
  maps by position.
- A truncated or invalid answer is scanned key by key: every complete `"text_k": {...}` object is
  kept, the rest get None with the reason.
- An answer with no JSON at all falls back to the text rules.

Ratings outside the rubric's scale, fractions ("3.5"), ranges ("3-4"), another denominator ("4/10")
and unknown words are rejected with the reason. Honesty's N/A gives rating None with error "N/A".
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from typing import Any

from poll_assets.rubrics.answer_format import FIELD_RE, HEADING_RE
from poll_assets.rubrics.ultrafeedback import Rubric

NA = "N/A"
JUDGE_FAILED = "judge call failed"
GENERATION_FAILED = "generation failed"


@dataclass
class Verdict:
    rating: int | None
    rationale: str | None
    type: str | None = None  # normalized type ids "1,3", "None" when the judge listed none
    error: str | None = None  # why rating is None

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
        return asdict(self)


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
_SCALE_NOTE_RE = re.compile(r"^\s*[(\[]\s*\d+\s*(?:-|\u2013|to)\s*\d+\s*[)\]]\s*:?\s*")  # "Rating (1-5): 4"


@dataclass(frozen=True)
class _Reading:
    rating: int | None
    error: str | None  # NA for honesty's N/A

    @property
    def usable(self) -> bool:
        return self.rating is not None or self.error == NA


def _num(token: str) -> float:
    word = _WORDS.get(token.lower())
    return float(word) if word is not None else float(token)


def _scale(rubric: Rubric) -> str:
    return f"{rubric.min_rating}-{rubric.max_rating}"


def read_rating(value: object, rubric: Rubric) -> _Reading:
    """One rating value as the judge wrote it -> an integer on the scale, N/A, or the reason."""
    if value is None:
        return _Reading(None, NA) if rubric.allows_na else _Reading(None, "rating is null")
    if isinstance(value, bool):
        return _Reading(None, f"rating {json.dumps(value)!r} is not on the {_scale(rubric)} scale")
    if isinstance(value, (int, float)):
        value = repr(value)
    raw = _SCALE_NOTE_RE.sub("", str(value), count=1)
    text = raw.strip(_STRIP)
    shown = raw.strip()[:40]
    if not text:
        return _Reading(None, "empty rating")
    if _NA_RE.match(text):
        if rubric.allows_na:
            return _Reading(None, NA)
        return _Reading(None, f"N/A is not allowed for {rubric.aspect}")
    m = _NUM_RE.match(text)
    if m:
        if _RANGE_RE.match(text[m.end():]):
            return _Reading(None, f"ambiguous rating {shown!r}")
        num = _num(m["num"])
        if m["den"] is not None and _num(m["den"]) != rubric.max_rating:
            return _Reading(None, f"rating {shown!r} is not on the {_scale(rubric)} scale")
        if num.is_integer() and int(num) in rubric.ratings:
            return _Reading(int(num), None)
        return _Reading(None, f"rating {shown!r} is not on the {_scale(rubric)} scale")
    lowered = text.lower()
    matches = [(len(label), r) for r, label in rubric.scale if lowered.startswith(label.lower())]
    if matches:
        return _Reading(max(matches)[1], None)  # the longest label wins ("Correct but Uncertain")
    return _Reading(None, f"rating {shown!r} is not on the {_scale(rubric)} scale")


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


# ---------------------------------------------------------------------------------------------
# Text answers

_SEPARATORS = ":-\u2013\u2014.|)]("
_COMPACT_RATING_RE = re.compile(r"\d+(?:\s*(?:/|out\s+of)\s*\d+)?[.!]?", re.IGNORECASE)
_FIELD_KIND = {"rating": "rating", "score": "rating", "type": "type"}


def _heading(line: str) -> tuple[int, str | None] | None:
    """(k, inline content) when the line opens the block of text k."""
    m = HEADING_RE.match(line)
    if not m:
        return None
    decorated = bool(m["out"]) or bool(re.match(r"^[ \t]*(?:[-+\u2022][ \t]+)?[*_#]", line))
    rest = m["rest"].lstrip(" \t*_")
    if rest and rest[0] not in _SEPARATORS:
        return None  # "Text 2 is better than..." is prose, not a heading
    inline = rest.lstrip(" \t*_" + _SEPARATORS).rstrip(" \t*_")
    if inline and FIELD_RE.match(inline):
        return int(m["k"]), inline
    if inline and _COMPACT_RATING_RE.fullmatch(inline):
        return int(m["k"]), f"Rating: {inline}"
    if inline and not decorated:
        return None  # a bare "Text 2: some sentence" in a rationale
    return int(m["k"]), None


@dataclass
class _Block:
    k: int | None
    lines: list[str]


def _split_blocks(lines: list[str]) -> list[_Block]:
    blocks = [_Block(None, [])]  # the preamble
    for line in lines:
        h = _heading(line)
        if h is None:
            blocks[-1].lines.append(line)
            continue
        k, inline = h
        blocks.append(_Block(k, [inline] if inline else []))
    return blocks


@dataclass
class _Fields:
    readings: list[_Reading]
    rationale: str | None
    type: str | None


def _read_fields(lines: list[str], rubric: Rubric) -> _Fields:
    readings: list[_Reading] = []
    rationales: list[list[str]] = []
    types: list[str | None] = []
    current: str | None = None
    pending_rating = False
    after_rating = -1  # index of the first rationale that follows a rating
    for line in lines:
        m = FIELD_RE.match(line)
        if m:
            kind = _FIELD_KIND.get(m["name"].lower(), "rationale")
            value = m["value"].strip()
            current, pending_rating = kind, False
            if kind == "rating":
                if value:
                    readings.append(read_rating(value, rubric))
                else:
                    pending_rating = True  # "Rating:" with the number on the next line
            elif kind == "type":
                types.append(read_type(value, rubric))
            else:
                if readings and after_rating < 0:
                    after_rating = len(rationales)
                rationales.append([value] if value else [])
            continue
        if pending_rating and line.strip():
            readings.append(read_rating(line.strip(), rubric))
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


def _parse_text(text: str, n: int, rubric: Rubric) -> list[Verdict]:
    lines = text.splitlines()
    blocks = _split_blocks(lines)
    headed = [b for b in blocks if b.k is not None]
    if not headed:
        return _parse_headless(lines, n, rubric)
    out: list[Verdict] = []
    for k in range(1, n + 1):
        mine = [b for b in headed if b.k == k]
        if not mine:
            out.append(Verdict(None, None, error=f"no block for text {k}"))
            continue
        parts = [_read_fields(b.lines, rubric) for b in mine]
        reading = _resolve(k, [r for p in parts for r in p.readings], len(mine))
        merged = _Fields(
            [],
            next((p.rationale for p in parts if p.rationale), None),
            next((p.type for p in parts if p.type is not None), None),
        )
        out.append(_verdict(reading, merged))
    return out


def _parse_headless(lines: list[str], n: int, rubric: Rubric) -> list[Verdict]:
    starts = [i for i, line in enumerate(lines) if (m := FIELD_RE.match(line)) and _FIELD_KIND.get(m["name"].lower()) == "rating"]
    if n == 1 and starts:
        fields = _read_fields(lines, rubric)
        return [_verdict(_resolve(1, fields.readings, 1), fields)]
    if starts and len(starts) == n:
        bounds = [0, *starts[1:], len(lines)]
        out = []
        for k in range(n):
            fields = _read_fields(lines[bounds[k]:bounds[k + 1]], rubric)
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
        seen: dict[str, list[Any]] = {}
        for key, value in pairs:
            seen.setdefault(key, []).append(value)
        self.repeats: dict[str, list[Any]] = {k: v for k, v in seen.items() if len(v) > 1}


# strict=False: llama.cpp's JSON grammar lets raw newlines into strings, which strict JSON forbids.
_DECODER = json.JSONDecoder(object_pairs_hook=_Obj, strict=False)
_TEXT_KEY_RE = re.compile(r"^\s*text[\s_\-]*(\d+)\s*$", re.IGNORECASE)
_KEY_SCAN_RE = re.compile(r'"text[ _\-]?(\d+)"\s*:\s*(?=\{)', re.IGNORECASE)
_LIST_KEYS = ("verdicts", "ratings", "results", "evaluations", "texts", "outputs")


def _first_json(text: str) -> tuple[Any, bool]:
    """The first complete JSON object or array in the text, and whether any '{'/'[' was seen."""
    seen = False
    for m in re.finditer(r"[\[{]", text):
        seen = True
        try:
            value, _ = _DECODER.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, (dict, list)):
            return value, True
    return None, seen


def _json_item(k: int, item: Any, rubric: Rubric, repeated: list[Any] | None = None) -> Verdict:
    items = repeated if repeated else [item]
    if not all(isinstance(i, dict) for i in items):
        return Verdict(None, None, error=f"the JSON verdict for text {k} is not an object")
    readings = []
    for i in items:
        if "rating" not in i and "score" not in i:
            readings.append(_Reading(None, f"no rating in the JSON verdict for text {k}"))
        else:
            readings.append(read_rating(i.get("rating", i.get("score")), rubric))
    reading = _resolve(k, readings, len(items)) if len(items) > 1 else readings[0]
    first = items[0]
    rationale = first.get("rationale")
    return Verdict(
        rating=reading.rating,
        rationale=rationale if isinstance(rationale, str) and rationale.strip() else None,
        type=read_type(first.get("type"), rubric),
        error=reading.error,
    )


def _from_mapping(obj: dict[str, Any], n: int, rubric: Rubric, cut: str) -> list[Verdict] | None:
    keyed: dict[int, tuple[Any, list[Any] | None]] = {}
    for key, value in obj.items():
        m = _TEXT_KEY_RE.match(key)
        if m:
            reps = obj.repeats.get(key) if isinstance(obj, _Obj) else None
            k = int(m[1])
            if k in keyed:  # "text_1" and "Text 1" both present
                prev, prev_reps = keyed[k]
                reps = [*(prev_reps or [prev]), *(reps or [value])]
            keyed[k] = (value, reps)
    if not keyed:
        for name in _LIST_KEYS:
            if isinstance(obj.get(name), list):
                return _from_list(obj[name], n, rubric, cut)
        if n == 1 and ("rating" in obj or "score" in obj):
            return [_json_item(1, obj, rubric)]
        return None
    return [
        _json_item(k, keyed[k][0], rubric, keyed[k][1]) if k in keyed else Verdict(None, None, error=f"{cut} for text {k}")
        for k in range(1, n + 1)
    ]


def _from_list(items: list[Any], n: int, rubric: Rubric, cut: str) -> list[Verdict]:
    out = [_json_item(k + 1, items[k], rubric) for k in range(min(n, len(items)))]
    out += [Verdict(None, None, error=f"{cut} for text {k}") for k in range(len(items) + 1, n + 1)]
    return out


def _scan_truncated(text: str, n: int, rubric: Rubric) -> list[Verdict] | None:
    found: dict[int, list[Any]] = {}
    for m in _KEY_SCAN_RE.finditer(text):
        try:
            value, _ = _DECODER.raw_decode(text, m.end())
        except json.JSONDecodeError:
            continue
        found.setdefault(int(m[1]), []).append(value)
    if not found:
        objs = []
        for m in re.finditer(r"\{[^{}]*\}", text):
            try:
                value = _DECODER.decode(m.group(0))
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and ("rating" in value or "score" in value):
                objs.append(value)
        if not objs:
            return None
        return _from_list(objs, n, rubric, "JSON answer cut off or invalid before the verdict")
    return [
        _json_item(k, found[k][0], rubric, found[k] if len(found[k]) > 1 else None)
        if k in found
        else Verdict(None, None, error=f"JSON answer cut off or invalid before the verdict for text {k}")
        for k in range(1, n + 1)
    ]


def _parse_json(text: str, n: int, rubric: Rubric) -> list[Verdict] | None:
    value, seen = _first_json(text)
    if isinstance(value, dict):
        got = _from_mapping(value, n, rubric, "no verdict in the JSON answer")
        if got is not None:
            return got
    elif isinstance(value, list):
        return _from_list(value, n, rubric, "no verdict in the JSON answer")
    if seen:
        return _scan_truncated(text, n, rubric)
    return None


# ---------------------------------------------------------------------------------------------


def parse_verdicts(text: str | None, n: int, rubric: Rubric, *, structured: bool) -> list[Verdict]:
    """Exactly n verdicts, in the order the texts were shown, whatever the judge wrote."""
    if n < 0:
        raise ValueError(f"parse_verdicts: n must be >= 0, got {n}")
    if text is None or not text.strip():
        return [Verdict(None, None, error="empty judge answer") for _ in range(n)]
    if structured:
        got = _parse_json(text, n, rubric)
        if got is not None:
            return got
        got = _parse_text(text, n, rubric)
        if any(v.rating is not None or v.error == NA for v in got):
            return got
        return [Verdict(None, None, error="no JSON object in the judge's answer") for _ in range(n)]
    got = _parse_text(text, n, rubric)
    if all(v.rating is None and v.error != NA for v in got) and "{" in text:
        as_json = _parse_json(text, n, rubric)
        if as_json is not None and any(v.rating is not None for v in as_json):
            return as_json
    return got


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
