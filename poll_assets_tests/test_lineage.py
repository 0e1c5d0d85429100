"""Lineage metadata on every asset, and the trail of a prompt through a materialized shard."""

from __future__ import annotations

import json

import dagster as dg
import pandas as pd
import pytest

from poll_assets import cli
from poll_assets.io_manager import partition_path, read_partition, stored_partitions
from poll_assets.lineage import TrailError, prompt_trail
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets_tests.fake_panel import scripted_resources, write_panel
from poll_assets_tests.instance import make_dagster_home

SHARD = "shard-00000"


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lineage")
    home = make_dagster_home(tmp / "home")
    # 3 generators and 3 judges on one shard of 3 prompts; judge_2 fails on one prompt, so a
    # trail shows a judge call error next to good verdicts (parse rate 1/3 is allowed here).
    panel, path = write_panel(tmp, n_prompts=6, shard_size=3, n_generators=3, n_judges=3,
                              extra={"thresholds": {"max_parse_failure_rate": 0.5}})
    storage = tmp / "storage"
    defs = build_definitions(panel, path, storage_dir=str(storage), cache_path=str(tmp / "c.sqlite"),
                             resource_overrides=scripted_resources(panel, {"judge_2": "rivers"}))
    instance = dg.DagsterInstance.local_temp(str(home))
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=SHARD, instance=instance)
    assert result.success
    yield panel, storage, instance
    instance.dispose()


def _stored(storage, key: str) -> pd.DataFrame:
    df = read_partition(storage, dg.AssetKey.from_user_string(key), SHARD)
    assert df is not None, key
    return df


def _meta(instance, key: str):
    event = instance.get_latest_materialization_event(dg.AssetKey.from_user_string(key))
    return event.asset_materialization.metadata


def test_every_asset_has_schema_and_row_count(shard):
    panel, storage, instance = shard
    keys = ["prompts", "combined_generations", "pooled_ratings", "preference_pairs",
            *(f"generations/{g.name}" for g in panel.generators), *(f"ratings/{j.name}" for j in panel.judges)]
    for key in keys:
        meta = _meta(instance, key)
        df = _stored(storage, key)
        assert meta["dagster/row_count"].value == len(df), key
        schema = meta["dagster/column_schema"].value
        assert [c.name for c in schema.columns] == list(df.columns), key
        assert all(c.description for c in schema.columns), key
        if key.startswith(("generations/", "ratings/")):
            assert meta["llm/input_tokens"].value > 0 and meta["llm/calls"].value > 0, key


def test_the_io_manager_stores_each_partition_where_the_layout_says(shard):
    # The layout the README documents, <storage>/<asset key parts>/<partition>.parquet, is the one
    # the IO manager writes and partition_path / stored_partitions read.
    panel, storage, _ = shard
    member = panel.judges[0].name
    path = partition_path(storage, dg.AssetKey(["ratings", member]), SHARD)
    assert str(path) == str(storage / "ratings" / member / f"{SHARD}.parquet") and path.is_file()
    assert stored_partitions(storage, dg.AssetKey("preference_pairs")) == [SHARD]
    assert stored_partitions(storage, dg.AssetKey("nothing_here")) == []
    assert read_partition(storage, dg.AssetKey("prompts"), "shard-00099") is None


def test_preference_pairs_column_lineage_points_at_upstream_columns(shard):
    panel, storage, instance = shard
    lineage = _meta(instance, "preference_pairs")["dagster/column_lineage"].value
    deps = {col: {(d.asset_key.to_user_string(), d.column_name) for d in ds} for col, ds in lineage.deps_by_column.items()}
    assert deps["prompt"] == {("prompts", "instruction")}
    assert ("combined_generations", "generations") in deps["chosen"]
    assert deps["chosen_rating"] == deps["rejected_rating"] == {("pooled_ratings", "avg_poll_ratings")}
    assert deps["poll_ratings"] == {(f"ratings/{j.name}", "ratings") for j in panel.judges}
    assert deps["rating_call_ids"] == {(f"ratings/{j.name}", "call_id") for j in panel.judges}
    assert deps["chosen_generator"] == deps["rejected_generator"] == {("combined_generations", "generators")}
    for col in ("judge_agreement", "judges_for", "judges_against", "judges_tied", "margin_low", "margin_high"):
        assert deps[col] == {(f"ratings/{j.name}", "ratings") for j in panel.judges}, col
    pairs = _stored(storage, "preference_pairs")
    assert set(deps) <= set(pairs.columns)
    # and every upstream column named exists in that upstream's stored table
    for col_deps in deps.values():
        for asset, column in col_deps:
            upstream = _stored(storage, asset)
            assert column in upstream.columns, (asset, column)
    pooled_lineage = _meta(instance, "pooled_ratings")["dagster/column_lineage"].value
    assert {d.asset_key.to_user_string() for d in pooled_lineage.deps_by_column["poll_ratings"]} == {
        f"ratings/{j.name}" for j in panel.judges
    }


