"""`poll-assets estimate`: calls, tokens and cost of a partition before any model is called, checked
against what the loopback server then reports for the same calls (counted with a real BPE tokenizer,
the bundled SmolLM2's, so the estimator's characters/4 rule is not graded by itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
import yaml

from poll_assets.cli import main as cli_main
from poll_assets.estimate import Estimate, estimate_prompts, format_estimate, partition_prompts
from poll_assets.llm.cache.response_cache import ResponseCache
from poll_assets.llm.pricing import Price
from poll_assets.panel import Panel, load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets.rubrics.ultrafeedback import get_rubric
from poll_assets.shard_cost import overhead_share
from poll_assets_tests.instance import make_dagster_home
from poll_assets_tests.test_paper_fake_server import CANARY, KEY_VARS, paper_on_fake

PARTITION, SECOND = "shard-00000", "shard-00001"


def _estimate(panel: Panel, prompts: pd.DataFrame, cache: ResponseCache | None, **kwargs: Any) -> Estimate:
    """The estimate as the prompts asset and the CLI ask for it: the panel's jury, priced by member."""
    return estimate_prompts(panel.jury, panel.member_prices(), prompts, cache, **kwargs)


def paper_shard(tmp_path: Path, url: str, size: int = 10, shards: int = 1, **changes: Any) -> Path:
    """The paper panel on the loopback server, shards of `size` bundled prompts, the response cache on."""
    path, raw = paper_on_fake(tmp_path, url)
    raw["source"].update(num_examples=size * shards, shard_size=size)
    raw["cache"] = {"mode": "use"}
    raw.update(changes)
    path.write_text(yaml.safe_dump(raw))
    return path


def materialize(path: Path, home: Path, partition: str = PARTITION) -> tuple[Any, dg.DagsterInstance]:
    panel, _ = load_panel(path)
    defs = build_definitions(panel, path, storage_dir=str(home / "storage"), cache_path=str(home / "cache.sqlite"))
    instance = dg.DagsterInstance.local_temp(str(home))
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=partition, instance=instance,
                                                               raise_on_error=False)
    return result, instance


def member_meta(instance: dg.DagsterInstance, prefix: str, name: str) -> dict[str, Any]:
    return member_meta_of(instance, dg.AssetKey([prefix, name]))


