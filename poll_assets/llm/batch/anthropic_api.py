"""Anthropic's Message Batches (`/v1/messages/batches`) through the official SDK.

A request in a batch is the same Messages call `AnthropicChatBackend` makes online (its `_kwargs`),
and its answer is read by the same `read_message`.
"""

from __future__ import annotations

import json
from typing import Any

from poll_assets.llm.providers.anthropic_api import AnthropicChatBackend
from poll_assets.llm.base import CallRequest, ProviderError
from poll_assets.llm.batch.transport import CANCELED, EXPIRED, BatchItem, BatchState, BatchTransport, sdk_call

# An errored result's error type, as the kinds the rest of the call layer uses.
_ERROR_KINDS = {
    "invalid_request_error": "bad_request", "authentication_error": "auth", "permission_error": "auth",
    "not_found_error": "not_found", "rate_limit_error": "rate_limit", "api_error": "server",
    "overloaded_error": "server", "timeout_error": "timeout",
}


class AnthropicBatchTransport(BatchTransport):
    def __init__(self, backend: AnthropicChatBackend) -> None:
        self.backend = backend

    def line(self, key: str, request: CallRequest) -> bytes:
        params, _ = self.backend._kwargs(request)
        return json.dumps({"custom_id": key, "params": params}, ensure_ascii=False).encode()

    async def submit(self, lines: list[bytes]) -> str:
        client = self.backend.client()
        batch = await sdk_call(self.backend, lambda: client.messages.batches.create(requests=[json.loads(x) for x in lines]))
        return batch.id

    async def poll(self, batch_id: str) -> BatchState:
        client = self.backend.client()
        batch = await sdk_call(self.backend, lambda: client.messages.batches.retrieve(batch_id))
        counts = batch.request_counts.model_dump()
        return BatchState(batch.processing_status, batch.processing_status == "ended", counts)

    async def results(self, batch_id: str, requests: dict[str, CallRequest]) -> list[BatchItem]:
        client = self.backend.client()

        async def download() -> list[Any]:
            return [line async for line in await client.messages.batches.results(batch_id)]

        return [self._item(line, requests) for line in await sdk_call(self.backend, download)]

    def _item(self, line: Any, requests: dict[str, CallRequest]) -> BatchItem:
        key, result = line.custom_id, line.result
        if result.type == "succeeded":
            request = requests.get(key)
            if request is None:  # a request of this batch that another run already collected
                return BatchItem(key, outcome="succeeded")
            _, wrapped = self.backend._kwargs(request)
            try:
                return BatchItem(key, self.backend.read_message(result.message, request, wrapped))
            except ProviderError as err:
                return BatchItem(key, error=err, outcome="errored")
        if result.type in ("expired", "canceled"):
            return BatchItem(key, outcome=EXPIRED if result.type == "expired" else CANCELED)
        error = getattr(result.error, "error", None)
        kind = _ERROR_KINDS.get(getattr(error, "type", ""), "other")
        message = self.backend.scrub(str(getattr(error, "message", "") or ""))
        return BatchItem(key, error=ProviderError(kind, f"{self.backend.who}: batch request failed: {message}"),  # type: ignore[arg-type]
                         outcome="errored")

    async def cancel(self, batch_id: str) -> None:
        client = self.backend.client()
        await sdk_call(self.backend, lambda: client.messages.batches.cancel(batch_id))
