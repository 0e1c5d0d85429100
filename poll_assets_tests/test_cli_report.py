"""`poll-assets run` says why a run failed: each failed check's asset, name, message and numbers,
and each failed step's error, not just the check's name."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg

from poll_assets.cli import failure_report
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets_tests.fake_panel import scripted_resources, write_panel
from poll_assets_tests.test_faults import KEY_ENV, REPO
from poll_assets_tests.test_faults import http_panel_file as write_http_panel


def test_failure_report_names_the_check_its_message_and_its_numbers(tmp_path):
    panel, path = write_panel(tmp_path)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "s"), cache_path=str(tmp_path / "c.sqlite"),
                             resource_overrides=scripted_resources(panel, {"gen_1": "Name three"}))
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def(JOB_NAME).execute_in_process(
            partition_key="shard-00000", instance=instance, raise_on_error=False)
    lines, failed = failure_report(result)
    assert failed
    check = next(line for line in lines if line.startswith("check failed: generations/gen_1: "))
    assert "failure_rate=0.5" in check and "threshold=0.1" in check and "failures=1" in check
    assert "failure rate 0.500 > max_generation_failure_rate 0.1" in check, check  # its sentence, not only its name


def cli_run(fake_llm, tmp_path):
    panel_path = write_http_panel(tmp_path, fake_llm, 4, max_retries=0)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), KEY_ENV: "fake-key", "DAGSTER_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "poll_assets.cli", "run", "--panel", str(panel_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_cli_prints_the_failed_check_and_exits_non_zero(fake_llm, tmp_path):
    fake_llm.script("500")  # the first generation call fails, not retried: 1 of 4 rows of one generator
    proc = cli_run(fake_llm, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next((x for x in proc.stderr.splitlines() if x.startswith("check failed: generations/")), proc.stderr)
    assert ": failure_rate: failure rate 0.250 > max_generation_failure_rate 0.1" in line
    assert "failure_rate=0.25" in line and "threshold=0.1" in line, line
    assert "failed; see `poll-assets ui`" in proc.stderr


def test_cli_prints_the_step_failure_sentence(fake_llm, tmp_path):
    fake_llm.configure(forced_status={"gen_openai": 400})  # every call of one generator is refused
    proc = cli_run(fake_llm, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next((x for x in proc.stderr.splitlines() if x.startswith("step failed: generations: ")), proc.stderr)
    assert "generations/gen_openai: all 4 calls to member 'gen_openai'" in line and "HTTP 400" in line, line
