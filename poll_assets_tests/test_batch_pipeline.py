"""A partition materialized in batch mode end to end: every LLM member of a small panel goes through
its provider's batch API on the loopback server (OpenAI and Anthropic wire formats), through Dagster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from poll_assets.panel import load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets_tests.fake_llm_server import FakeLLMServer
from poll_assets_tests.fake_panel import PROMPTS, write_panel_file
from poll_assets_tests.instance import make_dagster_home

PARTITION = "shard-00000"
BATCH = {"enabled": True, "poll_interval_s": 0.05, "max_poll_interval_s": 0.2}


def member(name: str, provider: str, url: str, role: str) -> dict[str, Any]:
    base = f"{url}/{name}/v1" if provider == "openai" else f"{url}/{name}"
    return {"name": name, "provider": provider, "model": f"{provider}-{role}", "family": name,
            "base_url": base, "params": {"max_new_tokens": 32}, "batch": BATCH}


def batch_panel(tmp_path: Path, url: str) -> Path:
    raw = {
        "name": "batch",
        "source": {"data_files": ["prompts.jsonl"], "column_mapping": {"prompt": "instruction"},
                   "num_examples": 4, "shard_size": 4},
        "generators": [member("gen_oa", "openai", url, "gen"), member("gen_an", "anthropic", url, "gen")],
        "judges": [member("judge_oa", "openai", url, "judge"), member("judge_an", "anthropic", url, "judge")],
        "thresholds": {"min_agreement": -1.0},
        "prices": {"openai-gen": {"input_per_mtok": 1.0, "output_per_mtok": 2.0, "batch_discount": 0.5}},
    }
    return write_panel_file(tmp_path, raw, prompts=PROMPTS)


def materialize(tmp_path: Path, url: str, setenv: Callable[[str, str], None]) -> tuple[Any, Path, Any]:
    setenv("OPENAI_API_KEY", "test-key")
    setenv("ANTHROPIC_API_KEY", "test-key")
    home = make_dagster_home(tmp_path / "home")
    setenv("DAGSTER_HOME", str(home))
    path = batch_panel(tmp_path, url)
    panel, _ = load_panel(path)
    storage = tmp_path / "storage"
    defs = build_definitions(panel, path, storage_dir=str(storage), cache_path=str(home / "cache.sqlite"))
    instance = dg.DagsterInstance.local_temp(str(home))
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=PARTITION, instance=instance,
                                                               raise_on_error=False)
    return result, storage, instance


def read(storage: Path, *key: str) -> pd.DataFrame:
    return pd.read_parquet(storage.joinpath(*key, f"{PARTITION}.parquet"))


def test_a_partition_in_batch_mode_end_to_end_with_failures_and_expiry(tmp_path, fake_llm, monkeypatch):
    fake_llm.batches.reset(processing_s=0.2, error_fraction=0.25, expire_batches=2, expire_keep=0.5)
    result, storage, instance = materialize(tmp_path, fake_llm.url, monkeypatch.setenv)
    assert result.success
    for name in ("gen_oa", "gen_an"):
        gen = read(storage, "generations", name)
        assert len(gen) == 4 and gen["error"].isna().all() and gen["generation"].map(bool).all()
    for name in ("judge_oa", "judge_an"):
        ratings = read(storage, "ratings", name)
        assert len(ratings) == 4 and ratings["error"].isna().all()
        assert all(1 <= r <= 5 for row in ratings["ratings"] for r in row)
    assert len(read(storage, "preference_pairs")) > 0

    assert fake_llm.stats()["total"] == 0  # not one call went online
    stats = fake_llm.batches.stats()
    assert stats["max_submissions"] <= 2  # a failed or expired request went once more, nothing else
    assert sum(fake_llm.batches.submissions.values()) > len(fake_llm.batches.submissions)  # faults happened
    assert len(fake_llm.batches.submissions) == 4 * 4  # 4 members x 4 prompts, each answered

    event = instance.get_latest_materialization_event(dg.AssetKey(["generations", "gen_oa"]))
    meta = event.asset_materialization.metadata
    batches = meta["llm/batches"].value
    assert batches and all(b["batch_id"].startswith("batch_") for b in batches)
    assert sum(b["counts"].get("succeeded", 0) for b in batches) == 4
    assert meta["llm/batch_cost_usd"].value == pytest.approx(meta["llm/cost_online_uncached_usd"].value / 2)
    assert meta["llm/cost_usd"].value == pytest.approx(meta["llm/batch_cost_usd"].value)  # paid: the batch price
    assert meta["llm/saving_fraction"].value == pytest.approx(0.5)
    an = instance.get_latest_materialization_event(dg.AssetKey(["ratings", "judge_an"])).asset_materialization
    assert all(b["batch_id"].startswith("msgbatch_") for b in an.metadata["llm/batches"].value)
    logs = " ".join(e.message for e in instance.all_logs(result.run_id) if e.message)
    assert "in batch mode" in logs and "submitted batch" in logs


CHILD = """
import os, sys
from pathlib import Path
from poll_assets_tests.test_batch_pipeline import materialize
materialize(Path(sys.argv[1]), sys.argv[2], os.environ.__setitem__)
"""


@pytest.mark.slow
def test_a_run_killed_while_its_batches_are_pending_is_relaunched_without_a_second_submission(
    tmp_path, fake_llm, monkeypatch
):
    from poll_assets_tests.test_batch import open_batch_ids

    fake_llm.batches.reset(processing_s=3600)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), fake_llm.url], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = tmp_path / "home" / "cache.sqlite"
    try:
        deadline = time.monotonic() + 120
        while len(open_batch_ids(cache)) < 2:  # both generators are waiting on their batch
            assert child.poll() is None and time.monotonic() < deadline, "the run never submitted its batches"
            time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    pending = sorted(open_batch_ids(cache))
    fake_llm.batches.configure(processing_s=0.2)
    result, storage, instance = materialize(tmp_path, fake_llm.url, monkeypatch.setenv)
    assert result.success
    stats = fake_llm.batches.stats()
    assert stats["max_submissions"] == 1 and stats["submitted_requests"] == 4 * 4 and stats["batches"] == 4
    ids = [b["batch_id"] for m in ("gen_oa", "gen_an") for b in instance.get_latest_materialization_event(
        dg.AssetKey(["generations", m])).asset_materialization.metadata["llm/batches"].value]
    assert sorted(ids) == pending  # the relaunch collected the batches the killed run submitted
    assert all(read(storage, "generations", m)["error"].isna().all() for m in ("gen_oa", "gen_an"))
