"""The exported preference set and its card, loaded back with `datasets`; the Hub upload checked at
the HfApi boundary."""

from __future__ import annotations

from pathlib import Path

import datasets
import pandas as pd
import pytest
import yaml
from huggingface_hub import DatasetCard, HfApi

from poll_assets.dataset_export import UPLOAD_PATTERNS, build_dataset_card, export_preference_set

CARD_INFO = {
    "panel": {
        "name": "local",
        "generators": [{"name": "gen_a", "model": "smollm2-135m", "family": "smollm", "provider": "local"},
                       {"name": "gen_b", "model": "qwen|tiny", "family": "qwen", "provider": "local"}],
        "judges": [{"name": "judge_a", "model": "smollm2-135m", "family": "smollm", "provider": "local",
                    "params": {"max_new_tokens": 400}, "api_key_env": "NONE_NEEDED"}],
    },
    "rubric": {"aspect": "instruction-following", "version": "if-1"},
    "judging": {"shuffle_positions": True, "exclude_self_family": True, "seed": 0, "structured": True},
    "pooling": {"method": "mean", "min_judges": 1},
    "binarization": {"strategy": "best_vs_worst", "min_margin": 0.0, "seed": 0},
    "counts": {"prompts": 3, "pairs": 2, "ties_dropped": 1, "parse_failures": 1, "parse_failure_rate": 0.04},
    "agreement": {"krippendorff_alpha": 0.41, "mean_cohen_kappa_quadratic": None,
                  "pairwise": [{"judge_a": "judge_a", "judge_b": "judge_b", "n_items": 9,
                                "cohen_kappa_quadratic": 0.5, "kendall_tau": None}]},
}


def _df() -> pd.DataFrame:
    return pd.DataFrame({
        "prompt_id": ["p1", "p3"],
        "prompt": ["Name a primary colour.", "Say hi in French."],
        "chosen": ["Red.", "Bonjour !"],
        "rejected": ["Purple, I think.", "Hello."],
        "chosen_rating": [4.67, 5.0],
        "rejected_rating": [1.5, 1.5],
        "judge_ratings": [[[4, 3, 5], [2, 2, 1]], [[5, None, 5], [2, 1, None]]],
    })


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_card_header_carries_the_settings():
    card_text = build_dataset_card(CARD_INFO, repo_id="someone/poll-pairs")
    meta = _front_matter(card_text)
    assert meta["task_categories"] == ["text-generation"] and "dpo" in meta["tags"]
    assert meta["size_categories"] == "n<1K"
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    poll = meta["poll"]
    assert poll["rubric"] == {"aspect": "instruction-following", "version": "if-1"}
    assert poll["pooling"] == {"method": "mean", "min_judges": 1}
    assert poll["binarization"]["strategy"] == "best_vs_worst"
    assert poll["counts"]["ties_dropped"] == 1 and poll["counts"]["parse_failures"] == 1
    assert poll["agreement"]["krippendorff_alpha"] == 0.41
    assert [j["name"] for j in poll["panel"]["judges"]] == ["judge_a"]
    # The Hub's own parser accepts it.
    card = DatasetCard(card_text)
    assert card.data.pretty_name == "local preference pairs (instruction-following)"
    assert "someone/poll-pairs" in card.text and "| qwen\\|tiny |" in card.text
    assert "Krippendorff's alpha (ordinal): 0.410" in card.text


def test_card_refuses_credentials_and_needs_the_rubric():
    with pytest.raises(ValueError, match=r"card_info.panel.judges\[0\].hf_token"):
        build_dataset_card({**CARD_INFO, "panel": {"judges": [{"name": "x", "hf_token": "hf_abc"}]}})
    with pytest.raises(ValueError, match="rubric"):
        build_dataset_card({"counts": {}})


def test_export_loads_back(tmp_path: Path):
    out = tmp_path / "export"
    res = export_preference_set(_df(), out, CARD_INFO)
    assert res["rows"] == 2 and res["pushed"] is False
    assert Path(res["parquet_path"]) == out / "data" / "train-00000-of-00001.parquet"
    from_disk = datasets.load_from_disk(res["disk_path"])
    from_parquet = datasets.load_dataset("parquet", data_files=res["parquet_path"], split="train",
                                         cache_dir=str(tmp_path / "cache"))
    # Loading the folder itself goes through the card's `configs`, as the Hub viewer does.
    from_folder = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache2"))
    for ds in (from_disk, from_parquet, from_folder):
        assert ds.num_rows == 2
        assert ds["chosen"] == ["Red.", "Bonjour !"] and ds["rejected"] == ["Purple, I think.", "Hello."]
        assert ds["judge_ratings"][1] == [[5, None, 5], [2, 1, None]]
    assert from_folder.column_names == list(_df().columns)
    assert _front_matter((out / "README.md").read_text())["poll"]["rubric"]["version"] == "if-1"
    # Re-export replaces the previous files instead of mixing them.
    res2 = export_preference_set(_df().iloc[:1], out, CARD_INFO)
    assert res2["rows"] == 1 and datasets.load_from_disk(res2["disk_path"]).num_rows == 1
    assert len(list((out / "data").iterdir())) == 1


