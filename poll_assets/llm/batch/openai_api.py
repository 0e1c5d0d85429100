"""OpenAI's Batch API (`/v1/files` + `/v1/batches`) through the official SDK; also what vLLM and
LiteLLM serve for `openai_compatible` members that declare `batch.server_has_batches`.

A request in a batch is the chat-completions body `OpenAIChatBackend` sends online (its `_kwargs`,
plus the json_schema response_format when the request has a schema).
"""

from __future__ import annotations

import json
from typing import Any

import openai
from openai.types.chat import ChatCompletion

from poll_assets.llm.base import CallRequest, Completion, ProviderError
from poll_assets.llm.batch.transport import CANCELED, EXPIRED, BatchItem, BatchState, BatchTransport, sdk_call
from poll_assets.llm.providers.openai_api import OpenAIChatBackend
from poll_assets.llm.providers.remote import body_message, schema_name

ENDPOINT = "/v1/chat/completions"
_ENDED = frozenset({"completed", "failed", "expired", "cancelled"})


class OpenAIBatchTransport(BatchTransport):
    def __init__(self, backend: OpenAIChatBackend) -> None:
        self.backend = backend

    def _body(self, request: CallRequest) -> tuple[dict[str, Any], str]:
        body = self.backend._kwargs(request)
        if request.json_schema is None:
            return body, "text"
        fmt = {"name": schema_name(request.json_schema), "schema": request.json_schema, "strict": True}
        return {**body, "response_format": {"type": "json_schema", "json_schema": fmt}}, "json_schema"

    def line(self, key: str, request: CallRequest) -> bytes:
        body, _ = self._body(request)
        line = {"custom_id": key, "method": "POST", "url": ENDPOINT, "body": body}
        return json.dumps(line, ensure_ascii=False).encode() + b"\n"

    async def submit(self, lines: list[bytes]) -> str:
        client = self.backend.client()
        upload = await sdk_call(
            self.backend, lambda: client.files.create(file=("batch.jsonl", b"".join(lines)), purpose="batch")
        )
        batch = await sdk_call(
            self.backend,
            lambda: client.batches.create(input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h"),
        )
        return batch.id

    async def poll(self, batch_id: str) -> BatchState:
        client = self.backend.client()
        batch = await sdk_call(self.backend, lambda: client.batches.retrieve(batch_id))
        counts = batch.request_counts.model_dump() if batch.request_counts else {}
        return BatchState(batch.status, batch.status in _ENDED, counts)

    async def results(self, batch_id: str, requests: dict[str, CallRequest]) -> list[BatchItem]:
        client = self.backend.client()
        batch = await sdk_call(self.backend, lambda: client.batches.retrieve(batch_id))
        if batch.status == "failed":  # the input was refused as a whole: sending it again would fail again
            errors = batch.errors.data if batch.errors and batch.errors.data else []
            why = "; ".join(self.backend.scrub(e.message or e.code or "") for e in errors) or "no reason given"
            err = ProviderError("bad_request", f"{self.backend.who}: batch {batch_id} failed validation: {why}")
            return [BatchItem(key, error=err, outcome="errored") for key in requests]
        items: list[BatchItem] = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                content = await sdk_call(self.backend, lambda f=file_id: client.files.content(f))
                items += [self._item(json.loads(x), requests) for x in content.text.splitlines() if x.strip()]
        return items

    def _item(self, line: dict[str, Any], requests: dict[str, CallRequest]) -> BatchItem:
        key = str(line.get("custom_id"))
        error = line.get("error") or {}
        response = line.get("response") or {}
        if error and not response:  # the request never ran: the batch expired or was cancelled first
            code = str(error.get("code", ""))
            return BatchItem(key, outcome=CANCELED if "cancel" in code else EXPIRED)
        status = int(response.get("status_code") or 0)
        if status != 200:
            err = self.backend.status_error(status, None, body_message(response.get("body")))
            return BatchItem(key, error=err, outcome="errored")
        request = requests.get(key)
        if request is None:  # a request of this batch that another run already collected
            return BatchItem(key, outcome="succeeded")
        try:
            completion = self._completion(response.get("body"), self._body(request)[1], response.get("request_id"))
        except ProviderError as err:
            return BatchItem(key, error=err, outcome="errored")
        return BatchItem(key, completion)

    def _completion(self, body: Any, mode: str, request_id: str | None) -> Completion:
        try:
            out = ChatCompletion.model_validate(body)
        except (ValueError, TypeError, openai.OpenAIError) as exc:
            raise self.backend.malformed(f"{type(exc).__name__} while reading a batch result") from None
        return self.backend.read_completion(out, mode, request_id)

    async def cancel(self, batch_id: str) -> None:
        client = self.backend.client()
        await sdk_call(self.backend, lambda: client.batches.cancel(batch_id))
