"""`poll-assets run` over several shards: --partitions A...B and --all, cut into runs of
`source.shards_per_run`, against the loopback fake server."""

from __future__ import annotations

import dagster as dg
import pytest

from poll_assets import cli
from poll_assets.partitions import run_ranges, select_shards
from poll_assets_tests.instance import make_dagster_home
from poll_assets_tests.test_shards import KEY_VARS, paper_in_shards

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

    fake_llm.reset()
    assert cli.main(["run", "--panel", str(panel), "--all"]) == 0  # warm: every call is cached
    assert fake_llm.stats()["total"] == 0
    assert "shard-00002: " in capsys.readouterr().out