def test_missing_columns_are_named(tmp_path: Path):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\]"):
        export_preference_set(_df().drop(columns=["rejected"]), tmp_path, CARD_INFO)


class RecordingHfApi(HfApi):
    """Stands in at the HfApi boundary: records calls and what the folder held at upload time."""

    def __init__(self, fail_with: Exception | None = None):
        super().__init__(endpoint="http://127.0.0.1:9")  # never contacted
        self.calls: list[tuple[str, dict]] = []
        self.fail_with = fail_with

    def create_repo(self, repo_id, **kwargs):  # type: ignore[override]
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):  # type: ignore[override]
        if self.fail_with:
            raise self.fail_with
        folder = Path(kwargs["folder_path"])
        uploaded = sorted(
            str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and any(p.relative_to(folder).match(pat) for pat in kwargs["allow_patterns"])
        )
        self.calls.append(("upload_folder", {**kwargs, "uploaded": uploaded}))

        class Commit:
            commit_url = f"https://hub.invalid/datasets/{kwargs['repo_id']}/commit/abc"

        return Commit()


def test_push_goes_through_create_repo_and_upload_folder(tmp_path: Path):
    api = RecordingHfApi()
    res = export_preference_set(_df(), tmp_path / "e", CARD_INFO, repo_id="someone/poll-pairs",
                                token="hf_SECRET123", api=api, private=True)
    assert res["pushed"] is True and res["commit_url"].endswith("/commit/abc")
    (name1, create), (name2, upload) = api.calls
    assert name1 == "create_repo" and name2 == "upload_folder"
    assert create == {"repo_id": "someone/poll-pairs", "repo_type": "dataset", "exist_ok": True,
                      "private": True, "token": "hf_SECRET123"}
    assert upload["repo_type"] == "dataset" and upload["token"] == "hf_SECRET123"
    assert upload["allow_patterns"] == UPLOAD_PATTERNS
    # Only the card and the Parquet shards go up, not the save_to_disk copy.
    assert upload["uploaded"] == ["README.md", "data/train-00000-of-00001.parquet"]
    assert "hf_SECRET123" not in repr(res)
    assert "hf_SECRET123" not in (tmp_path / "e" / "README.md").read_text()


def test_no_token_no_push_and_failures_hide_the_token(tmp_path: Path):
    api = RecordingHfApi()
    res = export_preference_set(_df(), tmp_path / "a", CARD_INFO, repo_id="someone/x", token=None, api=api)
    assert res["pushed"] is False and res["push_skipped"] == "no token given" and api.calls == []
    failing = RecordingHfApi(fail_with=OSError("401 Unauthorized for token hf_SECRET123"))
    with pytest.raises(RuntimeError) as err:
        export_preference_set(_df(), tmp_path / "b", CARD_INFO, repo_id="someone/x", token="hf_SECRET123", api=failing)
    assert "someone/x" in str(err.value) and "401" in str(err.value)
    assert "hf_SECRET123" not in str(err.value) and err.value.__cause__ is None


QUALITY = {
    "settings": {"min_judge_agreement": 0.75, "min_margin_low": None},
    "pairs": 2,
    "mean_judge_agreement": 0.875,
    "judge_agreement": {"every judge": 1, "3/4 or more": 1, "1/2 to 3/4": 0, "under 1/2": 0, "no judge rated both": 0},
    "margin_low": {"above 0": 1, "0 or below": 1, "no interval (under 2 judges)": 0},
    "left_out": {"prompts_without_pair": {"tie": 1, "judge agreement below min_judge_agreement": 1},
                 "contested_pairs": {"judge agreement below min_judge_agreement": 3}},
}


def test_the_cards_quality_section_shows_confidence_and_what_was_left_out():
    card_text = build_dataset_card({**CARD_INFO, "quality": QUALITY})
    assert _front_matter(card_text)["poll"]["quality"]["left_out"]["contested_pairs"] == {
        "judge agreement below min_judge_agreement": 3}
    quality = card_text.split("## Quality", 1)[1]
    assert "Krippendorff's alpha 0.410" in quality
    assert "min_judge_agreement 0.750, min_margin_low n/a" in quality
    assert "contested pairs: judge agreement below min_judge_agreement: 3" in quality
    assert "prompts without a pair: tie: 1; judge agreement below min_judge_agreement: 1" in quality
    assert "| every judge | 1 |" in quality and "| 0 or below | 1 |" in quality
    assert "Mean judge agreement over the written pairs: 0.875" in quality
    assert "## Quality" not in build_dataset_card(CARD_INFO)  # no figures, no section
