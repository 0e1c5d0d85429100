from pathlib import Path

import pytest
import yaml

from poll_assets.panel import PANELS_DIR, PanelConfigError, load_panel
from poll_assets_tests.fake_panel import write_panel_file


def local_panel_file(tmp_path: Path, mutate) -> Path:
    """The bundled `local` panel with `mutate` applied, written to tmp_path."""
    raw = yaml.safe_load((PANELS_DIR / "local.yaml").read_text())
    raw["source"]["data_files"] = [str((PANELS_DIR / "../data/sample_prompts.jsonl").resolve())]
    raw["gold"]["path"] = str((PANELS_DIR / raw["gold"]["path"]).resolve())
    mutate(raw)
    return write_panel_file(tmp_path, raw)


@pytest.mark.parametrize("name", ["local", "paper"])
def test_bundled_panels_load(name):
    panel, path = load_panel(name)
    assert path == PANELS_DIR / f"{name}.yaml"
    assert len(panel.generators) >= 2 and panel.judges


def test_paper_panel_is_the_reference_panel():
    panel, _ = load_panel("paper")
    assert [g.model for g in panel.generators] == [
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "google/gemma-1.1-7b-it",
        "microsoft/Phi-3-mini-4k-instruct",
        "mistralai/Mistral-7B-Instruct-v0.2",
    ]
    assert {g.provider for g in panel.generators} == {"hf_inference"}
    assert all(g.params.temperature == 0.7 and g.params.max_new_tokens == 1024 for g in panel.generators)
    assert [(j.provider, j.model) for j in panel.judges] == [
        ("hf_inference", "CohereForAI/c4ai-command-r-plus"),
        ("openai", "gpt-3.5-turbo-0125"),
        ("anthropic", "claude-3-haiku-20240307"),
    ]


def test_env_var_selects_panel(monkeypatch):
    monkeypatch.setenv("POLL_PANEL", "paper")
    assert load_panel()[0].name == "paper"


def test_unknown_panel_lists_bundled_ones(monkeypatch):
    monkeypatch.setenv("POLL_PANEL", "nope")
    with pytest.raises(PanelConfigError, match=r"POLL_PANEL='nope'.*\['local', 'paper'\]"):
        load_panel()


def test_bad_provider_names_file_field_member_and_allowed_values(tmp_path):
    path = local_panel_file(tmp_path, lambda raw: raw["judges"][1].update(provider="antropic"))
    with pytest.raises(PanelConfigError) as err:
        load_panel(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "judges[1].provider (member 'gemma_judge')" in msg
    for allowed in ("openai", "anthropic", "hf_inference", "openai_compatible", "local"):
        assert allowed in msg


def test_param_a_provider_lacks_is_refused_at_load(tmp_path):
    def mutate(raw):
        raw["judges"][0].update(provider="anthropic", model="claude-3-haiku-20240307")
    path = local_panel_file(tmp_path, mutate)
    with pytest.raises(PanelConfigError, match=r"judges\[0\].*\['seed', 'temperature'\] are not supported by provider 'anthropic'"):
        load_panel(path)


def test_duplicate_member_names_refused(tmp_path):
    path = local_panel_file(tmp_path, lambda raw: raw["judges"][0].update(name="smol_answer"))
    with pytest.raises(PanelConfigError, match="repeated: \\['smol_answer'\\]"):
        load_panel(path)


def test_source_needs_exactly_one_origin(tmp_path):
    path = local_panel_file(tmp_path, lambda raw: raw["source"].update(repo_id="org/ds"))
    with pytest.raises(PanelConfigError, match="exactly one of repo_id"):
        load_panel(path)


def test_fingerprint_changes_with_params_only_for_that_member():
    panel, _ = load_panel("local")
    a, b = panel.judges[0], panel.judges[1]
    changed = a.model_copy(update={"params": a.params.model_copy(update={"temperature": 0.9})})
    assert changed.fingerprint() != a.fingerprint()
    assert b.fingerprint() == load_panel("local")[0].judges[1].fingerprint()
    assert a.fingerprint("rubric-v1") != a.fingerprint("rubric-v2")


def test_the_local_panel_has_two_families_and_excludes_self_ratings():
    panel, _ = load_panel("local")
    model_families = {m.family for m in panel.members if m.provider == "local"}
    assert model_families == {"smollm2", "gemma3"}
    assert {j.family for j in panel.judges} == model_families
    assert panel.judging.exclude_self_family is True
    written = [g for g in panel.generators if g.provider == "dataset"]
    assert [g.source_column for g in written] == ["good_answer", "flawed_answer"]


def test_a_dataset_generator_needs_its_column_and_no_other_member_has_one(tmp_path):
    def written(**fields):
        return lambda raw: raw["generators"].append({"name": "mine", "provider": "dataset", "model": "m", "family": "f", **fields})

    with pytest.raises(PanelConfigError, match=r"generators\[4\] \(member 'mine'\).*source_column"):
        load_panel(local_panel_file(tmp_path, written()))
    with pytest.raises(PanelConfigError, match=r"params \['temperature'\] are not supported by provider 'dataset'"):
        load_panel(local_panel_file(tmp_path, written(source_column="good_answer", params={"temperature": 0.5})))
    with pytest.raises(PanelConfigError, match=r"generators\[0\].*give both or neither"):
        load_panel(local_panel_file(tmp_path, lambda raw: raw["generators"][0].update(source_column="good_answer")))
    def judge(raw):
        raw["judges"][0] = {"name": "reader", "provider": "dataset", "model": "m", "family": "f", "source_column": "x"}
    with pytest.raises(PanelConfigError, match=r"judges \['reader'\]: provider 'dataset' only answers prompts"):
        load_panel(local_panel_file(tmp_path, judge))


def test_a_dataset_generators_fingerprint_names_its_column():
    panel, _ = load_panel("local")
    good, flawed = (g for g in panel.generators if g.provider == "dataset")
    assert good.fingerprint() != flawed.fingerprint()  # same model, another column


def test_binarization_minimums_are_validated(tmp_path):
    with pytest.raises(PanelConfigError, match=r"binarization.min_judge_agreement: Input should be less than or equal to 1"):
        load_panel(local_panel_file(tmp_path, lambda raw: raw.update(binarization={"min_judge_agreement": 1.5})))
    panel, _ = load_panel(local_panel_file(tmp_path, lambda raw: raw.update(
        binarization={"min_judge_agreement": 0.75, "min_margin_low": 0.5})))
    assert (panel.binarization.min_judge_agreement, panel.binarization.min_margin_low) == (0.75, 0.5)
