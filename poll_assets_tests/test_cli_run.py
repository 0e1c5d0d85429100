"""`poll-assets run` over several shards: --partitions A...B and --all, cut into runs of
`source.shards_per_run`, against the loopback fake server."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from poll_assets import cli
from poll_assets.panel import load_panel
from poll_assets.partitions import run_ranges, select_shards
from poll_assets_tests.instance import make_dagster_home
from poll_assets_tests.test_paper_fake_server import tag_of
from poll_assets_tests.test_shards import KEY_VARS, asset_keys, paper_in_shards

KEYS = [f"shard-0000{i}" for i in range(5)]


def test_select_shards_reads_a_range_a_key_and_names_what_is_wrong() -> None:
    assert select_shards(KEYS, "shard-00001...shard-00003") == KEYS[1:4]
    assert select_shards(KEYS, "shard-00002") == ["shard-00002"]
    with pytest.raises(ValueError, match="'shard-00009' is not a shard of this panel"):
        select_shards(KEYS, "shard-00000...shard-00009")
    with pytest.raises(ValueError, match="ends before it starts"):
        select_shards(KEYS, "shard-00003...shard-00001")
    assert run_ranges(KEYS, 2) == [KEYS[0:2], KEYS[2:4], KEYS[4:5]]


def test_run_rejects_an_unknown_shard_before_running(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    panel = paper_in_shards(tmp_path, "http://127.0.0.1:9")
    assert cli.main(["run", "--panel", str(panel), "--partitions", "shard-00000...shard-00042"]) == 2
    assert "'shard-00042' is not a shard of this panel" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --all and a range together make no sense
        cli.main(["run", "--panel", str(panel), "--all", "--partitions", "shard-00000...shard-00001"])


@pytest.mark.slow
def test_run_partitions_and_all_run_few_runs_and_pay_each_call_once(tmp_path, fake_llm, monkeypatch, capsys) -> None:
    fake_llm.configure(latency_ms=10, jitter_ms=5)
    for var in KEY_VARS:
        monkeypatch.setenv(var, "sk-test")
    home = make_dagster_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    panel = paper_in_shards(tmp_path, fake_llm.url, shards=3, shard_size=1, shards_per_run=2)
    members = 7

    assert cli.main(["run", "--panel", str(panel), "--partitions", "shard-00000...shard-00002"]) == 0
    out = capsys.readouterr().out
    assert "3 shard(s) shard-00000 ... shard-00002 in 2 run(s)" in out
    for shard in ("shard-00000", "shard-00001", "shard-00002"):
        assert f"{shard}: " in out and f"{shard}.parquet" in out
    assert fake_llm.stats()["total"] == 3 * members and fake_llm.stats()["max_repeats"] == 1
    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.get_run_records()
        assert len(records) == 2  # shards_per_run 2: one run of 2 shards, one of 1
        # Each run names its assets, as a *Materialize all* run does: the UI's Runs → Target shows them.
        for record in records:
            assert dg.AssetKey("preference_pairs") in (record.dagster_run.asset_selection or ()), record.dagster_run
            assert dg.AssetKey("prompts") in record.dagster_run.asset_selection

        # Recorded under the code location `poll-assets ui` serves (workspace.yaml), so the UI lists
        # them under their job and on the Overview timeline.
        for record in records:
            origin = record.dagster_run.remote_job_origin
            assert origin is not None, record.dagster_run
            assert (origin.location_name, origin.repository_origin.repository_name, origin.job_name) == (
                "poll_assets", "__repository__", "__ASSET_JOB")

    fake_llm.reset()
    assert cli.main(["run", "--panel", str(panel), "--all"]) == 0  # nothing missing or stale: no run at all
    assert fake_llm.stats()["total"] == 0
    assert "nothing to do: every asset of the 3 shard(s) is materialized and up to date" in capsys.readouterr().out
    assert cli.main(["run", "--panel", str(panel), "--all", "--force"]) == 0  # warm: every call is cached
    assert fake_llm.stats()["total"] == 0
    assert "shard-00002: " in capsys.readouterr().out
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert len(instance.get_run_records()) == 4  # the no-op launched none; --force two (2 + 1 shards)


def _runs_after(instance: dg.DagsterInstance, known: set[str]) -> list[dg.DagsterRun]:
    return [r.dagster_run for r in instance.get_run_records() if r.dagster_run.run_id not in known]


def _set_judge_tokens(panel: Path, judge: str, tokens: int) -> dict:
    raw = yaml.safe_load(panel.read_text())
    (member,) = [m for m in raw["judges"] if m["name"] == judge]
    member["params"]["max_new_tokens"] = tokens  # a new code version for this judge alone
    panel.write_text(yaml.safe_dump(raw))
    return member


@pytest.mark.slow
def test_run_redoes_only_a_changed_judge_a_missing_shard_or_everything_with_force(
        tmp_path, fake_llm, monkeypatch, capsys) -> None:
    fake_llm.configure(latency_ms=5, jitter_ms=2)
    for var in KEY_VARS:
        monkeypatch.setenv(var, "sk-test")
    home = make_dagster_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    panel = paper_in_shards(tmp_path, fake_llm.url, shards=4, shard_size=1, shards_per_run=4)
    members = 7
    assert cli.main(["run", "--panel", str(panel), "--partitions", "shard-00000...shard-00001"]) == 0
    assert cli.main(["run", "--panel", str(panel), "--partition", "shard-00003"]) == 0
    instance = dg.DagsterInstance.from_config(str(home))
    every_asset = set(asset_keys(load_panel(panel)[0]))
    known = {r.dagster_run.run_id for r in instance.get_run_records()}

    # A shard missing in the middle: that shard alone, every asset, and only its calls.
    fake_llm.reset()
    capsys.readouterr()
    assert cli.main(["run", "--panel", str(panel), "--all"]) == 0
    assert "1 of 4 shard(s) to do" in capsys.readouterr().out
    (run,) = _runs_after(instance, known)
    assert run.tags.get("dagster/partition") == "shard-00002" and set(run.asset_selection) == every_asset
    assert fake_llm.stats()["total"] == members
    known.add(run.run_id)

    # One judge changed: only its calls, and only it and what reads it are re-made, in every shard.
    judge = _set_judge_tokens(panel, "gpt35_turbo", 512)
    fake_llm.reset()
    assert cli.main(["run", "--panel", str(panel), "--all"]) == 0
    assert fake_llm.stats()["by_tag"] == {tag_of(judge): 4}, fake_llm.stats()["by_tag"]
    assert "ratings/gpt35_turbo: 4 shard(s) (code version changed: 4)" in capsys.readouterr().out
    (run,) = _runs_after(instance, known)
    assert set(run.asset_selection) == {dg.AssetKey(["ratings", "gpt35_turbo"]), dg.AssetKey("pooled_ratings"),
                                        dg.AssetKey("preference_pairs")}
    known.add(run.run_id)
    assert cli.main(["run", "--panel", str(panel), "--all"]) == 0 and not _runs_after(instance, known)

    # --force: every asset of the shards asked for, answered from the cache.
    fake_llm.reset()
    assert cli.main(["run", "--panel", str(panel), "--partitions", "shard-00001...shard-00003", "--force"]) == 0
    (run,) = _runs_after(instance, known)
    assert set(run.asset_selection) == every_asset
    assert (run.tags["dagster/asset_partition_range_start"], run.tags["dagster/asset_partition_range_end"]) == (
        "shard-00001", "shard-00003")
    assert fake_llm.stats()["total"] == 0
    instance.dispose()
