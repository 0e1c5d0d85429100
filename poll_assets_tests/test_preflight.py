"""The preflight: every member of a run is checked before the run's first paid call.

Pure checks (keys by the registry's rules, base URLs, weights files), the model listing through the
real SDKs against the loopback server, and whole runs of the `paper` panel on that server: a run
with missing keys fails before any request reaches the server, naming every member without a key.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._serdes import serialize_value

from poll_assets.llm.preflight import (
    ModelListDenied,
    NotReady,
    PreflightError,
    closest_ids,
    model_checks,
    model_problems,
    names_the_model,
    offline_problems,
    preflight,
)
from poll_assets.panel import Member, load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets_tests.instance import make_dagster_home
from poll_assets_tests.test_paper_fake_server import CANARY, KEY_VARS, PARTITION, paper_on_fake, tag_of


def member(name: str, provider: str, **kw: object) -> Member:
    base = {"openai_compatible": "http://127.0.0.1:9/v1"}.get(provider)
    return Member(name=name, provider=provider, model=kw.pop("model", f"{name}-model"), family=name,
                  base_url=kw.pop("base_url", base), **kw)


# -- offline checks ---------------------------------------------------------------------------------


def test_offline_checks_follow_the_registry_key_rules():
    members = [
        member("gpt", "openai"),                                        # required: OPENAI_API_KEY
        member("claude", "anthropic", api_key_env="MY_CLAUDE_KEY"),     # required: the named variable
        member("vllm", "openai_compatible"),                            # if_named: none named, none needed
        member("vllm_keyed", "openai_compatible", api_key_env="VLLM_KEY"),  # if_named: named, so needed
        member("smol", "local"),                                        # none
    ]
    env = {"OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "sk-ant-x"}  # the default var does not stand in
    problems = offline_problems(members, env)
    assert [(p.member, p.provider) for p in problems] == [("claude", "anthropic"), ("vllm_keyed", "openai_compatible")]
    assert "MY_CLAUDE_KEY" in problems[0].what and "VLLM_KEY" in problems[1].what
    assert offline_problems(members, {**env, "MY_CLAUDE_KEY": "k", "VLLM_KEY": "k"}) == []
    assert [p.member for p in offline_problems(members, {**env, "MY_CLAUDE_KEY": "  ", "VLLM_KEY": "k"})] == ["claude"]


def test_offline_checks_base_url_and_weights(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    members = [
        member("bad_url", "openai", base_url="localhost:8000/v1"),
        member("ok_url", "openai", base_url="https://api.example.com/v1"),
        member("no_weights", "local", model_path=str(tmp_path / "missing.gguf")),
        member("weights", "local", model_path=str(gguf)),
    ]
    problems = offline_problems(members, {"OPENAI_API_KEY": "k"})
    assert [p.member for p in problems] == ["bad_url", "no_weights"]
    assert "base_url" in problems[0].what and "missing.gguf" in problems[1].what


def test_error_names_every_member_with_what_and_fix_and_no_secret():
    members = [member("gpt", "openai"), member("claude", "anthropic"), member("smol", "local")]
    with pytest.raises(PreflightError) as info:
        preflight(members, {"HF_TOKEN": CANARY}, check_models=False)
    err = info.value
    assert err.members == ["gpt", "claude"]
    text = str(err)
    assert text.startswith("2 of 3 panel members of this run are not ready (gpt, claude); no call was made")
    assert "- gpt (openai): environment variable OPENAI_API_KEY" in text
    assert "- claude (anthropic): environment variable ANTHROPIC_API_KEY" in text
    assert ".env" in text and "api_key_env" in text  # what to do
    assert CANARY not in text


def test_models_are_not_asked_about_while_a_key_is_missing():
    asked: list[str] = []

    def lister(base_url, key, timeout_s):
        asked.append(base_url)
        return []

    members = [member("gpt", "openai"), member("claude", "anthropic")]
    with pytest.raises(PreflightError):
        preflight(members, {"OPENAI_API_KEY": "k"}, listers={"openai": lister, "anthropic": lister})
    assert asked == []


def test_model_listing_outcomes_with_stub_listers():
    def served(base_url, key, timeout_s):
        return ["known-model"]

    def cannot_list(base_url, key, timeout_s):
        return None

    def refuses_key(base_url, key, timeout_s):
        raise ModelListDenied

    def breaks(base_url, key, timeout_s):
        raise ConnectionError("boom")

    members = [member("known", "openai", model="known-model"), member("unknown", "openai", model="typo-model"),
               member("unlisted", "anthropic"), member("vllm", "openai_compatible")]
    env = {"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k"}
    listers = {"openai": served, "anthropic": cannot_list, "openai_compatible": breaks}
    # A list is evidence, not proof: a model it leaves out is a warning naming the closest ids, never a refusal.
    refused, warned = model_checks(members, env, listers=listers)
    assert refused == []
    assert [(w.member, "typo-model" in w.what and "known-model" in w.what) for w in warned] == [("unknown", True)]
    # Only the provider's own "no such model" for that id refuses it.
    def no_typo(base_url, key, model, timeout_s):
        return model != "typo-model"

    found = model_problems(members, env, listers=listers, retrievers={"openai": no_typo})
    assert [(p.member, "typo-model" in p.what and "known-model" in p.what) for p in found] == [("unknown", True)]
    denied = model_problems(members[:1], env, listers={"openai": refuses_key})
    assert [p.member for p in denied] == ["known"] and "OPENAI_API_KEY" in denied[0].what
    azure = member("azure", "openai", model="my-deployment", base_url="https://res.openai.azure.com/openai/v1/")
    assert model_problems([azure], env, listers={"openai": served}) == []  # deployments are not listed


# -- model listing through the SDKs, on the loopback server -------------------------------------------


def test_model_listing_through_the_sdks(fake_llm):
    fake_llm.configure(models=["served-a", "served-b"], expected_key=CANARY)
    env = {"OPENAI_API_KEY": CANARY, "ANTHROPIC_API_KEY": CANARY}
    members = [
        member("gpt_ok", "openai", model="served-a", base_url=f"{fake_llm.url}/oa/v1"),
        member("gpt_typo", "openai", model="served-c", base_url=f"{fake_llm.url}/ob/v1"),
        member("claude_ok", "anthropic", model="served-b", base_url=f"{fake_llm.url}/an"),
        member("claude_typo", "anthropic", model="claude-9", base_url=f"{fake_llm.url}/ab"),
    ]
    found = model_problems(members, env, timeout_s=5)
    assert [p.member for p in found] == ["gpt_typo", "claude_typo"]
    assert "served-a" in found[0].what and "'claude-9'" in found[1].what and "HTTP 404" in found[1].what
    # Each model is asked about alone; the list is read only for the hint of the two refused.
    assert fake_llm.stats()["model_gets"] == {"oa": 1, "ob": 1, "an": 1, "ab": 1}
    assert fake_llm.stats()["model_lists"] == {"ob": 1, "ab": 1}
    assert fake_llm.stats()["total"] == 0  # asking is not a call

    # A refused key is reported (the server echoes the key back; the message must not).
    wrong = model_problems(members[:1], {"OPENAI_API_KEY": "sk-wrong-key-123456"}, timeout_s=5)
    assert [p.member for p in wrong] == ["gpt_ok"] and "401" in wrong[0].what
    assert "sk-wrong-key-123456" not in wrong[0].line()

    # A server that cannot list (404) never fails a run.
    fake_llm.configure(models=None)
    assert model_problems(members, env, timeout_s=5) == []


# -- whole runs on the loopback server ----------------------------------------------------------------


def paper_defs(tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch, missing: tuple[str, ...]):
    for var in KEY_VARS:
        monkeypatch.setenv(var, CANARY)
    for var in missing:
        monkeypatch.delenv(var)
    home = make_dagster_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return load_paper_defs(tmp_path, url)


def load_paper_defs(tmp_path: Path, url: str):
    """The definitions as a run worker loads them, from the environment as it is now."""
    home = tmp_path / "home"
    path, raw = paper_on_fake(tmp_path, url)
    panel, _ = load_panel(path)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"), cache_path=str(home / "c.sqlite"))
    return defs, raw, dg.DagsterInstance.local_temp(str(home))


def failure_text(instance: dg.DagsterInstance, run_id: str) -> str:
    events = [e for e in instance.all_logs(run_id) if e.dagster_event_type == dg.DagsterEventType.STEP_FAILURE]
    return " ".join(serialize_value(e) for e in events)


@pytest.mark.parametrize("missing", [("ANTHROPIC_API_KEY",), ("ANTHROPIC_API_KEY", "OPENAI_API_KEY")])
def test_run_with_missing_keys_fails_before_any_request(tmp_path, fake_llm, monkeypatch, missing):
    fake_llm.configure(expected_key=CANARY, models=[])  # listing would also fail every model: it must not run
    defs, raw, instance = paper_defs(tmp_path, fake_llm.url, monkeypatch, missing)
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        partition_key=PARTITION, instance=instance, raise_on_error=False)
    assert not result.success
    stats = fake_llm.stats()
    assert stats["total"] == 0 and stats["model_lists"] == stats["model_gets"] == {}  # nothing reached the server
    text = failure_text(instance, result.run_id)
    without_key = [m for m in (*raw["generators"], *raw["judges"])
                   if {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}.get(m["provider"]) in missing]
    assert len(without_key) == len(missing)
    for m in without_key:
        assert f"- {m['name']} ({m['provider']})" in text
    for var in missing:
        assert var in text
    assert f"{len(missing)} of 7 panel members" in text
    # It failed in the first LLM step: no generation was stored.
    assert all(instance.get_latest_materialization_event(dg.AssetKey(["generations", g["name"]])) is None
               for g in raw["generators"])
    assert CANARY not in text


@pytest.mark.slow
def test_subset_runs_check_only_their_members_and_unknown_models_fail_first(tmp_path, fake_llm, monkeypatch):
    defs, raw, instance = paper_defs(tmp_path, fake_llm.url, monkeypatch, ())
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(partition_key=PARTITION, instance=instance, raise_on_error=False).success
    judges = [dg.AssetKey(["ratings", m["name"]]) for m in raw["judges"] if m["provider"] != "hf_inference"]

    # Re-judging with the OpenAI and Anthropic judges only: a missing HF_TOKEN is not this run's business.
    monkeypatch.delenv("HF_TOKEN")
    fake_llm.reset()
    defs, raw, instance = load_paper_defs(tmp_path, fake_llm.url)
    subset = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection=set(judges))
    assert subset.execute_in_process(partition_key=PARTITION, instance=instance, raise_on_error=False).success

    # The same subset, one judge's model not served: fails before any call, naming it.
    fake_llm.reset(models=[m["model"] for m in raw["judges"] if m["provider"] == "openai"])
    claude = next(m for m in raw["judges"] if m["provider"] == "anthropic")
    result = subset.execute_in_process(partition_key=PARTITION, instance=instance, raise_on_error=False)
    assert not result.success
    assert fake_llm.stats()["total"] == 0
    assert set(fake_llm.stats()["model_gets"]) == {tag_of(m) for m in raw["judges"] if m["provider"] != "hf_inference"}
    text = failure_text(instance, result.run_id)
    assert f"- {claude['name']} (anthropic): model '{claude['model']}'" in text and "1 of 2 panel members" in text


def paper_asset_job() -> dg.JobDefinition:
    """`poll_job` (the same assets as the implicit asset job, which cannot be reconstructed by that
    reserved name) of the panel in $POLL_PANEL, rebuilt in every step process: the multiprocess
    executor reconstructs it there, as a run worker launched by the UI does."""
    panel, path = load_panel(os.environ["POLL_PANEL"])
    return build_definitions(panel, path, cache_path=os.environ["POLL_TEST_CACHE"]).resolve_job_def(JOB_NAME)


@pytest.mark.slow
def test_multiprocess_run_fails_in_its_first_paid_step_naming_a_judge(tmp_path, fake_llm, monkeypatch):
    # The UI's runs use the multiprocess executor: each step in its own process with only its own
    # resources. The generators' step still checks the judges, so nothing is bought.
    fake_llm.configure(expected_key=CANARY)
    for var in KEY_VARS:
        monkeypatch.setenv(var, CANARY)
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    home = make_dagster_home(tmp_path / "home")
    path, raw = paper_on_fake(tmp_path, fake_llm.url)
    for var, value in {"DAGSTER_HOME": str(home), "POLL_PANEL": str(path), "POLL_STORAGE_DIR": str(tmp_path / "storage"),
                       "POLL_TEST_CACHE": str(home / "c.sqlite")}.items():
        monkeypatch.setenv(var, value)
    instance = dg.DagsterInstance.get()
    with dg.execute_job(dg.reconstructable(paper_asset_job), instance=instance,
                        tags={"dagster/partition": PARTITION}, raise_on_error=False) as result:
        assert not result.success
        failed = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert [e.step_key for e in failed] == ["generations"]
    assert failed[0].pid != os.getpid()  # the step ran in a process of its own
    assert fake_llm.stats()["total"] == 0
    claude = next(m for m in raw["judges"] if m["provider"] == "anthropic")
    assert f"- {claude['name']} (anthropic): environment variable ANTHROPIC_API_KEY" in failure_text(instance, result.run_id)


def test_not_ready_line_reads_as_one_sentence():
    line = NotReady("gpt", "openai", "environment variable OPENAI_API_KEY is not set or empty", "Export it.").line()
    assert line == "- gpt (openai): environment variable OPENAI_API_KEY is not set or empty. Export it."


def test_models_are_listed_once_per_run_and_not_at_all_when_the_cache_answers_everything(tmp_path, fake_llm, monkeypatch):
    for var in KEY_VARS:
        monkeypatch.setenv(var, CANARY)
    home = make_dagster_home(tmp_path / "home")
    path, raw = paper_on_fake(tmp_path, fake_llm.url)
    raw.pop("cache")  # the default: read and write the response cache
    path.write_text(yaml.safe_dump(raw))
    panel, _ = load_panel(path)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"), cache_path=str(home / "c.sqlite"))
    job = defs.resolve_implicit_global_asset_job_def()
    instance = dg.DagsterInstance.local_temp(str(home))
    listing = {tag_of(m) for m in (*raw["generators"], *raw["judges"]) if m["provider"] in ("openai", "anthropic")}
    assert listing  # the paper panel has members whose models can be listed

    assert job.execute_in_process(partition_key=PARTITION, instance=instance, raise_on_error=False).success
    # Two paid steps in one process: each listing member was asked once, before the first call.
    assert fake_llm.stats()["total"] > 0 and fake_llm.stats()["model_lists"] == {t: 1 for t in listing}

    fake_llm.reset()
    assert job.execute_in_process(partition_key=PARTITION, instance=instance, raise_on_error=False).success
    assert fake_llm.stats()["total"] == 0 and fake_llm.stats()["model_lists"] == {}


# -- aliases, routes that are missing, lists that are not the whole truth ------------------------------


def test_a_404_refuses_only_when_it_names_the_model():
    assert names_the_model(404, {"error": {"message": "The model `gpt-x` does not exist", "code": None}}, "gpt-x")
    assert names_the_model(404, {"error": {"message": "no such thing", "code": "model_not_found"}}, "gpt-x")
    assert names_the_model(404, {"type": "error", "error": {"type": "not_found_error", "message": "model: c-9"}}, "c-9")
    assert not names_the_model(404, {"detail": "Not Found"}, "gpt-x")  # vLLM/FastAPI: the route is missing
    assert not names_the_model(405, {"error": {"message": "gpt-x"}}, "gpt-x")
    assert not names_the_model(404, None, "gpt-x")
    assert closest_ids("claude-3-5-haiku-latest", ["claude-3-opus-20240229", "claude-3-5-haiku-20241022"])[0] == \
        "claude-3-5-haiku-20241022"
    assert closest_ids("llama3.1", ["mistral:latest", "llama3.1:latest"])[0] == "llama3.1:latest"


ANTHROPIC_LISTED = ["claude-3-5-haiku-20241022", "claude-3-haiku-20240307", "claude-3-opus-20240229"]
ALIASES = {"claude-3-5-haiku-latest": "claude-3-5-haiku-20241022", "llama3.1": "llama3.1:latest"}


def test_aliases_pass_routes_that_are_missing_warn_and_unknown_models_are_refused(fake_llm):
    fake_llm.configure(models=[*ANTHROPIC_LISTED, "llama3.1:latest", "gpt-4o-mini"], aliases=ALIASES)
    env = {"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k"}
    members = [
        member("claude_alias", "anthropic", model="claude-3-5-haiku-latest", base_url=f"{fake_llm.url}/an"),
        member("ollama_alias", "openai_compatible", model="llama3.1", base_url=f"{fake_llm.url}/ol/v1"),
        member("claude_typo", "anthropic", model="claude-3-5-haiku-lateest", base_url=f"{fake_llm.url}/ab"),
        member("gpt_typo", "openai", model="gpt-4o-mnii", base_url=f"{fake_llm.url}/oa/v1"),
    ]
    refused, warned = model_checks(members, env, timeout_s=5)
    print(f"\nmodel checks: refused {[p.member for p in refused]}, warned {[w.member for w in warned]}, "
          f"GET /v1/models/{{id}} {fake_llm.stats()['model_gets']}, GET /v1/models {fake_llm.stats()['model_lists']}")
    assert [p.member for p in refused] == ["claude_typo", "gpt_typo"] and warned == []
    assert "claude-3-5-haiku-20241022" in refused[0].what  # the hint names the closest listed id
    assert fake_llm.stats()["model_lists"] == {"ab": 1, "oa": 1}  # the aliases were settled by their own route

    # A server without the per-model route (vLLM): its list is evidence only, a miss is a warning.
    fake_llm.configure(model_route=False)
    refused, warned = model_checks(members, env, timeout_s=5)
    assert refused == [] and [w.member for w in warned] == [m.name for m in members]
    assert "closest listed: llama3.1:latest" in warned[1].what and "the run goes on" in warned[1].what
    fake_llm.configure(model_route_status=405)  # the route answers "method not allowed": the same
    refused, warned = model_checks(members, env, timeout_s=5)
    assert refused == [] and len(warned) == len(members)

    # A refused key on the per-model route is still a refusal, naming the variable, never the key.
    fake_llm.configure(model_route=True, expected_key=CANARY)
    refused, _ = model_checks(members[:1], {"ANTHROPIC_API_KEY": "sk-wrong-key-123456"}, timeout_s=5)
    assert [p.member for p in refused] == ["claude_alias"] and "ANTHROPIC_API_KEY" in refused[0].what
    assert "sk-wrong-key-123456" not in refused[0].line()


def aliased_paper(tmp_path: Path, url: str, n: int, claude_model: str) -> tuple[Path, dict]:
    """The paper panel's shape (4 generators, 3 judges) on the fake server, one generator on an
    OpenAI-compatible route named `llama3.1` (served as llama3.1:latest) and the Anthropic judge named `claude_model`."""
    path, raw = paper_on_fake(tmp_path, url)
    raw["source"].update(num_examples=n, shard_size=n)
    gen = raw["generators"][0]
    gen.update(provider="openai_compatible", model="llama3.1", base_url=f"{url}/ollama_{gen['name']}/v1",
               api_key_env="OPENAI_API_KEY")
    gen["params"].pop("seed", None)
    claude = next(m for m in raw["judges"] if m["provider"] == "anthropic")
    claude["model"] = claude_model
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def test_a_paper_shaped_run_with_aliased_models_makes_7n_requests_and_an_unknown_one_none(tmp_path, fake_llm,
                                                                                           monkeypatch):
    n = 4
    for var in KEY_VARS:
        monkeypatch.setenv(var, CANARY)
    home = make_dagster_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    listed = [*ANTHROPIC_LISTED, "llama3.1:latest", "gpt-3.5-turbo-0125"]
    fake_llm.reset(models=listed, aliases=ALIASES, expected_key=CANARY)
    path, raw = aliased_paper(tmp_path, fake_llm.url, n, "claude-3-5-haiku-latest")
    panel, _ = load_panel(path)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"), cache_path=str(home / "c.sqlite"))
    instance = dg.DagsterInstance.local_temp(str(home))
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        partition_key=PARTITION, instance=instance, raise_on_error=False)
    stats = fake_llm.stats()
    print(f"\naliased paper-shaped run, N={n}: success {result.success}, {stats['total']} requests (7N = {7 * n}), "
          f"GET /v1/models/{{id}} {sum(stats['model_gets'].values())}, GET /v1/models {sum(stats['model_lists'].values())}")
    assert result.success, failure_text(instance, result.run_id)[:3000]
    assert stats["total"] == 7 * n and stats["max_repeats"] == 1
    assert stats["model_lists"] == {}  # every alias was settled by GET /v1/models/{id}

    # A model no route serves is refused before any call, naming it.
    fake_llm.reset(models=listed, aliases=ALIASES, expected_key=CANARY)
    path, raw = aliased_paper(tmp_path, fake_llm.url, n, "claude-3-5-haiku-nonexistent")
    panel, _ = load_panel(path)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage2"), cache_path=str(home / "c2.sqlite"))
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        partition_key=PARTITION, instance=instance, raise_on_error=False)
    assert not result.success and fake_llm.stats()["total"] == 0
    text = failure_text(instance, result.run_id)
    assert "(anthropic): model 'claude-3-5-haiku-nonexistent' does not exist" in text and "1 of 7 panel members" in text
