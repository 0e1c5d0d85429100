"""Each stage's code_version covers its settings whole, less the exclusions `code_versions` names.

Every field of every stage's settings model is changed in turn: the version must change exactly for
the fields not excluded. A field added to a model (a subclass here) changes the version too, so a new
setting cannot leave stale partitions marked fresh."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
from pydantic import BaseModel

from poll_assets.assets.judging import judge_code_version
from poll_assets.code_versions import (
    JUDGING_EXCLUDED_FOR_JUDGES,
    JUDGING_EXCLUDED_FOR_POOLING,
    MEMBER_EXCLUDED,
    SOURCE_EXCLUDED,
    pairs_version,
    pooled_version,
    prompts_version,
)
from poll_assets.panel import Binarization, Judging, Member, Panel, Pooling, Source, load_panel
from poll_assets.pipeline import build_definitions
from poll_assets.rubrics.ultrafeedback import get_rubric


def changed(value: Any, annotation: Any = None) -> Any:
    """A value different from `value`, of a shape its field can dump (no validation on model_copy)."""
    if isinstance(value, BaseModel):  # a nested model: change its first field
        first = next(iter(type(value).model_fields))
        return value.model_copy(update={first: changed(getattr(value, first))})
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "_changed"
    if isinstance(value, list):
        return [*value, "changed"]
    if isinstance(value, dict):
        return {**value, "changed": "instruction"}
    if value is None:
        return ["changed"] if "list" in str(annotation) else "changed"
    raise AssertionError(f"no changed value for {value!r}")


def fields_that_change(settings: BaseModel, version: Callable[[BaseModel], str]) -> set[str]:
    base = version(settings)
    fields = type(settings).model_fields
    return {name for name, info in fields.items()
            if version(settings.model_copy(update={name: changed(getattr(settings, name), info.annotation)})) != base}


def with_extra_field(settings: BaseModel) -> BaseModel:
    """The same settings in a subclass that has one more field, as a new setting would add."""
    extended = type(f"{type(settings).__name__}WithANewSetting", (type(settings),), {
        "__annotations__": {"a_new_setting": int}, "a_new_setting": 0})
    return extended.model_construct(**dict(settings), a_new_setting=0)


PANEL, PANEL_PATH = load_panel("paper")
RUBRIC = get_rubric(PANEL.judging.aspect)
FAMILIES = [(m.name, m.family) for m in PANEL.members]


def judge_of(judging: Judging) -> Callable[[BaseModel], str]:
    return lambda member: judge_code_version(member, judging, RUBRIC)


# stage -> (its settings, the version as a function of them, the fields excluded on purpose)
STAGES: dict[str, tuple[BaseModel, Callable[[Any], str], Mapping[str, str]]] = {
    "prompts: source": (PANEL.source, prompts_version, SOURCE_EXCLUDED),
    "generations: member": (PANEL.generators[0], lambda m: m.fingerprint(), MEMBER_EXCLUDED),
    "ratings: member": (PANEL.judges[0], judge_of(PANEL.judging), MEMBER_EXCLUDED),
    "ratings: judging": (PANEL.judging, lambda j: judge_code_version(
        PANEL.judges[0], j, RUBRIC), JUDGING_EXCLUDED_FOR_JUDGES),
    "pooled_ratings: pooling": (PANEL.pooling, lambda p: pooled_version(p, PANEL.judging, FAMILIES), {}),
    "pooled_ratings: judging": (PANEL.judging, lambda j: pooled_version(PANEL.pooling, j, FAMILIES),
                                JUDGING_EXCLUDED_FOR_POOLING),
    "preference_pairs: binarization": (PANEL.binarization, pairs_version, {}),
}


@pytest.mark.parametrize("stage", STAGES)
def test_every_field_not_excluded_changes_the_version(stage):
    settings, version, excluded = STAGES[stage]
    assert set(excluded) <= set(type(settings).model_fields), "an exclusion names no field"
    assert fields_that_change(settings, version) == set(type(settings).model_fields) - set(excluded)


@pytest.mark.parametrize("stage", STAGES)
def test_a_new_field_changes_the_version(stage):
    settings, version, _ = STAGES[stage]
    assert version(with_extra_field(settings)) != version(settings)


def test_a_member_family_changes_only_the_pooled_version():
    member = PANEL.judges[0]
    other = member.model_copy(update={"family": member.family + "_changed"})
    assert judge_of(PANEL.judging)(other) == judge_of(PANEL.judging)(member)
    families = [(m.name, m.family if m is not member else other.family) for m in PANEL.members]
    assert pooled_version(PANEL.pooling, PANEL.judging, families) != pooled_version(PANEL.pooling, PANEL.judging, FAMILIES)


def test_the_graph_takes_its_code_versions_from_these_functions(monkeypatch):
    for var in ("HF_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.setenv(var, "unused-in-this-test")
    graph = build_definitions(PANEL, PANEL_PATH).resolve_asset_graph()
    versions = {k.to_user_string(): graph.get(k).code_version for k in graph.get_all_asset_keys()}
    assert versions["prompts"] == prompts_version(PANEL.source)
    for g in PANEL.generators:
        assert versions[f"generations/{g.name}"] == g.fingerprint()
    for j in PANEL.judges:
        assert versions[f"ratings/{j.name}"] == judge_code_version(j, PANEL.judging, RUBRIC)
    assert versions["pooled_ratings"] == pooled_version(PANEL.pooling, PANEL.judging, FAMILIES)
    assert versions["preference_pairs"] == pairs_version(PANEL.binarization)


def test_the_settings_models_are_the_panels():
    # the stages above are every settings model a stage's version reads
    assert {type(s) for s, _, _ in STAGES.values()} == {Source, Member, Judging, Pooling, Binarization}
    assert Panel.model_fields["source"].annotation is Source


def test_switching_to_pairwise_changes_only_the_judges_and_what_follows(monkeypatch):
    # The generations are reused (same versions, so same storage and cache); the judges and pooling re-run.
    for var in ("HF_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.setenv(var, "unused-in-this-test")

    def versions(panel: Panel) -> dict[str, str | None]:
        graph = build_definitions(panel, PANEL_PATH).resolve_asset_graph()
        return {k.to_user_string(): graph.get(k).code_version for k in graph.get_all_asset_keys()}

    rating = versions(PANEL)
    pairwise = versions(PANEL.model_copy(update={"judging": PANEL.judging.model_copy(update={"mode": "pairwise"})}))
    changed_keys = {k for k in rating if rating[k] != pairwise[k]}
    assert changed_keys == {*(f"ratings/{j.name}" for j in PANEL.judges), "pooled_ratings"}
    anchored = PANEL.judging.model_copy(update={"mode": "pairwise", "pairwise": PANEL.judging.pairwise.model_copy(
        update={"against": PANEL.generators[0].name})})
    assert versions(PANEL.model_copy(update={"judging": anchored}))[f"ratings/{PANEL.judges[0].name}"] != \
        pairwise[f"ratings/{PANEL.judges[0].name}"]
