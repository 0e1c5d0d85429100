"""The real provider SDKs, driven through our backends and resources against the loopback fake server.

Nothing is mocked: every call goes over HTTP on 127.0.0.1 through openai / anthropic / huggingface_hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any

import dagster as dg
import httpx2
import pytest

from poll_assets.llm.base import (
    TEXT_FALLBACK,
    CallRequest,
    ChatBackend,
    Completion,
    FatalProviderError,
    GenerationParams,
    ProviderError,
)
from poll_assets.llm.online.policy import CallPolicy, RetryPolicy
from poll_assets.llm.redact import safe_url, scrub
from poll_assets.llm.providers.remote import FormNegotiation, mentions_structured_output, parse_retry_after
from poll_assets.llm.providers.registry import provider_spec
from poll_assets.llm.preflight import PreflightError, preflight
from poll_assets.llm.resources import ChatModelResource, MissingAPIKeyError, build_llm_resource, resource_key
from poll_assets.llm.online.runner import CallBatch, attempt, run_calls
from poll_assets.panel import Member, Params
from poll_assets_tests.fake_llm_server import FakeLLMServer, value_for_schema

CANARY = "sk-poll-SECRET-canary-123"

JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "verdicts": {
            "type": "array",
            "minItems": 4,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                    "rationale": {"type": "string"},
                },
                "required": ["rating", "rationale"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["verdicts"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Spec:
    provider: str
    model: str
    path: str  # appended to the fake server's URL: also the tag the server keys failures on
    structured_mode: str
    request_id_prefix: str


SPECS = {
    "openai": Spec("openai", "gpt-4o-mini", "/openai/v1", "json_schema", "req_fake_"),
    "openai_compatible": Spec("openai_compatible", "Qwen/Qwen2.5-7B-Instruct", "/vllm/v1", "json_schema", "req_fake_"),
    "anthropic": Spec("anthropic", "claude-3-5-haiku-latest", "/anthropic", "tool_use", "req_fake_"),
    "hf_inference": Spec("hf_inference", "meta-llama/Llama-3.1-8B-Instruct", "/hf", "grammar", "chatcmpl-"),
}
PROVIDERS = list(SPECS)


def key_env(provider: str) -> str:
    return f"POLL_TEST_{provider.upper()}_KEY"


def make_resource(
    fake: FakeLLMServer,
    monkeypatch: pytest.MonkeyPatch,
    provider: str,
    *,
    key: str | None = "test-key",
    params: dict[str, Any] | None = None,
    name: str | None = None,
    base_url: str | None = None,
) -> ChatModelResource:
    spec = SPECS[provider]
    env = key_env(provider)
    if key is None:
        monkeypatch.delenv(env, raising=False)
    else:
        monkeypatch.setenv(env, key)
    member = Member(
        name=name or f"m_{provider}",
        provider=provider,  # type: ignore[arg-type]
        model=spec.model,
        family="test",
        base_url=base_url or fake.url + spec.path,
        api_key_env=env,
        params=Params(**(params or {})),
    )
    return build_llm_resource(member)


def request(text: str = "Name three colours.", schema: dict[str, Any] | None = None, **params: Any) -> CallRequest:
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]
    return CallRequest.build(msgs, GenerationParams(**params), json_schema=schema)


@contextlib.asynccontextmanager
async def held(backend: ChatBackend) -> AsyncIterator[ChatBackend]:
    """The backend held for a block of calls, as run_calls holds it for a batch."""
    backend.hold()
    try:
        yield backend
    finally:
        await backend.release()


def call(resource: ChatModelResource, req: CallRequest, timeout_s: float = 10.0) -> Completion:
    """One attempt through the runner's deadline (`attempt`), as run_calls makes it."""
    async def once() -> Completion:
        async with held(resource.backend()) as backend:
            return await attempt(backend, req, timeout_s)

    return asyncio.run(once())


def failure(resource: ChatModelResource, req: CallRequest, timeout_s: float = 10.0) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        call(resource, req, timeout_s)
    return info.value


