"""How many prompts a shard should carry: Dagster's fixed cost per shard against its calls.

Every shard is its own partition, and Dagster writes events for each one whatever it holds: a
materialization planned and a materialization per asset, and an evaluation per asset check. A run
also pays a fixed cost (run start, one step per stage, their events), shared by the shards it
carries (`source.shards_per_run`). The calls a shard carries take `prompts x calls per prompt x
call time / concurrency` for each member; the members of a stage call side by side (the slowest
sets the stage's time), in-process models take turns. The overhead share of a shard size is

    overhead / (overhead + call time),

and the default shard size is the smallest size on a fixed ladder whose share is at most the target.
Pure: numbers in, numbers out; the panel hands in its shape (`Panel.shard_shape`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Seconds per event of a shard on Dagster's SQLite event log, its index rows and the step's own
# per-shard bookkeeping included. Issue 24's table: at N = 3,000, shards of 500 instead of 50 saved
# 52 s for 54 fewer shards (less two runs' fixed cost: 0.85 s a shard); at N = 1,000, 28 s for 18
# fewer (1.56 s a shard); over the 47 events a paper shard wrote then, 18-33 ms. One bare write
# (a row) is 8.7-9.5 ms; an asset event writes an index row too, a check evaluation two.
EVENT_S = 0.02
# A run of the graph's shape whose steps do no work (bench/dagster_floor.py): 3.16-3.58 s.
RUN_FIXED_S = 3.2
# Expected seconds per call: a remote provider answering a short generation or a verdict (longer
# answers take longer, which only lowers the overhead share); an in-process model on this kind of
# machine; a `dataset` generator makes no call.
REMOTE_CALL_S = 2.0
IN_PROCESS_CALL_S = 1.0
# The overhead share the default aims at, and the sizes it picks from: coarse steps, so a small
# change of the panel (a member's concurrency) rarely moves the default and re-keys the shards;
# capped because a run's memory grows with its shards' frames.
TARGET_SHARE = 0.05
SHARD_SIZE_LADDER: tuple[int, ...] = (50, 100, 200, 500, 1000)
# What an unset shard_size meant before the cost model chose it: shards stored then have this size.
LEGACY_DEFAULT_SHARD_SIZE = 50


@dataclass(frozen=True)
class MemberLoad:
    """One member's calls per prompt, how many it keeps in flight, and the seconds each takes."""

    calls_per_prompt: float
    concurrency: int
    call_s: float
    in_process: bool = False

    def seconds_per_prompt(self) -> float:
        return self.calls_per_prompt * self.call_s / (1 if self.in_process else max(self.concurrency, 1))


@dataclass(frozen=True)
class ShardShape:
    """What the model needs of a panel: its LLM stages (each a tuple of members calling side by
    side), Dagster events per shard, and shards per run (which share a run's fixed cost)."""

    stages: tuple[tuple[MemberLoad, ...], ...]
    events_per_shard: int
    shards_per_run: int


def events_per_shard(assets: int, checks: int) -> int:
    """Events Dagster writes for one shard: a materialization planned and a materialization per
    asset, and one evaluation per asset check."""
    return 2 * assets + checks


def stage_seconds_per_prompt(stage: Sequence[MemberLoad]) -> float:
    """Call time per prompt of one stage: remote members call side by side (the slowest one sets
    the pace); in-process models take turns, so theirs add up."""
    remote = [m.seconds_per_prompt() for m in stage if not m.in_process]
    local = [m.seconds_per_prompt() for m in stage if m.in_process]
    return max(remote, default=0.0) + sum(local)


def call_seconds(shape: ShardShape, shard_size: int) -> float:
    """Seconds of calls one shard of `shard_size` prompts carries, over every stage."""
    return shard_size * sum(stage_seconds_per_prompt(s) for s in shape.stages)


def overhead_seconds(shape: ShardShape, event_s: float = EVENT_S, run_fixed_s: float = RUN_FIXED_S) -> float:
    """Dagster's fixed cost of one shard: its events, and its share of a run's fixed cost."""
    return shape.events_per_shard * event_s + run_fixed_s / max(shape.shards_per_run, 1)


def overhead_share(shape: ShardShape, shard_size: int, event_s: float = EVENT_S,
                   run_fixed_s: float = RUN_FIXED_S) -> float:
    """The share of a shard's time that is Dagster's fixed cost (0 to 1)."""
    overhead = overhead_seconds(shape, event_s, run_fixed_s)
    total = overhead + call_seconds(shape, shard_size)
    return overhead / total if total > 0 else 1.0


def size_for_share(shape: ShardShape, target: float = TARGET_SHARE, event_s: float = EVENT_S,
                   run_fixed_s: float = RUN_FIXED_S) -> int | None:
    """The fewest prompts per shard whose overhead share is at most `target`; None when the shard
    carries no call time (every generator reads a column and there is no judge call)."""
    per_prompt = call_seconds(shape, 1)
    if per_prompt <= 0:
        return None
    overhead = overhead_seconds(shape, event_s, run_fixed_s)
    return max(1, math.ceil(overhead * (1 - target) / (target * per_prompt)))


def default_shard_size(shape: ShardShape, target: float = TARGET_SHARE,
                       ladder: Sequence[int] = SHARD_SIZE_LADDER) -> int:
    """The smallest size of `ladder` whose overhead share is at most `target` (its largest when
    none is, or when the shard carries no call)."""
    wanted = size_for_share(shape, target)
    if wanted is None:
        return max(ladder)
    return next((size for size in sorted(ladder) if size >= wanted), max(ladder))
