"""Hugging Face inference through `huggingface_hub.AsyncInferenceClient`: serverless model ids (routed by the
Hub), dedicated Inference Endpoints and self-hosted TGI (a URL in `base_url`).

With a URL, the client posts to `<url>/v1/chat/completions` (it appends `/chat/completions` when the URL
already ends in `/v1`, and nothing when it ends in `/chat/completions`). Structured output uses TGI's
grammar (`{"type": "json", "value": schema}`) for URLs, and the OpenAI-style `json_schema` format for
the Hub's router, which speaks the OpenAI dialect.
"""

from __future__ import annotations

import json
from typing import Any

import httpx2
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError

from poll_assets.llm.base import CallRequest, Completion, ProviderError
from poll_assets.llm.remote import (
    RemoteBackend,
    body_message,
    classify_transport,
    mentions_structured_output,
    schema_name,
)


class HFInferenceBackend(RemoteBackend[AsyncInferenceClient]):
    provider = "hf_inference"

    def __init__(self, model: str, **kwargs: Any):
        super().__init__(model, **kwargs)
        self.structured_supported = True

    def _new_client(self, timeout_s: float) -> AsyncInferenceClient:
        # A URL goes in base_url, so `model` stays free for the payload (TGI ignores it, vLLM needs it).
        return AsyncInferenceClient(base_url=self.base_url or None, api_key=self._api_key, timeout=timeout_s)

    def _kwargs(self, request: CallRequest) -> dict[str, Any]:
        p = request.params
        kwargs: dict[str, Any] = {
            "messages": request.message_dicts(),
            "model": self.model,
            "max_tokens": p.max_new_tokens,
        }
        if p.temperature is not None:
            kwargs["temperature"] = p.temperature
        if p.top_p is not None:
            kwargs["top_p"] = p.top_p
        if p.stop:
            kwargs["stop"] = list(p.stop)
        if p.seed is not None:
            kwargs["seed"] = p.seed
        return kwargs

    def _structured_format(self, schema: dict[str, Any]) -> tuple[dict[str, Any], str]:
        if self.base_url:
            return {"type": "json", "value": schema}, "grammar"
        return {
            "type": "json_schema",
            "json_schema": {"name": schema_name(schema), "schema": schema, "strict": True},
        }, "json_schema"

    async def _call(self, client: AsyncInferenceClient, request: CallRequest, timeout_s: float) -> Completion:
        kwargs = self._kwargs(request)
        if request.json_schema is not None and self.structured_supported:
            fmt, mode = self._structured_format(request.json_schema)
            try:
                return await self._send(client, {**kwargs, "response_format": fmt}, mode)
            except HfHubHTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                if not mentions_structured_output(status, _detail(exc)):
                    raise
                self.structured_supported = False  # this server cannot constrain output; use text from now on
        return await self._send(client, kwargs, "text")

    async def _send(self, client: AsyncInferenceClient, kwargs: dict[str, Any], mode: str) -> Completion:
        out = await client.chat_completion(**kwargs)
        try:
            choice = out.choices[0]
            text = choice.message.content
            usage = out.usage
        except (TypeError, AttributeError, IndexError, KeyError) as exc:
            raise self.malformed(f"{type(exc).__name__} while reading the chat completion") from None
        if text is None:
            raise self.malformed("the completion has no message content")
        response_id = getattr(out, "id", None) or None
        return Completion(
            text=text,
            finish_reason=choice.finish_reason,
            input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            model=getattr(out, "model", None) or None,
            request_id=response_id,
            output_mode=mode,
            extra={"response_id": response_id} if response_id else {},
        )

    def _classify(self, exc: BaseException) -> ProviderError | None:
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            return self.status_error(exc.response.status_code, exc.response.headers, _detail(exc))
        if isinstance(exc, InferenceTimeoutError):
            return ProviderError("timeout", f"{self.who}: the request timed out")
        if isinstance(exc, httpx2.HTTPError):
            return classify_transport(self, exc)
        if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
            return self.malformed(type(exc).__name__)
        if isinstance(exc, ValueError | TypeError | KeyError) and "parse_obj" in _frames(exc):
            # The SDK could not turn the body into a ChatCompletionOutput (missing fields, wrong types);
            # a ValueError raised anywhere else is a configuration problem and stays unclassified.
            return self.malformed(type(exc).__name__)
        return None


def _detail(exc: HfHubHTTPError) -> str:
    """The server's message, read from the body rather than the SDK's text (which embeds the URL)."""
    try:
        return body_message(exc.response.json())
    except Exception:  # noqa: BLE001 - not JSON
        try:
            return exc.response.text
        except Exception:  # noqa: BLE001
            return ""


def _frames(exc: BaseException) -> str:
    tb = exc.__traceback__
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return " ".join(names)
