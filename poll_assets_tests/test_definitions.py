import subprocess
import sys

import dagster as dg
import pytest

from poll_assets.panel import load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions


def _keys(defs: dg.Definitions) -> set[str]:
    return {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}


@pytest.mark.parametrize("name", ["local", "paper"])
def test_graph_has_one_node_per_member_and_shared_partitions(name, monkeypatch):
    for var in ("HF_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.setenv(var, "unused-in-this-test")
    panel, path = load_panel(name)
    defs = build_definitions(panel, path)
    expected = {"prompts", "combined_generations", "pooled_ratings", "preference_pairs", "preference_dataset"}
    expected |= {f"generations/{g.name}" for g in panel.generators}
    expected |= {f"ratings/{j.name}" for j in panel.judges}
    assert _keys(defs) == expected

    graph = defs.resolve_asset_graph()
    shard_keys = {k for k in graph.get_all_asset_keys() if graph.get(k).is_materializable}
    # The export is recorded by publish_job and is not part of the per-shard graph.
    assert {k.to_user_string() for k in graph.get_all_asset_keys() - shard_keys} == {"preference_dataset"}
    partitions = {graph.get(key).partitions_def for key in shard_keys}
    assert len(partitions) == 1
    (only,) = partitions
    assert only.get_partition_keys()[0] == "shard-00000"
    assert len(only.get_partition_keys()) == -(-panel.source.num_examples // panel.source.shard_size)
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.kinds, key
        assert node.group_name and node.group_name != "default", key
        assert node.description, key
        assert node.code_version or key in graph.get_all_asset_keys() - shard_keys, key
    job = defs.resolve_job_def(JOB_NAME)
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == expected - {"preference_dataset"}


def test_judge_code_version_tracks_only_that_judge(tmp_path):
    panel, path = load_panel("local")
    before = build_definitions(panel, path).resolve_asset_graph()
    j0 = panel.judges[0]
    changed = panel.model_copy(
        update={"judges": [j0.model_copy(update={"params": j0.params.model_copy(update={"temperature": 0.9})}), *panel.judges[1:]]}
    )
    after = build_definitions(changed, path).resolve_asset_graph()
    differ = {
        k.to_user_string()
        for k in before.get_all_asset_keys()
        if before.get(k).code_version != after.get(k).code_version
    }
    assert differ == {f"ratings/{j0.name}"}


def test_definitions_validate_cli():
    out = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-m", "poll_assets.definitions"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_storage_dir_comes_from_the_environment(monkeypatch, tmp_path):
    from poll_assets.io_manager import default_storage_dir

    monkeypatch.delenv("POLL_STORAGE_DIR", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assert default_storage_dir() == str(tmp_path / "storage")
    monkeypatch.setenv("POLL_STORAGE_DIR", "s3://bucket/prefix")
    assert default_storage_dir() == "s3://bucket/prefix"
