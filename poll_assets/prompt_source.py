"""Loading the prompt set with `datasets`, from the Hub or from local files."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from poll_assets.json_lines import describe_json_value, json_objects_by_line
from poll_assets.panel import Source

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class PromptSourceError(ValueError):
    """The prompt source cannot be read as configured; the message names the source and the field."""


def prompt_id(instruction: str) -> str:
    """Stable id of a prompt: the sha256 hex of its instruction text."""
    return hashlib.sha256(instruction.encode("utf-8")).hexdigest()


def describe_source(source: Source, base_dir: Path) -> str:
    if source.repo_id:
        rev = f"@{source.revision}" if source.revision else ""
        return f"hub:{source.repo_id}{rev} split={source.split}"
    return ", ".join(str(p) for p in resolve_data_files(source, base_dir))


def resolve_data_files(source: Source, base_dir: Path) -> list[Path]:
    files = [Path(f) if Path(f).is_absolute() else (base_dir / f).resolve() for f in source.data_files or []]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise PromptSourceError(f"source.data_files: no such file: {', '.join(missing)}")
    return files


def _file_format(files: list[Path]) -> str:
    kinds = {_FORMATS.get(f.suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise PromptSourceError(
            f"source.data_files: {[f.name for f in files]}: use one format, one of {sorted(_FORMATS)}"
        )
    return kinds.pop()  # type: ignore[return-value]


def _check_instruction(value: object, where: str, column: str) -> None:
    """Instructions are text; None (a missing value) is counted as empty later."""
    if value is not None and not isinstance(value, str):
        raise PromptSourceError(f"{where}: {column!r} is a {describe_json_value(value)}, not text; every instruction must be a string")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PromptSourceError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save the file as UTF-8"
        ) from None
    if not text.strip():
        raise PromptSourceError(f"{path}: the file is empty; it must hold one prompt per row")
    return text


def _json_lines_rows(path: Path, text: str, column: str) -> int:
    rows = 0
    for number, record in json_objects_by_line(text, str(path), PromptSourceError):
        _check_instruction(record.get(column), f"{path}: line {number}", column)
        rows += 1
    return rows


def _json_rows(path: Path, text: str, column: str) -> int:
    """A .json file is either one JSON array of objects or JSON lines, as `datasets` reads both."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        return _json_lines_rows(path, text, column)
    if not isinstance(records, list):
        return _json_lines_rows(path, text, column)
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise PromptSourceError(f"{path}: record {i}: expected a JSON object, got a {describe_json_value(record)}")
        _check_instruction(record.get(column), f"{path}: record {i}", column)
    return len(records)


def _csv_rows(path: Path, text: str) -> int:
    reader = csv.reader(io.StringIO(text))
    try:
        return max(0, sum(1 for _ in reader) - 1)  # minus the header
    except csv.Error as exc:
        raise PromptSourceError(f"{path}: line {reader.line_num}: not valid CSV ({exc})") from None


def check_local_file(path: Path, column: str) -> int | None:
    """A cheap pass over a local text file before `datasets` reads it: UTF-8, not empty, every JSON
    line an object whose instruction is a string. Returns the row count (None for Parquet, whose
    checks come after loading). Each error names the file, the line and what is wrong."""
    kind = _FORMATS.get(path.suffix.lower())
    if kind == "parquet":
        return None
    text = _read_text(path)
    if kind == "csv":
        return _csv_rows(path, text)
    return _json_rows(path, text, column) if path.suffix.lower() == ".json" else _json_lines_rows(path, text, column)


def count_local_rows(source: Source, base_dir: Path) -> int | None:
    """Rows in a local source's text files (after validating them), or None for the Hub or Parquet."""
    if source.repo_id:
        return None
    counts = [check_local_file(f, source.instruction_column) for f in resolve_data_files(source, base_dir)]
    return None if None in counts else sum(c for c in counts if c is not None)


