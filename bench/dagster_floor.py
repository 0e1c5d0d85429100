"""What a run of our graph's shape costs when its steps do no work: Dagster's own floor.

Not a test. Run from the repository root with the project's venv:

    .venv/bin/python bench/dagster_floor.py
    .venv/bin/python bench/dagster_floor.py --runs 1 --shards 200 --shards-per-run 20   # a whole dataset

The job has the shape `poll_job` has with the `paper` panel: one partitioned prompts asset, a stage step
with 4 member outputs, a combining asset, a stage step with 3 member outputs, pooling and pairs, and the
19 asset checks evaluated inside their steps (the real graph's names). Each step hands a one-row frame per
shard to an IO manager that keeps it in memory, on a SQLite instance in a temporary DAGSTER_HOME (Dagster's
default storage, like the project's `.dagster_home`). With `--shards K` the job has K shards and one pass
runs them as `poll-assets run --all` does: runs of `--shards-per-run` consecutive shards (a partition range
per run), each shard materialized and checked as its own partition. It prints the time of each pass in one
process; the first one also pays Dagster's lazy imports, the later ones are the floor a warm re-run of
the real pipeline cannot go under.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

GENERATORS = ["g1", "g2", "g3", "g4"]
JUDGES = ["j1", "j2", "j3"]
# The check names of the real graph (19 checks with `paper`: each member has its stage's combined check
# and pending_rows, the pairs two since contested_pairs).
PROMPT_CHECKS = ["prompts_valid"]
GENERATION_CHECKS = ["generations_valid", "pending_rows"]
RATING_CHECKS = ["ratings_valid", "pending_rows"]
POOLED_CHECKS = ["covers_every_generation", "judge_agreement"]
PAIR_CHECKS = ["chosen_beats_rejected", "contested_pairs"]


def shard_keys(shards: int) -> list[str]:
    """The real graph's partition keys (poll_assets.partitions), without importing the project."""
    return [f"shard-{i:05d}" for i in range(shards)]


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": ["p"], "value": [1]})


class _MemoryShards(dg.IOManager):
    """Each shard's frame kept in memory, keyed by asset and shard; a range run's output is
    {shard: frame} and its input comes back the same way (one shard: the frame itself), as the
    project's Parquet IO manager does, without the files."""

    def __init__(self) -> None:
        self.frames: dict[tuple[str, str], Any] = {}

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:  # a check's output
            return
        shards = context.asset_partition_keys
        values = obj if isinstance(obj, dict) else {shards[0]: obj}
        for shard in shards:
            self.frames[(context.asset_key.to_user_string(), shard)] = values[shard]

    def load_input(self, context: dg.InputContext) -> Any:
        shards = context.asset_partition_keys
        values = {s: self.frames[(context.asset_key.to_user_string(), s)] for s in shards}
        return values if len(shards) > 1 else values[shards[0]]


def _checks(key: dg.AssetKey, names: list[str]) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(n, asset=key, blocking=True) for n in names]


def _emit(context: dg.AssetExecutionContext, key: dg.AssetKey, names: list[str],
          output_name: str = "result") -> Iterator[Any]:
    """The output of the run's shards, then every check of every shard recorded against that shard
    (one shard: plain check results, which Dagster attributes itself)."""
    shards = context.partition_keys
    if len(shards) == 1:
        yield dg.Output(_frame(), output_name=output_name)
        yield from (dg.AssetCheckResult(asset_key=key, check_name=n, passed=True) for n in names)
        return
    yield dg.Output({s: _frame() for s in shards}, output_name=output_name)
    for n in names:  # the check's own output says it ran; the evaluations carry the shards
        yield dg.Output(None, output_name=context.assets_def.get_output_name_for_asset_check_key(dg.AssetCheckKey(key, n)))
    for s in shards:
        for n in names:
            yield dg.AssetCheckEvaluation(asset_key=key, check_name=n, passed=True, partition=s, blocking=True)


