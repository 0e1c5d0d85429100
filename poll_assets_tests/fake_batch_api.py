"""The batch endpoints of the loopback server: OpenAI's `/v1/files` + `/v1/batches` and Anthropic's
`/v1/messages/batches`, answering each request with the fake server's own online answer.

* OpenAI: `POST /v1/files` (multipart upload), `GET /v1/files/{id}/content`, `POST /v1/batches`,
  `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`; results in an output and an error file.
* Anthropic: `POST /v1/messages/batches`, `GET /v1/messages/batches/{id}`, `POST .../{id}/cancel`,
  `GET .../{id}/results` (JSONL).

Any path prefix before `/v1` is allowed, as on the online routes. A batch ends `processing_s` after
it was created. `error_fraction` of the requests fail (HTTP `error_status`) the first time they are
submitted; the next `expire_batches` batches end expired with only `expire_keep` of their requests
answered; the next `flaky_reads` GETs (or `flaky_downloads` result downloads) answer 503. `submissions` counts, per custom_id and per request body, how often a request was
submitted: the counter that proves a resumed run sends nothing twice.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

from poll_assets_tests.fake_llm_server import CREATED, canonical_hash

if TYPE_CHECKING:
    from poll_assets_tests.fake_llm_server import FakeLLMServer

_PATH = re.compile(r"^(?P<tag>.*?)/v1/(?P<what>files|batches|messages/batches)(?:/(?P<id>[^/]+))?(?:/(?P<action>[a-z]+))?$")


@dataclass
class BatchConfig:
    processing_s: float = 0.0
    error_fraction: float = 0.0  # of requests, on their first submission only (a transient failure)
    error_status: int = 500
    expire_batches: int = 0  # the next N batches created end expired
    expire_keep: float = 0.5  # the share of an expiring batch's requests answered before it expired
    flaky_reads: int = 0  # the next N GETs (status, results, file content) answer 503
    flaky_downloads: int = 0  # the next N result downloads (Anthropic results, OpenAI file content) answer 503
    invalid_batches: int = 0  # the next N OpenAI batches fail validation (status "failed", no results)


@dataclass
class _Batch:
    id: str
    wire: str  # "openai" | "anthropic"
    tag: str
    requests: list[tuple[str, dict[str, Any]]]  # (custom_id, request body)
    created: float
    failing: frozenset[str]  # custom_ids that fail this time
    expires: bool
    invalid: bool = False
    input_file_id: str = ""
    cancelled: bool = False
    results: list[tuple[str, str, dict[str, Any] | None]] | None = None  # (custom_id, outcome, body)
    files: dict[str, str] = field(default_factory=dict)  # "output"/"error" -> file id


class FakeBatchAPI:
    """Batch state and counters of one `FakeLLMServer`; `route()` is its hook into the server's routes."""

    def __init__(self, server: FakeLLMServer) -> None:
        self.server = server
        self._lock = threading.Lock()
        self.reset()

    def reset(self, **config: Any) -> None:
        with self._lock:
            self.config = BatchConfig(**config)
            self.files: dict[str, bytes] = {}
            self.batches: dict[str, _Batch] = {}
            self.submissions: Counter[str] = Counter()  # custom_id -> times submitted
            self.by_body: Counter[str] = Counter()  # request body hash -> times submitted
            self.calls: Counter[str] = Counter()  # endpoint -> requests received
            self._ids = itertools.count(1)

    def configure(self, **changes: Any) -> None:
        known = {f.name for f in fields(BatchConfig)}
        if set(changes) - known:
            raise TypeError(f"unknown batch settings {sorted(set(changes) - known)}; known: {sorted(known)}")
        with self._lock:
            for k, v in changes.items():
                setattr(self.config, k, v)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "batches": len(self.batches),
                "submitted_requests": sum(self.submissions.values()),
                "max_submissions": max(self.submissions.values(), default=0),
                "max_body_submissions": max(self.by_body.values(), default=0),
                "calls": dict(self.calls),
            }

    def route(self) -> BaseRoute:
        return _BatchRoute(self)

    # -- dispatch -------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        m = _PATH.match(request.url.path)
        assert m is not None  # the route only matches batch paths
        tag, what, bid, action = m["tag"].strip("/"), m["what"], m["id"], m["action"]
        with self._lock:
            self.calls[f"{request.method} {what}{'/{id}' if bid else ''}{'/' + action if action else ''}"] += 1
        expected = self.server.config.expected_key
        presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or request.headers.get("x-api-key", "")
        if expected is not None and presented != expected:
            return _error(what, 401, "invalid API key")
        download = request.method == "GET" and (action == "results" or (what == "files" and action == "content"))
        if request.method == "GET" and (self._flaky("flaky_reads") or (download and self._flaky("flaky_downloads"))):
            return _error(what, 503, "overloaded, try again")
        if what == "files":
            if request.method == "POST" and bid is None:
                return await self._upload(request)
            return self._file_content(bid or "")
        if request.method == "POST" and bid is None:
            return await self._create(request, what, tag)
        batch = self.batches.get(bid or "")
        if batch is None:
            return _error(what, 404, f"no batch {bid}")
        if action == "cancel":
            batch.cancelled = True
        if action == "results":
            return Response(self._anthropic_results(batch), media_type="application/binary")
        return JSONResponse(self._view(batch, str(request.base_url).rstrip("/")))

    def _flaky(self, knob: str) -> bool:
        with self._lock:
            flaky = getattr(self.config, knob) > 0
            setattr(self.config, knob, getattr(self.config, knob) - flaky)
        return flaky

    async def _upload(self, request: Request) -> Response:
        raw = await request.body()
        head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
        data = next(p.get_payload(decode=True) for p in message.iter_parts() if p.get_param("name", header="content-disposition") == "file")
        file_id = self._store_file(data)
        return JSONResponse({"id": file_id, "object": "file", "bytes": len(data), "created_at": CREATED,
                             "filename": "batch.jsonl", "purpose": "batch", "status": "processed"})

    def _store_file(self, data: bytes) -> str:
        with self._lock:
            file_id = f"file-{next(self._ids):06d}"
            self.files[file_id] = data
        return file_id

    def _file_content(self, file_id: str) -> Response:
        if file_id not in self.files:
            return _error("files", 404, f"no file {file_id}")
        return Response(self.files[file_id], media_type="application/octet-stream")

    async def _create(self, request: Request, what: str, tag: str) -> Response:
        body = await request.json()
        if what == "batches":
            data = self.files.get(body.get("input_file_id", ""))
            if data is None:
                return _error(what, 400, "unknown input_file_id")
            lines = [json.loads(x) for x in data.decode().splitlines() if x.strip()]
            reqs = [(x["custom_id"], x["body"]) for x in lines]
            wire = "openai"
        else:
            reqs = [(x["custom_id"], x["params"]) for x in body.get("requests", [])]
            wire = "anthropic"
        batch = self._new_batch(wire, tag, reqs, body.get("input_file_id", ""))
        return JSONResponse(self._view(batch, str(request.base_url).rstrip("/")))

    def _new_batch(self, wire: str, tag: str, reqs: list[tuple[str, dict[str, Any]]], input_file: str) -> _Batch:
        cfg = self.config
        with self._lock:
            failing = set()
            for custom_id, params in reqs:
                self.submissions[custom_id] += 1
                self.by_body[canonical_hash(params)] += 1
                first = self.submissions[custom_id] == 1
                if first and _draw(canonical_hash(params)) < cfg.error_fraction:
                    failing.add(custom_id)
            expires = cfg.expire_batches > 0
            cfg.expire_batches -= expires
            invalid = wire == "openai" and cfg.invalid_batches > 0
            cfg.invalid_batches -= invalid
            prefix = "batch_" if wire == "openai" else "msgbatch_"
            batch = _Batch(f"{prefix}{next(self._ids):06d}", wire, tag, reqs, time.monotonic(), frozenset(failing),
                           expires, invalid, input_file)
            self.batches[batch.id] = batch
        return batch

    # -- processing -----------------------------------------------------------------------------

    def _ended(self, batch: _Batch) -> bool:
        return batch.cancelled or time.monotonic() - batch.created >= self.config.processing_s

    def _finish(self, batch: _Batch) -> list[tuple[str, str, dict[str, Any] | None]]:
        """Each request's outcome, decided once when the batch ends: succeeded, errored, expired, canceled."""
        if batch.results is not None:
            return batch.results
        keep = int(len(batch.requests) * self.config.expire_keep) if batch.expires else len(batch.requests)
        out: list[tuple[str, str, dict[str, Any] | None]] = []
        for i, (custom_id, params) in enumerate(batch.requests):
            if batch.cancelled:
                out.append((custom_id, "canceled", None))
            elif i >= keep:
                out.append((custom_id, "expired", None))
            elif custom_id in batch.failing:
                out.append((custom_id, "errored", None))
            else:
                out.append((custom_id, "succeeded", self._answer(batch.wire, params, i)))
        batch.results = out
        if batch.wire == "openai":
            self._write_openai_files(batch)
        return out

    def _answer(self, wire: str, params: dict[str, Any], number: int) -> dict[str, Any]:
        """The online route's answer to the same body (so batch and online answers agree)."""
        digest = canonical_hash(params)
        rng = random.Random(int(digest[:16], 16))
        answer = self.server._chat if wire == "openai" else self.server._messages
        payload, _ = answer(params, digest, number, rng)
        return payload

    def _write_openai_files(self, batch: _Batch) -> None:
        ok, bad = [], []
        for n, (custom_id, outcome, body) in enumerate(batch.results or []):
            line: dict[str, Any] = {"id": f"batch_req_{batch.id}_{n}", "custom_id": custom_id, "error": None}
            if outcome == "succeeded":
                line["response"] = {"status_code": 200, "request_id": f"req_{batch.id}_{n}", "body": body}
                ok.append(line)
            elif outcome == "errored":
                status = self.config.error_status
                line["response"] = {"status_code": status, "request_id": f"req_{batch.id}_{n}",
                                    "body": {"error": {"message": f"fake batch error {status}", "type": "server_error"}}}
                bad.append(line)
            else:
                line["response"] = None
                line["error"] = {"code": f"batch_{'cancelled' if outcome == 'canceled' else 'expired'}",
                                 "message": f"this request {outcome} before it was processed"}
                bad.append(line)
        for name, lines in (("output", ok), ("error", bad)):
            if lines:
                batch.files[name] = self._store_file("".join(json.dumps(x) + "\n" for x in lines).encode())

    def _anthropic_results(self, batch: _Batch) -> bytes:
        lines = []
        for custom_id, outcome, body in self._finish(batch):
            if outcome == "succeeded":
                result: dict[str, Any] = {"type": "succeeded", "message": body}
            elif outcome == "errored":
                result = {"type": "errored", "error": {"type": "error", "error": {
                    "type": "api_error" if self.config.error_status >= 500 else "invalid_request_error",
                    "message": f"fake batch error {self.config.error_status}"}}}
            else:
                result = {"type": outcome}
            lines.append(json.dumps({"custom_id": custom_id, "result": result}) + "\n")
        return "".join(lines).encode()

    # -- the batch objects as each API shows them -------------------------------------------------

    def _view(self, batch: _Batch, base: str) -> dict[str, Any]:
        ended = self._ended(batch)
        outcomes = Counter(o for _, o, _ in self._finish(batch)) if ended else Counter()
        created = datetime.fromtimestamp(CREATED, UTC).isoformat().replace("+00:00", "Z")
        if batch.wire == "anthropic":
            counts = {k: outcomes[k] for k in ("succeeded", "errored", "canceled", "expired")}
            return {
                "id": batch.id, "type": "message_batch",
                "processing_status": "ended" if ended else ("canceling" if batch.cancelled else "in_progress"),
                "request_counts": {"processing": 0 if ended else len(batch.requests), **counts},
                "created_at": created, "expires_at": created, "ended_at": created if ended else None,
                "cancel_initiated_at": created if batch.cancelled else None, "archived_at": None,
                "results_url": f"{base}/{batch.tag + '/' if batch.tag else ''}v1/messages/batches/{batch.id}/results"
                if ended else None,
            }
        status = "in_progress"
        if ended:
            status = "cancelled" if batch.cancelled else "expired" if batch.expires else "completed"
        if batch.invalid:
            return {**self._openai_view(batch, "failed", Counter()), "output_file_id": None, "error_file_id": None,
                    "errors": {"object": "list", "data": [{"code": "invalid_json_line", "message": "line 1 is not valid"}]}}
        return self._openai_view(batch, status, outcomes)

    def _openai_view(self, batch: _Batch, status: str, outcomes: Counter[str]) -> dict[str, Any]:
        ended = status != "in_progress"
        return {
            "id": batch.id, "object": "batch", "endpoint": "/v1/chat/completions", "completion_window": "24h",
            "input_file_id": batch.input_file_id, "status": status, "created_at": CREATED, "errors": None,
            "output_file_id": batch.files.get("output"), "error_file_id": batch.files.get("error"),
            "request_counts": {"total": len(batch.requests), "completed": outcomes["succeeded"],
                               "failed": len(batch.requests) - outcomes["succeeded"] if ended else 0},
        }


def _draw(body_hash: str) -> float:
    """A fixed number in [0, 1) per request body, so which requests fail depends neither on their
    order nor on the server's port (which is part of the custom_id, a cache key)."""
    return int(body_hash[:8], 16) / 16**8


def _error(what: str, status: int, message: str) -> Response:
    if what == "messages/batches":
        return JSONResponse({"type": "error", "error": {"type": "api_error", "message": message}}, status_code=status)
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)


class _BatchRoute(BaseRoute):
    """Matches only the batch paths, so the server's catch-all online route keeps everything else."""

    def __init__(self, api: FakeBatchAPI) -> None:
        self.api = api

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and _PATH.match(scope["path"]):
            return Match.FULL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.api.handle(Request(scope, receive))
        await response(scope, receive, send)
