"""A panel's local prompt files are relative to the panel file, and a missing one is named at load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from poll_assets.panel import PANELS_DIR, PanelConfigError, load_panel


def test_a_copied_panel_names_itself_and_the_relative_path_rule(tmp_path: Path) -> None:
    copy = tmp_path / "mine" / "local.yaml"
    copy.parent.mkdir()
    shutil.copy(PANELS_DIR / "local.yaml", copy)
    with pytest.raises(PanelConfigError) as err:
        load_panel(copy)
    msg = str(err.value)
    assert msg.startswith(f"{copy}: source.data_files: no such file: ../data/sample_prompts.jsonl")
    assert str(tmp_path / "data" / "sample_prompts.jsonl") in msg  # where it looked
    assert f"relative to the folder of this panel file, {copy.parent}" in msg
    assert str(PANELS_DIR.parent / "data" / "sample_prompts.jsonl") in msg  # the bundled copy, to point at


def test_absolute_and_relative_data_files_load(tmp_path: Path) -> None:
    bundled = PANELS_DIR.parent / "data" / "sample_prompts.jsonl"
    gold = PANELS_DIR.parent / "data" / "gold_labels.jsonl"
    text = (PANELS_DIR / "local.yaml").read_text().replace("../data/gold_labels.jsonl", str(gold))
    absolute = tmp_path / "abs.yaml"
    absolute.write_text(text.replace("../data/sample_prompts.jsonl", str(bundled)))
    assert load_panel(absolute)[0].source.data_files == [str(bundled)]
    shutil.copy(bundled, tmp_path / "prompts.jsonl")
    relative = tmp_path / "rel.yaml"
    relative.write_text(text.replace("../data/sample_prompts.jsonl", "prompts.jsonl"))
    assert load_panel(relative)[0].source.data_files == ["prompts.jsonl"]
