"""What a run of our graph's shape costs when its steps do no work: Dagster's own floor.

Not a test. Run from the repository root with the project's venv:

    .venv/bin/python bench/dagster_floor.py

The job has the shape `poll_job` has with the `paper` panel: one partitioned prompts asset, a stage step
with 4 member outputs, a combining asset, a stage step with 3 member outputs, pooling and pairs, and the
19 asset checks evaluated inside their steps (the real graph's names). Each step returns a one-row frame through Dagster's default
filesystem IO manager, on a SQLite instance in a temporary DAGSTER_HOME (Dagster's default storage, like
the project's `.dagster_home`). It prints the run time of a few runs in one process; the first one also
pays Dagster's lazy imports, the later ones are the floor a warm re-run of the real pipeline cannot go under.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg
import pandas as pd

PARTS = dg.StaticPartitionsDefinition(["shard-00000"])
GENERATORS = ["g1", "g2", "g3", "g4"]
JUDGES = ["j1", "j2", "j3"]


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": ["p"], "value": [1]})


def _checks(key: dg.AssetKey, names: list[str]) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(n, asset=key, blocking=True) for n in names]


def _results(key: dg.AssetKey, names: list[str]) -> list[dg.AssetCheckResult]:
    return [dg.AssetCheckResult(asset_key=key, check_name=n, passed=True) for n in names]


def build_job() -> dg.JobDefinition:
    @dg.asset(partitions_def=PARTS, check_specs=_checks(dg.AssetKey("prompts"), ["prompts_valid"]))
    def prompts():  # noqa: ANN202
        yield dg.Output(_frame())
        yield from _results(dg.AssetKey("prompts"), ["prompts_valid"])

    def stage(name: str, members: list[str], upstream: str, checks: list[str]) -> dg.AssetsDefinition:
        keys = {m: dg.AssetKey([name, m]) for m in members}

        @dg.multi_asset(
            name=name,
            outs={m: dg.AssetOut(key=k, is_required=False) for m, k in keys.items()},
            ins={"upstream": dg.AssetIn(upstream)},
            partitions_def=PARTS,
            can_subset=True,
            check_specs=[s for k in keys.values() for s in _checks(k, checks)],
        )
        def _stage(context, upstream: pd.DataFrame):  # noqa: ANN001, ANN202
            for m, k in keys.items():
                yield dg.Output(_frame(), output_name=m)
                yield from _results(k, checks)

        return _stage

    # The check names of the real graph (19 checks with `paper`: each member has its stage's combined check and pending_rows,
    # the pairs two since contested_pairs).
    gens = stage("generations", GENERATORS, "prompts", ["generations_valid", "pending_rows"])

    @dg.asset(partitions_def=PARTS, ins={f"g_{m}": dg.AssetIn(["generations", m]) for m in GENERATORS})
    def combined_generations(**_frames: pd.DataFrame) -> pd.DataFrame:
        return _frame()

    ratings = stage("ratings", JUDGES, "combined_generations", ["ratings_valid", "pending_rows"])

    @dg.asset(
        partitions_def=PARTS,
        ins={f"r_{j}": dg.AssetIn(["ratings", j]) for j in JUDGES},
        check_specs=_checks(dg.AssetKey("pooled_ratings"), ["covers_every_generation", "judge_agreement"]),
    )
    def pooled_ratings(**_frames: pd.DataFrame):  # noqa: ANN202
        yield dg.Output(_frame())
        yield from _results(dg.AssetKey("pooled_ratings"), ["covers_every_generation", "judge_agreement"])

    pair_checks = ["chosen_beats_rejected", "contested_pairs"]

    @dg.asset(partitions_def=PARTS, check_specs=_checks(dg.AssetKey("preference_pairs"), pair_checks))
    def preference_pairs(pooled_ratings: pd.DataFrame):  # noqa: ANN202
        yield dg.Output(_frame())
        yield from _results(dg.AssetKey("preference_pairs"), pair_checks)

    defs = dg.Definitions(
        assets=[prompts, gens, combined_generations, ratings, pooled_ratings, preference_pairs],
        jobs=[dg.define_asset_job("floor_job", partitions_def=PARTS)],
    )
    return defs.resolve_job_def("floor_job")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4, help="runs in this process (1: a whole process per run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dagster-floor-") as home:
        Path(home, "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        os.environ["DAGSTER_HOME"] = home
        job = build_job()
        times = []
        with dg.DagsterInstance.get() as instance:
            for _ in range(args.runs):
                start = time.monotonic()
                result = job.execute_in_process(partition_key="shard-00000", instance=instance)
                times.append(time.monotonic() - start)
                assert result.success
            events = len(instance.all_logs(result.run_id))
    print(f"run times: {', '.join(f'{t:.2f}s' for t in times)}; events in the last run: {events}")
    if len(times) > 1:
        print(f"floor (median of the runs after the first): {statistics.median(times[1:]):.2f}s")


if __name__ == "__main__":
    main()
