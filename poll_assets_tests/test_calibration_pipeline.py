"""Calibration through Dagster: the scripted panel with gold labels shows the per-shard table in the
pooled ratings' metadata; a bad gold file is refused at panel load and loses nothing already paid;
the whole-dataset view (CLI, dataset card) reads every stored shard; weighted pooling runs in the step."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import dagster as dg
import pytest
import yaml

from poll_assets.assets.keys import PAIRS_KEY, POOLED_KEY
from poll_assets.assets.publishing import card_info, dataset_calibration, read_all_partitions
from poll_assets.cli import main
from poll_assets.dataset_export import build_dataset_card
from poll_assets.panel import PanelConfigError, load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets.prompt_source import prompt_id
from poll_assets.rubrics import get_rubric
from poll_assets_tests.fake_panel import PROMPTS, scripted_resources, write_panel

SHARD = "shard-00000"


def _gold_rows() -> list[dict]:
    """Ratings of both generators for every prompt (4 per shard), one preference, and one label naming a
    generator the panel does not have."""
    rows = [{"prompt_id": prompt_id(p), "ratings": {"gen_0": 1 + i % 5, "gen_1": 1 + (i * 3) % 5}}
            for i, p in enumerate(PROMPTS)]
    rows.append({"instruction": PROMPTS[0], "a": "gen_1", "b": "gen_0", "winner": "a", "annotator": "ann"})
    rows.append({"prompt_id": prompt_id(PROMPTS[1]), "generator": "gen_9", "rating": 3})
    return rows


def _write_gold(tmp_path: Path, rows: list[dict]) -> None:
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _run(tmp_path: Path, pooling: dict | None = None):
    _write_gold(tmp_path, _gold_rows())
    extra = {"gold": {"path": "gold.jsonl", "bootstrap_resamples": 200}, "publish": {"out_dir": str(tmp_path / "export")},
             **({"pooling": pooling} if pooling else {})}
    panel, path = write_panel(tmp_path, n_prompts=8, shard_size=4, extra=extra)
    resources = scripted_resources(panel)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"), cache_path=str(tmp_path / "c.sqlite"),
                             resource_overrides=resources)
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=SHARD)
    return panel, path, resources, result


def _pooled_metadata(result: dg.ExecuteInProcessResult) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == POOLED_KEY]
    return event.event_specific_data.materialization.metadata


def test_the_shard_calibration_table_is_in_the_pooled_metadata(tmp_path):
    panel, _, _, result = _run(tmp_path)
    assert result.success
    meta = _pooled_metadata(result)
    table = meta["calibration"].value
    for row in ("| judge_0 |", "| judge_1 |", "| jury (mean) |", "| jury (weighted, fitted) |", "| jury without judge_0 |"):
        assert row in table
    # 4 prompts of this shard have labels; the other 4 are another shard's; the gen_9 label is counted
    assert meta["calibration/labelled_prompts"].value == 4
    assert meta["gold/labels_in_shard"].value == 9  # 8 ratings + 1 preference
    assert meta["gold/labels_unknown_generator"].value == 1
    assert "for prompts outside these shards" in table and "1 naming a generator the panel does not have" in table
    assert meta["calibration/verdict"].value
    numbers = {k for k in meta if k.startswith("calibration/") and isinstance(meta[k].value, float)}
    assert "calibration/labelled_prompts" in numbers and any(k.startswith("calibration/mae/") for k in numbers)


def test_a_bad_gold_file_fails_at_panel_load_and_loses_nothing_paid(tmp_path):
    panel, path, _, result = _run(tmp_path)
    assert result.success
    cache = tmp_path / "c.sqlite"
    with sqlite3.connect(cache) as db:
        before = db.execute("SELECT count(*) FROM completions").fetchone()[0]
    bad = _gold_rows()
    bad[2] = {"prompt_id": prompt_id(PROMPTS[2]), "a": "gen_0", "b": "gen_1", "winner": "left"}
    _write_gold(tmp_path, bad)
    with pytest.raises(PanelConfigError) as caught:
        load_panel(path)
    message = str(caught.value)
    assert f"{path}: gold.path: {tmp_path / 'gold.jsonl'}: line 3: field 'winner': unknown winner 'left'" in message
    with sqlite3.connect(cache) as db:
        assert db.execute("SELECT count(*) FROM completions").fetchone()[0] == before > 0
    # Fixed, the same shard runs again from the cache: not one call is paid twice.
    _write_gold(tmp_path, _gold_rows())
    panel, path = load_panel(path)
    resources = scripted_resources(panel)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"), cache_path=str(cache),
                             resource_overrides=resources)
    assert defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=SHARD).success
    assert sum(backend.total_calls for backend in resources.values()) == 0


def test_the_whole_dataset_view_reads_every_stored_shard(tmp_path, capsys):
    panel, path, resources, _ = _run(tmp_path)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"), cache_path=str(tmp_path / "c.sqlite"),
                             resource_overrides=resources)
    assert defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key="shard-00001").success
    assert main(["calibration", "--panel", str(path), "--storage", str(tmp_path / "storage")]) == 0
    out = capsys.readouterr().out
    assert "8 prompts in the stored shards" in out and "| jury (mean) |" in out
    pooled = read_all_partitions(str(tmp_path / "storage"), POOLED_KEY)
    rubric = get_rubric(panel.judging.aspect)
    calibration = dataset_calibration(panel, rubric, pooled, panel.gold.location(path))
    assert calibration["counts"]["labelled_prompts"] == 8 and calibration["counts"]["labels_outside_prompts"] == 0
    pairs = read_all_partitions(str(tmp_path / "storage"), PAIRS_KEY)
    info = {**card_info(panel, rubric, pairs, pooled), "calibration": calibration}
    card = build_dataset_card(info)
    assert "## Quality: calibration against gold labels" in card and "| jury without judge_1 |" in card
    # publish_job writes that card, and shows the table in the UI on the preference_dataset asset
    published = defs.resolve_job_def("publish_job").execute_in_process()
    assert published.success
    (event,) = published.get_asset_materialization_events()
    meta = event.event_specific_data.materialization.metadata
    assert meta["card"].value.count("## Quality: calibration against gold labels") == 1
    assert "| jury (mean) |" in meta["calibration"].value and "over the 8 labelled prompts" in meta["calibration"].value


def test_weighted_pooling_with_given_weights_runs_in_the_step(tmp_path):
    _, _, _, result = _run(tmp_path, pooling={"method": "weighted", "weights": {"judge_0": 3.0, "judge_1": 1.0}})
    assert result.success
    meta = _pooled_metadata(result)
    assert meta["pooling/weights_source"].value == "given"
    assert "| jury (weighted, given) |" in meta["calibration"].value
    frame = read_all_partitions(str(tmp_path / "storage"), POOLED_KEY)
    for matrix, pooled in zip(frame["poll_ratings"], frame["avg_poll_ratings"]):
        for g, value in enumerate(pooled):
            assert value == pytest.approx((3 * matrix[0][g] + matrix[1][g]) / 4)


def test_fitted_weights_need_gold_labels(tmp_path):
    with pytest.raises(PanelConfigError, match="pooling.weights 'fit' fits the weights on gold labels"):
        write_panel(tmp_path, extra={"pooling": {"method": "weighted", "weights": "fit"}})
    with pytest.raises(PanelConfigError, match=r"pooling.weights: \['judge_9'\] are not judges"):
        write_panel(tmp_path, extra={"pooling": {"method": "weighted", "weights": {"judge_9": 1.0}}})
    with pytest.raises(PanelConfigError, match=r"pooling.weights: no weight for judges \['judge_1'\]"):
        write_panel(tmp_path, extra={"pooling": {"method": "weighted", "weights": {"judge_0": 1.0}}})
    with pytest.raises(PanelConfigError, match="pooling: .*`weights` apply to method 'weighted' only"):
        write_panel(tmp_path, extra={"pooling": {"method": "mean", "weights": {"judge_0": 1.0, "judge_1": 1.0}}})


def test_fitted_weights_pool_the_shard_and_their_gold_file_is_in_the_code_version(tmp_path):
    panel, path, _, result = _run(tmp_path, pooling={"method": "weighted", "weights": "fit"})
    assert result.success
    meta = _pooled_metadata(result)
    assert meta["pooling/weights_source"].value.startswith("fitted: inverse mean squared error on gold ratings")
    assert "| jury (weighted, fitted) |" in meta["calibration"].value

    def version() -> str:
        graph = build_definitions(*load_panel(path), storage_dir=str(tmp_path / "storage")).resolve_asset_graph()
        return graph.get(POOLED_KEY).code_version

    before = version()
    rows = _gold_rows()
    rows[0]["ratings"]["gen_0"] = 5 if rows[0]["ratings"]["gen_0"] != 5 else 4
    _write_gold(tmp_path, rows)
    assert version() != before  # new labels, new weights: the pooled ratings are stale


def test_a_remote_gold_file_is_read_at_first_use_and_a_bad_one_fails_that_step_only(tmp_path):
    from upath import UPath

    bad = _gold_rows()
    bad[1] = {"prompt_id": prompt_id(PROMPTS[1]), "generator": "gen_0", "rating": 9}
    UPath("memory://gold-test/labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    panel, path = write_panel(tmp_path, n_prompts=8, shard_size=4,
                              extra={"gold": {"path": "memory://gold-test/labels.jsonl"}})  # no error at load
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"), cache_path=str(tmp_path / "c.sqlite"),
                             resource_overrides=scripted_resources(panel))
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=SHARD, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "pooled_ratings"
    message = failure.event_specific_data.user_failure_data.description
    assert "gold.path: memory://gold-test/labels.jsonl: line 2: field 'rating': rating 9 is off the scale" in message
    stored = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert {"ratings/judge_0", "ratings/judge_1"} <= stored and "pooled_ratings" not in stored


def test_a_panel_without_fitted_weights_has_no_gold_file_in_its_pooled_code_version(tmp_path):
    """Only `weights: fit` reads the gold labels while pooling, so only it puts the gold file in the
    version: editing the gold file of a mean-pooled panel leaves its pooled shards fresh."""
    from poll_assets.assets.pooling import pooling_version
    from poll_assets.code_versions import pooled_version

    panel, _ = write_panel(tmp_path)
    gold = tmp_path / "gold.jsonl"
    gold.write_text('{"prompt_id": "x", "generator": "g", "rating": 3}\n')
    expected = pooled_version(panel.pooling, panel.judging, [(m.name, m.family) for m in panel.members])
    assert pooling_version(panel.jury, panel.gold, str(gold)) == expected
    gold.write_text('{"prompt_id": "x", "generator": "g", "rating": 5}\n')
    assert pooling_version(panel.jury, panel.gold, str(gold)) == expected


def test_the_paper_panel_on_the_loopback_server_shows_the_calibration_table(tmp_path, fake_llm, monkeypatch):
    """The same table with real SDKs over HTTP: the paper panel's three judges against gold ratings of
    its four generators on the first shard's three sample prompts (+ one preference)."""
    from poll_assets.panel import PANELS_DIR
    from poll_assets_tests.test_paper_fake_server import CANARY, KEY_VARS, paper_on_fake

    for var in KEY_VARS:
        monkeypatch.setenv(var, CANARY)
    path, raw = paper_on_fake(tmp_path, fake_llm.url)
    texts = [json.loads(line)["prompt"] for line in (PANELS_DIR.parent / "data" / "sample_prompts.jsonl").read_text().splitlines()[:3]]
    generators = [g["name"] for g in raw["generators"]]
    rows = [{"instruction": t, "ratings": {g: 1 + (i + k) % 5 for k, g in enumerate(generators)}} for i, t in enumerate(texts)]
    rows.append({"instruction": texts[0], "a": generators[0], "b": generators[1], "winner": "tie"})
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw["gold"] = {"path": "gold.jsonl", "bootstrap_resamples": 200}
    path.write_text(yaml.safe_dump(raw))
    panel, _ = load_panel(path)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"), cache_path=str(tmp_path / "c.sqlite"))
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=SHARD, raise_on_error=False)
    assert result.success
    meta = _pooled_metadata(result)
    table = meta["calibration"].value
    for judge in (j.name for j in panel.judges):
        assert f"| {judge} |" in table and f"| jury without {judge} |" in table
    assert meta["calibration/labelled_prompts"].value == 3
    assert "Gold labels used: 12 rating(s), 1 preference(s)" in table


def test_the_whole_dataset_reports_say_what_the_panel_lacks(tmp_path, capsys):
    """`calibration` needs gold labels and `leaderboard` pairwise mode: each exits 2 naming the panel
    and what to add, before reading any storage."""
    panel, path = write_panel(tmp_path)
    assert panel.gold is None and panel.judging.mode == "rating"
    storage = str(tmp_path / "no-storage-here")
    assert main(["calibration", "--panel", str(path), "--storage", storage]) == 2
    assert main(["leaderboard", "--panel", str(path), "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert f"poll-assets calibration: panel {panel.name} ({path}) has no gold labels; add `gold:" in err
    assert f"poll-assets leaderboard: panel {panel.name} ({path}) judges in mode 'rating'" in err
