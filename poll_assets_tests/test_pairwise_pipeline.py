"""Pairwise judging end to end: the paper panel in `judging.mode: pairwise` on the loopback server
(OpenAI, Anthropic and TGI wire formats), with pairs written from Bradley-Terry strengths, the
judges' position figures in their metadata, and the leaderboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from poll_assets.cli import main
from poll_assets.panel import load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets_tests.instance import make_dagster_home
from poll_assets_tests.test_paper_fake_server import CANARY, KEY_VARS, PARTITION, STRUCTURED_MODE, paper_on_fake, read, tag_of


def pairwise_panel(tmp_path: Path, url: str, **pairwise: Any) -> tuple[Path, dict[str, Any]]:
    path, raw = paper_on_fake(tmp_path, url)
    raw["judging"] = {"mode": "pairwise", "pairwise": pairwise}
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def run(tmp_path: Path, path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    for var in KEY_VARS:
        monkeypatch.setenv(var, CANARY)
    home = make_dagster_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    storage = tmp_path / "storage"
    panel, _ = load_panel(path)
    defs = build_definitions(panel, path, storage_dir=str(storage), cache_path=str(home / "cache.sqlite"))
    instance = dg.DagsterInstance.local_temp(str(home))
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=PARTITION, instance=instance, raise_on_error=False)
    return panel, storage, instance, result, defs


@pytest.mark.slow
def test_paper_panel_in_pairwise_mode_over_http(tmp_path, fake_llm, monkeypatch, capsys):
    fake_llm.configure(expected_key=CANARY)
    path, raw = pairwise_panel(tmp_path, fake_llm.url)
    panel, storage, instance, result, defs = run(tmp_path, path, monkeypatch)
    assert result.success
    n = len(panel.generators)
    for j in panel.judges:
        frame = read(storage, "ratings", j.name)
        assert len(frame) == 3
        for _, row in frame.iterrows():
            pairs = list(zip(row["pair_a"], row["pair_b"], row["first_shown"]))
            assert len(pairs) == n * (n - 1)  # n(n-1)/2 pairs, both orders
            assert {(a, b) for a, b, _ in pairs} == {(a, b) for a in range(n) for b in range(a + 1, n)}
            assert all(p in ("a", "b", "tie") for p in row["preferred"])  # schema-constrained: all read
            assert set(row["output_modes"]) == {STRUCTURED_MODE[j.provider]}
        meta = instance.get_latest_materialization_event(dg.AssetKey(["ratings", j.name])).asset_materialization.metadata
        assert meta["position/pairs_both_orders"].value == 3 * n * (n - 1) // 2
        assert 0.0 <= meta["position/consistency"].value <= 1.0
    pooled = read(storage, "pooled_ratings")
    for _, row in pooled.iterrows():
        assert sum(row["win_counts"]) == pytest.approx(len(panel.judges) * n * (n - 1))  # every answer read
        assert abs(sum(row["bt_strengths"])) < 1e-6
    pairs = read(storage, "preference_pairs")
    assert len(pairs) >= 1
    for _, row in pairs.iterrows():
        assert row["chosen_rating"] > row["rejected_rating"]
        assert list(row["bt_strengths"]) and row["chosen_rating"] in list(row["bt_strengths"])
    # the leaderboard: per shard in pooled_ratings' metadata (numbers the UI plots), and over every shard
    pooled_meta = instance.get_latest_materialization_event(dg.AssetKey("pooled_ratings")).asset_materialization.metadata
    assert pooled_meta["leaderboard"].value.startswith("| rank | generator |")
    assert pooled_meta["unrated_generations"].value == 0
    coverage = [c for c in result.get_asset_check_evaluations() if c.check_name == "covers_every_generation"]
    assert coverage and all(c.passed for c in coverage)
    assert {f"leaderboard/{g.name}/strength" for g in panel.generators} <= set(pooled_meta)
    assert main(["leaderboard", "--panel", str(path), "--storage", str(storage), "--resamples", "100"]) == 0
    printed = capsys.readouterr().out
    assert "3 prompts in the stored shards" in printed and all(f"| {g.name} |" in printed for g in panel.generators)
    published = defs.resolve_job_def("publish_job").execute_in_process(instance=instance)
    assert published.success
    (event,) = published.get_asset_materialization_events()
    meta = event.event_specific_data.materialization.metadata
    assert "## Pairwise judging: leaderboard and position bias" in meta["card"].value
    assert "| unread comparisons | 0 |" in meta["card"].value and "compared the answers two at a time" in meta["card"].value
    assert "| judge | position consistency |" in meta["position_bias"].value
    assert Path(meta["leaderboard_plot"].value).read_text().startswith("<svg")
    stats = fake_llm.stats()
    judges = {tag_of(m) for m in raw["judges"]}
    assert {t: c for t, c in stats["by_tag"].items() if t in judges} == {t: 3 * n * (n - 1) for t in judges}
    assert stats["max_repeats"] == 1


def test_pairwise_judges_in_batch_mode(tmp_path, fake_llm, monkeypatch):
    # The batch panel of test_batch_pipeline (OpenAI and Anthropic batch APIs), judging in pairs.
    from poll_assets_tests import test_batch_pipeline as batch

    fake_llm.batches.reset(processing_s=0.1)
    original = batch.batch_panel

    def pairwise_batch_panel(tmp: Path, url: str) -> Path:
        path = original(tmp, url)
        raw = yaml.safe_load(path.read_text())
        raw["judging"] = {"mode": "pairwise"}
        path.write_text(yaml.safe_dump(raw))
        return path

    monkeypatch.setattr(batch, "batch_panel", pairwise_batch_panel)
    result, storage, instance = batch.materialize(tmp_path, fake_llm.url, monkeypatch.setenv)
    assert result.success
    for name in ("judge_oa", "judge_an"):
        frame = batch.read(storage, "ratings", name)
        assert len(frame) == 4 and [len(p) for p in frame["preferred"]] == [2] * 4  # 1 pair, both orders
        assert all(p in ("a", "b", "tie") for row in frame["preferred"] for p in row)
        meta = instance.get_latest_materialization_event(dg.AssetKey(["ratings", name])).asset_materialization.metadata
        assert meta["llm/batches"].value and meta["position/pairs_both_orders"].value == 4
    assert fake_llm.stats()["total"] == 0  # not one call went online
    assert len(fake_llm.batches.submissions) == 2 * 4 + 2 * 4 * 2  # generators: 1 per prompt; judges: 2 per prompt
    pooled = batch.read(storage, "pooled_ratings")
    assert all(sum(w) == pytest.approx(2 * 2) for w in pooled["win_counts"])  # 2 judges x 2 orders, all read


@pytest.mark.slow
def test_the_offline_local_panel_in_pairwise_mode(tmp_path, monkeypatch, capsys):
    # The bundled local panel (SmolLM2-135M and Gemma 3 270M in-process, grammar-constrained, and two
    # written answers), one shard of 1 prompt: n(n-1)/2 pairs x 2 orders for each judge.
    from poll_assets.panel import PANELS_DIR

    raw = yaml.safe_load((PANELS_DIR / "local.yaml").read_text())
    raw["source"]["data_files"] = [str((PANELS_DIR / raw["source"]["data_files"][0]).resolve())]
    raw["gold"]["path"] = str((PANELS_DIR / raw["gold"]["path"]).resolve())
    raw["source"]["shard_size"] = 1
    raw["judging"]["mode"] = "pairwise"
    n = len(raw["generators"])
    path = tmp_path / "local_pairwise.yaml"
    path.write_text(yaml.safe_dump(raw))
    panel, storage, instance, result, _ = run(tmp_path, path, monkeypatch)
    assert result.success
    for j in panel.judges:
        frame = read(storage, "ratings", j.name)
        assert [len(p) for p in frame["preferred"]] == [n * (n - 1)]
        assert set(o for modes in frame["output_modes"] for o in modes) == {"grammar"}
        meta = instance.get_latest_materialization_event(dg.AssetKey(["ratings", j.name])).asset_materialization.metadata
        for prefs, errs in zip(frame["preferred"], frame["comparison_errors"]):
            assert all((p in ("a", "b", "tie")) != bool(e) for p, e in zip(prefs, errs))  # read, or unread with a reason
        print(j.name, {k: getattr(meta[k], "value", None) for k in meta if k.startswith(("position/", "parse_failures"))})
    pooled = read(storage, "pooled_ratings")
    assert len(pooled) == 1 and all(len(s) == n for s in pooled["bt_strengths"])
    pooled_meta = instance.get_latest_materialization_event(dg.AssetKey("pooled_ratings")).asset_materialization.metadata
    assert pooled_meta["leaderboard"].value.startswith("| rank | generator |")
    print(pooled_meta["leaderboard"].value)
    print(pooled_meta["position_bias"].value)


def test_gold_labels_calibrate_the_pairwise_jury_in_the_step(tmp_path):
    # The scripted panel of test_calibration_pipeline (gold ratings and a preference) in pairwise mode:
    # the shard's calibration table scores each judge and the Bradley-Terry jury on preferences.
    from poll_assets_tests.fake_panel import scripted_resources, write_panel
    from poll_assets_tests.test_calibration_pipeline import SHARD, _gold_rows, _pooled_metadata, _write_gold

    _write_gold(tmp_path, _gold_rows())
    panel, path = write_panel(tmp_path, n_prompts=8, shard_size=8, extra={
        "gold": {"path": "gold.jsonl", "bootstrap_resamples": 100}, "judging": {"mode": "pairwise"}})
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"), cache_path=str(tmp_path / "c.sqlite"),
                             resource_overrides=scripted_resources(panel))
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=SHARD)
    assert result.success
    meta = _pooled_metadata(result)
    table = meta["calibration"].value
    assert all(row in table for row in ("| judge_0 |", "| judge_1 |", "| jury (Bradley-Terry) |", "| jury without judge_0 |"))
    assert meta["calibration/labelled_prompts"].value == 8
    # 8 gold pairs: 7 derived from two gold ratings of a prompt, 1 gold preference (it wins over its ratings)
    for rater in ("judge_0", "judge_1", "jury_bt"):
        assert 0.0 <= meta[f"calibration/pref_agreement/{rater}"].value <= 1.0
    assert not any(k.startswith("calibration/kappa/") for k in meta)  # no ratings in this mode: absent
    assert meta["position/judge_0/consistency"].value >= 0.0
