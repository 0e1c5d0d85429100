"""The in-process backend: bundled weights by model name, Gemma's chat turns, the requests it sends
to llama.cpp's engine and what comes back."""

from __future__ import annotations

import asyncio
import json

import pytest

from poll_assets.llm.base import CallRequest, GenerationParams, ProviderError
from poll_assets.llm.providers.local import (
    COMPACT_JSON, LocalLlamaBackend, bundled_model_path, chat_format, chat_request, gemma_turns,
)
from poll_assets.rubrics.ultrafeedback import build_judge_messages, get_rubric, verdict_json_schema


def test_bundled_names_resolve_to_the_weights_their_packages_ship():
    smol = bundled_model_path("SmolLM2-135M-Instruct")
    assert smol.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smol.is_file()
    assert bundled_model_path("smollm2-135m") == smol == bundled_model_path()
    gemma = bundled_model_path("gemma-3-270m")
    assert gemma.name == "gemma-3-270m-q4_k_m.gguf" and gemma.stat().st_size > 200_000_000
    assert bundled_model_path("Gemma3-270M") == gemma  # joined once, then found


def test_an_unknown_local_model_needs_a_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"local model 'llama-7b': no installed package ships its weights.*model_path"):
        LocalLlamaBackend("llama-7b", None, 4096)
    weights = tmp_path / "w.gguf"
    weights.write_bytes(b"GGUF")
    assert LocalLlamaBackend("llama-7b", str(weights), 4096).path == weights  # a path is taken as given


def test_gemma_gets_its_own_turns_with_the_system_text_kept():
    assert chat_format("gemma-3-270m") == "gemma" and chat_format("SmolLM2-135M-Instruct") is None
    messages = [{"role": "system", "content": "Rubric."}, {"role": "user", "content": "Texts."}]
    assert gemma_turns(messages) == [{"role": "user", "content": "Rubric.\n\nTexts."}]
    assert messages[1]["content"] == "Texts."  # the request's messages are not changed
    assert gemma_turns([{"role": "user", "content": "Hi"}]) == [{"role": "user", "content": "Hi"}]
    assert gemma_turns([{"role": "system", "content": "S"}]) == [{"role": "user", "content": "S"}]


SCHEMA = {"type": "object", "properties": {"rating": {"type": "integer"}}, "required": ["rating"]}


def test_a_request_asks_for_one_line_json_and_reuses_no_earlier_prompt():
    body = chat_request([{"role": "user", "content": "Rate it."}], {"max_tokens": 8, "seed": 3}, SCHEMA)
    assert body["response_format"] == {"type": "json_object", "schema": {**SCHEMA, "x-guidance": COMPACT_JSON}}
    assert "x-guidance" not in SCHEMA  # the request's own schema is not changed
    assert body["cache_prompt"] is False and body["seed"] == 3 and body["max_tokens"] == 8
    assert "response_format" not in chat_request([], {"max_tokens": 8}, None)


def _verdict_request(seed: int, text: str = "Paris is the capital of France.") -> CallRequest:
    rubric = get_rubric("instruction-following")
    messages = build_judge_messages(rubric, "What is the capital of France?", [text, "Lyon."], structured=True)
    return CallRequest.build(messages, GenerationParams(max_new_tokens=320, temperature=0.0, seed=seed),
                             json_schema=verdict_json_schema(rubric, 2, max_rationale_chars=80))


@pytest.mark.slow
def test_gemma_verdicts_parse_as_one_line_json_and_repeat_whatever_ran_before():
    pytest.importorskip("xllamacpp")
    backend = LocalLlamaBackend("gemma-3-270m", None, 2048, member="gemma_judge")
    first = asyncio.run(backend.complete(_verdict_request(2)))
    # Before COMPACT_JSON, Gemma filled max_new_tokens with newlines inside the JSON in 2 of 3 calls.
    assert first.finish_reason == "stop" and "\n" not in first.text, first.text
    verdicts = json.loads(first.text)
    assert set(verdicts) == {"text_1", "text_2"} and all(v["rating"] in range(1, 6) for v in verdicts.values())
    asyncio.run(backend.complete(_verdict_request(9, "Berlin.")))  # another prompt in between
    assert asyncio.run(backend.complete(_verdict_request(2))).text == first.text  # same seed, same verdict


@pytest.mark.slow
def test_a_prompt_longer_than_the_context_and_a_file_that_is_no_gguf_are_clear_errors(tmp_path):
    pytest.importorskip("xllamacpp")
    backend = LocalLlamaBackend("SmolLM2-135M-Instruct", None, 256, member="smol")
    long = CallRequest.build([{"role": "user", "content": "word " * 2000}], GenerationParams(max_new_tokens=4))
    with pytest.raises(ProviderError, match=r"local model SmolLM2-135M-Instruct: .*context size") as err:
        asyncio.run(backend.complete(long))
    assert err.value.kind == "bad_request"
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    with pytest.raises(ProviderError, match=r"junk.gguf: llama.cpp could not load it as a GGUF model"):
        asyncio.run(LocalLlamaBackend("mine", str(junk), 256).complete(long))


def test_engine_threads_default_to_every_cpu_and_obey_the_environment(monkeypatch):
    from poll_assets.llm.providers import local

    monkeypatch.delenv(local.THREADS_ENV, raising=False)
    monkeypatch.setattr(local.os, "sched_getaffinity", lambda _pid: {0, 1, 2}, raising=False)
    assert local._threads() == 3
    monkeypatch.setenv(local.THREADS_ENV, "1")
    assert local._threads() == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(local.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=f"{local.THREADS_ENV}='{bad}'"):
            local._threads()
