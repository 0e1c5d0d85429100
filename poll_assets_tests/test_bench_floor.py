"""bench/dagster_floor.py must keep the real graph's shape, or the warm-run target compares apples
with pears: the same steps, the same number of assets and the same checks per asset."""

from __future__ import annotations

from collections import Counter

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
