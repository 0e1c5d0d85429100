"""`poll-assets trail` prints control characters from prompts and answers as escapes, never raw."""

from __future__ import annotations

import json

import dagster as dg
import pandas as pd

from poll_assets import cli
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets.terminal import escape_controls
from poll_assets_tests.fake_panel import scripted_resources, write_panel

RED = "\x1b[31m"


def test_escape_controls_keeps_text_and_layout_and_escapes_the_rest():
    assert escape_controls("plain\ttext\nnext line, café ✓") == "plain\ttext\nnext line, café ✓"
    assert escape_controls(f"{RED}red\x1b[0m") == "\\u001b[31mred\\u001b[0m"
    assert escape_controls("over\rwrite\x07\x7f\x9b2J") == "over\\u000dwrite\\u0007\\u007f\\u009b2J"
    assert escape_controls("abc\u202edcba") == "abc\\u202edcba"  # a bidi override
    assert json.loads(escape_controls(json.dumps({"t": "\x9b"}, ensure_ascii=False))) == {"t": "\x9b"}


def test_trail_cli_prints_an_ansi_prompt_escaped(tmp_path, capsys):
    panel, path = write_panel(tmp_path, n_prompts=2, shard_size=2)
    (tmp_path / "prompts.jsonl").write_text(
        json.dumps({"prompt": f"{RED}Paint the terminal red\x1b[0m"}) + "\n" + json.dumps({"prompt": "Say hi."}) + "\n")
    storage = tmp_path / "storage"
    defs = build_definitions(panel, path, storage_dir=str(storage), cache_path=str(tmp_path / "c.sqlite"),
                             resource_overrides=scripted_resources(panel))
    with dg.DagsterInstance.ephemeral() as instance:
        assert defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key="shard-00000", instance=instance).success
    pid = pd.read_parquet(storage / "prompts" / "shard-00000.parquet")["prompt_id"][0]
    for extra in ([], ["--json"]):
        assert cli.main(["trail", pid, "--storage", str(storage), *extra]) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\\u001b[31mPaint the terminal red" in out
    assert json.loads(out)["instruction"] == f"{RED}Paint the terminal red\x1b[0m"  # JSON still decodes to the text