def test_trail_of_every_prompt_matches_the_stored_rows(shard):
    panel, storage, _ = shard
    prompts = _stored(storage, "prompts")
    pooled = _stored(storage, "pooled_ratings").set_index("prompt_id")
    pairs = _stored(storage, "preference_pairs")
    for pid, instruction in zip(prompts["prompt_id"], prompts["instruction"]):
        trail = prompt_trail(pid, str(storage))  # no partition: searches every shard
        assert trail["partition"] == SHARD and trail["instruction"] == instruction and trail["missing"] == []
        assert [g["generator"] for g in trail["generations"]] == [g.name for g in panel.generators]
        for g, member in zip(trail["generations"], panel.generators):
            assert g["model"] == member.model and g["text"].startswith(f"[{member.name}]")
            assert g["usage"]["output_tokens"] > 0 and len(g["call_id"]) == 64
        assert [j["judge"] for j in trail["judges"]] == [j.name for j in panel.judges]
        for j in trail["judges"]:
            assert len(j["ratings"]) == len(panel.generators)
            # judge_2's column holds a None, so Parquet stored floats; the trail gives ratings back as ints
            assert all(r is None or type(r) is int for r in j["ratings"]), j["ratings"]
            if j["error"] is None:
                # the parsed ratings undo the shuffle of the raw output
                raw = json.loads(j["raw_output"])
                for position, gen_index in enumerate(j["shown_order"]):
                    assert j["ratings"][gen_index] == raw[f"text_{position + 1}"]["rating"]
        assert trail["pooled"]["avg_poll_ratings"] == pytest.approx(list(pooled.loc[pid, "avg_poll_ratings"]))
        expected_pairs = pairs[pairs["prompt_id"] == pid]
        assert len(trail["pairs"]) == len(expected_pairs)
        for p, (_, row) in zip(trail["pairs"], expected_pairs.iterrows()):
            assert p["chosen_rating"] > p["rejected_rating"]
            chosen = next(g for g in trail["generations"] if g["call_id"] == p["chosen_call_id"])
            assert chosen["text"] == p["chosen"] == row["chosen"][-1]["content"]
            assert p["chosen_generator"] == chosen["generator"] and p["chosen_model"] == chosen["model"]


def test_trail_shows_a_failed_judge_call(shard):
    _, storage, _ = shard
    prompts = _stored(storage, "prompts")
    pid = prompts.loc[prompts["instruction"].str.contains("rivers"), "prompt_id"].item()
    trail = prompt_trail(pid[:10], str(storage), partition=SHARD)  # a prefix is enough
    judge_2 = next(j for j in trail["judges"] if j["judge"] == "judge_2")
    assert "refuses this prompt" in judge_2["error"] and judge_2["ratings"] == [None, None, None]
    assert all(e.startswith("judge call failed") for e in judge_2["rating_errors"])


def test_unknown_prompt_id_is_a_clear_error(shard):
    _, storage, _ = shard
    with pytest.raises(TrailError, match=r"prompt id 'ffffffffff' is not in 1 materialized partition\(s\) of prompts"):
        prompt_trail("ffffffffff", str(storage))
    with pytest.raises(TrailError, match=r"partition 'shard-00001' of prompts is not materialized"):
        prompt_trail("ffffffffff", str(storage), partition="shard-00001")
    with pytest.raises(TrailError, match="too short"):
        prompt_trail("ab", str(storage))
    with pytest.raises(TrailError, match="no prompts have been materialized"):
        prompt_trail("ffffffffff", str(storage / "nowhere"))


def test_trail_cli_text_json_and_error(shard, capsys):
    _, storage, _ = shard
    pid = _stored(storage, "prompts")["prompt_id"][0]
    assert cli.main(["trail", pid, "--storage", str(storage)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"prompt {pid}  ({SHARD}, source row 0)")
    for heading in ("generations:", "judges:", "pooled:", "pairs:"):
        assert f"\n{heading}" in text
    assert cli.main(["trail", pid, "--storage", str(storage), "--partition", SHARD, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_id"] == pid
    assert cli.main(["trail", "0123456789", "--storage", str(storage)]) == 2
    assert "poll-assets trail: prompt id '0123456789' is not in" in capsys.readouterr().err


def test_parquet_writes_replace_the_file_whole(tmp_path):
    """A reader of a partition file sees the old frame or the new one, never an empty or partial
    file: the IO manager writes beside it and renames it into place."""
    import pandas as pd
    from upath import UPath

    from poll_assets.io_manager import write_parquet

    path = UPath(tmp_path / "asset" / "shard-00000.parquet")
    write_parquet(pd.DataFrame({"a": [1, 2]}), path)
    inode_before = (tmp_path / "asset" / "shard-00000.parquet").stat().st_ino
    write_parquet(pd.DataFrame({"a": [3]}), path)
    assert list(pd.read_parquet(tmp_path / "asset" / "shard-00000.parquet")["a"]) == [3]
    assert (tmp_path / "asset" / "shard-00000.parquet").stat().st_ino != inode_before  # replaced, not truncated
    assert sorted(p.name for p in (tmp_path / "asset").iterdir()) == ["shard-00000.parquet"]  # no temp left
