"""Shards of the prompt set: the one partitions definition every asset shares."""

from __future__ import annotations

import math

import dagster as dg

from poll_assets.panel import Source

_PREFIX = "shard-"


def shard_keys(num_examples: int, shard_size: int) -> list[str]:
    """Keys are derived from the config alone, so the code location loads offline and fast.
    Raising num_examples appends keys; existing shards keep their rows."""
    return [f"{_PREFIX}{i:05d}" for i in range(math.ceil(num_examples / shard_size))]


def shard_bounds(key: str, source: Source) -> tuple[int, int]:
    """Row range [start, end) of the prompt set that the shard covers."""
    if not key.startswith(_PREFIX) or not key[len(_PREFIX) :].isdigit():
        raise ValueError(f"partition key {key!r} is not a shard key like '{_PREFIX}00000'")
    index = int(key[len(_PREFIX) :])
    start = index * source.shard_size
    if start >= source.num_examples:
        raise ValueError(f"partition {key!r} starts at row {start}, past num_examples={source.num_examples}")
    return start, min(start + source.shard_size, source.num_examples)


def build_partitions_def(source: Source) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(shard_keys(source.num_examples, source.shard_size))
