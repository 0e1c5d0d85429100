"""The instance files the project ships load under Dagster's own validation: the project's
.dagster_home/dagster.yaml (used by `poll-assets run` and `poll-assets ui`) and the deployment's
deploy/dagster.yaml (also exercised against a real PostgreSQL in test_postgres.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.instance.config import dagster_instance_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_project_instance_loads(tmp_path: Path) -> None:
    shutil.copy(REPO_ROOT / ".dagster_home" / "dagster.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        concurrency = instance.get_concurrency_config()
        assert concurrency.run_queue_config is not None
        assert concurrency.run_queue_config.max_concurrent_runs >= 1
        assert concurrency.pool_config.default_pool_limit is not None  # LLM pools are bounded
        limits = concurrency.run_queue_config.tag_concurrency_limits
        assert {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits
        assert instance.run_monitoring_enabled  # the daemon fails runs stuck in STARTING
        assert instance.run_monitoring_start_timeout_seconds == 180


def test_deployment_instance_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(REPO_ROOT / "deploy" / "dagster.yaml", tmp_path / "dagster.yaml")
    for var in ("DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.setenv(var, "x")
    monkeypatch.setenv("DAGSTER_PG_PORT", "5432")
    config, _ = dagster_instance_config(str(tmp_path))
    assert set(config["storage"]) == {"postgres"}
    assert config["concurrency"]["runs"]["max_concurrent_runs"] >= 1
    assert config["concurrency"]["pools"]["default_limit"] >= 1
    assert config["run_monitoring"]["enabled"] is True
    shard_limit = {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
    assert shard_limit in config["concurrency"]["runs"]["tag_concurrency_limits"]
