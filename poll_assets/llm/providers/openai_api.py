"""OpenAI chat completions through the official SDK: api.openai.com, Azure OpenAI's v1 endpoint, and any
OpenAI-compatible server (vLLM, TGI's OpenAI route, Ollama, llama.cpp server, LiteLLM) via `base_url`."""

from __future__ import annotations

from typing import Any

import httpx2
import openai

from poll_assets.llm.base import TEXT_FALLBACK, CallRequest, Completion, ProviderError
from poll_assets.llm.providers.remote import (
    FormNegotiation,
    RemoteBackend,
    send_negotiated,
    body_message,
    classify_sdk_failure,
    json_fields,
    schema_name,
    structured_reading,
)

# Self-hosted servers usually take no key, but the SDK insists on one; sending this placeholder keeps the
# SDK from falling back to $OPENAI_API_KEY and handing a real key to a third-party server.
NO_KEY_PLACEHOLDER = "no-key"


# The structured-output forms servers actually take, in the order tried: OpenAI's strict json_schema
# (OpenAI, vLLM, TGI, SGLang); json_object with a `schema`, which llama.cpp's servers (llama-server,
# llama-cpp-python) turn into a grammar; plain text last, the prompt itself asking for JSON.
STRUCTURED_FORMS = ("json_schema", "json_object", "text")

# The SDK's own request path (client.post) with its bearer auth, skipping `chat.completions.create`'s
# walk of the body through the params' TypedDicts and the pydantic response model: together
# about 40% of the call's CPU on a loopback server (docs/calls.md, "Per-call CPU").
_CHAT_PATH = "/chat/completions"
_BEARER: dict[str, Any] = {"security": {"bearer_auth": True}}


class OpenAIChatBackend(RemoteBackend[openai.AsyncOpenAI]):
    provider = "openai"

    def __init__(self, model: str, **kwargs: Any):
        super().__init__(model, **kwargs)
        # What this member's server accepted, learned from its refusals and kept for the run.
        self.negotiation = FormNegotiation(STRUCTURED_FORMS)

    def learned_form(self) -> str | None:
        return self.negotiation.learned

    def assume_form(self, form: str) -> None:
        self.negotiation.assume(form)

    def _new_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            api_key=self._api_key or NO_KEY_PLACEHOLDER,
            base_url=self.base_url or None,
            max_retries=0,  # retries belong to poll_assets.llm.online.runner
            timeout=None,  # and so does the deadline (runner.attempt)
            # The SDK's aiohttp transport (the `aiohttp` extra): about half the client CPU per call of
            # its default httpx pool, whose every request scans all pooled connections. Ours, not the
            # SDK's default wrapper, so `release` closes it on the loop that owns it.
            http_client=openai.DefaultAioHttpClient(timeout=None),
        )

    def _kwargs(self, request: CallRequest) -> dict[str, Any]:
        return {"model": self.model, "messages": request.message_dicts(), **request.params.chat_completion_kwargs()}

    async def _call(self, client: openai.AsyncOpenAI, request: CallRequest) -> Completion:
        return await send_negotiated(self, request, lambda kwargs, form: self._send(client, kwargs, form), response_format)

    def _refusal(self, exc: BaseException) -> str | None:
        """The server's words when `exc` is a capability refusal of the response_format, else None."""
        if not isinstance(exc, openai.APIStatusError):
            return None
        return self.capability_refusal(exc.status_code, body_message(exc.body) or exc.message)

    async def _send(self, client: openai.AsyncOpenAI, kwargs: dict[str, Any], form: str) -> Completion:
        raw = await client.post(_CHAT_PATH, body=kwargs, cast_to=httpx2.Response, options=_BEARER)  # type: ignore[arg-type]
        try:
            out = json_fields(raw.content)
        except ValueError as exc:
            raise self.malformed(f"{type(exc).__name__} while reading the chat completion") from None
        return self.read_completion(out, form, raw.headers.get("x-request-id"))

    def read_completion(self, out: Any, form: str, request_id: str | None) -> Completion:
        """A chat completion as a Completion, online or from a batch. A paid 200 is kept whatever its
        shape: a refusal or prose instead of JSON is read as text."""
        try:
            choice = out.choices[0]
            content = choice.message.content
            refusal = getattr(choice.message, "refusal", None)
            usage = out.usage
            response_id = out.id
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            raise self.malformed(f"{type(exc).__name__} while reading the chat completion") from None
        if content is None and form == "text":
            raise self.malformed("the completion has no message content")
        if content is None and refusal:
            text, mode, fell_back = refusal, TEXT_FALLBACK, "the model refused (message.refusal)"
        else:
            text, mode, fell_back = structured_reading(content, form)
        extra: dict[str, Any] = {"response_id": response_id} if response_id else {}
        if fell_back and choice.finish_reason == "length":  # paid and kept: read for what it holds, then repaired
            fell_back = "the answer was cut off at max_tokens (finish_reason length)"
        if fell_back:
            extra["structured_fallback"] = fell_back
        return Completion(
            text=text,
            finish_reason=choice.finish_reason,
            input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            cached_input_tokens=cached_prompt_tokens(usage),
            output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            model=out.model or None,
            request_id=request_id or response_id,
            output_mode=mode,
            extra=extra,
        )

    def _classify(self, exc: BaseException) -> ProviderError | None:
        if isinstance(exc, openai.APIStatusError):
            return self.status_error(
                exc.status_code, exc.response.headers, body_message(exc.body), body_text=_safe_text(exc.response)
            )
        return classify_sdk_failure(self, exc, openai)


def response_format(form: str, schema: dict[str, Any]) -> dict[str, Any] | None:
    """The `response_format` body for one structured-output form (None for plain text)."""
    if form == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": schema_name(schema), "schema": schema, "strict": True}}
    if form == "json_object":
        return {"type": "json_object", "schema": schema}
    return None


def cached_prompt_tokens(usage: Any) -> int:
    """Prompt tokens OpenAI served from its automatic prefix cache (part of prompt_tokens)."""
    details = getattr(usage, "prompt_tokens_details", None)
    return int(getattr(details, "cached_tokens", 0) or 0)


def _safe_text(response: httpx2.Response) -> str:
    try:
        return response.text
    except Exception:  # noqa: BLE001 - a stream that was never read has no text
        return ""
