"""`poll-assets ui` started exactly as the README says: the venv's script by absolute path, with no
venv on PATH. It must reach a working UI, and start without Dagster's preview or `dg dev` warnings."""

from __future__ import annotations

import sys
import time
import urllib.request
import warnings
from pathlib import Path

import dagster as dg
import pytest

from poll_assets.cli import run_job, ui_argv
from poll_assets.panel import load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets_tests.dagster_dev import _NO_PROXY, free_port, serve, server_env, write_test_home

POLL_ASSETS_SCRIPT = Path(sys.executable).with_name("poll-assets")
NO_VENV_PATH = "/usr/bin:/bin"


def test_ui_runs_dagster_with_this_interpreter_not_from_path() -> None:
    argv = ui_argv("127.0.0.1", 4321)
    assert argv[0] == sys.executable
    assert argv[argv.index("-m") + 1:argv.index("-m") + 3] == ["dagster", "dev"]
    assert argv[argv.index("-p") + 1] == "4321"


@pytest.mark.parametrize("panel", ["local", "paper"])
def test_loading_definitions_emits_no_preview_warning(panel: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_definitions(*load_panel(panel))
    previews = [str(w.message) for w in caught if issubclass(w.category, dg.PreviewWarning)]
    assert previews == []


@pytest.mark.slow
def test_poll_assets_ui_the_readme_way_without_venv_on_path(tmp_path: Path) -> None:
    assert POLL_ASSETS_SCRIPT.is_file(), f"no console script at {POLL_ASSETS_SCRIPT}; pip install -e ."
    home = tmp_path / "home"
    write_test_home(home)
    port = free_port()
    argv = [str(POLL_ASSETS_SCRIPT), "ui", "--port", str(port)]
    started = time.monotonic()
    # serve() waits for the poll_assets code location to load over GraphQL, then kills the tree.
    for server in serve(argv, server_env(home, PATH=NO_VENV_PATH), home, port, cwd=tmp_path):
        with _NO_PROXY.open(f"{server.url}/server_info", timeout=10) as resp:
            info = resp.read().decode()
        assert resp.status == 200 and "dagster_webserver_version" in info, info
        print(f"poll-assets ui answered after {time.monotonic() - started:.1f}s")
    log = server.log_tail(200_000)
    assert "PreviewWarning" not in log, log
    assert "dg dev" not in log, log


def test_cli_runs_the_job_the_ui_materialize_all_runs() -> None:
    """`poll-assets run` and the UI's *Materialize all* record one job name: Dagster's implicit asset
    job. The UI picks the first of an asset's job names, sorted, so `__ASSET_JOB` wins over `poll_job`
    (the browser test checks the UI's side); it must still cover every asset `poll_job` does."""
    defs = build_definitions(*load_panel("local"))
    job = run_job(defs)
    assert job.name == "__ASSET_JOB"
    assert sorted(["poll_job", job.name])[0] == job.name
    assert job.asset_layer.executable_asset_keys == defs.resolve_job_def(JOB_NAME).asset_layer.executable_asset_keys
    assert job.partitions_def is not None
