"""OpenAI chat completions through the official SDK: api.openai.com, Azure OpenAI's v1 endpoint, and any
OpenAI-compatible server (vLLM, TGI's OpenAI route, Ollama, llama.cpp server, LiteLLM) via `base_url`."""

from __future__ import annotations

from typing import Any

import httpx2
import openai

from poll_assets.llm.base import CallRequest, Completion, ProviderError
from poll_assets.llm.remote import (
    RemoteBackend,
    body_message,
    classify_sdk_failure,
    mentions_structured_output,
    schema_name,
)

# Self-hosted servers usually take no key, but the SDK insists on one; sending this placeholder keeps the
# SDK from falling back to $OPENAI_API_KEY and handing a real key to a third-party server.
NO_KEY_PLACEHOLDER = "no-key"


class OpenAIChatBackend(RemoteBackend[openai.AsyncOpenAI]):
    provider = "openai"

    def __init__(self, model: str, **kwargs: Any):
        super().__init__(model, **kwargs)
        # Flipped off the first time the server refuses response_format, so later calls go straight to text.
        self.structured_supported = True

    def _new_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            api_key=self._api_key or NO_KEY_PLACEHOLDER,
            base_url=self.base_url or None,
            max_retries=0,  # retries belong to poll_assets.llm.runner
            timeout=None,  # and so does the deadline (runner.attempt)
            # The SDK's aiohttp transport (the `aiohttp` extra): about half the client CPU per call of
            # its default httpx pool, whose every request scans all pooled connections. Ours, not the
            # SDK's default wrapper, so `release` closes it on the loop that owns it.
            http_client=openai.DefaultAioHttpClient(timeout=None),
        )

    def _kwargs(self, request: CallRequest) -> dict[str, Any]:
        return {"model": self.model, "messages": request.message_dicts(), **request.params.chat_completion_kwargs()}

    async def _call(self, client: openai.AsyncOpenAI, request: CallRequest) -> Completion:
        kwargs = self._kwargs(request)
        if request.json_schema is not None and self.structured_supported:
            fmt = {
                "type": "json_schema",
                "json_schema": {"name": schema_name(request.json_schema), "schema": request.json_schema, "strict": True},
            }
            try:
                return await self._send(client, {**kwargs, "response_format": fmt}, "json_schema")
            except openai.APIStatusError as exc:
                detail = body_message(exc.body) or exc.message
                if not mentions_structured_output(exc.status_code, detail):
                    raise
                # The server cannot do schema-constrained output: ask again in plain text; the prompt
                # itself still asks for JSON and the parser downstream copes with text.
                self.structured_supported = False
        return await self._send(client, kwargs, "text")

    async def _send(self, client: openai.AsyncOpenAI, kwargs: dict[str, Any], mode: str) -> Completion:
        raw = await client.chat.completions.with_raw_response.create(**kwargs)
        try:
            out = raw.parse()
            if isinstance(out, str):  # the SDK hands back text when the body is not JSON
                raise ValueError("body is not JSON")
            choice = out.choices[0]
            text = choice.message.content
            usage = out.usage
            response_id = out.id
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            raise self.malformed(f"{type(exc).__name__} while reading the chat completion") from None
        if text is None:
            raise self.malformed("the completion has no message content")
        return Completion(
            text=text,
            finish_reason=choice.finish_reason,
            input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            model=out.model or None,
            request_id=raw.headers.get("x-request-id") or response_id,
            output_mode=mode,
            extra={"response_id": response_id} if response_id else {},
        )

    def _classify(self, exc: BaseException) -> ProviderError | None:
        if isinstance(exc, openai.APIStatusError):
            return self.status_error(
                exc.status_code, exc.response.headers, body_message(exc.body), body_text=_safe_text(exc.response)
            )
        return classify_sdk_failure(self, exc, openai)


def _safe_text(response: httpx2.Response) -> str:
    try:
        return response.text
    except Exception:  # noqa: BLE001 - a stream that was never read has no text
        return ""
