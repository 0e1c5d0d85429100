"""Values read back from Parquet, as plain Python.

Parquet (through pandas) returns list cells as numpy arrays, numbers as numpy scalars, and a missing
integer or string as NaN. Pooling, binarization, lineage and checks want lists, ints and None.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def is_missing(value: Any) -> bool:
    """None, or the NaN pandas puts in a missing cell."""
    return value is None or (isinstance(value, float) and value != value)


def plain(value: Any) -> Any:
    """`value` with arrays and tuples as lists, numpy scalars as Python numbers and NaN as None, at any depth."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        value = value.item()
    return None if is_missing(value) else value


def plain_list(value: Any) -> list[Any]:
    """A list cell as a plain list; a missing cell is an empty list."""
    return [] if is_missing(value) else plain(list(value))
