"""The in-process models are freed before interpreter teardown, so a clean run ends cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from poll_assets.llm.providers import local
from poll_assets.llm.base import CallRequest, GenerationParams

# Closed, as the project's verdict schemas are: LLGuidance honours JSON Schema's default of allowing
# more keys, which SmolLM2 takes and which 16 tokens then cut off.
SCHEMA = {"type": "object", "properties": {"rating": {"type": "integer"}}, "required": ["rating"],
          "additionalProperties": False}


def _judge_once() -> str:
    backend = local.LocalLlamaBackend("SmolLM2-135M-Instruct", None, 512, member="exit_judge")
    request = CallRequest.build([{"role": "user", "content": "Rate 'hello' from 1 to 5."}],
                                GenerationParams(max_new_tokens=16, temperature=0.0), json_schema=SCHEMA)
    return asyncio.run(backend.complete(request)).text or ""


def _answers_health(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"{address}/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:  # connection refused: the engine and its loopback listener are gone
        return False


def _close_and_reload() -> dict:
    first = json.loads(_judge_once())
    server, _ = local._load_model(str(local.bundled_model_path()), 512)
    address = server.listening_address
    loaded = _answers_health(address)  # the engine's own loopback endpoint answers
    del server
    local.close_models()
    return {"first": first, "loaded": loaded, "cached": local._load_model.cache_info().currsize,
            "kept": len(local._loaded), "after_close": _answers_health(address), "again": json.loads(_judge_once())}


def _run_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_close_models_frees_each_loaded_model_and_a_later_call_loads_it_again(tmp_path):
    pytest.importorskip("xllamacpp")
    # In a process of its own: close_models is for a process's end (see its docstring), and this
    # test process goes on to load other models.
    proc = _run_script(tmp_path, """
        import json
        from poll_assets_tests.test_local_exit import _close_and_reload
        print(json.dumps(_close_and_reload()))
    """)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] and "rating" in out["first"]
    assert out["cached"] == 0 and out["kept"] == 0
    assert not out["after_close"]  # freed: its threads and listener stopped with it
    assert "rating" in out["again"]  # a fresh load, still grammar-constrained


@pytest.mark.slow
def test_a_process_that_used_the_local_model_exits_with_nothing_on_stderr(tmp_path):
    pytest.importorskip("xllamacpp")
    proc = _run_script(tmp_path, """
        from poll_assets_tests.test_local_exit import _judge_once
        print(_judge_once())
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # no llama.cpp log, no "Exception ignored in: ..."
    assert "rating" in json.loads(proc.stdout.strip().splitlines()[-1])
