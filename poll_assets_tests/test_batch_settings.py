"""The `batch:` member setting: which providers may use it, and the policy it resolves to."""

from __future__ import annotations

import pytest

from poll_assets.llm.batch.settings import BatchPolicy, BatchSettings
from poll_assets.llm.providers.registry import BATCH_PROVIDERS, PROVIDERS
from poll_assets.panel import PanelConfigError, load_panel
from poll_assets_tests.test_panel import local_panel_file


def test_batch_providers_come_from_the_registry():
    assert BATCH_PROVIDERS == ("openai", "anthropic", "openai_compatible")
    assert PROVIDERS["openai"].batch.max_requests == 50_000
    assert PROVIDERS["anthropic"].batch.max_bytes == 256 * 1024 * 1024
    assert PROVIDERS["openai_compatible"].batch.needs_declaration


@pytest.mark.parametrize("provider", ["local", "hf_inference"])
def test_batch_on_a_provider_without_a_batch_api_is_refused_at_load(tmp_path, provider):
    def mutate(raw):
        judge = raw["judges"][1]
        judge.update(provider=provider, batch={"enabled": True})
        if provider == "hf_inference":
            judge.pop("model_path", None)
            judge.pop("n_ctx", None)

    path = local_panel_file(tmp_path, mutate)
    with pytest.raises(PanelConfigError) as err:
        load_panel(path)
    msg = str(err.value)
    assert str(path) in msg and "judges[1]" in msg
    assert f"member 'gemma_judge' asks for batch mode, but provider '{provider}' has no batch API" in msg
    assert "providers with one: openai, anthropic, openai_compatible" in msg


def test_openai_compatible_needs_the_server_to_declare_batches(tmp_path):
    def member(extra):
        def mutate(raw):
            raw["judges"][1] = {"name": "vllm_judge", "provider": "openai_compatible", "model": "m", "family": "f",
                                "base_url": "http://127.0.0.1:9/v1", "batch": {"enabled": True, **extra}}
        return mutate

    with pytest.raises(PanelConfigError, match="member 'vllm_judge'.*server_has_batches: true"):
        load_panel(local_panel_file(tmp_path, member({})))
    panel, _ = load_panel(local_panel_file(tmp_path, member({"server_has_batches": True})))
    assert panel.member("vllm_judge").batch.enabled


def test_batch_off_is_accepted_on_any_provider(tmp_path):
    panel, _ = load_panel(local_panel_file(tmp_path, lambda raw: raw["judges"][1].update(batch={"enabled": False})))
    assert not any(m.batch.enabled for m in panel.members)


def test_policy_takes_the_provider_limits_and_never_exceeds_them():
    policy = BatchPolicy.resolve(BatchSettings(enabled=True, max_requests=10), "anthropic")
    assert (policy.wire, policy.max_requests, policy.max_bytes) == ("anthropic", 10, 256 * 1024 * 1024)
    capped = BatchPolicy.resolve(BatchSettings(enabled=True, max_requests=10**9), "openai")
    assert capped.max_requests == 50_000
    assert [round(policy.next_interval(x), 2) for x in (30.0, 250.0)] == [45.0, 300.0]
    with pytest.raises(ValueError, match="provider 'local' has no batch API"):
        BatchPolicy.resolve(BatchSettings(enabled=True), "local")



def test_batch_mode_with_a_postgres_cache_is_refused_at_load(tmp_path):
    """Batch ids live in the SQLite cache file; a PostgreSQL cache cannot record them, so the
    panel is refused rather than risking a second submission."""
    def mutate(raw):
        judge = raw["judges"][1]
        judge.update(provider="openai", model="gpt-4o-mini", batch={"enabled": True})
        judge.pop("model_path", None)
        judge.pop("n_ctx", None)
        raw["cache"] = {"backend": "postgres", "url_env": "SOME_PG_URL"}

    with pytest.raises(PanelConfigError, match=r"\['gemma_judge'\] run in batch mode.*SQLite cache"):
        load_panel(local_panel_file(tmp_path, mutate))
