"""Gold labels: a file of human ratings or preferences, read and validated (pure, no Dagster).

A row names a prompt by `prompt_id` or by `instruction`, and is either a rating row (`generator` and
`rating`, or in JSONL/Parquet `ratings: {generator: rating}`) or a preference row (`a`, `b`,
`winner` in a | b | tie). `annotator` and `note` are kept. Every error names the file, the line
(CSV: the header is line 1; Parquet: the row, 1-based), the field and what was expected.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from poll_assets.json_lines import json_objects_by_line

FORMATS = (".jsonl", ".csv", ".parquet")
WINNERS = ("a", "b", "tie")
RATING_FIELDS = ("generator", "rating", "ratings")
PREFERENCE_FIELDS = ("a", "b", "winner")


class GoldLabelError(ValueError):
    """A gold label file that cannot be used; the message names the file, the line and the field."""


def normalize_instruction(text: str) -> str:
    """The text a prompt is matched on: line endings folded to \\n, then stripped as the prompts
    asset strips every instruction (a CSV saved on Windows still matches a prompt file with \\n)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def instruction_key(text: str) -> str:
    """sha256 hex of the normalized instruction; equal to the prompts asset's prompt_id when the
    prompt text has no carriage returns."""
    return hashlib.sha256(normalize_instruction(text).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class GoldRating:
    prompt: str  # prompt_id, or instruction_key(instruction) when the row gave the text
    by_text: bool  # True: `prompt` came from the instruction text
    generator: str
    rating: int
    line: int
    annotator: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class GoldPreference:
    prompt: str
    by_text: bool
    a: str
    b: str
    winner: str  # "a", "b" or "tie"
    line: int
    annotator: str | None = None
    note: str | None = None


@dataclass
class GoldSet:
    source: str
    ratings: list[GoldRating] = field(default_factory=list)
    preferences: list[GoldPreference] = field(default_factory=list)

    def generators(self) -> set[str]:
        return {r.generator for r in self.ratings} | {n for p in self.preferences for n in (p.a, p.b)}

    def unknown_generator_labels(self, generators: Iterable[str]) -> int:
        """Labels naming a generator the panel does not have: counted, reported, not used."""
        known = set(generators)
        return (sum(r.generator not in known for r in self.ratings)
                + sum(p.a not in known or p.b not in known for p in self.preferences))

    def __len__(self) -> int:
        return len(self.ratings) + len(self.preferences)


class _Row:
    """One raw row and where it came from, so every complaint can say file, line and field."""

    def __init__(self, source: str, line: int, values: dict[str, Any], unit: str = "line") -> None:
        self.source, self.line, self.values, self.unit = source, line, values, unit

    def fail(self, fieldname: str, expected: str) -> GoldLabelError:
        return GoldLabelError(f"{self.source}: {self.unit} {self.line}: field {fieldname!r}: {expected}")

    def get(self, name: str) -> Any:
        value = self.values.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if isinstance(value, str) and not value.strip():
            return None  # an empty CSV cell is an absent value
        return value

    def text(self, name: str) -> str | None:
        value = self.get(name)
        if value is not None and not isinstance(value, str):
            raise self.fail(name, f"expected text, got {type(value).__name__} {value!r}")
        return value


def _rating_value(row: _Row, fieldname: str, value: Any, scale: Sequence[int]) -> int:
    number: Any = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise row.fail(fieldname, f"expected a rating on the scale {list(scale)}, got {value!r}") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or number != int(number) or int(number) not in scale:
        raise row.fail(fieldname, f"rating {value!r} is off the scale; expected one of {list(scale)}")
    return int(number)


def _prompt_ref(row: _Row) -> tuple[str, bool]:
    pid, text = row.text("prompt_id"), row.text("instruction")
    if pid is not None:
        pid = pid.strip().lower()
        if len(pid) != 64 or any(c not in "0123456789abcdef" for c in pid):
            raise row.fail("prompt_id", f"expected the sha256 hex of the instruction (64 hex digits), got {pid!r}")
        return pid, False
    if text is not None and normalize_instruction(text):
        return instruction_key(text), True
    raise row.fail("prompt_id", "missing: give `prompt_id` (sha256 hex of the instruction) or `instruction` (its text)")


def _kind(row: _Row) -> str:
    has_rating = any(row.get(f) is not None for f in RATING_FIELDS)
    has_preference = any(row.get(f) is not None for f in PREFERENCE_FIELDS)
    if has_rating and has_preference:
        given = [f for f in (*RATING_FIELDS, *PREFERENCE_FIELDS) if row.get(f) is not None]
        raise row.fail("/".join(given), "a row is either a rating (generator, rating) or a preference "
                                        "(a, b, winner), not both")
    if not (has_rating or has_preference):
        raise row.fail("rating", "the row is neither a rating (generator, rating) nor a preference (a, b, winner)")
    return "rating" if has_rating else "preference"


def _ratings_of(row: _Row, scale: Sequence[int]) -> list[tuple[str, int]]:
    many = row.get("ratings")
    if many is not None:
        if row.get("generator") is not None or row.get("rating") is not None:
            raise row.fail("ratings", "give `ratings: {generator: rating}` or `generator` + `rating`, not both")
        if not isinstance(many, dict) or not many:
            raise row.fail("ratings", f"expected a mapping {{generator: rating}}, got {many!r}")
        return [(str(g), _rating_value(row, f"ratings.{g}", v, scale)) for g, v in many.items()]
    for name in ("generator", "rating"):
        if row.get(name) is None:
            raise row.fail(name, "missing: a rating row needs `generator` and `rating`")
    return [(str(row.get("generator")).strip(), _rating_value(row, "rating", row.get("rating"), scale))]


def _preference_of(row: _Row) -> tuple[str, str, str]:
    for name in PREFERENCE_FIELDS:
        if row.get(name) is None:
            raise row.fail(name, "missing: a preference row needs `a`, `b` and `winner`")
    a, b = str(row.get("a")).strip(), str(row.get("b")).strip()
    winner = str(row.get("winner")).strip().lower()
    if winner not in WINNERS:
        raise row.fail("winner", f"unknown winner {row.get('winner')!r}; expected one of {list(WINNERS)}")
    if a == b:
        raise row.fail("b", f"a preference compares two different generators; both are {a!r}")
    return a, b, winner


def parse_gold_rows(rows: Iterable[_Row], source: str, scale: Sequence[int]) -> GoldSet:
    """Validate rows into a GoldSet; a second label for the same prompt and generator (or pair) fails."""
    gold = GoldSet(source)
    seen: dict[tuple[str, ...], int] = {}
    for row in rows:
        prompt, by_text = _prompt_ref(row)
        extras = {"annotator": row.text("annotator"), "note": row.text("note")}
        if _kind(row) == "rating":
            for generator, rating in _ratings_of(row, scale):
                _first(seen, ("rating", prompt, generator), row, f"generator {generator!r}")
                gold.ratings.append(GoldRating(prompt, by_text, generator, rating, row.line, **extras))
        else:
            a, b, winner = _preference_of(row)
            _first(seen, ("preference", prompt, *sorted((a, b))), row, f"pair {a!r} / {b!r}")
            gold.preferences.append(GoldPreference(prompt, by_text, a, b, winner, row.line, **extras))
    return gold


def _first(seen: dict[tuple[str, ...], int], key: tuple[str, ...], row: _Row, what: str) -> None:
    if key in seen:
        fieldname = "generator" if key[0] == "rating" else "a/b"
        raise row.fail(fieldname, f"duplicate label: {what} of prompt {key[1][:12]} already labelled at "
                                  f"{row.unit} {seen[key]}; give one label per prompt and {what.split()[0]}")
    seen[key] = row.line


def _decode(source: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise GoldLabelError(f"{source}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at byte offset "
                             f"{exc.start}); save the file as UTF-8") from None


def _jsonl_rows(source: str, text: str) -> Iterator[_Row]:
    for number, record in json_objects_by_line(text, source, GoldLabelError):
        yield _Row(source, number, record)


def _csv_rows(source: str, text: str) -> Iterator[_Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        if "prompt_id" not in header and "instruction" not in header:
            raise GoldLabelError(f"{source}: line 1 (the header): field 'prompt_id': missing column; the header "
                                 f"needs `prompt_id` or `instruction`, it has {header}")
        if "ratings" in header:
            raise GoldLabelError(f"{source}: line 1 (the header): field 'ratings': a CSV gives one rating per row "
                                 "(`generator`, `rating`); `ratings: {...}` is for JSONL and Parquet")
        start = reader.line_num + 1
        for record in reader:
            if None in record:
                raise GoldLabelError(f"{source}: line {start} (the header is line 1): more cells than header columns")
            yield _Row(source, start, record, unit="line")
            start = reader.line_num + 1
    except csv.Error as exc:
        raise GoldLabelError(f"{source}: line {reader.line_num} (the header is line 1): not valid CSV ({exc})") from None


def _parquet_rows(source: str, data: bytes) -> Iterator[_Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds; name the file whatever it was
        raise GoldLabelError(f"{source}: not a readable Parquet file: {type(exc).__name__}: {exc}") from None
    for i, record in enumerate(table.to_pylist(), 1):
        ratings = record.get("ratings")
        if isinstance(ratings, list):  # a Parquet map arrives as [(key, value), ...]
            record = {**record, "ratings": dict(ratings)}
        yield _Row(source, i, record, unit="row")


def read_gold_bytes(source: str, data: bytes, scale: Sequence[int]) -> GoldSet:
    """Parse a gold file's bytes by its suffix (`source` is its name, used in every message)."""
    suffix = "." + source.rsplit(".", 1)[-1].lower() if "." in source else ""
    if suffix not in FORMATS:
        raise GoldLabelError(f"{source}: unknown gold label format {suffix or '(no suffix)'!r}; use one of {list(FORMATS)}")
    if suffix == ".parquet":
        rows: Iterable[_Row] = _parquet_rows(source, data)
    else:
        text = _decode(source, data)
        rows = _jsonl_rows(source, text) if suffix == ".jsonl" else _csv_rows(source, text)
    gold = parse_gold_rows(rows, source, scale)
    if not len(gold):
        raise GoldLabelError(f"{source}: no gold labels in the file")
    return gold


def load_gold(path: Any, scale: Sequence[int]) -> GoldSet:
    """Read and validate a gold file: a local path or any UPath (s3://...)."""
    from upath import UPath

    location = UPath(path)
    try:
        data = location.read_bytes()
    except (OSError, ValueError) as exc:
        raise GoldLabelError(f"{path}: cannot read the gold label file: {type(exc).__name__}: {exc}") from None
    return read_gold_bytes(str(path), data, scale)
