"""The run budget: calls stop starting at the cap, finished calls stay cached, the step says what was
spent and what is left, and a relaunch with a raised budget finishes without paying twice."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from poll_assets.llm.base import CallRequest, Completion, GenerationParams
from poll_assets.llm.budget import BudgetLedger, BudgetSettings, MemberBudget, RunBudget
from poll_assets.llm.pricing import Price
from poll_assets.panel import PanelConfigError, load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets_tests.fake_panel import PROMPTS, write_panel_file
from poll_assets_tests.instance import make_dagster_home

PARTITION = "shard-00000"
PRICE = {"input_per_mtok": 100.0, "output_per_mtok": 400.0}  # dear, so a few calls reach a small cap


def test_reserve_holds_the_worst_case_and_settle_books_the_actual(tmp_path):
    ledger = BudgetLedger(tmp_path / "c.sqlite")
    run = RunBudget.open(BudgetSettings(max_usd=1.0), "run-1", ledger)
    assert run.reserve(0.6) and not run.reserve(0.5)  # 0.6 in flight + 0.5 > 1.0
    run.settle(0.6, 0.2, "m", "k1")
    assert run.reserve(0.5) and run.in_flight_usd == pytest.approx(0.5)
    run.settle(0.5, 0.5, "m", "k2")
    # another step of the same run starts from what the run spent; another run starts from zero
    again = RunBudget.open(BudgetSettings(max_usd=1.0), "run-1", ledger)
    assert again.spent_usd == pytest.approx(0.7) and again.calls == 2 and not again.reserve(0.31)
    assert RunBudget.open(BudgetSettings(max_usd=1.0), "run-2", ledger).spent_usd == 0.0


def test_a_member_budget_prices_the_request_at_its_worst_case():
    request = CallRequest.build([{"role": "user", "content": "x" * 400}], GenerationParams(max_new_tokens=100))
    budget = MemberBudget(RunBudget(1.0, "r"), "gen", Price(input_per_mtok=1e6, output_per_mtok=0))
    assert budget.worst_case_usd(request) == pytest.approx(104.0)  # 400 chars / 4 + 4 per message
    assert asyncio.run(budget.reserve(request)) is None and budget.refused == 1
    cheap = MemberBudget(RunBudget(1.0, "r"), "gen", Price(input_per_mtok=1000, output_per_mtok=1000))
    held = asyncio.run(cheap.reserve(request))
    cheap.settle(held, Completion(text="ok", input_tokens=100, output_tokens=10))
    assert cheap.run.spent_usd == pytest.approx(0.11) and cheap.run.in_flight_usd == 0.0


def test_a_budget_needs_a_price_for_every_paid_member(tmp_path, fake_llm):
    raw = budget_panel(fake_llm.url, 1.0)
    raw["prices"] = {}
    with pytest.raises(PanelConfigError, match="budget.*missing"):
        load_panel(write_panel_file(tmp_path, raw, prompts=PROMPTS))


def budget_panel(url: str, max_usd: float) -> dict[str, Any]:
    def member(name: str) -> dict[str, Any]:
        return {"name": name, "provider": "openai", "model": f"gpt-{name}", "family": name,
                "base_url": f"{url}/{name}/v1", "params": {"max_new_tokens": 32}, "limits": {"max_concurrency": 2}}

    return {
        "name": "budgeted",
        "source": {"data_files": ["prompts.jsonl"], "column_mapping": {"prompt": "instruction"},
                   "num_examples": 8, "shard_size": 8},
        "generators": [member("gen_a"), member("gen_b")],
        "judges": [member("judge_a")],
        "thresholds": {"min_agreement": -1.0},
        "prices": {f"gpt-{name}": PRICE for name in ("gen_a", "gen_b", "judge_a")},
        "budget": {"max_usd": max_usd},
    }


def run_once(tmp_path: Path, url: str, max_usd: float, home: Path) -> tuple[Any, Path]:
    path = write_panel_file(tmp_path, budget_panel(url, max_usd), prompts=PROMPTS)
    panel, _ = load_panel(path)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"), cache_path=str(home / "cache.sqlite"))
    instance = dg.DagsterInstance.local_temp(str(home))
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=PARTITION, instance=instance,
                                                               raise_on_error=False)
    return result, home / "cache.sqlite"


def failure_text(result: Any) -> str:
    failures = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    parts = []
    for f in failures:
        data = f.step_failure_data
        parts.append((data.error.message if data.error else "") + " " +
                     (data.user_failure_data.description or "" if data.user_failure_data else ""))
    return " ".join(parts)


def test_a_run_stops_at_its_budget_and_a_relaunch_with_more_finishes_paying_nothing_twice(tmp_path, fake_llm, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    home = make_dagster_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    cap = 0.05  # a generator call's worst case is about $0.015 here: a handful of the 16 generations
    result, cache_path = run_once(tmp_path, fake_llm.url, cap, home)
    assert not result.success
    message = failure_text(result)
    assert f"budget of ${cap:.4f} is reached" in message and "spent $" in message
    assert "were not started" in message and "Raise budget.max_usd" in message and "will not be paid again" in message

    spent, booked = BudgetLedger(cache_path).spent(result.run_id)
    made = fake_llm.stats()["total"]
    assert booked == made and 0 < made < 16  # every call made was booked; the cap left calls unstarted
    assert spent <= cap  # what was paid never passed the cap
    worst_call = (60 / 4 + 8) * PRICE["input_per_mtok"] / 1e6 + 32 * PRICE["output_per_mtok"] / 1e6
    assert spent > cap - 2 * worst_call  # it stopped at the cap, not well before it (2 calls in flight)
    print(f"budget test: cap ${cap}, spent ${spent:.4f} on {made} of 16 generator calls")

    first_counts = dict(fake_llm.stats()["by_body"])
    result, _ = run_once(tmp_path, fake_llm.url, 100.0, home)
    assert result.success, failure_text(result)
    by_body = fake_llm.stats()["by_body"]
    assert max(by_body.values()) == 1  # no request reached the server twice over both runs
    assert set(first_counts) <= set(by_body) and len(by_body) == 16 + 8  # 2x8 generations, 8 judge calls
