"""The loopback fake server's fault modes that the runner's reliability work is tested against:
a concurrency cap with rate-limit headers, an outage window, an Anthropic 200 without tool_use, a
llama.cpp-like server that refuses json_schema, and the per-request count."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

SCHEMA = {"type": "object", "properties": {"rating": {"type": "integer", "minimum": 1, "maximum": 5}},
          "required": ["rating"]}


def chat(model: str = "m", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extra}


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=10)


def test_concurrency_cap_answers_429_with_rate_limit_headers(fake_llm):
    fake_llm.reset(max_concurrent=2, latency_ms=400, retry_after_s=2)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=10) as client:
            return await asyncio.gather(*(client.post(f"{fake_llm.url}/v1/chat/completions", json=chat(f"m{i}"))
                                          for i in range(6)))

    responses = asyncio.run(burst())
    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    assert (len(ok), len(limited)) == (2, 4)
    for r in limited:
        assert r.headers["retry-after"] == "2"
        assert r.headers["x-ratelimit-limit-requests"] == "2"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert r.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert all(r.headers["x-ratelimit-limit-requests"] == "2" for r in ok)
    stats = fake_llm.stats()
    assert stats["over_cap"] == 4 and stats["max_in_flight"] == 2


def test_outage_window_from_a_given_request(fake_llm):
    fake_llm.reset(outage_from_request=2, outage_s=0.6)
    codes = [post(fake_llm, "/v1/chat/completions", chat(f"m{i}")).status_code for i in range(3)]
    assert codes == [200, 503, 503]
    time.sleep(0.7)
    assert post(fake_llm, "/v1/chat/completions", chat("after")).status_code == 200
    fake_llm.start_outage(0.3)  # also on demand, from now
    assert post(fake_llm, "/v1/chat/completions", chat("again")).status_code == 503


def test_anthropic_200_without_the_tool_use_block(fake_llm):
    fake_llm.reset(omit_tool_use=["judge"])
    body = {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "rate"}],
            "tools": [{"name": "verdict", "input_schema": SCHEMA}], "tool_choice": {"type": "tool", "name": "verdict"}}
    answered = post(fake_llm, "/judge/v1/messages", body)
    assert answered.status_code == 200
    content = answered.json()["content"]
    assert [b["type"] for b in content] == ["text"] and answered.json()["stop_reason"] == "end_turn"
    assert 1 <= json.loads(content[0]["text"].split(": ", 1)[1])["rating"] <= 5
    normal = post(fake_llm, "/other/v1/messages", body).json()["content"]
    assert [b["type"] for b in normal] == ["tool_use"]


def test_llama_cpp_like_server_refuses_json_schema_with_500_and_takes_json_object_schema(fake_llm):
    fake_llm.reset(llama_cpp=["llama"])
    refused = post(fake_llm, "/llama/v1/chat/completions",
                   chat(response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA}}))
    assert refused.status_code == 500 and "validation error" in refused.json()["error"]["message"]
    accepted = post(fake_llm, "/llama/v1/chat/completions",
                    chat(response_format={"type": "json_object", "schema": SCHEMA}))
    assert accepted.status_code == 200
    assert 1 <= json.loads(accepted.json()["choices"][0]["message"]["content"])["rating"] <= 5


def test_requests_are_counted_per_distinct_body(fake_llm):
    fake_llm.reset()
    for _ in range(3):
        post(fake_llm, "/v1/chat/completions", chat("same"))
    post(fake_llm, "/v1/chat/completions", chat("other"))
    assert fake_llm.requests_for(chat("same")) == 3
    assert fake_llm.requests_for(chat("other")) == 1
    assert fake_llm.requests_for(chat("never")) == 0
    assert fake_llm.stats()["max_repeats"] == 3