def member_meta_of(instance: dg.DagsterInstance, key: dg.AssetKey) -> dict[str, Any]:
    event = instance.get_latest_materialization_event(key)
    return {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    for var in KEY_VARS:
        monkeypatch.setenv(var, CANARY)
    home = make_dagster_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def reported_input_tokens(instance: dg.DagsterInstance, panel: Any) -> dict[str, int]:
    """Input tokens the server reported, per member, from the latest materializations' metadata."""
    out = {m.name: member_meta(instance, "generations", m.name)["llm/input_tokens"] for m in panel.generators}
    return out | {m.name: member_meta(instance, "ratings", m.name)["llm/input_tokens"] for m in panel.judges}


def test_estimate_input_tokens_are_within_15_percent_of_what_the_server_reports(tmp_path, fake_llm, env):
    fake_llm.configure(tokenizer="gguf", prompt_cache=False)
    path = paper_shard(tmp_path, fake_llm.url, size=10, shards=2)
    panel, _ = load_panel(path)
    cache = ResponseCache(env / "cache.sqlite")
    first = _estimate(panel, partition_prompts(panel.source, path.parent, PARTITION), cache, partitions=[PARTITION])
    assert fake_llm.stats()["total"] == 0  # the estimate called no model
    assert [m.calls for m in first.members] == [10] * 7 and all(m.cached_calls == 0 for m in first.members)
    assert all("max_new_tokens bound" in m.output_basis for m in first.members)
    result, instance = materialize(path, env, PARTITION)
    assert result.success
    reported = reported_input_tokens(instance, panel)
    # Before any answer exists, judges' prompts are sized with max_new_tokens-long generations: an upper bound.
    assert all(m.input_tokens >= reported[m.member] for m in first.members if m.role == "judge")

    # The next shard, estimated from what the first left in the cache (the generators' mean answer length).
    second = _estimate(panel, partition_prompts(panel.source, path.parent, SECOND), cache, partitions=[SECOND])
    assert all(m.output_basis.startswith("mean of 10 cached answers") for m in second.members)
    result, instance = materialize(path, env, SECOND)
    assert result.success
    reported = reported_input_tokens(instance, panel)
    estimated = {m.member: m.input_tokens for m in second.members}
    error = abs(sum(estimated.values()) - sum(reported.values())) / sum(reported.values())
    print(f"estimate accuracy: estimated {sum(estimated.values())} input tokens, server reported "
          f"{sum(reported.values())} ({error:.1%} off); by member {estimated} vs {reported}")
    assert error <= 0.15
    for role in ("generator", "judge"):  # and for each stage on its own
        names = [m.member for m in second.members if m.role == role]
        est, rep = sum(estimated[n] for n in names), sum(reported[n] for n in names)
        assert abs(est - rep) / rep <= 0.15, (role, est, rep)

    after = _estimate(panel, partition_prompts(panel.source, path.parent, SECOND), cache, partitions=[SECOND])
    assert all(m.cached_calls == m.calls == 10 and m.input_tokens == 0 for m in after.members)
    assert all(m.repair_calls == 0 for m in after.members)  # answered judge calls are not counted again
    priced = [m.online_usd for m in after.members if m.provider in ("openai", "anthropic")]
    assert priced == [0.0, 0.0]  # everything is cached: nothing left to pay


def test_the_cli_prints_the_estimate_and_the_prompts_asset_carries_it(tmp_path, fake_llm, env, capsys):
    path = paper_shard(tmp_path, fake_llm.url, prices={
        "gpt-3.5-turbo-0125": {"input_per_mtok": 0.5, "output_per_mtok": 1.5},
        "claude-3-haiku-20240307": {"input_per_mtok": 0.25, "output_per_mtok": 1.25},
    })
    assert cli_main(["estimate", "--panel", str(path), "--partition", PARTITION]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert " 10 " in lines["gpt35_turbo"] and "$" in lines["gpt35_turbo"] and "max_new_tokens bound" in out
    assert "n/a" in lines["llama3_8b"] and "no price" in out  # hf_inference models are not priced
    assert fake_llm.stats()["total"] == 0
    panel, _ = load_panel(path)  # the shard size in use, where it came from, and the model's overhead share
    share = overhead_share(panel.shard_shape(), panel.source.shard_size)
    assert (f"shard size: {panel.source.shard_size} prompts (source.shard_size); expected Dagster overhead "
            f"{share:.1%} of a shard's time") in out
    assert cli_main(["estimate", "--panel", str(path), "--partition", "shard-00009"]) == 2
    print(out)

    panel, _ = load_panel(path)
    defs = build_definitions(panel, path, storage_dir=str(env / "storage"), cache_path=str(env / "cache.sqlite"))
    instance = dg.DagsterInstance.local_temp(str(env))
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey("prompts")})
    assert job.execute_in_process(partition_key=PARTITION, instance=instance).success
    meta = member_meta_of(instance, dg.AssetKey("prompts"))
    assert meta["estimate/calls"] == 70 and meta["estimate/cached_calls"] == 0
    assert meta["estimate/repair_calls_at_most"] == 30 * panel.judging.repair_attempts  # 3 judges x 10 prompts
    assert meta["estimate/input_tokens"] > 0 and "gpt35_turbo" in meta["estimate"]
    assert fake_llm.stats()["total"] == 0  # materializing the prompts called no model


def test_format_estimate_names_where_output_tokens_come_from(tmp_path, fake_llm):
    path = paper_shard(tmp_path, fake_llm.url, size=3)
    panel, _ = load_panel(path)
    text = format_estimate(_estimate(panel, partition_prompts(panel.source, path.parent, PARTITION), None, partitions=[PARTITION]))
    assert "max_new_tokens bound" in text and "0 of 12 generations from the cache" in text


