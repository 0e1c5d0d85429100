"""Faults over real HTTP: the real assets, resources and SDKs against the loopback fake provider server.

A small panel with the `paper` panel's provider mix (HF inference and OpenAI generators; OpenAI and
Anthropic judges), every member aimed at its own path on the fake server so failures can target one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from poll_assets.llm.cache import ResponseCache
from poll_assets.panel import Panel, load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets_tests.fake_llm_server import FakeLLMServer
from poll_assets_tests.fake_panel import write_panel_file

PARTITION = "shard-00000"
KEY_ENV = "POLL_FAULT_TEST_KEY"
REPO = Path(__file__).resolve().parent.parent

MEMBERS = {
    "generators": [("gen_hf", "hf_inference", "meta-llama/Meta-Llama-3-8B-Instruct", "llama"),
                   ("gen_openai", "openai", "gpt-4o-mini", "gpt")],
    "judges": [("judge_openai", "openai", "gpt-3.5-turbo-0125", "gpt35"),
               ("judge_claude", "anthropic", "claude-3-haiku-20240307", "claude")],
}


def tag(name: str, provider: str) -> str:
    return f"hf_{name}" if provider == "hf_inference" else name


def base_url(server: FakeLLMServer, name: str, provider: str) -> str:
    return f"{server.url}/{tag(name, provider)}" + ("" if provider == "anthropic" else "/v1")


def http_panel_file(tmp: Path, server: FakeLLMServer, n: int, *, concurrency: int = 8, max_retries: int = 5) -> Path:
    """A panel of HTTP members (hf_inference, openai, anthropic), each pointed at the fake server."""
    prompts = [f"Fault test prompt number {i}: say something short." for i in range(n)]
    raw: dict[str, Any] = {
        "name": "faults",
        "source": {"data_files": [str(tmp / "prompts.jsonl")], "column_mapping": {"prompt": "instruction"},
                   "num_examples": n, "shard_size": n},
        "judging": {"aspect": "instruction-following"},
    }
    for role, members in MEMBERS.items():
        raw[role] = [
            {
                "name": name, "provider": provider, "model": model, "family": family,
                "params": {"max_new_tokens": 64},
                "limits": {"max_concurrency": concurrency, "max_retries": max_retries, "timeout_s": 20},
                "base_url": base_url(server, name, provider), "api_key_env": KEY_ENV,
            }
            for name, provider, model, family in members
        ]
    return write_panel_file(tmp, raw, prompts=prompts)


def materialize(panel_path: Path, storage: Path, cache: Path) -> tuple[dg.ExecuteInProcessResult, dg.DagsterInstance, Panel]:
    panel, path = load_panel(panel_path)
    defs = build_definitions(panel, path, storage_dir=str(storage), cache_path=str(cache))
    instance = dg.DagsterInstance.ephemeral()
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(
        partition_key=PARTITION, instance=instance, raise_on_error=False
    )
    return result, instance, panel


def read(storage: Path, *key: str) -> pd.DataFrame:
    return pd.read_parquet(storage.joinpath(*key, f"{PARTITION}.parquet"))


def llm_metadata(instance: dg.DagsterInstance, key: list[str]) -> dict[str, Any]:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    assert event is not None and event.asset_materialization is not None, key
    return {k: v.value for k, v in event.asset_materialization.metadata.items() if k.startswith("llm/")}


@pytest.fixture
def env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "fake-key")


def test_transient_429_and_500_lose_no_row_and_retries_are_recorded(fake_llm, tmp_path, env_key):
    n = 40
    fake_llm.reset(latency_ms=5, rate_limit_fraction=0.025, server_error_fraction=0.025, retry_after_s=0.05, seed=7)
    result, instance, panel = materialize(http_panel_file(tmp_path, fake_llm, n), tmp_path / "storage", tmp_path / "c.sqlite")
    assert result.success
    stats = fake_llm.stats()
    faults = stats["outcomes"].get("429", 0) + stats["outcomes"].get("500", 0)
    assert faults > 0, stats["outcomes"]

    prompts = read(tmp_path / "storage", "prompts")
    assert len(prompts) == n
    attempts = retries = 0
    for g in panel.generators:
        gen = read(tmp_path / "storage", "generations", g.name)
        assert gen["prompt_id"].tolist() == prompts["prompt_id"].tolist()
        assert gen["error"].isna().all(), gen["error"].dropna().tolist()
        assert gen["generation"].map(lambda t: isinstance(t, str) and bool(t)).all()
        meta = llm_metadata(instance, ["generations", g.name])
        attempts += meta["llm/calls"]
        retries += meta["llm/retries"]
    for j in panel.judges:
        ratings = read(tmp_path / "storage", "ratings", j.name)
        assert ratings["prompt_id"].tolist() == prompts["prompt_id"].tolist()
        assert ratings["error"].isna().all(), ratings["error"].dropna().tolist()
        for row in ratings.itertuples():
            assert len(row.ratings) == len(panel.generators)
            assert all(r is not None and 1 <= r <= 5 for r in row.ratings), row.rating_errors
        meta = llm_metadata(instance, ["ratings", j.name])
        attempts += meta["llm/calls"]
        retries += meta["llm/retries"]
    calls = n * (len(panel.generators) + len(panel.judges))
    # Every attempt the server saw is accounted for, and every fault became exactly one retry.
    assert attempts == stats["total"] == calls + faults
    assert retries == faults
    pooled = read(tmp_path / "storage", "pooled_ratings")
    assert len(pooled) == n
    for valid in pooled["n_valid_judges"]:  # one count per generation
        assert list(valid) == [len(panel.judges)] * len(panel.generators)


def test_judges_answering_200_without_the_structured_part_cost_one_call_per_row_and_give_verdicts(
    fake_llm, tmp_path, env_key
):
    n = 10
    # The Anthropic judge answers its forced tool call in prose; the OpenAI judge ignores json_schema.
    fake_llm.reset(omit_tool_use=["judge_claude"], ignore_response_format=["judge_openai"])
    result, instance, panel = materialize(http_panel_file(tmp_path, fake_llm, n), tmp_path / "storage", tmp_path / "c.sqlite")
    assert result.success
    stats = fake_llm.stats()
    assert stats["total"] == n * (len(panel.generators) + len(panel.judges)) and stats["max_repeats"] == 1
    assert stats["by_tag"]["judge_claude"] == stats["by_tag"]["judge_openai"] == n
    for j in panel.judges:
        ratings = read(tmp_path / "storage", "ratings", j.name)
        assert ratings["error"].isna().all(), ratings["error"].dropna().tolist()
        assert ratings["output_mode"].eq("text_fallback").all(), j.name
        assert ratings["raw_output"].str.contains("#### Output for Text 1\nRating: ", regex=False).all()
        for row in ratings.itertuples():  # the text parser read every verdict the judge wrote
            assert all(r is not None and 1 <= r <= 5 for r in row.ratings), row.rating_errors
        meta = llm_metadata(instance, ["ratings", j.name])
        assert meta["llm/calls"] == n and meta["llm/retries"] == 0 and meta["llm/failures"] == 0


_RUN_SCRIPT = """
import sys
import dagster as dg
from pathlib import Path
from poll_assets.panel import load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions
panel, path = load_panel(Path(sys.argv[1]))
defs = build_definitions(panel, path, storage_dir=sys.argv[2], cache_path=sys.argv[3])
print("starting", flush=True)
result = defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key="shard-00000", instance=dg.DagsterInstance.ephemeral())
print("finished", result.success, flush=True)
"""


@pytest.mark.slow
def test_a_run_killed_during_generation_never_requests_a_cached_call_again(fake_llm, tmp_path, env_key):
    n = 30
    fake_llm.reset(latency_ms=150, jitter_ms=50)
    panel_path = http_panel_file(tmp_path, fake_llm, n, concurrency=3)
    storage, cache_path = tmp_path / "storage", tmp_path / "cache.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO), KEY_ENV: "fake-key"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN_SCRIPT, str(panel_path), str(storage), str(cache_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    generation_calls = n * len(MEMBERS["generators"])
    try:
        deadline = time.monotonic() + 60
        while sum(fake_llm.stats()["outcomes"].values()) < 12:
            assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "the server never answered 12 requests"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    first = fake_llm.stats()
    assert first["total"] < generation_calls, "killed too late: the generations had all been requested"
    cached = len(ResponseCache(cache_path))
    assert 0 < cached <= first["total"]

    result, _, panel = materialize(panel_path, storage, cache_path)
    assert result.success
    total_calls = n * (len(panel.generators) + len(panel.judges))
    after = fake_llm.stats()
    # The re-run asked for exactly the calls that were not cached when the first run died ...
    assert after["total"] - first["total"] == total_calls - cached
    # ... so no body was sent more than twice, and only calls cut off in flight were sent twice.
    repeated = sum(1 for count in after["by_body"].values() if count > 1)
    assert after["max_repeats"] <= 2
    assert repeated == first["total"] - cached
    for g in panel.generators:
        assert read(storage, "generations", g.name)["error"].isna().all()


def test_a_provider_that_stays_down_fails_its_asset_clearly_and_keeps_the_rest(fake_llm, tmp_path, env_key):
    n = 12
    fake_llm.reset(latency_ms=5, forced_status={"gen_openai": 503})
    panel_path = http_panel_file(tmp_path, fake_llm, n, max_retries=1)
    storage, cache_path = tmp_path / "storage", tmp_path / "cache.sqlite"
    result, instance, panel = materialize(panel_path, storage, cache_path)
    assert not result.success
    failures = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert len(failures) == 1
    message = failures[0].step_failure_data.error.message if failures[0].step_failure_data.error else ""
    message += " " + (failures[0].step_failure_data.user_failure_data.description or "" if failures[0].step_failure_data.user_failure_data else "")
    assert "generations/gen_openai" in message and "'gen_openai'" in message and "openai" in message
    assert f"all {n} calls" in message and "server" in message
    assert "down or overloaded" in message and "re-materialize the partition" in message
    assert "fake-key" not in message

    # The healthy generator's answers were stored and cached; the judges never ran.
    assert len(read(storage, "generations", "gen_hf")) == n
    assert not (storage / "generations" / "gen_openai").exists()
    assert not (storage / "ratings").exists()
    assert len(ResponseCache(cache_path)) == n
    assert fake_llm.stats()["by_tag"] == {"hf_gen_hf": n, "gen_openai": 2 * n}  # one retry each

    # The provider comes back: a re-run requests only what never succeeded.
    fake_llm.reset(latency_ms=5)
    result, _, _ = materialize(panel_path, storage, cache_path)
    assert result.success
    assert fake_llm.stats()["by_tag"] == {"gen_openai": n, "judge_openai": n, "judge_claude": n}
    assert len(read(storage, "preference_pairs")) > 0
