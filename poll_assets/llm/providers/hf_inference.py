"""Hugging Face inference through `huggingface_hub.AsyncInferenceClient`: serverless model ids (routed by the
Hub), dedicated Inference Endpoints and self-hosted TGI (a URL in `base_url`).

With a URL, the client posts to `<url>/v1/chat/completions` (it appends `/chat/completions` when the URL
already ends in `/v1`, and nothing when it ends in `/chat/completions`). Structured output is
negotiated (see `URL_FORMS`, `ROUTER_FORMS`): a server's refusal of one form moves to the next.
"""

from __future__ import annotations

import json
from typing import Any

import threading

import httpx2
from huggingface_hub import AsyncInferenceClient, get_async_session, set_async_client_factory
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError
from httpx_aiohttp.httpx2 import Httpx2AiohttpClient

from poll_assets.llm.base import CallRequest, Completion, ProviderError
from poll_assets.llm.providers.remote import (
    FormNegotiation,
    RemoteBackend,
    send_negotiated,
    body_message,
    classify_transport,
    schema_name,
    structured_reading,
)


_factory_lock = threading.Lock()
_factory_installed = False


def install_pooled_client_factory() -> None:
    """Give huggingface_hub's async clients an aiohttp transport that keeps its connections alive.

    The library's default httpx client keeps 20 idle connections, so with more calls than that in
    flight it closes and reopens connections all the time (about 2350 connects for 2100 requests in
    bench/), and its pool scans every connection on each request. The aiohttp transport (the one the
    OpenAI and Anthropic SDKs ship as their `aiohttp` extra) does neither. Connections stay bounded
    by the member's `max_concurrency`. The library's own request/response hooks are kept. The
    factory is process-wide (that is the library's API), so it is installed once.
    """
    global _factory_installed
    with _factory_lock:
        if _factory_installed:
            return
        hooks = get_async_session().event_hooks  # the current factory's hooks, read before replacing it

        def pooled() -> httpx2.AsyncClient:
            return Httpx2AiohttpClient(
                event_hooks=hooks,
                follow_redirects=True,
                timeout=None,
                # 0 is aiohttp's "no cap on connections"; the member's max_concurrency is the cap.
                limits=httpx2.Limits(max_connections=0, max_keepalive_connections=None),
            )

        set_async_client_factory(pooled)
        _factory_installed = True


# Structured-output forms in the order tried, plain text last (the prompt itself asks for JSON). A URL
# (TGI, an Inference Endpoint) gets TGI's grammar; huggingface_hub rewrites a json_schema format into
# that same grammar for such servers, so trying it next would only meet the same refusal. The Hub's
# router speaks the OpenAI dialect, and the library adapts json_schema to each routed provider.
URL_FORMS = ("grammar", "text")
ROUTER_FORMS = ("json_schema", "text")


def _response_format(form: str, schema: dict[str, Any]) -> dict[str, Any] | None:
    if form == "grammar":
        return {"type": "json", "value": schema}
    if form == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": schema_name(schema), "schema": schema, "strict": True}}
    return None


class HFInferenceBackend(RemoteBackend[AsyncInferenceClient]):
    provider = "hf_inference"

    def __init__(self, model: str, **kwargs: Any):
        super().__init__(model, **kwargs)
        # What this member's server accepted, learned from its refusals and kept for the run.
        self.negotiation = FormNegotiation(URL_FORMS if self.base_url else ROUTER_FORMS)

    def learned_form(self) -> str | None:
        return self.negotiation.learned

    def assume_form(self, form: str) -> None:
        self.negotiation.assume(form)

    def _new_client(self) -> AsyncInferenceClient:
        install_pooled_client_factory()
        # A URL goes in base_url, so `model` stays free for the payload (TGI ignores it, vLLM needs it).
        # No timeout of its own: the attempt deadline is the caller's (runner.attempt).
        return AsyncInferenceClient(base_url=self.base_url or None, api_key=self._api_key)

    def _kwargs(self, request: CallRequest) -> dict[str, Any]:
        return {"messages": request.message_dicts(), "model": self.model, **request.params.chat_completion_kwargs()}

    async def _call(self, client: AsyncInferenceClient, request: CallRequest) -> Completion:
        return await send_negotiated(self, request, lambda kwargs, form: self._send(client, kwargs, form), _response_format)

    def _refusal(self, exc: BaseException) -> str | None:
        """The server's words when `exc` is a capability refusal of the response_format, else None."""
        if not isinstance(exc, HfHubHTTPError) or exc.response is None:
            return None
        return self.capability_refusal(exc.response.status_code, _detail(exc))

    async def _send(self, client: AsyncInferenceClient, kwargs: dict[str, Any], form: str) -> Completion:
        out = await client.chat_completion(**kwargs)
        try:
            choice = out.choices[0]
            content = choice.message.content
            usage = out.usage
        except (TypeError, AttributeError, IndexError, KeyError) as exc:
            raise self.malformed(f"{type(exc).__name__} while reading the chat completion") from None
        if content is None and form == "text":
            raise self.malformed("the completion has no message content")
        text, mode, fell_back = structured_reading(content, form)  # a paid 200 is kept, prose included
        response_id = getattr(out, "id", None) or None
        extra: dict[str, Any] = {"response_id": response_id} if response_id else {}
        if fell_back:
            extra["structured_fallback"] = fell_back
        return Completion(
            text=text,
            finish_reason=choice.finish_reason,
            input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            model=getattr(out, "model", None) or None,
            request_id=response_id,
            output_mode=mode,
            extra=extra,
        )

    def _classify(self, exc: BaseException) -> ProviderError | None:
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            return self.status_error(exc.response.status_code, exc.response.headers, _detail(exc))
        if isinstance(exc, InferenceTimeoutError):
            # The library turns every httpx "timeout" into this; under aiohttp that includes refused
            # and dropped connections, which classify_transport tells apart.
            return classify_transport(self, exc.__cause__) or ProviderError("timeout", f"{self.who}: the request timed out")
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
