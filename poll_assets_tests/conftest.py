from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def dagster_home(tmp_path, monkeypatch) -> Path:
    """A throwaway Dagster instance, so tests never touch the project's run history."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home
