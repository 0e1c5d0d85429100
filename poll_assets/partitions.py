"""Shards of the prompt set: the one partitions definition every asset shares."""

from __future__ import annotations

import math
from collections.abc import Sequence

import dagster as dg

from poll_assets.panel import Source

_PREFIX = "shard-"


def shard_keys(num_examples: int, shard_size: int) -> list[str]:
    """Keys are derived from the config alone, so the code location loads offline and fast.
    Raising num_examples appends keys; existing shards keep their rows."""
    return [f"{_PREFIX}{i:05d}" for i in range(math.ceil(num_examples / shard_size))]


def shard_size_of(source: Source) -> int:
    """The source's rows per shard. A Source read as part of a Panel always has one (the panel
    fills an unset size from the shard cost model); a bare Source without one cannot be sharded."""
    if source.shard_size is None:
        raise ValueError("source.shard_size is unset: load the source as part of a panel (load_panel), "
                         "which chooses it, or give it")
    return source.shard_size


def shard_bounds(key: str, source: Source) -> tuple[int, int]:
    """Row range [start, end) of the prompt set that the shard covers."""
    size = shard_size_of(source)
    if not key.startswith(_PREFIX) or not key[len(_PREFIX) :].isdigit():
        raise ValueError(f"partition key {key!r} is not a shard key like '{_PREFIX}00000'")
    index = int(key[len(_PREFIX) :])
    start = index * size
    if start >= source.num_examples:
        raise ValueError(f"partition {key!r} starts at row {start}, past num_examples={source.num_examples}")
    return start, min(start + size, source.num_examples)


def build_partitions_def(source: Source) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(shard_keys(source.num_examples, shard_size_of(source)))


def backfill_policy(source: Source) -> dg.BackfillPolicy:
    """How a backfill of many shards is cut into runs: `shards_per_run` shards per run, whose calls
    overlap and whose frames are the most a run holds in memory."""
    return dg.BackfillPolicy.multi_run(max_partitions_per_run=source.shards_per_run)


def run_ranges(keys: Sequence[str], shards_per_run: int) -> list[list[str]]:
    """`keys` (in partition order) cut into consecutive runs of at most `shards_per_run` shards."""
    return [list(keys[i : i + shards_per_run]) for i in range(0, len(keys), shards_per_run)]


def select_shards(all_keys: Sequence[str], spec: str) -> list[str]:
    """The shards a `A...B` range names (both ends included, in partition order), or one key.
    Raises ValueError naming the key that is not a shard of the panel."""
    first, sep, last = spec.partition("...")
    for key in (first, last) if sep else (first,):
        if key not in all_keys:
            raise ValueError(f"{key!r} is not a shard of this panel (its shards are {all_keys[0]} ... {all_keys[-1]})")
    if not sep:
        return [first]
    start, end = all_keys.index(first), all_keys.index(last)
    if end < start:
        raise ValueError(f"range {spec!r} ends before it starts")
    return list(all_keys[start : end + 1])