def _load_column(source: Source, base_dir: Path, column: str | None = None) -> tuple[list[str], list[object] | None, str]:
    """The source's columns, the values of `column` (default: its instruction column; None when it has
    no such column), and a description of where they came from. `datasets` only for a Hub source or a `.json` file (which
    may hold one JSON array); other local files are read with pyarrow, which costs a fraction of
    importing `datasets` and preparing its cache."""
    column = column or source.instruction_column
    if source.repo_id:
        import datasets

        where = f"hub dataset {source.repo_id!r} (split {source.split!r})"
        ds = datasets.load_dataset(source.repo_id, source.subset, split=source.split, revision=source.revision)
        return ds.column_names, (ds[column] if column in ds.column_names else None), where
    files = resolve_data_files(source, base_dir)
    where = ", ".join(str(f) for f in files)
    fmt = _file_format(files)
    for f in files:
        check_local_file(f, column)
    try:
        names, values = _read_local(files, fmt, column)
    except PromptSourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - the readers raise many kinds; name the file whatever it was
        raise PromptSourceError(f"{where}: could not read it as {fmt}: {type(exc).__name__}: {exc}") from exc
    return names, values, where


def _read_local(files: list[Path], fmt: str, column: str) -> tuple[list[str], list[object] | None]:
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    if any(f.suffix.lower() == ".json" for f in files):
        import datasets

        ds = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
        return ds.column_names, (ds[column] if column in ds.column_names else None)
    read = {"json": pa_json.read_json, "csv": pa_csv.read_csv, "parquet": pq.read_table}[fmt]
    table = pa.concat_tables([read(str(f)) for f in files], promote_options="default")
    return table.column_names, (table.column(column).to_pylist() if column in table.column_names else None)


def load_instructions(source: Source, base_dir: Path, end: int) -> pd.Series:
    """The instruction column of the first `end` rows, as strings (None for missing values).

    Refuses, naming the file and row: unreadable or empty files, broken JSON lines, instructions
    that are not text, and a shard that would reach past the end of the file."""
    names, all_values, where = _load_column(source, base_dir)
    column = source.instruction_column
    if all_values is None:
        raise PromptSourceError(
            f"{where}: column {column!r} (mapped to 'instruction' by source.column_mapping) not found; "
            f"the source has columns {names}"
        )
    if end > len(all_values):
        raise PromptSourceError(
            f"{where}: has {len(all_values)} rows, but this shard needs rows up to {end - 1} "
            f"(source.num_examples is {source.num_examples}); set num_examples to at most {len(all_values)} or add rows"
        )
    values = all_values[:end]
    for i, v in enumerate(values):
        _check_instruction(v, f"{where}: row {i}", column)
    return pd.Series(values, dtype=object)


def load_source_column(source: Source, base_dir: Path, column: str, rows: list[int]) -> list[str | None]:
    """The text in `column` of the source at each of `rows` (the prompts' `source_row`): the answers of
    a `dataset` generator. None where the cell is empty; an unknown column or a row past the end is
    refused, naming the source and the column."""
    names, values, where = _load_column(source, base_dir, column)
    if values is None:
        raise PromptSourceError(f"{where}: no column {column!r} (a `dataset` generator's source_column); "
                                f"the source has columns {names}")
    past = [r for r in rows if r >= len(values)]
    if past:
        raise PromptSourceError(f"{where}: column {column!r} has {len(values)} rows; rows {past[:5]} are past its end")
    out: list[str | None] = []
    for r in rows:
        _check_instruction(values[r], f"{where}: row {r}", column)
        text = values[r]
        out.append(text if isinstance(text, str) and text.strip() else None)
    return out


@dataclass
class ShardSelection:
    rows: pd.DataFrame  # prompt_id, instruction, source_row
    dropped_empty: int
    dropped_duplicate: int


def select_shard(instructions: pd.Series, start: int, end: int) -> ShardSelection:
    """Rows [start, end) with empty instructions and repeats of an earlier row removed.

    A repeat is judged against every earlier row of the whole set, not only this shard, so a
    prompt is never in two shards."""
    seen: set[str] = set()
    rows: list[dict[str, object]] = []
    empty = dupes = 0
    for i in range(min(end, len(instructions))):
        text = instructions.iloc[i]
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            empty += i >= start
            continue
        pid = prompt_id(text)
        if pid in seen:
            dupes += i >= start
            continue
        seen.add(pid)
        if i >= start:
            rows.append({"prompt_id": pid, "instruction": text, "source_row": i})
    frame = pd.DataFrame(rows, columns=["prompt_id", "instruction", "source_row"])
    return ShardSelection(frame, empty, dupes)