def schema_errors(value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None, at: str = "$") -> list[str]:
    """A small JSON-schema check covering what structured-output schemas use."""
    root = root or schema
    if "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        return schema_errors(value, node, root, at)
    errs: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{at}: {value!r} not in {schema['enum']}")
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    kinds = kind if isinstance(kind, list) else [kind] if kind else []
    if kinds and not any(checks[k](value) for k in kinds):
        return [f"{at}: {value!r} is not {kind}"]
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                errs.append(f"{at}: missing {name}")
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            errs += [f"{at}: unexpected {k}" for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                errs += schema_errors(v, props[k], root, f"{at}.{k}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 10**9):
            errs.append(f"{at}: {len(value)} items outside [{schema.get('minItems')}, {schema.get('maxItems')}]")
        for i, v in enumerate(value):
            errs += schema_errors(v, schema.get("items", {}), root, f"{at}[{i}]")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errs.append(f"{at}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errs.append(f"{at}: {value} > {schema['maximum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 10**9):
            errs.append(f"{at}: length {len(value)} outside bounds")
    return errs


def all_text(exc: BaseException) -> str:
    """Everything an exception could show: message, args, repr, full formatted chain."""
    parts = [str(exc), repr(exc), repr(exc.args), "".join(traceback.format_exception(exc))]
    seen = exc.__cause__ or exc.__context__
    while seen is not None:
        parts.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


# -- success paths --------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_text_call_fills_every_completion_field(fake_llm, monkeypatch, provider):
    fake_llm.configure(served_model_suffix="-2024-served")
    res = make_resource(fake_llm, monkeypatch, provider)
    done = call(res, request("Name three colours please.", max_new_tokens=64))
    spec = SPECS[provider]
    assert done.ok and done.text and done.text.strip()
    assert done.output_mode == "text"
    assert done.finish_reason in ("stop", "length")
    # The fake counts words: "You are terse." + "Name three colours please." = 7 prompt tokens.
    assert done.input_tokens == 7
    assert done.output_tokens == len(done.text.split())
    assert done.model == spec.model + "-2024-served"  # what the server said, not what we asked for
    assert done.request_id and done.request_id.startswith(spec.request_id_prefix)
    assert done.latency_s > 0
    assert fake_llm.stats()["by_path"] == {spec.path + ("/v1" if not spec.path.endswith("/v1") else "") +
                                           ("/messages" if provider == "anthropic" else "/chat/completions"): 1}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_structured_call_returns_schema_valid_json_and_records_mode(fake_llm, monkeypatch, provider):
    res = make_resource(fake_llm, monkeypatch, provider)
    done = call(res, request("Rate these four answers.", schema=JUDGE_SCHEMA))
    assert done.output_mode == SPECS[provider].structured_mode
    value = json.loads(done.text)
    assert schema_errors(value, JUDGE_SCHEMA) == []
    assert len(value["verdicts"]) == 4
    body = fake_llm.bodies[-1]["body"]
    if provider == "anthropic":
        assert body["tool_choice"]["type"] == "tool"
        assert body["tools"][0]["input_schema"] == JUDGE_SCHEMA
        assert body["tool_choice"]["name"] == body["tools"][0]["name"]
    elif provider == "hf_inference":
        assert body["response_format"] == {"type": "json", "value": JUDGE_SCHEMA}
    else:
        fmt = body["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
        assert fmt["json_schema"]["schema"] == JUDGE_SCHEMA


def test_anthropic_non_object_schema_is_wrapped_and_unwrapped(fake_llm, monkeypatch):
    res = make_resource(fake_llm, monkeypatch, "anthropic")
    schema = {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "enum": [1, 2, 3]}}
    done = call(res, request(schema=schema))
    value = json.loads(done.text)
    assert schema_errors(value, schema) == []


# Wire names each provider must use for each parameter its registry row (llm/providers/registry.py) says it supports.
WIRE_NAMES = {
    "openai": {"temperature": "temperature", "top_p": "top_p", "max_new_tokens": "max_tokens", "stop": "stop", "seed": "seed"},
    "anthropic": {"max_new_tokens": "max_tokens", "stop": "stop_sequences"},
}
WIRE_NAMES["openai_compatible"] = WIRE_NAMES["hf_inference"] = WIRE_NAMES["openai"]
PARAM_VALUES = {"temperature": 0.3, "top_p": 0.9, "max_new_tokens": 33, "stop": ("END",), "seed": 7}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_supported_param_reaches_the_wire_under_the_provider_name(fake_llm, monkeypatch, provider):
    supported = provider_spec(provider).params
    assert set(WIRE_NAMES[provider]) == supported  # the registry and the backends agree
    res = make_resource(fake_llm, monkeypatch, provider)
    call(res, request(**{p: PARAM_VALUES[p] for p in supported}))
    body = fake_llm.bodies[-1]["body"]
    for param, wire in WIRE_NAMES[provider].items():
        expected = list(PARAM_VALUES[param]) if param == "stop" else PARAM_VALUES[param]
        assert body[wire] == expected, (param, wire, body)
    assert body["model"] == SPECS[provider].model
    if provider == "anthropic":
        assert not {"seed", "temperature", "top_p", "top_k"} & set(body)
        assert body["system"] == "You are terse."
        assert [m["role"] for m in body["messages"]] == ["user"]
    else:
        assert [m["role"] for m in body["messages"]] == ["system", "user"]


@pytest.mark.parametrize("param", [{"seed": 1}, {"temperature": 0.0}, {"top_p": 0.5}])
def test_anthropic_member_with_a_param_the_api_lacks_is_refused_at_load(param):
    with pytest.raises(ValueError, match=next(iter(param))):
        Member(name="j", provider="anthropic", model="claude", family="c", params=Params(**param))


def test_openai_compatible_member_without_base_url_is_refused_at_load():
    with pytest.raises(ValueError, match="base_url"):
        Member(name="v", provider="openai_compatible", model="m", family="f")


def test_anthropic_backend_refuses_sampling_params_instead_of_dropping_them(fake_llm, monkeypatch):
    res = make_resource(fake_llm, monkeypatch, "anthropic")
    err = failure(res, request(temperature=0.0))
    assert isinstance(err, FatalProviderError) and "temperature" in str(err)
    assert fake_llm.stats()["total"] == 0


def sent_form(body: dict[str, Any]) -> str:
    """The structured-output form a chat request asked for, as the backends name it."""
    fmt = body.get("response_format")
    if fmt is None:
        return "text"
    if fmt["type"] == "json":
        return "grammar"
    return fmt["type"]


# Each negotiating provider's forms, in the order it tries them against a server that refuses them all.
LADDERS = {
    "openai": ["json_schema", "json_object", "text"],
    "openai_compatible": ["json_schema", "json_object", "text"],
    "hf_inference": ["grammar", "text"],
}


@pytest.mark.parametrize("provider", list(LADDERS))
def test_structured_output_falls_back_to_text_when_server_refuses_it(fake_llm, monkeypatch, provider):
    tag = SPECS[provider].path.strip("/").removesuffix("/v1")
    fake_llm.configure(reject_response_format=[tag])
    res = make_resource(fake_llm, monkeypatch, provider)
    first = call(res, request("one", schema=JUDGE_SCHEMA))
    assert first.ok and first.output_mode == "text"
    # Each refused form was tried once, in order, then the text call; no refusal was retried.
    assert [sent_form(b["body"]) for b in fake_llm.bodies] == LADDERS[provider]
    assert [r.split(":")[0] for r in first.extra["structured_refusals"]] == LADDERS[provider][:-1]
    # Within one backend the refusal is remembered: later calls go straight to text.
    backend = res.backend()

    async def two_more() -> list[Completion]:
        async with held(backend):
            return [await attempt(backend, request(t, schema=JUDGE_SCHEMA), 10) for t in ("two", "three")]

    later = asyncio.run(two_more())
    assert [c.output_mode for c in later] == ["text", "text"]
    assert fake_llm.stats()["total"] == len(LADDERS[provider]) + 2


def test_a_400_unrelated_to_response_format_is_bad_request_without_fallback(fake_llm, monkeypatch):
    fake_llm.configure(forced_status={"vllm": 400})
    res = make_resource(fake_llm, monkeypatch, "openai_compatible")
    err = failure(res, request(schema=JUDGE_SCHEMA))
    assert err.kind == "bad_request" and not isinstance(err, FatalProviderError)
    assert fake_llm.stats()["total"] == 1


def test_openai_azure_style_base_url(fake_llm, monkeypatch):
    # Azure OpenAI's v1 API is https://<resource>.openai.azure.com/openai/v1/ with the key as a bearer token.
    res = make_resource(fake_llm, monkeypatch, "openai", base_url=fake_llm.url + "/openai/v1/")
    assert call(res, request()).ok
    assert fake_llm.stats()["by_path"] == {"/openai/v1/chat/completions": 1}


@pytest.mark.parametrize(
    "suffix,route", [("", "/v1/chat/completions"), ("/v1", "/v1/chat/completions"), ("/ep/v1/chat/completions", "/ep/v1/chat/completions")]
)
def test_hf_client_url_building_is_served(fake_llm, monkeypatch, suffix, route):
    res = make_resource(fake_llm, monkeypatch, "hf_inference", base_url=fake_llm.url + suffix)
    assert call(res, request()).ok
    assert fake_llm.stats()["by_path"] == {route: 1}


def test_one_client_per_backend_and_event_loop(fake_llm, monkeypatch):
    res = make_resource(fake_llm, monkeypatch, "openai")
    backend = res.backend()
    assert res.backend() is backend

    async def many() -> list[Completion]:
        async with held(backend):
            # Two overlapping holds on one loop share the client; the last one out closes it.
            async with held(backend):
                first = await asyncio.gather(*(attempt(backend, request(f"q{i}"), 10) for i in range(10)))
            assert backend.clients_closed == closed_before
            rest = await asyncio.gather(*(attempt(backend, request(f"r{i}"), 10) for i in range(10)))
        return first + rest

    closed_before = 0
    assert all(c.ok for c in asyncio.run(many()))
    assert (backend.clients_created, backend.clients_closed) == (1, 1)
    # A second asyncio.run (the next asset's batch) gets a fresh client instead of a dead pool.
    closed_before = 1
    assert all(c.ok for c in asyncio.run(many()))
    assert (backend.clients_created, backend.clients_closed) == (2, 2)


def test_openai_compatible_without_key_never_sends_openai_api_key(fake_llm, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    fake_llm.configure(expected_key="no-key")  # only the placeholder is accepted
    member = Member(name="local_vllm", provider="openai_compatible", model="m", family="f", base_url=fake_llm.url + "/vllm/v1")
    res = build_llm_resource(member)
    assert call(res, request()).ok


def test_the_key_goes_out_in_each_providers_header(fake_llm, monkeypatch):
    fake_llm.configure(expected_key=CANARY)
    for provider in PROVIDERS:
        res = make_resource(fake_llm, monkeypatch, provider, key=CANARY)
        assert call(res, request()).ok, provider


# -- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_are_fatal_and_name_provider_model_and_variable(fake_llm, monkeypatch, provider, status):
    tag = SPECS[provider].path.strip("/").removesuffix("/v1")
    fake_llm.configure(forced_status={tag: status})
    res = make_resource(fake_llm, monkeypatch, provider, key=CANARY)
    err = failure(res, request())
    assert isinstance(err, FatalProviderError) and err.kind == "auth"
    msg = str(err)
    assert provider in msg and SPECS[provider].model in msg and key_env(provider) in msg and str(status) in msg
    assert CANARY not in all_text(err)
    assert fake_llm.stats()["total"] == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_not_found_is_fatal_and_says_model_or_base_url(fake_llm, monkeypatch, provider):
    tag = SPECS[provider].path.strip("/").removesuffix("/v1")
    fake_llm.configure(forced_status={tag: 404})
    err = failure(make_resource(fake_llm, monkeypatch, provider), request())
    assert isinstance(err, FatalProviderError) and err.kind == "not_found"
    assert "unknown model or wrong base_url" in str(err) and SPECS[provider].model in str(err)


@pytest.mark.parametrize(
    "provider,wrong_path",
    [
        ("openai", "/openai"),  # missing /v1
        ("openai_compatible", "/vllm"),
        ("anthropic", "/anthropic/v1"),  # the SDK appends /v1/messages itself
        ("hf_inference", "/hf/v1/v1"),
    ],
)
def test_wrong_base_url_path_is_not_found(fake_llm, monkeypatch, provider, wrong_path):
    err = failure(make_resource(fake_llm, monkeypatch, provider, base_url=fake_llm.url + wrong_path), request())
    assert isinstance(err, FatalProviderError) and err.kind == "not_found"
    assert "wrong base_url" in str(err)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_rate_limit_carries_retry_after_and_is_not_retried_here(fake_llm, monkeypatch, provider):
    fake_llm.configure(retry_after_s=7)
    fake_llm.script("429")
    err = failure(make_resource(fake_llm, monkeypatch, provider), request())
    assert err.kind == "rate_limit" and err.retryable and not isinstance(err, FatalProviderError)
    assert err.retry_after == pytest.approx(7.0)
    assert fake_llm.stats()["total"] == 1  # max_retries=0: the SDK did not retry on its own


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("outcome,kind", [("500", "server"), ("503", "server"), ("malformed", "malformed"), ("truncated", "malformed")])
def test_server_and_body_failures_are_classified_and_retryable(fake_llm, monkeypatch, provider, outcome, kind):
    fake_llm.script(outcome)
    err = failure(make_resource(fake_llm, monkeypatch, provider, key=CANARY), request())
    assert err.kind == kind and err.retryable
    assert SPECS[provider].model in str(err)
    assert CANARY not in all_text(err)
    assert fake_llm.stats()["total"] == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_hanging_server_is_a_timeout_within_the_deadline(fake_llm, monkeypatch, provider):
    fake_llm.script("timeout")
    res = make_resource(fake_llm, monkeypatch, provider)
    res.backend()  # outside the clock: the first use imports the SDK, which alone can take seconds
    start = time.perf_counter()
    err = failure(res, request(), timeout_s=1.5)
    assert err.kind == "timeout" and err.retryable
    assert time.perf_counter() - start < 6.0  # the server would hang for 30 s
    assert fake_llm.stats()["total"] == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_refused_connection_is_a_connection_error(fake_llm, monkeypatch, provider):
    url = f"http://127.0.0.1:{_closed_port()}" + SPECS[provider].path
    err = failure(make_resource(fake_llm, monkeypatch, provider, base_url=url), request())
    assert err.kind == "connection" and err.retryable


@pytest.mark.parametrize("provider", PROVIDERS)
def test_key_echoed_by_server_never_reaches_errors_or_completions(fake_llm, monkeypatch, provider):
    """The fake answers a wrong key with 'Incorrect API key provided: <key>' and puts it in 5xx bodies."""
    res = make_resource(fake_llm, monkeypatch, provider, key=CANARY)
    fake_llm.configure(expected_key="some-other-key")
    err = failure(res, request())
    assert err.kind == "auth" and CANARY not in all_text(err)
    fake_llm.configure(expected_key=None)
    fake_llm.script("500")
    err = failure(res, request())
    assert err.kind == "server" and CANARY not in all_text(err)
    assert "***" in str(err)  # the echoed key was there and got masked
    ok = call(res, request(schema=JUDGE_SCHEMA))
    assert CANARY not in json.dumps(ok.to_dict())
    assert CANARY not in repr(res) and CANARY not in repr(res.backend()) and CANARY not in str(res)


def test_scrub_masks_key_and_credential_shapes():
    text = (
        f"bad key {CANARY}; Authorization: Bearer abc.def-123; x-api-key=zzz999; "
        "hf_abcdefghijklmnop and sk-proj-ABCDEFGH12345"
    )
    out = scrub(text, (CANARY,))
    for secret in (CANARY, "abc.def-123", "zzz999", "hf_abcdefghijklmnop", "sk-proj-ABCDEFGH12345"):
        assert secret not in out
    assert safe_url("https://user:pw@host.example:8443/v1?token=abc") == "https://host.example:8443/v1"


def test_parse_retry_after_forms():
    assert parse_retry_after({"retry-after": "12"}) == 12.0
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    when = parse_retry_after({"retry-after": formatdate(time.time() + 30, usegmt=True)})
    assert when is not None and 25 <= when <= 31
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


# -- keys and resources ---------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "anthropic", "hf_inference"])
@pytest.mark.parametrize("value", [None, ""])
def test_missing_key_names_variable_and_member(fake_llm, monkeypatch, provider, value):
    if value is None:
        res = make_resource(fake_llm, monkeypatch, provider, key=None, name="judge_gpt")
    else:
        res = make_resource(fake_llm, monkeypatch, provider, key="", name="judge_gpt")
    with pytest.raises(MissingAPIKeyError) as info:
        res.backend()
    assert key_env(provider) in str(info.value) and "judge_gpt" in str(info.value)
    assert fake_llm.stats()["total"] == 0


def test_missing_key_fails_the_preflight_naming_variable_and_member(fake_llm, monkeypatch):
    # Inside a run, the key is checked by the run's preflight (every member at once, before any
    # call; see test_preflight.py), no longer one resource at a time when resources start.
    member = Member(name="judge_claude", provider="anthropic", model="claude", family="c",
                    api_key_env="POLL_TEST_NOPE_KEY", base_url=fake_llm.url)
    monkeypatch.delenv("POLL_TEST_NOPE_KEY", raising=False)
    with pytest.raises(PreflightError) as info:
        preflight([member], os.environ)
    text = str(info.value)
    assert "POLL_TEST_NOPE_KEY" in text and "judge_claude" in text
    assert fake_llm.stats()["total"] == 0 and fake_llm.stats()["model_lists"] == {}


def test_key_from_env_resolves_inside_a_dagster_run(fake_llm, monkeypatch, tmp_path):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    fake_llm.configure(expected_key=CANARY)
    res = make_resource(fake_llm, monkeypatch, "openai", key=CANARY, name="gen_a")

    @dg.asset(required_resource_keys={"llm_gen_a"})
    def answer(context) -> str:  # noqa: ANN001
        return call(context.resources.llm_gen_a, request(), 10).text

    result = dg.materialize([answer], resources={"llm_gen_a": res})
    assert result.success and result.output_for_node("answer")
    assert fake_llm.stats()["total"] == 1


# -- throughput -----------------------------------------------------------------------------------------


def test_64_calls_per_model_overlap_at_500ms_latency(fake_llm, monkeypatch):
    """Concurrency, not speed: timings belong to bench/, this checks that the calls really overlap."""
    fake_llm.configure(latency_ms=500, jitter_ms=100)
    backends = [make_resource(fake_llm, monkeypatch, p).backend() for p in PROVIDERS]

    async def burst() -> list[Completion]:
        reqs = [(b, request(f"prompt {i}", schema=JUDGE_SCHEMA if i % 2 else None)) for b in backends for i in range(64)]
        for b in backends:
            b.hold()
        try:
            return await asyncio.gather(*(attempt(b, r, 30) for b, r in reqs))
        finally:
            for b in backends:
                await b.release()

    done = asyncio.run(burst())
    stats = fake_llm.stats()
    assert all(c.ok for c in done) and len(done) == 256
    assert stats["total"] == 256 and stats["max_repeats"] == 1
    assert stats["max_in_flight"] >= 128  # the calls really overlapped (a default member allows 8)


# -- the fake server itself -----------------------------------------------------------------------------


def test_fake_answers_are_deterministic_per_request(fake_llm, monkeypatch):
    res = make_resource(fake_llm, monkeypatch, "openai")
    a, b = call(res, request("same")), call(res, request("same"))
    c = call(res, request("different"))
    assert a.text == b.text and a.text != c.text
    counts = sorted(fake_llm.stats()["by_body"].values())
    assert counts == [1, 2]


@pytest.mark.parametrize(
    "schema",
    [
        JUDGE_SCHEMA,
        {  # keyed verdicts with a nullable enum rating, as a rubric allowing N/A would ask for
            "type": "object",
            "properties": {
                f"text_{k}": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "array", "items": {"type": "integer", "enum": [1, 2, 3]}},
                        "rationale": {"type": "string", "maxLength": 40},
                        "rating": {"type": ["integer", "null"], "enum": [1, 2, 3, 4, 5, None]},
                    },
                    "required": ["type", "rationale", "rating"],
                    "additionalProperties": False,
                }
                for k in (1, 2, 3)
            },
            "required": ["text_1", "text_2", "text_3"],
            "additionalProperties": False,
        },
        {"type": "object", "properties": {"label": {"enum": ["A", "B", "tie"]}, "score": {"type": "number", "minimum": -1, "maximum": 1}, "ok": {"type": "boolean"}}},
        {
            "$defs": {"V": {"type": "object", "properties": {"r": {"type": "integer", "minimum": 1, "maximum": 10}}, "required": ["r"]}},
            "type": "object",
            "properties": {"items": {"type": "array", "minItems": 5, "maxItems": 5, "items": {"$ref": "#/$defs/V"}}, "note": {"type": ["string", "null"], "maxLength": 12}},
            "required": ["items", "note"],
        },
    ],
)
def test_fake_structured_values_follow_any_schema(schema):
    import random

    for seed in range(50):
        value = value_for_schema(schema, random.Random(seed))
        assert schema_errors(value, schema) == [], (seed, value)


def test_fake_server_cli_serves_and_reports_stats():
    port = _closed_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "poll_assets_tests.fake_llm_server", "--port", str(port), "--latency-ms", "20", "--jitter-ms", "5"],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx2.get(base + "/_stats", timeout=1)
                break
            except httpx2.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("fake server CLI did not come up") from None
                time.sleep(0.1)
        r = httpx2.post(base + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        httpx2.post(base + "/_config", json={"forced_status": {"x": 401}})
        assert httpx2.post(base + "/x/v1/messages", json={"model": "m", "messages": []}).status_code == 401
        stats = httpx2.get(base + "/_stats").json()
        assert stats["total"] == 2 and stats["config"]["latency_ms"] == 20
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("panel", ["paper", "local"])
def test_building_a_panels_resources_imports_no_sdk(panel):
    # SDK imports take seconds; they wait for a stage step whose calls the cache cannot serve, which
    # builds every member's client before any member sends (test_shards.py checks that order).
    code = (
        "import sys, json\n"
        "from poll_assets.panel import load_panel\n"
        "from poll_assets.llm.resources import build_llm_resource\n"
        f"p, _ = load_panel({panel!r})\n"
        "before = set(sys.modules)\n"
        "[build_llm_resource(m) for m in [*p.generators, *p.judges]]\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert not ({"anthropic", "openai", "llama_cpp", "xllamacpp", "huggingface_hub.inference._generated._async_client"} & loaded)


def test_hf_clients_keep_their_connections_alive_and_the_library_hooks(fake_llm, monkeypatch):
    import huggingface_hub

    from poll_assets.llm.providers.hf_inference import install_pooled_client_factory

    hooks_before = huggingface_hub.get_async_session().event_hooks
    install_pooled_client_factory()
    client = huggingface_hub.get_async_session()
    transport = client._transport  # noqa: SLF001 - the transport is only visible here
    assert type(transport).__module__.startswith("httpx_aiohttp")
    assert transport.limits.max_keepalive_connections is None  # the library default keeps 20
    assert {k: [h.__name__ for h in v] for k, v in client.event_hooks.items()} == {
        k: [h.__name__ for h in v] for k, v in hooks_before.items()
    }
    res = make_resource(fake_llm, monkeypatch, "hf_inference")
    assert call(res, request()).ok


# -- a paid 200 is kept; structured output is negotiated ------------------------------------------------

VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        f"text_{k}": {
            "type": "object",
            "properties": {"rationale": {"type": "string"}, "rating": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
            "required": ["rationale", "rating"],
            "additionalProperties": False,
        }
        for k in (1, 2)
    },
    "required": ["text_1", "text_2"],
    "additionalProperties": False,
}
FAST_RETRIES = CallPolicy(max_concurrency=4, max_retries=5, timeout_s=10, retry=RetryPolicy(base_s=0.01, cap_s=0.05))


def run_batch(resource: ChatModelResource, n: int, schema: dict[str, Any] | None = VERDICT_SCHEMA,
              policy: CallPolicy = FAST_RETRIES) -> CallBatch:
    """`n` distinct structured requests through run_calls (retries, concurrency), no cache."""
    reqs = [request(f"Rate the two texts for prompt {i}.", schema=schema) for i in range(n)]
    return asyncio.run(run_calls(resource.backend(), policy, reqs))


# (provider, fake-server setting) for each way a provider answers 200 without the structured part.
UNSTRUCTURED_200 = [
    ("anthropic", "omit_tool_use"),  # no tool_use block, prose in a text block
    ("openai", "ignore_response_format"),  # prose content under json_schema
    ("openai_compatible", "ignore_response_format"),
    ("hf_inference", "ignore_response_format"),
    ("openai", "model_refusal"),  # content null, message.refusal set
]


@pytest.mark.parametrize(("provider", "mode"), UNSTRUCTURED_200)
def test_a_200_without_the_structured_part_is_kept_as_text_and_costs_one_call(fake_llm, monkeypatch, provider, mode):
    tag = SPECS[provider].path.strip("/").removesuffix("/v1")
    fake_llm.configure(**{mode: [tag]})
    batch = run_batch(make_resource(fake_llm, monkeypatch, provider), 6)
    # Exactly one request per row reached the server, and none was retried.
    assert fake_llm.stats()["total"] == 6 and fake_llm.stats()["max_repeats"] == 1
    assert batch.stats.calls == 6 and batch.stats.retries == 0 and batch.stats.failures == 0
    for c in batch.completions:
        assert c.ok and c.output_mode == TEXT_FALLBACK and not c.structured
        assert c.extra["structured_fallback"]
        if mode == "model_refusal":
            assert c.text == "I can't help with rating these texts."
        else:  # the prose the server wrote, whole
            assert c.text.startswith("I will rate each text in turn.") and "#### Output for Text 2\nRating: " in c.text


def test_llama_cpp_like_server_settles_on_json_object_after_one_refusal(fake_llm, monkeypatch):
    fake_llm.configure(llama_cpp=["vllm"])  # json_schema refused with HTTP 500, json_object + schema taken
    res = make_resource(fake_llm, monkeypatch, "openai_compatible")
    batch = run_batch(res, 8)
    assert [c.output_mode for c in batch.completions] == ["json_object"] * 8
    for c in batch.completions:
        assert schema_errors(json.loads(c.text), VERDICT_SCHEMA) == []
    # One refusal in the whole batch (the first call probes alone), never retried as an outage, and
    # not counted as a call: 8 rows cost 8 calls.
    stats = fake_llm.stats()
    assert stats["outcomes"] == {"500": 1, "200": 8} and stats["total"] == 9
    assert [sent_form(b["body"]) for b in fake_llm.bodies] == ["json_schema"] + ["json_object"] * 8
    assert batch.stats.calls == 8 and batch.stats.retries == 0
    refused = [c.extra["structured_refusals"] for c in batch.completions if "structured_refusals" in c.extra]
    assert len(refused) == 1 and refused[0][0].startswith("json_schema: HTTP 500") and "response_format" in refused[0][0]
    backend = res.backend()
    assert backend.negotiation.form == "json_object" and backend.negotiation.refusals == {"json_schema": 1}
    # Remembered for the member: a later batch goes straight to the form that worked.
    fake_llm.reset(llama_cpp=["vllm"])
    run_batch(res, 3)
    assert fake_llm.stats()["outcomes"] == {"200": 3}


@pytest.mark.parametrize("status", [500, 503])
def test_an_error_that_is_no_capability_refusal_is_still_retried_as_an_outage(fake_llm, monkeypatch, status):
    fake_llm.configure(forced_status={"vllm": status})  # "forced status ..." says nothing about response_format
    res = make_resource(fake_llm, monkeypatch, "openai_compatible")
    batch = run_batch(res, 1, policy=CallPolicy(max_retries=2, timeout_s=10, retry=RetryPolicy(base_s=0.01, cap_s=0.02),
                                                retry_window_s=0))  # max_retries alone says when to stop
    assert batch.completions[0].error_kind == "server"
    assert fake_llm.stats()["total"] == 3  # the first attempt and two retries, all with json_schema
    assert {sent_form(b["body"]) for b in fake_llm.bodies} == {"json_schema"}
    assert res.backend().negotiation.refusals == {}


@pytest.mark.parametrize(
    ("status", "detail", "refusal"),
    [
        (400, "response_format of type json_schema is not supported", True),
        (422, "Unknown grammar type", True),
        (500, "1 validation error ... response_format.type Input should be 'text' or 'json_object'", True),
        (400, "messages: field required", False),
        (500, "internal error", False),
        (503, "schema registry unavailable", False),  # gateways and outages are never refusals
        (429, "json_schema requests are rate limited", False),
    ],
)
def test_capability_refusals_are_told_apart_from_other_errors(status, detail, refusal):
    assert mentions_structured_output(status, detail) is refusal


def test_negotiation_probes_one_call_then_lets_the_queued_calls_go_together():
    # The first call finds the form (json_schema refused, json_object answers) alone; the calls
    # that queued behind it must then overlap, not take the probe's lock one after another.
    negotiation = FormNegotiation(["json_schema", "json_object", "text"])
    in_flight, peak, sent = 0, 0, []

    async def send(form: str) -> Completion:
        nonlocal in_flight, peak
        sent.append(form)
        if form == "json_schema":
            raise ValueError("response_format json_schema is not supported")
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return Completion(text="{}", input_tokens=1, output_tokens=1)

    def refusal(exc: BaseException) -> str | None:
        return str(exc) if isinstance(exc, ValueError) else None

    async def calls() -> list[Completion]:
        return await asyncio.gather(*(negotiation.run(send, refusal) for _ in range(20)))

    done = asyncio.run(calls())
    assert sent.count("json_schema") == 1 and sent.count("json_object") == 20
    assert done[0].extra["structured_refusals"] and negotiation.form == "json_object"
    assert peak == 19  # the probe alone, then the 19 queued calls at once


def test_a_response_body_reads_as_the_sdk_models_do_without_building_them():
    # The openai and anthropic backends read 200 bodies with json_fields instead of the SDKs' pydantic
    # models (about a third of a call's CPU): attribute access, a missing field reads as None, and an
    # object stays a dict (a tool call's input is dumped as JSON as it came).
    import json as json_module

    from poll_assets.llm.providers.remote import json_fields

    out = json_fields(b'{"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], '
                      b'"content": [{"type": "tool_use", "input": {"rating": 4}}]}')
    assert out.choices[0].message.content == "hi" and out.choices[0].finish_reason == "stop"
    assert out.usage is None and out.choices[0].message.refusal is None
    assert json_module.dumps(out.content[0].input) == '{"rating": 4}' and isinstance(out.content[0].input, dict)
    with pytest.raises(AttributeError):
        out.__deepcopy__  # noqa: B018 - protocols see no hook, not None
    with pytest.raises(ValueError):
        json_fields(b"<html>bad gateway</html>")
