from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from poll_assets_tests.fake_llm_server import FakeLLMServer
from poll_assets_tests.instance import make_dagster_home
# One `dagster dev` server per session, shared by the UI and GraphQL tests (it is declared here so
# both modules get the same instance rather than one each).
from poll_assets_tests.dagster_dev import dagster_server  # noqa: F401


@pytest.fixture
def dagster_home(tmp_path, monkeypatch) -> Path:
    """A throwaway Dagster instance, so tests never touch the project's run history."""
    home = make_dagster_home(tmp_path / "dagster_home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


# -- fake LLM provider server (self-contained: one server per test session, reset for every test) --


@pytest.fixture(scope="session")
def fake_llm_server_session() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as server:
        yield server


@pytest.fixture
def fake_llm(fake_llm_server_session: FakeLLMServer) -> FakeLLMServer:
    """The loopback provider server, with default behaviour and zeroed counters."""
    fake_llm_server_session.reset()
    return fake_llm_server_session
