"""Throwaway Dagster instance directories for tests (the `dagster_home` fixture and module-wide runs)."""

from __future__ import annotations

from pathlib import Path

INSTANCE_YAML = "telemetry:\n  enabled: false\n"


def make_dagster_home(home: Path, extra_yaml: str = "") -> Path:
    """`home` as a Dagster home with telemetry off (plus `extra_yaml` settings), so tests never
    touch the project's run history nor report usage."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(INSTANCE_YAML + extra_yaml)
    return home