def _stage(name: str, members: list[str], upstream: str, checks: list[str],
           parts: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    keys = {m: dg.AssetKey([name, m]) for m in members}

    @dg.multi_asset(
        name=name,
        outs={m: dg.AssetOut(key=k, is_required=False) for m, k in keys.items()},
        ins={"upstream": dg.AssetIn(upstream)},
        partitions_def=parts,
        can_subset=True,
        check_specs=[s for k in keys.values() for s in _checks(k, checks)],
    )
    def _step(context, upstream):  # noqa: ANN001, ANN202
        for m, k in keys.items():
            yield from _emit(context, k, checks, output_name=m)

    return _step


def _single(name: str, checks: list[str], parts: dg.PartitionsDefinition, ins: dict[str, dg.AssetIn]) -> dg.AssetsDefinition:
    key = dg.AssetKey(name)

    @dg.asset(name=name, partitions_def=parts, ins=ins, check_specs=_checks(key, checks))
    def _step(context, **_inputs):  # noqa: ANN001, ANN202
        yield from _emit(context, key, checks)

    return _step


def build_job(shards: int = 1) -> dg.JobDefinition:
    """`poll_job`'s shape with the `paper` panel over `shards` shards."""
    parts = dg.StaticPartitionsDefinition(shard_keys(shards))
    assets = [
        _single("prompts", PROMPT_CHECKS, parts, {}),
        _stage("generations", GENERATORS, "prompts", GENERATION_CHECKS, parts),
        _single("combined_generations", [], parts, {f"g_{m}": dg.AssetIn(["generations", m]) for m in GENERATORS}),
        _stage("ratings", JUDGES, "combined_generations", RATING_CHECKS, parts),
        _single("pooled_ratings", POOLED_CHECKS, parts, {f"r_{j}": dg.AssetIn(["ratings", j]) for j in JUDGES}),
        _single("preference_pairs", PAIR_CHECKS, parts, {"pooled_ratings": dg.AssetIn("pooled_ratings")}),
    ]
    defs = dg.Definitions(
        assets=assets,
        jobs=[dg.define_asset_job("floor_job", selection=dg.AssetSelection.all())],
        resources={"io_manager": _MemoryShards()},
    )
    return defs.resolve_job_def("floor_job")


def run_pass(job: dg.JobDefinition, instance: dg.DagsterInstance, shards_per_run: int) -> list[str]:
    """Every shard once, in runs of `shards_per_run` consecutive shards, as `poll-assets run --all`
    launches them; the ids of the runs."""
    keys = job.partitions_def.get_partition_keys()
    run_ids = []
    for i in range(0, len(keys), shards_per_run):
        run = keys[i : i + shards_per_run]
        where = {"partition_key": run[0]} if len(run) == 1 else {"tags": {
            "dagster/asset_partition_range_start": run[0], "dagster/asset_partition_range_end": run[-1]}}
        result = job.execute_in_process(instance=instance, **where)
        assert result.success
        run_ids.append(result.run_id)
    return run_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4, help="passes in this process (1: a whole process per pass)")
    parser.add_argument("--shards", type=int, default=1, help="shards of the graph; a pass materializes all of them")
    parser.add_argument("--shards-per-run", type=int, default=20, help="shards per run, as source.shards_per_run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dagster-floor-") as home:
        Path(home, "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        os.environ["DAGSTER_HOME"] = home
        job = build_job(args.shards)
        times = []
        with dg.DagsterInstance.get() as instance:
            for _ in range(args.runs):
                start = time.monotonic()
                run_ids = run_pass(job, instance, args.shards_per_run)
                times.append(time.monotonic() - start)
            by_type = Counter(e.dagster_event_type.value if e.dagster_event_type else "LOG_MESSAGE"
                              for r in run_ids for e in instance.all_logs(r))
    events = sum(by_type.values())
    print(f"passes over {args.shards} shard(s) in {len(run_ids)} run(s) each: {', '.join(f'{t:.2f}s' for t in times)}; "
          f"events in the last pass: {events} ({events / args.shards:.1f} per shard)")
    if len(times) > 1:
        print(f"floor (median of the passes after the first): {statistics.median(times[1:]):.2f}s")
    # for bench_pipeline.py, which reads this line
    print("BENCH_RESULT " + json.dumps({"success": True, "pass_s": times, "runs": len(run_ids), "events_by_type": by_type}))


if __name__ == "__main__":
    main()
