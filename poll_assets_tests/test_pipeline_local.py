"""One shard (3 prompts) through the whole graph with the real embedded model."""

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from poll_assets.panel import PANELS_DIR, load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets_tests.instance import make_dagster_home

PARTITION = "shard-00000"


def panel_path(panel) -> Path:
    return PANELS_DIR / f"{panel.name}.yaml"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    home = make_dagster_home(tmp_path_factory.mktemp("home"))
    storage = tmp_path_factory.mktemp("storage")
    panel, path = load_panel("local")
    defs = build_definitions(panel, path, storage_dir=str(storage), cache_path=str(home / "cache.sqlite"))
    instance = dg.DagsterInstance.local_temp(str(home))
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=PARTITION, instance=instance)
    yield panel, storage, instance, result
    instance.dispose()


def _read(storage: Path, *key: str) -> pd.DataFrame:
    path = storage.joinpath(*key, f"{PARTITION}.parquet")
    assert path.is_file(), path
    return pd.read_parquet(path)


@pytest.mark.slow
def test_every_asset_materializes_into_parquet(local_run):
    panel, storage, instance, result = local_run
    assert result.success
    prompts = _read(storage, "prompts")
    assert len(prompts) == 3 and prompts["prompt_id"].is_unique
    written = pd.read_json(panel_path(panel).parent / panel.source.data_files[0], lines=True)
    for g in panel.generators:
        gen = _read(storage, "generations", g.name)
        assert gen["prompt_id"].tolist() == prompts["prompt_id"].tolist()
        assert gen["error"].isna().all()
        assert all(isinstance(t, str) and t for t in gen["generation"])
        assert gen["model_name"].eq(g.model).all()
        if g.provider == "dataset":  # read from the prompt file: no call, no tokens
            assert gen["generation"].tolist() == written[g.source_column].tolist()[:3]
            assert (gen["output_tokens"] == 0).all() and gen["finish_reason"].eq("source").all()
        else:
            assert (gen["output_tokens"] > 0).all() and (gen["output_tokens"] <= g.params.max_new_tokens).all()


@pytest.mark.slow
def test_ratings_align_with_generations(local_run):
    panel, storage, _, _ = local_run
    combined = _read(storage, "combined_generations")
    assert combined["generation_models"].map(list).tolist() == [[g.model for g in panel.generators]] * 3
    for j in panel.judges:
        ratings = _read(storage, "ratings", j.name)
        assert ratings["prompt_id"].tolist() == combined["prompt_id"].tolist()
        for _, row in ratings.iterrows():
            assert len(row["ratings"]) == len(panel.generators) == len(row["rationales"]) == len(row["rating_errors"])
            assert sorted(row["shown_order"]) == list(range(len(panel.generators)))
            for rating, error in zip(row["ratings"], row["rating_errors"]):
                # Grammar-constrained output: every rating parses and is on the scale.
                assert rating == rating and 1 <= rating <= 5 and error is None
            assert row["output_mode"] == "grammar"
            assert isinstance(row["raw_output"], str)


@pytest.mark.slow
def test_pooled_ratings_are_the_mean_of_the_judges(local_run):
    panel, storage, _, _ = local_run
    pooled = _read(storage, "pooled_ratings")
    for _, row in pooled.iterrows():
        matrix = [list(r) for r in row["poll_ratings"]]
        assert len(matrix) == len(panel.judges)
        for g, avg in enumerate(row["avg_poll_ratings"]):
            # self-family exclusion: a judge's rating of its own family's answer is left out
            kept = [r[g] for r, j in zip(matrix, panel.judges) if j.family != panel.generators[g].family]
            assert kept and avg == pytest.approx(sum(kept) / len(kept))


@pytest.mark.slow
def test_preference_pairs_schema_and_metadata(local_run):
    panel, storage, instance, _ = local_run
    pairs = _read(storage, "preference_pairs")
    pooled = _read(storage, "pooled_ratings")
    for col in ("prompt", "prompt_id", "chosen", "rejected", "chosen_model", "rejected_model", "chosen_rating", "rejected_rating"):
        assert col in pairs.columns
    names = [g.name for g in panel.generators]
    for _, p in pairs.iterrows():
        assert p["chosen_rating"] > p["rejected_rating"]
        assert p["chosen_generator"] in names and p["rejected_generator"] in names
        assert p["chosen_generator"] != p["rejected_generator"]
        # a judge votes unless it shares a family with one of the two answers' generators (every rating is
        # readable under the grammar); an interval needs two votes, the share one
        families = {panel.member(p["chosen_generator"]).family, panel.member(p["rejected_generator"]).family}
        votes = sum(j.family not in families for j in panel.judges)
        assert p["judges_for"] + p["judges_against"] + p["judges_tied"] == votes
        assert pd.notna(p["margin_low"]) == pd.notna(p["margin_high"]) == (votes >= 2)
        assert pd.notna(p["judge_agreement"]) == (votes >= 1)
        assert [m["role"] for m in p["chosen"]] == ["user", "assistant"] == [m["role"] for m in p["rejected"]]
        assert p["chosen"][0]["content"] == p["prompt"]
        assert p["chosen"][1]["content"] != p["rejected"][1]["content"]
        row = pooled.set_index("prompt_id").loc[p["prompt_id"]]
        assert p["chosen_rating"] == max(row["avg_poll_ratings"])
        assert p["rejected_rating"] == min(row["avg_poll_ratings"])
    event = instance.get_latest_materialization_event(dg.AssetKey("preference_pairs"))
    meta = event.asset_materialization.metadata
    assert meta["dagster/row_count"].value == len(pairs)
    assert meta["pairs"].value == len(pairs)
    assert meta["ties_dropped"].value == 3 - pairs["prompt_id"].nunique()
    assert meta["contested_pairs_left_out"].value == 0  # the local panel sets no minimum
    assert "chosen > rejected" in meta["preview"].value and "chosen answer" in meta["pairs_table"].value
    assert meta["path"].value.endswith(f"preference_pairs/{PARTITION}.parquet")


@pytest.mark.slow
def test_publish_job_exports_dataset_and_card(local_run):
    import datasets

    panel, storage, instance, _ = local_run
    pairs = _read(storage, "preference_pairs")
    defs = build_definitions(panel, load_panel("local")[1], storage_dir=str(storage))
    result = defs.resolve_job_def("publish_job").execute_in_process(instance=instance)
    assert result.success
    meta = instance.get_latest_materialization_event(dg.AssetKey("preference_dataset")).asset_materialization.metadata
    assert meta["dagster/row_count"].value == len(pairs)
    assert meta["pushed"].value is False
    ds = datasets.load_from_disk(meta["save_to_disk"].value)
    assert ds.num_rows == len(pairs) and {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    card = meta["card"].value
    assert "instruction-following" in card and panel.judges[0].model in card
    assert f"pairs: {len(pairs)}" in card
