"""The panel reference (docs/panel.md, generated at build time) holds every field of every panel
model, with its type, default and description: a new field without a description fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from poll_assets.llm.batch.settings import BatchSettings
from poll_assets.llm.budget import BudgetSettings
from poll_assets.llm.online.policy import Limits
from poll_assets.llm.pricing import Price
from poll_assets.panel import Member, Panel, Source
from poll_assets.panel_reference import _cell, model_section, panel_models, panel_reference_markdown

ROOT = Path(__file__).resolve().parent.parent
MODELS = panel_models()


def section_of(markdown: str, model: type) -> str:
    start = markdown.index(f"## {model.__name__}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end if end != -1 else None]


def test_every_model_of_the_panel_file_is_reached():
    assert {Panel, Source, Member, Limits, BatchSettings, BudgetSettings, Price} <= set(MODELS)
    assert MODELS[Member] == ["generators[]", "judges[]"]


@pytest.mark.parametrize("model", list(MODELS), ids=lambda m: m.__name__)
def test_every_field_has_a_description_and_a_row(model):
    missing = [name for name, info in model.model_fields.items() if not (info.description or "").strip()]
    assert not missing, f"{model.__name__}: fields without Field(description=...): {missing}"
    section = section_of(panel_reference_markdown(), model)
    for name, info in model.model_fields.items():
        (row,) = [line for line in section.splitlines() if line.startswith(f"| `{name}` |")]
        assert row.rstrip().endswith(f"| {_cell(info.description)} |"), row


def test_types_defaults_and_bounds_come_from_the_models():
    member = section_of(panel_reference_markdown(), Member)
    assert "| `n_ctx` | integer (≥ 256) | `4096` |" in member
    assert "| `name` | text | **required** |" in member
    assert "'openai' \\| 'anthropic'" in member  # the provider registry's names, escaped for the table
    assert "- `limits`: how fast" in member  # the fields left out of the code version, with the reason


def test_a_field_added_without_a_description_shows_an_empty_cell():
    class Extended(Source):
        a_new_setting: int = 0

    row = [line for line in model_section(["source"], Extended).splitlines() if "`a_new_setting`" in line]
    assert row == ["| `a_new_setting` | integer | `0` |  |"]  # what the test above refuses


def test_the_docs_hook_puts_the_reference_in_the_panel_page():
    spec = importlib.util.spec_from_file_location("panel_hook", ROOT / "docs" / "hooks" / "panel_reference.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = (ROOT / "docs" / "panel.md").read_text(encoding="utf-8")
    built = hook.on_page_markdown(page, page=SimpleNamespace(file=SimpleNamespace(src_uri="panel.md")))
    assert hook.MARKER not in built and panel_reference_markdown() in built
    other = hook.on_page_markdown(page, page=SimpleNamespace(file=SimpleNamespace(src_uri="index.md")))
    assert other == page
    with pytest.raises(ValueError, match="marker"):
        hook.on_page_markdown("# Panel", page=SimpleNamespace(file=SimpleNamespace(src_uri="panel.md")))


def test_the_readme_panel_example_loads(tmp_path):
    import re

    from poll_assets.panel import load_panel

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (example,) = re.findall(r"```yaml\n(name: my_panel\n.*?)```", readme, re.S)
    path = tmp_path / "readme_panel.yaml"
    path.write_text(example, encoding="utf-8")
    panel, _ = load_panel(path)
    assert [m.provider for m in panel.members] == ["hf_inference", "openai_compatible", "openai", "anthropic"]
    assert panel.judges[0].limits.max_concurrency == 16 and panel.judging.repair_attempts == 1