def test_tokens_are_a_quarter_of_the_characters_and_one_per_digit():
    from poll_assets.llm.base import CallRequest, GenerationParams
    from poll_assets.llm.tokens import approx_tokens, request_input_tokens

    assert approx_tokens("abcdefgh") == 2 and approx_tokens("2026") == 4 and approx_tokens("id 12") == 3
    request = CallRequest.build([{"role": "user", "content": "abcd" * 10}], GenerationParams(), json_schema={"a": 1})
    assert request_input_tokens(request) == 10 + 4 + approx_tokens('{"a": 1}')


def _with_repairs(attempts: int, prices: bool = True) -> tuple[Any, Any]:
    """The paper panel (estimated only: no call is made) with `judging.repair_attempts` set, and the
    bundled local panel's first shard of prompts (3)."""
    panel, _ = load_panel("paper")
    panel = panel.model_copy(update={"judging": panel.judging.model_copy(update={"repair_attempts": attempts})})
    if prices:
        panel = panel.model_copy(update={"prices": {
            "gpt-3.5-turbo-0125": Price(input_per_mtok=0.5, output_per_mtok=1.5),
            "claude-3-haiku-20240307": Price(input_per_mtok=0.25, output_per_mtok=1.25)}})
    local, local_path = load_panel("local")
    return panel, partition_prompts(local.source, local_path.parent, PARTITION)


def test_repairs_are_counted_as_an_upper_bound_of_repair_attempts_per_judge_call():
    panel, prompts = _with_repairs(2)
    est = _estimate(panel, prompts, None, partitions=[PARTITION])
    judges = [m for m in est.members if m.role == "judge"]
    assert [m.repair_calls for m in judges] == [2 * m.calls for m in judges] == [6, 6, 6]
    assert all(m.repair_calls == 0 for m in est.members if m.role == "generator")
    # each repair carries the first prompt and answer again, and the second round one turn more
    assert all(m.repair_input_tokens > 2 * m.input_tokens for m in judges)
    assert all(m.repair_output_tokens == 2 * m.output_tokens for m in judges)
    paid = [m for m in judges if m.online_usd is not None]
    assert len(paid) == 2 and all(m.repair_online_usd > m.online_usd for m in paid)
    text = format_estimate(est)
    assert "repairs, at most" in text and "total with repairs, at most" in text
    assert "upper bound: judging.repair_attempts re-asks for every judge call to make" in text
    assert est.to_dict()["repair_calls_at_most"] == 18

    none = _estimate(_with_repairs(0)[0], prompts, None, partitions=[PARTITION])
    assert all(m.repair_calls == 0 for m in none.members) and "repairs" not in format_estimate(none)


def test_the_repair_bound_holds_over_the_judging_stage_own_repair_request():
    from poll_assets.assets.judging import first_reading, repair_request
    from poll_assets.estimate import expected_output, repair_requests_at_most
    from poll_assets.llm.base import Completion
    from poll_assets.llm.tokens import request_input_tokens
    from poll_assets.stage_requests import plan_judge_task

    panel, prompts = _with_repairs(1)
    judge, rubric = panel.judges[1], get_rubric(panel.judging.aspect)
    row = prompts.iloc[0].copy()
    row["generations"] = ["a short answer", "another answer", "a third"]
    task = plan_judge_task(row, judge, panel.judging, rubric)
    length, _ = expected_output(judge, None)
    # the stage's own repair of a first answer of the expected length that left every text unread
    unread_answer = Completion(text="abc " * round(length), output_mode="json_schema")
    real = repair_request(first_reading(task, unread_answer, rubric), rubric, panel.judging.max_rationale_chars)
    (bound,) = repair_requests_at_most(task, rubric, 1, length, panel.judging.max_rationale_chars)
    assert real is not None and request_input_tokens(real) <= request_input_tokens(bound)
