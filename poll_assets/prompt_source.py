"""Loading the prompt set with `datasets`, from the Hub or from local files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

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


def load_instructions(source: Source, base_dir: Path, end: int) -> pd.Series:
    """The instruction column of the first `end` rows, as strings (None for missing values)."""
    if source.repo_id:
        where = f"hub dataset {source.repo_id!r} (split {source.split!r})"
        columns, values = _hub_column(source)
    else:
        files = resolve_data_files(source, base_dir)
        where = ", ".join(str(f) for f in files)
        columns, values = _local_column(files, _file_format(files), source.instruction_column)
    column = source.instruction_column
    if values is None:
        raise PromptSourceError(
            f"{where}: column {column!r} (mapped to 'instruction' by source.column_mapping) not found; "
            f"the source has columns {columns}"
        )
    return pd.Series([v if isinstance(v, str) else None if v is None else str(v) for v in values[:end]], dtype=object)


def _hub_column(source: Source) -> tuple[list[str], list[object] | None]:
    """The source's columns, and its instruction column's values (None when it has no such column)."""
    import datasets  # only a Hub source needs it (importing it costs a second of CPU here)

    ds = datasets.load_dataset(source.repo_id, source.subset, split=source.split, revision=source.revision)
    column = source.instruction_column
    return ds.column_names, (ds[column] if column in ds.column_names else None)


def _local_column(files: list[Path], fmt: str, column: str) -> tuple[list[str], list[object] | None]:
    """As `_hub_column`, for local files, read with pyarrow (files in order, rows in file order).
    A `.json` file may hold one JSON array rather than JSON lines: `datasets` reads those."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    if fmt == "json" and any(f.suffix.lower() == ".json" for f in files):
        import datasets

        ds = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
        return ds.column_names, (ds[column] if column in ds.column_names else None)
    read = {"json": pa_json.read_json, "csv": pa_csv.read_csv, "parquet": pq.read_table}[fmt]
    table = pa.concat_tables([read(str(f)) for f in files], promote_options="default")
    return table.column_names, (table.column(column).to_pylist() if column in table.column_names else None)


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
