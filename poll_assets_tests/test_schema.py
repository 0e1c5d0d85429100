"""Column schemas: one per asset, feeding the definitions, the materializations and the docs' asset table."""

from __future__ import annotations

import re
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from poll_assets.assets.keys import (
    COMBINED_COLUMNS, COMPARISON_COLUMNS, GENERATION_COLUMNS, PAIR_COLUMNS, POOLED_COLUMNS, PROMPT_COLUMNS, RATING_COLUMNS,
)
from poll_assets.engine.schema import schema
from poll_assets.pipeline import build_definitions
from poll_assets_tests.fake_panel import write_panel

ASSETS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "assets.md"
SCHEMAS = [PROMPT_COLUMNS, GENERATION_COLUMNS, COMBINED_COLUMNS, RATING_COLUMNS, COMPARISON_COLUMNS, POOLED_COLUMNS, PAIR_COLUMNS]


def _documented_columns() -> dict[str, list[str]]:
    """asset -> the backquoted names in its row of the asset table in docs/assets.md."""
    rows = {}
    for line in ASSETS_PAGE.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = re.findall(r"`([^`]+)`", cells[3])
    return rows


def test_the_docs_table_lists_exactly_the_columns_of_each_schema():
    rows = _documented_columns()
    assert set(rows) == {s.asset for s in SCHEMAS}
    for s in SCHEMAS:
        assert rows[s.asset] == s.names, s.asset


def test_every_column_has_a_description_and_names_are_unique():
    for s in SCHEMAS:
        assert len(set(s.names)) == len(s.names), s.asset
        assert all(c.description.strip() for c in s.columns), s.asset


def test_definitions_describe_every_column_before_anything_is_materialized(tmp_path):
    panel, path = write_panel(tmp_path)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "s"), cache_path=str(tmp_path / "c.sqlite"))
    graph = defs.resolve_asset_graph()
    described = {}
    for key in graph.materializable_asset_keys:
        if key == dg.AssetKey("preference_dataset"):
            continue
        table = graph.get(key).metadata["dagster/column_schema"]
        assert all(c.description for c in table.columns), key
        described[key.to_user_string()] = [c.name for c in table.columns]
    assert described["generations/gen_0"] == GENERATION_COLUMNS.names
    assert described["ratings/judge_1"] == RATING_COLUMNS.names
    assert described["pooled_ratings"] == POOLED_COLUMNS.names
    assert len(described) == 4 + len(panel.generators) + len(panel.judges)


def test_a_frame_or_lineage_that_strays_from_the_schema_is_refused():
    s = schema("thing", ("a", "int", "first"), ("b", "string", "second"))
    assert s.output_metadata(s.frame([{"a": 1, "b": "x"}]))["dagster/row_count"] == 1
    with pytest.raises(ValueError, match=r"thing: the frame's columns \['b', 'a'\] are not the declared ones"):
        s.output_metadata(pd.DataFrame({"b": ["x"], "a": [1]}))
    with pytest.raises(ValueError, match=r"thing: column lineage names columns it does not have: \['c'\]"):
        s.lineage({"c": []})


def test_a_judges_description_names_the_rubric_version_as_the_readme_does():
    """The UI showed `vif-1` while the docs said `if-1`: the version is printed as itself."""
    from poll_assets.panel import load_panel
    from poll_assets.pipeline import build_definitions

    panel, path = load_panel("local")
    defs = build_definitions(panel, path)
    judge = panel.judges[0]
    spec = next(s for s in defs.resolve_all_asset_specs() if s.key.path == ["ratings", judge.name])
    assert "(version if-1)" in spec.description and "vif-1" not in spec.description
