"""The in-process models are freed before interpreter teardown, so a clean run ends cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from poll_assets.llm.providers import local
from poll_assets.llm.base import CallRequest, GenerationParams

SCHEMA = {"type": "object", "properties": {"rating": {"type": "integer"}}, "required": ["rating"]}


def _judge_once() -> str:
    backend = local.LocalLlamaBackend("SmolLM2-135M-Instruct", None, 512, member="exit_judge")
    request = CallRequest.build([{"role": "user", "content": "Rate 'hello' from 1 to 5."}],
                                GenerationParams(max_new_tokens=16, temperature=0.0), json_schema=SCHEMA)
    return asyncio.run(backend.complete(request)).text or ""


@pytest.mark.slow
def test_close_models_frees_each_loaded_model_and_a_later_call_loads_it_again():
    pytest.importorskip("llama_cpp")
    _judge_once()
    llama, _ = local._load_llama(str(local.bundled_model_path()), 512)
    local.close_models()
    assert llama._model.model is None  # llama-cpp-python's handle on the freed weights
    assert local._load_llama.cache_info().currsize == 0
    assert "rating" in json.loads(_judge_once())  # a fresh load, still grammar-constrained


@pytest.mark.slow
def test_a_process_that_used_the_local_model_exits_with_nothing_on_stderr(tmp_path):
    pytest.importorskip("llama_cpp")
    script = tmp_path / "judge_once.py"
    script.write_text(textwrap.dedent("""
        from poll_assets_tests.test_local_exit import _judge_once
        print(_judge_once())
    """))
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # no "Exception ignored in: <function Llama.__del__ ...>"
    assert "rating" in json.loads(proc.stdout.strip().splitlines()[-1])
