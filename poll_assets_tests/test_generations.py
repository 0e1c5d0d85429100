"""Generators that answer from a column of the prompt source (`provider: dataset`): no call, no cost,
rows that say where the answer came from, through the real graph with scripted judges."""

from __future__ import annotations

import json

import dagster as dg
import pandas as pd
import pytest

from poll_assets.assets.generations import SOURCE_FINISH
from poll_assets.estimate import estimate_prompts
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets.prompt_source import PromptSourceError, load_source_column
from poll_assets_tests.fake_panel import PROMPTS, scripted_resources, write_panel

SHARD = "shard-00000"
WRITTEN = {"name": "written", "provider": "dataset", "model": "answers-on-file", "family": "people",
           "source_column": "answer"}


def _panel_with_answers(tmp_path, answers):
    panel, path = write_panel(tmp_path, extra={"generators": [
        {"name": "gen_0", "provider": "local", "model": "gen-model-0", "family": "g0"}, WRITTEN]})
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(PROMPTS, answers)))
    return panel, path


def test_answers_come_from_the_column_and_no_call_is_made(tmp_path):
    answers = [f"written answer {i} with *stars*" for i in range(len(PROMPTS))]
    answers[1] = ""  # an empty cell: a failed generation, said so
    panel, path = _panel_with_answers(tmp_path, answers)
    resources = scripted_resources(panel)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "s"), cache_path=str(tmp_path / "c.sqlite"),
                             resource_overrides=resources)
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=SHARD, raise_on_error=False)
    gen = pd.read_parquet(tmp_path / "s" / "generations" / "written" / f"{SHARD}.parquet")
    assert gen["generation"][0] == answers[0] and gen["generation"].isna().tolist() == [False, True]
    assert (gen["finish_reason"] == SOURCE_FINISH).all() and (gen["output_tokens"] == 0).all()
    assert gen["served_model"].eq("source column 'answer'").all() and not gen["cached"].any()
    assert gen["error"].isna()[0] and gen["error"][1] == "no answer in source column 'answer'"
    assert gen["call_id"].is_unique and gen["call_id"].notna().all()
    assert resources["llm_written"].total_calls == 0  # never called
    meta = result.asset_materializations_for_node("generations")
    written = next(m for m in meta if m.asset_key == dg.AssetKey(["generations", "written"])).metadata
    assert written["llm/calls"].value == 0 and "no call" in written["llm/cost"].value
    # the empty cell fails the generator's failure-rate check (1 of 2 > 0.1), naming the prompt
    checks = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
    written_check = checks[("generations/written", "generations_valid")]
    assert not written_check.passed and written_check.metadata["failed_conditions"].value == "failure_rate"
    assert checks[("generations/gen_0", "generations_valid")].passed


def test_the_estimate_counts_no_call_for_a_dataset_generator(tmp_path):
    panel, _ = _panel_with_answers(tmp_path, ["a"] * len(PROMPTS))
    prompts = pd.DataFrame({"prompt_id": ["p1", "p2"], "instruction": PROMPTS[:2]})
    written = next(m for m in estimate_prompts(panel.jury, panel.member_prices(), prompts, None).members if m.member == "written")
    assert (written.calls, written.input_tokens, written.online_usd) == (0, 0, 0.0)
    assert "source column 'answer'" in written.output_basis


def test_an_unknown_column_is_refused_naming_the_source_and_its_columns(tmp_path):
    panel, path = _panel_with_answers(tmp_path, ["a"] * len(PROMPTS))
    with pytest.raises(PromptSourceError, match=r"prompts.jsonl: no column 'answr'.*columns \['prompt', 'answer'\]"):
        load_source_column(panel.source, path.parent, "answr", [0])
    with pytest.raises(PromptSourceError, match=r"rows \[99\] are past its end"):
        load_source_column(panel.source, path.parent, "answer", [0, 99])
