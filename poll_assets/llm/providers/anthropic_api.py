"""Anthropic's Messages API through the official SDK. Structured output goes through a forced tool call."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2

try:  # private module; only used to word an error message
    from anthropic._constants import ANTHROPIC_API_VERSION
except ImportError:  # pragma: no cover
    ANTHROPIC_API_VERSION = "current"

from poll_assets.llm.base import (
    TEXT_FALLBACK,
    CallRequest,
    Completion,
    FatalProviderError,
    ProviderError,
    split_at_cache_break,
)
from poll_assets.llm.providers.remote import (
    RemoteBackend,
    body_message,
    classify_sdk_failure,
    json_fields,
    schema_name,
)
from poll_assets.llm.providers.registry import PROVIDERS

# Anthropic's stop reasons in the vocabulary the rest of the pipeline uses (OpenAI's).
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "stop", "max_tokens": "length"}
_WRAP_KEY = "value"
# A cache breakpoint: the prompt up to and including the block carrying it is cached for a few minutes.
_EPHEMERAL = {"type": "ephemeral"}
_MIN_CACHED_CHARS = 4096
# The SDK's own request path (client.post: its auth, headers and errors) without building the
# pydantic Message: about 30% of the call's CPU on a loopback server (docs/calls.md, "Per-call CPU").
_MESSAGES_PATH = "/v1/messages"


class AnthropicChatBackend(RemoteBackend[anthropic.AsyncAnthropic]):
    provider = "anthropic"

    def _new_client(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            api_key=self._api_key,
            base_url=self.base_url or None,
            max_retries=0,  # retries belong to poll_assets.llm.online.runner
            # And so does the deadline (runner.attempt). A timeout other than the SDK's default also
            # skips its long-request guard, which refuses large max_tokens without streaming.
            timeout=None,
            # The SDK's aiohttp transport (the `aiohttp` extra): about half the client CPU per call of
            # its default httpx pool, whose every request scans all pooled connections. Ours, not the
            # SDK's default wrapper, so `release` closes it on the loop that owns it.
            http_client=anthropic.DefaultAioHttpClient(timeout=None),
        )

    def _kwargs(self, request: CallRequest) -> tuple[dict[str, Any], bool]:
        p = request.params
        system = [c for r, c in request.messages if r == "system"]
        messages = [{"role": r, "content": _cached_blocks(c)} for r, c in request.messages if r != "system"]
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": p.max_new_tokens,
        }
        if system:
            kwargs["system"] = _system(system, marked=any(not isinstance(m["content"], str) for m in messages))
        unsupported = sorted(p.set_fields() - PROVIDERS["anthropic"].params)
        if unsupported:
            # The panel refuses these at load; a request built elsewhere must not have them dropped silently.
            raise FatalProviderError(
                "bad_request",
                f"{self.who}: {unsupported} cannot be sent to the Anthropic Messages API "
                f"(API version {ANTHROPIC_API_VERSION} has no sampling parameters and no seed)",
            )
        if p.stop:
            kwargs["stop_sequences"] = list(p.stop)
        wrapped = False
        if request.json_schema is not None:
            schema = request.json_schema
            if schema.get("type") != "object":
                # Tool inputs must be objects; carry any other shape in a single field.
                schema = {"type": "object", "properties": {_WRAP_KEY: schema}, "required": [_WRAP_KEY]}
                wrapped = True
            name = schema_name(request.json_schema, "record_answer")
            kwargs["tools"] = [
                {"name": name, "description": "Record the answer in the required structure.", "input_schema": schema}
            ]
            kwargs["tool_choice"] = {"type": "tool", "name": name}
        return kwargs, wrapped

    async def _call(self, client: anthropic.AsyncAnthropic, request: CallRequest) -> Completion:
        kwargs, wrapped = self._kwargs(request)
        raw = await client.post(_MESSAGES_PATH, body=kwargs, cast_to=httpx2.Response)
        try:
            msg = json_fields(raw.content)
        except ValueError as exc:
            raise self.malformed(f"{type(exc).__name__} while reading the message") from None
        return self.read_message(msg, request, wrapped, raw.headers.get("request-id"))

    def read_message(self, msg: Any, request: CallRequest, wrapped: bool, request_id: str | None = None) -> Completion:
        """The Completion in a Messages API answer (online, or one result of a message batch)."""
        try:
            if isinstance(msg, str):
                raise ValueError("body is not JSON")
            text, mode, fell_back = _read_content(msg.content, request.json_schema is not None, wrapped)
            usage = msg.usage
            stop_reason = msg.stop_reason
            message_id = msg.id
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            raise self.malformed(f"{type(exc).__name__} while reading the message") from None
        extra: dict[str, Any] = {"response_id": message_id, "stop_reason": stop_reason}
        if fell_back and stop_reason == "max_tokens":  # paid and kept: read for what it holds, then repaired
            fell_back = "the answer was cut off at max_tokens (stop_reason max_tokens)"
        if fell_back:
            extra["structured_fallback"] = fell_back
        # Anthropic's input_tokens leaves out what was written to or read from its prompt cache.
        written = int(getattr(usage, "cache_creation_input_tokens", 0) or 0)
        read = int(getattr(usage, "cache_read_input_tokens", 0) or 0)
        return Completion(
            text=text,
            finish_reason=_FINISH.get(stop_reason or "", stop_reason),
            input_tokens=int(getattr(usage, "input_tokens", 0) or 0) + written + read,
            cached_input_tokens=read,
            cache_write_tokens=written,
            output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
            model=msg.model or None,
            request_id=request_id or message_id,
            output_mode=mode,
            extra=extra,
        )

    def _classify(self, exc: BaseException) -> ProviderError | None:
        if isinstance(exc, anthropic.APIStatusError):
            return self.status_error(exc.status_code, exc.response.headers, body_message(exc.body))
        return classify_sdk_failure(self, exc, anthropic)


def _system(parts: list[str], marked: bool) -> str | list[dict[str, Any]]:
    """The system prompt; a breakpoint of its own only when no message carries one and it is long
    enough to be cached at all (Anthropic caches no prefix under 1,024 tokens, about 4,096 characters)."""
    text = "\n\n".join(parts)
    if marked or len(text) < _MIN_CACHED_CHARS:
        return text
    return [{"type": "text", "text": text, "cache_control": _EPHEMERAL}]


def _cached_blocks(content: str) -> str | list[dict[str, Any]]:
    """A message's content, with a cache breakpoint after its stable prefix when it has one."""
    split = split_at_cache_break(content)
    if split is None:
        return content
    stable, rest = split
    return [{"type": "text", "text": stable, "cache_control": _EPHEMERAL}, {"type": "text", "text": rest}]


def _read_content(blocks: list[Any], forced_tool: bool, wrapped: bool) -> tuple[str, str, str | None]:
    """(text, output_mode, why it fell back) from a message's content blocks.

    A forced tool call answered without a tool_use block was still generated and paid for: its
    text blocks are kept and read as text, never retried as if the reply were unreadable.
    """
    prose = "".join(b.text for b in blocks if getattr(b, "type", None) == "text")
    if not forced_tool:
        return prose, "text", None
    tool = next((b for b in blocks if getattr(b, "type", None) == "tool_use"), None)
    if tool is None:
        return prose, TEXT_FALLBACK, "no tool_use block in the answer to a forced tool call"
    value = tool.input
    if wrapped and isinstance(value, dict) and _WRAP_KEY in value:
        value = value[_WRAP_KEY]
    return json.dumps(value, ensure_ascii=False), "tool_use", None
