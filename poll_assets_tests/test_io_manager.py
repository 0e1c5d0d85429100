"""The Parquet IO manager reading a range of shards: {shard: frame}, one log line, a named error."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest
from upath import UPath

from poll_assets.io_manager import ParquetIOManager, partition_path, write_parquet

KEY = dg.AssetKey(["generations", "gen_a"])
SHARDS = dg.StaticPartitionsDefinition(["shard-00000", "shard-00001", "shard-00002"])


def range_context(first: str, last: str) -> dg.InputContext:
    return dg.build_input_context(asset_key=KEY, asset_partitions_def=SHARDS,
                                  asset_partition_key_range=dg.PartitionKeyRange(first, last))


def test_a_range_is_read_as_one_frame_per_shard(tmp_path):
    manager = ParquetIOManager(UPath(tmp_path))
    for i, shard in enumerate(SHARDS.get_partition_keys()):
        write_parquet(pd.DataFrame({"prompt_id": [f"p{i}"]}), partition_path(str(tmp_path), KEY, shard))
    frames = manager.load_input(range_context("shard-00000", "shard-00002"))
    assert list(frames) == SHARDS.get_partition_keys()
    assert [f["prompt_id"].tolist() for f in frames.values()] == [["p0"], ["p1"], ["p2"]]
    one = manager.load_input(range_context("shard-00001", "shard-00001"))
    assert isinstance(one, pd.DataFrame) and one["prompt_id"].tolist() == ["p1"]  # one shard: a frame


def test_a_missing_shard_of_a_range_is_named_with_its_path(tmp_path):
    manager = ParquetIOManager(UPath(tmp_path))
    write_parquet(pd.DataFrame({"prompt_id": ["p0"]}), partition_path(str(tmp_path), KEY, "shard-00000"))
    with pytest.raises(FileNotFoundError, match=r"generations/gen_a: shard shard-00001 has no file at .*shard-00001"):
        manager.load_input(range_context("shard-00000", "shard-00001"))
