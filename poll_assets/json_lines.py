"""JSON Lines read as objects, one per non-blank line, with errors that name the file and the line.

Shared by the prompt source and the gold labels, so both files read and complain the same way. Pure."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


def describe_json_value(value: object) -> str:
    """A value's type and its start, for an error message: `list [1, 2]`."""
    text = json.dumps(value, default=str)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def json_objects_by_line(text: str, where: str, error: type[Exception]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line of `text`; `error(message)` is raised for a
    line that is not JSON or not an object, the message starting with `where` and the line."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise error(f"{where}: line {number}: expected a JSON object, got a {describe_json_value(record)}")
        yield number, record
