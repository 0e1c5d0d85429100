"""The `paper` panel end to end against the loopback provider server, through the real SDKs.

Every member keeps its provider and model from paper.yaml; only base_url (to the fake server), the
prompt source (the bundled sample prompts) and the keys (a canary in the environment) change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
import yaml
from dagster._serdes import serialize_value

from poll_assets.panel import PANELS_DIR, load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets_tests.fake_llm_server import FakeLLMServer
from poll_assets_tests.instance import make_dagster_home

CANARY = "sk-poll-SECRET-canary-123"
PARTITION = "shard-00000"
KEY_VARS = ("HF_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY")
STRUCTURED_MODE = {"hf_inference": "grammar", "openai": "json_schema", "anthropic": "tool_use"}


def member_path(member: dict[str, Any]) -> str:
    """The path on the fake server: one tag per member, so failures can be aimed at one of them."""
    tag = f"{member['provider']}_{member['name']}"
    return {"openai": f"/{tag}/v1", "anthropic": f"/{tag}", "hf_inference": f"/hf_{member['name']}"}[member["provider"]]


def tag_of(member: dict[str, Any]) -> str:
    return member_path(member).strip("/").removesuffix("/v1")


def paper_on_fake(tmp_path: Path, url: str) -> tuple[Path, dict[str, Any]]:
    raw = yaml.safe_load((PANELS_DIR / "paper.yaml").read_text())
    raw["source"] = {
        "data_files": [str((PANELS_DIR / "../data/sample_prompts.jsonl").resolve())],
        "column_mapping": {"prompt": "instruction"},
        "num_examples": 6,
        "shard_size": 3,
    }
    for member in (*raw["generators"], *raw["judges"]):
        member["base_url"] = url + member_path(member)
    raw["cache"] = {"mode": "bypass"}
    path = tmp_path / "paper_fake.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def run_partition(tmp_path: Path, fake: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    for var in KEY_VARS:
        monkeypatch.setenv(var, CANARY)
    home = make_dagster_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    storage = tmp_path / "storage"
    path, raw = paper_on_fake(tmp_path, fake.url)
    panel, _ = load_panel(path)
    defs = build_definitions(panel, path, storage_dir=str(storage), cache_path=str(home / "cache.sqlite"))
    instance = dg.DagsterInstance.local_temp(str(home))
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(
        partition_key=PARTITION, instance=instance, raise_on_error=False
    )
    return panel, raw, storage, home, instance, result


def read(storage: Path, *key: str) -> pd.DataFrame:
    path = storage.joinpath(*key, f"{PARTITION}.parquet")
    assert path.is_file(), path
    return pd.read_parquet(path)


def find_canary(instance: dg.DagsterInstance, run_id: str, roots: list[Path], needle: str = CANARY) -> list[str]:
    """Every place `needle` shows up: events, run config, materialization metadata, files on disk."""
    hits = []
    for entry in instance.all_logs(run_id):
        if needle in serialize_value(entry) or needle in str(entry):
            hits.append(f"event {entry.dagster_event_type}: {entry.message[:80]!r}")
    run = instance.get_run_by_id(run_id)
    if needle in serialize_value(run.run_config):
        hits.append("run config")
    for key in instance.get_asset_keys():
        event = instance.get_latest_materialization_event(key)
        if event is not None and needle in serialize_value(event.asset_materialization.metadata):
            hits.append(f"metadata of {key.to_user_string()}")
    for root in roots:
        for file in root.rglob("*"):
            if file.is_file() and needle.encode() in file.read_bytes():
                hits.append(f"file {file}")
    return hits


@pytest.mark.slow
def test_paper_panel_materializes_one_partition_over_http(tmp_path, fake_llm, monkeypatch):
    fake_llm.configure(expected_key=CANARY, latency_ms=20, jitter_ms=10)
    panel, raw, storage, home, instance, result = run_partition(tmp_path, fake_llm, monkeypatch)
    assert result.success

    prompts = read(storage, "prompts")
    ids = prompts["prompt_id"].tolist()
    assert len(ids) == 3 and prompts["prompt_id"].is_unique
    for g in panel.generators:
        gen = read(storage, "generations", g.name)
        assert gen["prompt_id"].tolist() == ids
        assert gen["error"].isna().all() and all(isinstance(t, str) and t for t in gen["generation"])
        assert gen["model_name"].eq(g.model).all() and gen["served_model"].eq(g.model).all()
        assert gen["request_id"].str.startswith("chatcmpl-").all()
        assert (gen["input_tokens"] > 0).all() and (gen["output_tokens"] > 0).all()
    combined = read(storage, "combined_generations")
    assert combined["prompt_id"].tolist() == ids
    assert combined["generation_models"].map(list).tolist() == [[g.model for g in panel.generators]] * 3
    for j in panel.judges:
        ratings = read(storage, "ratings", j.name)
        assert ratings["prompt_id"].tolist() == ids
        assert ratings["output_mode"].eq(STRUCTURED_MODE[j.provider]).all(), j.name
        for _, row in ratings.iterrows():
            assert len(row["ratings"]) == len(panel.generators) == len(row["rating_errors"])
            assert sorted(row["shown_order"]) == list(range(len(panel.generators)))
            # Schema-constrained answers from the fake always parse onto the 1-5 scale.
            assert all(1 <= r <= 5 for r in row["ratings"]) and all(e is None for e in row["rating_errors"])
    pooled = read(storage, "pooled_ratings")
    assert pooled["prompt_id"].tolist() == ids
    pairs = read(storage, "preference_pairs")
    assert set(pairs["prompt_id"]) <= set(ids)
    assert pairs["prompt_id"].tolist() == [i for i in ids if i in set(pairs["prompt_id"])]

    stats = fake_llm.stats()
    members = [*raw["generators"], *raw["judges"]]
    assert stats["by_tag"] == {tag_of(m): 3 for m in members}  # one call per prompt per member
    assert stats["max_repeats"] == 1  # no request was sent twice
    assert find_canary(instance, result.run_id, [storage, home]) == []


@pytest.mark.slow
def test_canary_key_never_leaks_even_when_the_server_echoes_it(tmp_path, fake_llm, monkeypatch):
    # The Claude judge's endpoint answers 401 quoting the key back; an HF generator's answers 500s quoting it.
    probe = tmp_path / "probe"
    probe.mkdir()
    _, raw = paper_on_fake(probe, fake_llm.url)
    claude = next(m for m in raw["judges"] if m["provider"] == "anthropic")
    fake_llm.configure(forced_status={tag_of(claude): 401}, server_error_fraction=0.3, seed=3)
    panel, raw, storage, home, instance, result = run_partition(tmp_path, fake_llm, monkeypatch)
    assert not result.success
    failures = [e for e in instance.all_logs(result.run_id) if e.dagster_event_type == dg.DagsterEventType.STEP_FAILURE]
    assert failures, "the 401 should fail the Claude judge's step"
    text = " ".join(serialize_value(e) for e in failures)
    assert "HTTP 401" in text and "ANTHROPIC_API_KEY" in text
    assert claude["name"] in text and claude["model"] in text
    assert fake_llm.stats()["outcomes"].get("500", 0) > 0  # the echoing 500s really happened
    assert find_canary(instance, result.run_id, [storage, home]) == []
    # The search itself can find things: the variable's name is in the failure event, and a planted
    # file with the key is reported.
    assert find_canary(instance, result.run_id, [], needle="ANTHROPIC_API_KEY")
    (storage / "planted.txt").write_text(f"oops {CANARY}")
    assert find_canary(instance, result.run_id, [storage]) == [f"file {storage / 'planted.txt'}"]
