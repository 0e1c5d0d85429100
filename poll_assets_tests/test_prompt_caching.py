"""Prompt caching: judge prompts put their stable part first, Anthropic requests mark it with
cache_control, and the cached input tokens each provider reports reach the Completion and the
response cache. Over real HTTP against the loopback server."""

from __future__ import annotations

import asyncio

import pytest

from poll_assets.llm.base import CACHE_BREAK, CallRequest, GenerationParams, split_at_cache_break
from poll_assets.llm.cache.response_cache import ResponseCache
from poll_assets.llm.online.policy import CallPolicy
from poll_assets.llm.online.runner import run_calls
from poll_assets.rubrics import build_judge_messages, get_rubric
from poll_assets_tests.test_providers import call, make_resource

RUBRIC = get_rubric()


def judge_request(instruction: str, texts: list[str]) -> CallRequest:
    messages = build_judge_messages(RUBRIC, instruction, texts, structured=False)
    return CallRequest.build(messages, GenerationParams(max_new_tokens=64))


def test_judge_prompts_share_their_stable_prefix_and_keep_material_after_it():
    a = build_judge_messages(RUBRIC, "Write a haiku.", ["alpha text", "beta text"], structured=True)[1]["content"]
    b = build_judge_messages(RUBRIC, "Explain DNS.", ["three", "four"], structured=True)[1]["content"]
    (stable_a, rest_a), (stable_b, rest_b) = split_at_cache_break(a), split_at_cache_break(b)
    assert stable_a == stable_b and len(stable_a) > 1000
    for prompt_part in ("Write a haiku.", "alpha text", "beta text", "Now rate the 2 texts"):
        assert prompt_part in rest_a and prompt_part not in stable_a
    assert rest_a.lstrip("\n").startswith(CACHE_BREAK)


def test_anthropic_marks_the_stable_block_and_reads_cache_usage(fake_llm, monkeypatch):
    res = make_resource(fake_llm, monkeypatch, "anthropic")
    first = call(res, judge_request("Write a haiku.", ["one", "two"]))
    body = fake_llm.bodies[-1]["body"]
    blocks = body["messages"][0]["content"]
    assert blocks[0]["cache_control"] == {"type": "ephemeral"} and "cache_control" not in blocks[1]
    assert "Write a haiku." in blocks[1]["text"] and "Write a haiku." not in blocks[0]["text"]
    second = call(res, judge_request("Explain DNS.", ["three", "four"]))
    assert first.cache_write_tokens > 0 and first.cached_input_tokens == 0
    assert second.cached_input_tokens == first.cache_write_tokens and second.cache_write_tokens == 0
    # input_tokens counts every input token, the cached ones included
    assert second.input_tokens > second.cached_input_tokens


def test_openai_reads_cached_tokens_and_the_response_cache_keeps_them(fake_llm, monkeypatch, tmp_path):
    res = make_resource(fake_llm, monkeypatch, "openai")
    requests = [judge_request(f"Question {i}?", [f"answer {i}", "other"]) for i in range(4)]
    cache = ResponseCache(tmp_path / "c.sqlite")
    policy = CallPolicy(max_concurrency=1)  # one at a time: the first call fills the provider's cache
    batch = asyncio.run(run_calls(res.backend(), policy, requests, cache))
    cached = [c.cached_input_tokens for c in batch.completions]
    # Whichever request reached the server first filled its cache (workers may take them in any order).
    assert sorted(cached)[0] == 0 and all(n > 0 for n in sorted(cached)[1:])
    again = asyncio.run(run_calls(res.backend(), policy, requests, cache))
    assert all(c.cached for c in again.completions)
    assert [c.cached_input_tokens for c in again.completions] == cached
    assert batch.stats.cached_input_tokens == sum(cached)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_no_prefix_is_cached_below_the_providers_minimum(fake_llm, monkeypatch, provider):
    fake_llm.configure(prompt_cache_min_tokens=100_000)
    res = make_resource(fake_llm, monkeypatch, provider)
    call(res, judge_request("A?", ["x", "y"]))
    done = call(res, judge_request("B?", ["x", "y"]))
    assert done.cached_input_tokens == 0 and done.cache_write_tokens == 0
