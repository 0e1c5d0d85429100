"""Parquet per asset and partition, at paths a person can open: <base>/<asset key>/<partition>.parquet.

This module owns that layout: code that reads stored partitions outside a run (the trail, the
publish job, tests) finds them with `partition_path` and `stored_partitions`.
"""

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


EXTENSION = ".parquet"


def asset_dir(base_dir: str | UPath, key: dg.AssetKey) -> UPath:
    """The folder of an asset's partitions: one level per part of its key (`generations/<member>`)."""
    return UPath(base_dir).joinpath(*key.path)


def partition_path(base_dir: str | UPath, key: dg.AssetKey, partition: str) -> UPath:
    return asset_dir(base_dir, key) / f"{partition}{EXTENSION}"


def stored_partitions(base_dir: str | UPath, key: dg.AssetKey) -> list[str]:
    """The partition keys stored for `key`, sorted; empty when none is."""
    folder = asset_dir(base_dir, key)
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(EXTENSION)] for p in folder.iterdir() if p.name.endswith(EXTENSION))


def read_partition(base_dir: str | UPath, key: dg.AssetKey, partition: str) -> pd.DataFrame | None:
    """One stored partition, or None when it is not stored."""
    path = partition_path(base_dir, key, partition)
    if not path.is_file():
        return None
    with path.open("rb") as f:
        return pd.read_parquet(f)


def write_parquet(frame: pd.DataFrame, path: UPath) -> None:
    """Write `frame` so that a reader never sees a half-written file: on a local disk through a
    temporary file renamed into place (two runs of one shard may write it while a third reads it);
    object stores publish an object only when its upload completes."""
    if path.protocol not in ("", "file", "local"):
        with path.open("wb") as f:
            frame.to_parquet(f, index=False)
        return
    target = Path(path.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


class ParquetIOManager(dg.UPathIOManager):
    """Reads and writes one Parquet file per partition. A run of several shards (a backfill range)
    hands it {shard: frame}; it writes each shard's file, and records each shard's path on that
    shard's materialization. Inputs of such a run arrive as {shard: frame} (UPathIOManager's way)."""

    extension = EXTENSION

    def __init__(self, base_path: UPath):
        super().__init__(base_path=base_path)
        self.base_dir = base_path

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        if not isinstance(obj, dict):
            return super().handle_output(context, obj)
        shards = list(context.asset_partition_keys)
        if sorted(obj) != sorted(shards):
            raise dg.Failure(description=f"{context.asset_key.to_user_string()}: the step made shards "
                                         f"{sorted(obj)} for a run of shards {shards}")
        for shard in shards:  # one file at a time, so writing holds no second copy of the range
            path = partition_path(self.base_dir, context.asset_key, shard)
            self.make_directory(path.parent)
            self.dump_to_path(context, obj[shard], path)
            context.step_context.add_asset_metadata(
                {"path": dg.MetadataValue.path(str(path))}, asset_key=context.asset_key, partition_key=shard
            )
        return None

    def load_partitions(self, context: dg.InputContext) -> pd.DataFrame | dict[str, pd.DataFrame]:
        """One shard as UPathIOManager reads it; a range as {shard: frame} with one log line for the
        input, not one stored log event per shard (a 20-shard run read 240 of them)."""
        shards = sorted(context.asset_partition_keys)  # shard keys are zero-padded: in partition order
        if len(shards) == 1:
            return super().load_partitions(context)
        context.log.debug(f"Loading {len(shards)} partitions ({shards[0]} ... {shards[-1]}) from "
                          f"{asset_dir(self.base_dir, context.asset_key)}")
        frames = {}
        for shard in shards:
            path = partition_path(self.base_dir, context.asset_key, shard)
            try:
                frames[shard] = self.load_from_path(context, path)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"{context.asset_key.to_user_string()}: shard {shard} has no file at {path}; "
                                        "materialize that shard first") from exc
        return frames

    def dump_to_path(self, context: dg.OutputContext, obj: pd.DataFrame, path: UPath) -> None:
        write_parquet(obj, path)

    def load_from_path(self, context: dg.InputContext, path: UPath) -> pd.DataFrame:
        with path.open("rb") as f:
            return pd.read_parquet(f)


class ParquetIOManagerFactory(dg.ConfigurableIOManagerFactory):
    """`base_dir` may be a local folder or any fsspec URL (s3://bucket/prefix, gs://...)."""

    base_dir: str

    def create_io_manager(self, context: dg.InitResourceContext) -> ParquetIOManager:
        return ParquetIOManager(base_path=UPath(self.base_dir))
