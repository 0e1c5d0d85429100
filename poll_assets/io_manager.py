"""Parquet per asset and partition, at paths a person can open: <base>/<asset key>/<partition>.parquet."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pandas as pd
from upath import UPath


def default_dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home")


STORAGE_ENV_VAR = "POLL_STORAGE_DIR"


def default_storage_dir() -> str:
    """$POLL_STORAGE_DIR (a folder or an fsspec URL such as s3://bucket/prefix), else $DAGSTER_HOME/storage."""
    return os.environ.get(STORAGE_ENV_VAR) or str(default_dagster_home() / "storage")


class ParquetIOManager(dg.UPathIOManager):
    extension = ".parquet"

    def dump_to_path(self, context: dg.OutputContext, obj: pd.DataFrame, path: UPath) -> None:
        with path.open("wb") as f:
            obj.to_parquet(f, index=False)

    def load_from_path(self, context: dg.InputContext, path: UPath) -> pd.DataFrame:
        with path.open("rb") as f:
            return pd.read_parquet(f)


class ParquetIOManagerFactory(dg.ConfigurableIOManagerFactory):
    """`base_dir` may be a local folder or any fsspec URL (s3://bucket/prefix, gs://...)."""

    base_dir: str

    def create_io_manager(self, context: dg.InitResourceContext) -> ParquetIOManager:
        return ParquetIOManager(base_path=UPath(self.base_dir))
