"""An asset's columns, declared once with their descriptions, and the column lineage between assets.

Each stage module declares one `ColumnSchema`. It gives the asset definition its
`dagster/column_schema` (so the UI describes every column before anything is materialized), each
materialization its schema with the real dtypes, the column order of the frame the stage builds,
the names its column lineage may use, and the asset table of docs/assets.md (a test compares the two).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pandas as pd


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # as shown in the UI before a materialization gives the dtype
    description: str


@dataclass(frozen=True)
class ColumnSchema:
    asset: str  # the asset (or `<stage>/<member>` pattern) it describes, for messages and the docs
    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def table_schema(self, df: pd.DataFrame | None = None) -> dg.TableSchema:
        """The schema with descriptions; with `df`, each column's type is its dtype there."""
        return dg.TableSchema(
            columns=[
                dg.TableColumn(name=c.name, type=str(df[c.name].dtype) if df is not None else c.type,
                               description=c.description)
                for c in self.columns
            ]
        )

    def definition_metadata(self) -> dict[str, Any]:
        return {"dagster/column_schema": self.table_schema()}

    def frame(self, rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
        """The stage's rows as a frame with exactly these columns, in this order."""
        return pd.DataFrame(list(rows), columns=self.names)

    def output_metadata(self, df: pd.DataFrame) -> dict[str, Any]:
        """Row count and schema of a frame the stage made; refuses a frame whose columns differ."""
        if list(df.columns) != self.names:
            raise ValueError(
                f"{self.asset}: the frame's columns {list(df.columns)} are not the declared ones {self.names}"
            )
        return {"dagster/row_count": len(df), "dagster/column_schema": self.table_schema(df)}

    def lineage(self, deps_by_column: Mapping[str, Sequence[dg.TableColumnDep]]) -> dg.TableColumnLineage:
        """Column lineage for columns of this schema; a name the schema lacks is refused."""
        unknown = sorted(set(deps_by_column) - set(self.names))
        if unknown:
            raise ValueError(f"{self.asset}: column lineage names columns it does not have: {unknown}")
        return dg.TableColumnLineage(deps_by_column={k: list(v) for k, v in deps_by_column.items()})


def schema(asset: str, *columns: tuple[str, str, str]) -> ColumnSchema:
    """`schema("prompts", ("prompt_id", "string", "sha256 hex of ..."), ...)`."""
    return ColumnSchema(asset, tuple(Column(*c) for c in columns))


def column_of(key: dg.AssetKey, schema_: ColumnSchema, column: str) -> dg.TableColumnDep:
    """A dependency on `column` of the asset `key`, whose columns `schema_` declares."""
    if column not in schema_.names:
        raise ValueError(f"{schema_.asset} has no column {column!r}")
    return dg.TableColumnDep(asset_key=key, column_name=column)


def column_of_each(keys: Iterable[dg.AssetKey], schema_: ColumnSchema, column: str) -> list[dg.TableColumnDep]:
    """The same column of every member's asset (one per generator or judge)."""
    return [column_of(k, schema_, column) for k in keys]
