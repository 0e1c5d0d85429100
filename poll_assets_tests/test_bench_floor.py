"""bench/dagster_floor.py must keep the real graph's shape, or the warm-run target compares apples
with pears: the same steps, the same number of assets and the same checks per asset."""

from __future__ import annotations

from collections import Counter

import dagster as dg

from bench.dagster_floor import build_job
from poll_assets.panel import load_panel
from poll_assets.pipeline import build_definitions


def _shape(job) -> tuple[Counter, Counter, int]:
    graph = job.asset_layer.asset_graph
    checks = Counter(len([c for c in graph.asset_check_keys if c.asset_key == k]) for k in graph.materializable_asset_keys)
    prefixes = Counter(k.path[0] for k in graph.materializable_asset_keys)
    return prefixes, checks, len(job.graph.node_defs)


def test_the_dagster_floor_has_the_paper_graphs_shape(tmp_path):
    panel, path = load_panel("paper")
    real = build_definitions(panel, path, storage_dir=str(tmp_path)).resolve_implicit_global_asset_job_def()
    assert _shape(build_job()) == _shape(real)


def test_a_range_run_of_the_floor_materializes_and_checks_every_shard_on_its_own(tmp_path):
    """The floor a whole-dataset build is measured against runs its shards as `run --all` does (runs
    of consecutive shards) and still writes one materialization per asset and shard, and one check
    evaluation per check and shard; the benchmark's event reader counts them."""
    from bench.dagster_floor import run_pass
    from bench.dataset_scale import read_events

    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    job = build_job(3)
    per_shard = len(job.asset_layer.asset_graph.asset_check_keys)  # 26 with `paper`, as the real graph has
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        run_ids = run_pass(job, instance, shards_per_run=2)
        checks = Counter(
            e.dagster_event.event_specific_data.partition
            for r in run_ids for e in instance.all_logs(r, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        )
    assert len(run_ids) == 2
    # the run of one shard yields plain check results, as the real steps do: their event names no partition
    assert checks == {"shard-00000": per_shard, "shard-00001": per_shard, None: per_shard}
    events = read_events(tmp_path, skip={run_ids[0]})
    assert events.run_ids == [run_ids[1]]
    assert events.materialized["prompts"] == 1 and sum(events.materialized.values()) == 11
    assert events.by_type["ASSET_CHECK_EVALUATION"] == per_shard and events.by_type["PIPELINE_SUCCESS"] == 1
    assert events.index_rows and events.index_rows > 0
