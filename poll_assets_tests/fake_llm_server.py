"""A loopback server that speaks the wire formats of the real providers, for tests and benchmarks.

Routes (any path prefix is allowed before `/v1`, and is the "tag" a test uses to aim failures at one
member, e.g. base_url `http://127.0.0.1:P/judge_a/v1`):

* `POST [/tag]/v1/chat/completions` - OpenAI chat completions, also what the HF client and TGI use
  (`response_format` json_schema, TGI grammar `{"type": "json"|"json_object", "value": schema}`, usage).
* `POST [/tag]/v1/messages` - Anthropic Messages (system, forced tool use, usage).
* `GET [/tag]/v1/models` - the model list (OpenAI's or Anthropic's shape, by the headers), when the
  config's `models` names them; 404 otherwise, like a server that cannot list. Counted apart
  (`model_lists`), not as calls.
* `GET [/tag]/v1/models/{id}` - one model: a listed id or an alias (`aliases`, served but never
  listed, as real APIs do), else a 404 naming the id; without `models` (or with `model_route`
  False) a route-level 404/405 that names nothing. Counted in `model_gets`.
* `GET /_stats`, `POST /_config`, `POST /_reset` - control for a server running in another process.

Fault modes (FakeConfig): injected 429/500/timeouts/malformed bodies by fraction or script; a
concurrency cap (`max_concurrent`: 429 with Retry-After above N in flight, and x-ratelimit-* /
anthropic-ratelimit-* headers on every reply); an outage window (`outage_from_request`, `outage_s`,
or `start_outage()`); Anthropic 200s without the tool_use block (`omit_tool_use`); chat 200s that
ignore response_format and answer in prose (`ignore_response_format`) or decline in
`message.refusal` (`model_refusal`); a llama.cpp-like server that answers json_schema with HTTP 500
and accepts json_object with a schema (`llama_cpp`).
`requests_for(body)` and `stats()["by_body"]` count how often each distinct request arrived.

Answers are deterministic: derived from a hash of the request body. Structured answers are generated
from the requested JSON schema, so they validate whatever the schema's field names are.

Run standalone: `python -m poll_assets_tests.fake_llm_server --port 8765 --latency-ms 500 --jitter-ms 100`.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import functools
import hashlib
import json
import random
import socket
import threading
import time
import urllib.parse
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from poll_assets.llm.base import CACHE_BREAK

WORDS = (
    "answer clear concise data detail example fact first helpful idea instruction list method model note "
    "option point question reason result step summary task test topic useful value view way word yes"
).split()
CREATED = 1_700_000_000  # fixed, so bodies are reproducible


@dataclass
class FakeConfig:
    """Behaviour knobs. Fractions are drawn per request from a seeded RNG (reproducible order-wise)."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_limit_fraction: float = 0.0
    retry_after_s: float = 1.0
    server_error_fraction: float = 0.0
    timeout_fraction: float = 0.0
    hang_s: float = 30.0  # how long a "timeout" request hangs (ends early if the client goes away)
    malformed_fraction: float = 0.0  # 200 with a body that is not JSON
    truncated_fraction: float = 0.0  # 200 with the JSON body cut in half
    forced_status: dict[str, int] = field(default_factory=dict)  # tag -> status for every request
    expected_key: str | None = None  # when set, any other key gets 401 (with the key echoed back)
    reject_response_format: list[str] = field(default_factory=list)  # tags that refuse structured output
    served_model_suffix: str = ""  # reported model = requested model + suffix
    models: list[str] | None = None  # what GET /v1/models lists; None = the route is missing (404)
    # What GET /v1/models/{id} resolves beyond the listed ids, alias -> listed id (Anthropic's
    # `claude-3-5-haiku-latest`, Ollama's `llama3.1` for `llama3.1:latest`): served, never listed.
    aliases: dict[str, str] = field(default_factory=dict)
    # Whether GET /v1/models/{id} exists (when `models` is set); False answers it as a server without
    # the route does (vLLM, FastAPI: 404 {"detail": "Not Found"}), or 405 with `model_route_status`.
    model_route: bool = True
    model_route_status: int = 404
    # A provider's concurrency limit: above this many requests in flight, 429 with Retry-After; every
    # reply carries OpenAI's x-ratelimit-* and Anthropic's anthropic-ratelimit-* headers. 0 = no cap.
    max_concurrent: int = 0
    # An outage: from request number `outage_from_request` (1-based, 0 = never), every request
    # for `outage_s` seconds gets `outage_status` (503 by default).
    outage_from_request: int = 0
    outage_s: float = 0.0
    outage_status: int = 503
    # An outage with connections refused: at request number `refuse_from_request` (1-based, 0 =
    # never) the server stops listening for `refuse_s` seconds (open connections are closed, new
    # ones refused), then listens again on the same port. That request is still answered.
    refuse_from_request: int = 0
    refuse_s: float = 0.0
    omit_tool_use: list[str] = field(default_factory=list)  # tags whose Anthropic 200s answer in prose, no tool_use
    # Tags that behave like llama-cpp-python's server: `response_format` json_schema is refused with
    # an HTTP 500 validation message; json_object with a `schema` is accepted.
    llama_cpp: list[str] = field(default_factory=list)
    # Tags whose chat 200s ignore `response_format` and answer a structured request in prose.
    ignore_response_format: list[str] = field(default_factory=list)
    # Tags whose chat 200s to a structured request decline in `message.refusal`, with no content.
    model_refusal: list[str] = field(default_factory=list)
    # Tags whose first structured answer (a request with no assistant turn: not a repair re-ask) hits the
    # token limit: its JSON cut in half, finish_reason "length" (Anthropic: stop_reason "max_tokens",
    # the cut JSON in a text block and no tool_use).
    cut_answers: list[str] = field(default_factory=list)
    # Context windows by tag, in this server's tokens: a longer prompt plus max_tokens is refused with
    # 400 "maximum context length", as vLLM and OpenAI do, before any work.
    context_tokens: dict[str, int] = field(default_factory=dict)
    # Tags whose plain-text answers are this many words long, whatever max_tokens says (long generations).
    long_answers: dict[str, int] = field(default_factory=dict)
    # How usage counts tokens: "words" (whitespace split) or "gguf" (the bundled SmolLM2's real tokenizer,
    # and the structured-output schema or tool definitions billed as input, as providers do).
    tokenizer: str = "words"
    # Prompt caching as the providers do it: a chat prompt's prefix up to CACHE_BREAK (OpenAI's automatic
    # caching) or an Anthropic prefix up to its last cache_control block, seen before and at least this
    # many tokens long, is reported as cached (prompt_tokens_details.cached_tokens, cache_read_input_tokens);
    # the first Anthropic sight of it as cache_creation_input_tokens.
    prompt_cache: bool = True
    prompt_cache_min_tokens: int = 0
    seed: int = 0


def canonical_hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# -- deterministic content ------------------------------------------------------------------------------


def value_for_schema(schema: dict[str, Any], rng: random.Random, root: dict[str, Any] | None = None) -> Any:
    """Some value valid for `schema` (the subset structured-output APIs accept)."""
    root = root if root is not None else schema
    if "$ref" in schema:
        ref = schema["$ref"]
        node: Any = root
        for part in ref.lstrip("#/").split("/"):
            if part:
                node = node[part]
        return value_for_schema(node, rng, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    for combo in ("anyOf", "oneOf"):
        if combo in schema:
            options = [s for s in schema[combo] if s.get("type") != "null"] or schema[combo]
            return value_for_schema(rng.choice(options), rng, root)
    if "allOf" in schema:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            merged.update(part)
        return value_for_schema(merged, rng, root)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties", {})
        return {name: value_for_schema(sub, rng, root) for name, sub in props.items()}
    if kind == "array":
        lo = int(schema.get("minItems", 1))
        hi = int(schema.get("maxItems", max(lo, 3)))
        n = rng.randint(lo, max(lo, hi))
        prefix = schema.get("prefixItems", [])
        items = schema.get("items", {})
        out = [value_for_schema(prefix[i], rng, root) for i in range(min(n, len(prefix)))]
        out += [value_for_schema(items if isinstance(items, dict) else {}, rng, root) for _ in range(n - len(out))]
        return out
    if kind == "integer":
        lo = schema.get("minimum", schema["exclusiveMinimum"] + 1 if "exclusiveMinimum" in schema else 0)
        hi = schema.get("maximum", schema["exclusiveMaximum"] - 1 if "exclusiveMaximum" in schema else lo + 10)
        return rng.randint(int(lo), int(hi))
    if kind == "number":
        lo = float(schema.get("minimum", schema.get("exclusiveMinimum", 0.0)))
        hi = float(schema.get("maximum", schema.get("exclusiveMaximum", lo + 1.0)))
        return round(rng.uniform(lo, hi), 3) if hi > lo else lo
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    # string
    lo = int(schema.get("minLength", 1))
    hi = int(schema.get("maxLength", max(lo, 80)))
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
    while len(text) < lo:
        text += " " + rng.choice(WORDS)
    return text[:hi]


def verdict_prose(value: Any) -> str:
    """What a judge writes when it ignores the structure it was asked for: for verdicts keyed
    text_1..text_n, the rubric's own text blocks; for anything else, the JSON after a lead-in."""
    keys = sorted(value, key=lambda k: int(k.rsplit("_", 1)[1])) if isinstance(value, dict) and value and all(
        str(k).startswith("text_") and str(k).rsplit("_", 1)[1].isdigit() and isinstance(v, dict) for k, v in value.items()
    ) else None
    if not keys:
        return f"Here is my assessment: {json.dumps(value)}"
    blocks = ["I will rate each text in turn."]
    for key in keys:
        verdict = value[key]
        lines = [f"#### Output for Text {key.rsplit('_', 1)[1]}"]
        if "type" in verdict:
            lines.append(f"Type: {', '.join(map(str, verdict['type'])) or 'None'}")
        rating = verdict.get("rating")
        lines += [f"Rating: {'N/A' if rating is None else rating}", f"Rationale: {verdict.get('rationale', '')}"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def text_for(rng: random.Random, max_tokens: int, stop: list[str]) -> tuple[str, str]:
    """A deterministic reply of at most `max_tokens` words, and the finish reason."""
    wanted = rng.randint(8, 40)
    n = min(wanted, max(1, max_tokens))
    text = " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."
    for s in stop:
        if s and s in text:
            return text[: text.index(s)], "stop"
    return text, "length" if wanted > n else "stop"


def count_tokens(*texts: str) -> int:
    return sum(len(t.split()) for t in texts if t)


@functools.lru_cache(maxsize=1)
def _gguf_vocab() -> Any:
    """The bundled SmolLM2's tokenizer alone (no weights): a real BPE, unrelated to the estimator's rule."""
    from llama_cpp import Llama

    from poll_assets.llm.providers.local import bundled_model_path

    vocab = Llama(model_path=str(bundled_model_path()), vocab_only=True, verbose=False)
    atexit.register(vocab.close)  # before interpreter shutdown, when its __del__ can no longer close it
    return vocab


def count_gguf_tokens(*texts: str, special: bool = False) -> int:
    vocab = _gguf_vocab()
    return sum(len(vocab.tokenize(t.encode("utf-8"), add_bos=False, special=special)) for t in texts if t)


def chatml(messages: list[dict[str, Any]]) -> str:
    """Messages in SmolLM2's chat template (ChatML), ending with the assistant's turn opened."""
    turns = [f"<|im_start|>{m.get('role', 'user')}\n" + "\n".join(t for t, _ in _block_texts(m.get("content", "")))
             + "<|im_end|>\n" for m in messages]
    return "".join(turns) + "<|im_start|>assistant\n"


def _block_texts(content: Any) -> list[tuple[str, bool]]:
    """(text, carries a cache breakpoint) for a message's content: a string, or Anthropic's blocks."""
    if isinstance(content, str):
        return [(content, False)]
    if isinstance(content, list):
        return [(str(b.get("text", "")) if b.get("type") == "text" else json.dumps(b), "cache_control" in b)
                for b in content if isinstance(b, dict)]
    return [(json.dumps(content), False)]


def _first_ask(messages: list[Any]) -> bool:
    """A conversation with no assistant turn yet: a first ask, not a re-ask that quotes an answer."""
    return not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)


def fmt_schema(body: dict[str, Any]) -> Any:
    """The JSON schema a chat request's response_format carries, if any (OpenAI, TGI or llama.cpp form)."""
    fmt = body.get("response_format") or {}
    return (fmt.get("json_schema") or {}).get("schema") or fmt.get("value") or fmt.get("schema")


# -- the server -----------------------------------------------------------------------------------------


class FakeLLMServer:
    """The app, its counters and config. `start()` runs uvicorn on a background thread."""

    def __init__(self, config: FakeConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        self.config = config or FakeConfig()
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._rng = random.Random(self.config.seed)
        self._script: deque[str] = deque()
        self._reset_counts()
        from poll_assets_tests.fake_batch_api import FakeBatchAPI  # it builds on this module's answers

        self.batches = FakeBatchAPI(self)  # OpenAI's /v1/files + /v1/batches, Anthropic's /v1/messages/batches
        self.app = Starlette(
            routes=[
                self.batches.route(),
                Route("/_stats", self._stats_endpoint, methods=["GET"]),
                Route("/_config", self._config_endpoint, methods=["POST"]),
                Route("/_reset", self._reset_endpoint, methods=["POST"]),
                Route("/{path:path}", self._dispatch, methods=["POST"]),
                Route("/{path:path}", self._list_models, methods=["GET"]),
            ]
        )
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- test-facing control ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _reset_counts(self) -> None:
        self.total = 0
        self.by_path: Counter[str] = Counter()
        self.by_tag: Counter[str] = Counter()
        self.by_body: Counter[str] = Counter()
        self.prompt_prefixes: set[str] = set()  # prompt-cache entries (hashes of cached prefixes)
        self.outcomes: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.model_lists: Counter[str] = Counter()  # GET /v1/models per tag
        self.model_gets: Counter[str] = Counter()  # GET /v1/models/{id} per tag
        self.over_cap = 0  # requests refused with 429 by max_concurrent
        self.refused_s: list[float] = []  # the connection-refused outages, as long as they really were
        self.answered_by_body: Counter[str] = Counter()  # 200s sent, per distinct body: what a provider bills
        self.over_context: Counter[str] = Counter()  # 400s for a prompt over context_tokens, per distinct body
        self._outage_until = 0.0
        self.bodies: deque[dict[str, Any]] = deque(maxlen=20_000)

    def reset(self, **config: Any) -> None:
        """Forget counts and scripted outcomes; start again from a default config updated with `config`.
        An outage of connections still under way (a test that failed early) is waited out first, so
        the next test finds the server listening."""
        outage = getattr(self, "_outage_thread", None)
        if outage is not None and outage.is_alive():
            outage.join()
        with self._lock:
            self._reset_counts()
            self._script.clear()
            self.config = FakeConfig(**config)
            self._rng = random.Random(self.config.seed)

    def configure(self, **changes: Any) -> None:
        known = {f.name for f in fields(FakeConfig)}
        unknown = set(changes) - known
        if unknown:
            raise TypeError(f"unknown fake server settings {sorted(unknown)}; known: {sorted(known)}")
        with self._lock:
            for k, v in changes.items():
                setattr(self.config, k, v)

    def script(self, *outcomes: str) -> None:
        """Force the next requests' outcomes in order: 'ok', '429', '500', '503', 'timeout', 'malformed', 'truncated'."""
        with self._lock:
            self._script.extend(outcomes)

    def start_outage(self, seconds: float) -> None:
        """Answer every request with `outage_status` for the next `seconds`, from now."""
        with self._lock:
            self._outage_until = time.monotonic() + seconds

    def refuse_connections(self, seconds: float) -> threading.Thread:
        """Stop listening for `seconds` (connections refused, open ones closed), then listen again on
        the same port; the counters and the config carry over. Returns the thread doing it."""

        def outage() -> None:
            began = time.monotonic()
            self.stop()
            time.sleep(max(0.0, seconds - (time.monotonic() - began)))
            self.start()
            with self._lock:
                self.refused_s.append(time.monotonic() - began)

        thread = threading.Thread(target=outage, name="fake-llm-outage", daemon=True)
        thread.start()
        self._outage_thread = thread
        return thread

    def requests_for(self, body: dict[str, Any]) -> int:
        """How many times a request with exactly this JSON body was received (its per-request-key count)."""
        with self._lock:
            return self.by_body[canonical_hash(body)]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total": self.total,
                "by_path": dict(self.by_path),
                "by_tag": dict(self.by_tag),
                "by_body": dict(self.by_body),
                "outcomes": dict(self.outcomes),
                "max_in_flight": self.max_in_flight,
                "over_cap": self.over_cap,
                "max_repeats": max(self.by_body.values(), default=0),
                "model_lists": dict(self.model_lists),
                "model_gets": dict(self.model_gets),
                "refused_s": list(self.refused_s),
                "max_answers_per_body": max(self.answered_by_body.values(), default=0),
                "over_context": sum(self.over_context.values()),
                "max_over_context_per_body": max(self.over_context.values(), default=0),
            }

    def start(self) -> "FakeLLMServer":
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            backlog=4096,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fake-llm-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"fake LLM server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "FakeLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control endpoints --------------------------------------------------------------------------

    async def _stats_endpoint(self, request: Request) -> Response:
        return JSONResponse({**self.stats(), "config": asdict(self.config)})

    async def _config_endpoint(self, request: Request) -> Response:
        try:
            self.configure(**await request.json())
        except (TypeError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(asdict(self.config))

    async def _reset_endpoint(self, request: Request) -> Response:
        raw = await request.body()
        self.reset(**(json.loads(raw) if raw else {}))
        return JSONResponse(asdict(self.config))

    # -- the provider routes ------------------------------------------------------------------------

    async def _dispatch(self, request: Request) -> Response:
        path = "/" + request.path_params["path"]
        if path.endswith("/v1/chat/completions"):
            kind = "chat"
        elif path.endswith("/v1/messages"):
            kind = "messages"
        else:
            return JSONResponse({"error": {"message": f"no route {path}", "type": "not_found"}}, status_code=404)
        tag = path[: path.rindex("/v1/")].strip("/")
        if "v1" in tag.split("/"):  # e.g. an Anthropic base_url ending in /v1: the SDK adds its own
            return JSONResponse({"error": {"message": f"no route {path}", "type": "not_found"}}, status_code=404)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        digest = canonical_hash(body) if body is not None else hashlib.sha256(raw).hexdigest()
        with self._lock:
            self.total += 1
            number = self.total
            self.by_path[path] += 1
            self.by_tag[tag] += 1
            self.by_body[digest] += 1
            if body is not None:
                self.bodies.append({"path": path, "tag": tag, "body": body})
            cfg = self.config
            if cfg.refuse_from_request and number == cfg.refuse_from_request:
                self.refuse_connections(cfg.refuse_s)
            refused = self._refusal(number)
            if refused is None:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                outcome = self._draw_outcome()
            delay = max(0.0, cfg.latency_ms + self._rng.uniform(-cfg.jitter_ms, cfg.jitter_ms)) / 1000.0
            limits = self._limit_headers()
        if refused is not None:
            with self._lock:
                self.outcomes[refused] += 1
            if refused == "over_cap":
                headers = {**limits, "retry-after": f"{cfg.retry_after_s:g}"}
                return self._error(kind, tag, 429, f"too many concurrent requests (limit {cfg.max_concurrent})", headers)
            return self._error(kind, tag, cfg.outage_status, "service unavailable (outage)")
        try:
            response = await self._respond(request, kind, tag, body, digest, number, outcome, delay)
        finally:
            with self._lock:
                self.in_flight -= 1
        response.headers.update(limits)
        with self._lock:
            self.outcomes[str(response.status_code) if outcome == "ok" else outcome] += 1
            self.answered_by_body[digest] += response.status_code == 200
        return response

    async def _list_models(self, request: Request) -> Response:
        path = "/" + request.path_params["path"]
        if "/v1/models/" in path:
            return self._one_model(request, path)
        if not path.endswith("/v1/models"):
            return JSONResponse({"error": {"message": f"no route {path}", "type": "not_found"}}, status_code=404)
        tag = path[: path.rindex("/v1/")].strip("/")
        kind = "messages" if request.headers.get("anthropic-version") else "chat"
        with self._lock:
            self.model_lists[tag] += 1
            cfg = self.config
        presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        presented = presented or request.headers.get("x-api-key", "")
        if cfg.expected_key is not None and presented != cfg.expected_key:
            return self._error(kind, tag, 401, f"Incorrect API key provided: {presented}")
        if cfg.models is None:
            return self._error(kind, tag, 404, f"no route {path}")
        if kind == "messages":
            data = [{"id": m, "type": "model", "display_name": m, "created_at": "2024-01-01T00:00:00Z"} for m in cfg.models]
            return JSONResponse({"data": data, "has_more": False, "first_id": None, "last_id": None})
        data = [{"id": m, "object": "model", "created": CREATED, "owned_by": "fake"} for m in cfg.models]
        return JSONResponse({"object": "list", "data": data})

    def _one_model(self, request: Request, path: str) -> Response:
        """GET /v1/models/{id}: the model (an alias resolved to its listed id), or a 404 naming the id."""
        at = path.index("/v1/models/")
        tag, model = path[:at].strip("/"), urllib.parse.unquote(path[at + len("/v1/models/"):])
        kind = "messages" if request.headers.get("anthropic-version") else "chat"
        with self._lock:
            self.model_gets[tag] += 1
            cfg = self.config
        presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        presented = presented or request.headers.get("x-api-key", "")
        if cfg.expected_key is not None and presented != cfg.expected_key:
            return self._error(kind, tag, 401, f"Incorrect API key provided: {presented}")
        if cfg.models is None or not cfg.model_route:
            status = 404 if cfg.models is None else cfg.model_route_status
            return JSONResponse({"detail": "Not Found" if status == 404 else "Method Not Allowed"}, status_code=status)
        served = model if model in cfg.models else cfg.aliases.get(model)
        if served is None:
            if kind == "messages":
                return self._error(kind, tag, 404, f"model: {model}")
            payload = {"error": {"message": f"The model `{model}` does not exist or you do not have access to it.",
                                 "type": "invalid_request_error", "param": None, "code": "model_not_found"}}
            return JSONResponse(payload, status_code=404)
        if kind == "messages":
            return JSONResponse({"id": served, "type": "model", "display_name": served,
                                 "created_at": "2024-01-01T00:00:00Z"})
        return JSONResponse({"id": served, "object": "model", "created": CREATED, "owned_by": "fake"})

    def _refusal(self, number: int) -> str | None:
        """'outage' or 'over_cap' when the request is refused before any work (lock held)."""
        cfg = self.config
        now = time.monotonic()
        if cfg.outage_from_request and number == cfg.outage_from_request:
            self._outage_until = now + cfg.outage_s
        if now < self._outage_until:
            return "outage"
        if cfg.max_concurrent and self.in_flight >= cfg.max_concurrent:
            self.over_cap += 1
            return "over_cap"
        return None

    def _limit_headers(self) -> dict[str, str]:
        """The rate-limit headers real providers send, reflecting the concurrency cap (lock held)."""
        cap = self.config.max_concurrent
        if not cap:
            return {}
        left = str(max(0, cap - self.in_flight))
        return {
            "x-ratelimit-limit-requests": str(cap),
            "x-ratelimit-remaining-requests": left,
            "x-ratelimit-reset-requests": f"{self.config.retry_after_s:g}s",
            "anthropic-ratelimit-requests-limit": str(cap),
            "anthropic-ratelimit-requests-remaining": left,
        }

    def _draw_outcome(self) -> str:
        if self._script:
            return self._script.popleft()
        cfg = self.config
        r = self._rng.random()
        for name, frac in (
            ("429", cfg.rate_limit_fraction),
            ("500", cfg.server_error_fraction),
            ("timeout", cfg.timeout_fraction),
            ("malformed", cfg.malformed_fraction),
            ("truncated", cfg.truncated_fraction),
        ):
            if r < frac:
                return name
            r -= frac
        return "ok"

    def _error(self, kind: str, tag: str, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        etype = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
        err_type = etype.get(status, "api_error" if status >= 500 else "invalid_request_error")
        if kind == "messages":
            payload: dict[str, Any] = {"type": "error", "error": {"type": err_type, "message": message}}
        elif tag.startswith(("hf", "tgi")):
            payload = {"error": message, "error_type": err_type}  # TGI's shape
        else:
            payload = {"error": {"message": message, "type": err_type, "param": None, "code": None}}
        return JSONResponse(payload, status_code=status, headers=headers)

    async def _respond(
        self,
        request: Request,
        kind: str,
        tag: str,
        body: Any,
        digest: str,
        number: int,
        outcome: str,
        delay: float,
    ) -> Response:
        cfg = self.config
        # Anthropic's SDK (>= 2.0) sends a bearer token too; older clients send x-api-key.
        presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if kind == "messages" and not presented:
            presented = request.headers.get("x-api-key", "")
        # Echoing the presented key back, as a careless proxy might, lets tests prove it gets scrubbed.
        if cfg.expected_key is not None and presented != cfg.expected_key:
            return self._error(kind, tag, 401, f"Incorrect API key provided: {presented}")
        forced = cfg.forced_status.get(tag)
        if forced:
            return self._error(kind, tag, forced, f"forced status {forced} for key {presented}")
        if body is None or not isinstance(body, dict):
            return self._error(kind, tag, 400, "request body is not a JSON object")
        over = self._over_context(body, tag)
        if over is not None:
            with self._lock:
                self.over_context[canonical_hash(body)] += 1
            return self._error(kind, tag, 400, over)
        if delay:
            await asyncio.sleep(delay)
        if outcome == "429":
            return self._error(kind, tag, 429, "rate limit reached", {"retry-after": f"{cfg.retry_after_s:g}"})
        if outcome in ("500", "503"):
            return self._error(kind, tag, int(outcome), f"internal error (key {presented})")
        if outcome == "timeout":
            end = time.monotonic() + cfg.hang_s
            while time.monotonic() < end and not await request.is_disconnected():
                await asyncio.sleep(0.05)
            return Response(status_code=504)
        if kind == "messages":
            # API version 2026-10-21 (what the current SDK sends) has no sampling parameters.
            sampling = sorted(k for k in ("temperature", "top_p", "top_k") if k in body)
            if sampling and request.headers.get("anthropic-version", "") >= "2026-10-21":
                return self._error(kind, tag, 400, f"{sampling[0]}: not supported in this API version")
        if kind == "chat" and body.get("response_format") and tag in cfg.reject_response_format:
            return self._error(kind, tag, 400, "response_format of type json_schema is not supported by this server")
        if kind == "chat" and tag in cfg.llama_cpp and (body.get("response_format") or {}).get("type") == "json_schema":
            return self._error(
                kind, tag, 500,
                "1 validation error for CreateChatCompletionRequest\nresponse_format.type\n"
                "  Input should be 'text' or 'json_object' [type=literal_error, input_value='json_schema']",
            )

        rng = random.Random(int(digest[:16], 16))
        if kind == "chat":
            payload, headers = self._chat(body, digest, number, rng, tag)
        else:
            payload, headers = self._messages(body, digest, number, rng, tag)
        data = json.dumps(payload).encode()
        if outcome == "malformed":
            data = b"<html>upstream hiccup: " + data[:40] + b"</html>"
        elif outcome == "truncated":
            data = data[: len(data) // 2]
        return Response(data, media_type="application/json", headers=headers)

    def _over_context(self, body: dict[str, Any], tag: str) -> str | None:
        """The 400 message for a request longer than the tag's `context_tokens`, else None."""
        limit = self.config.context_tokens.get(tag)
        if not limit:
            return None
        blocks = _block_texts(body.get("system") or "")
        for m in body.get("messages") or []:
            blocks += _block_texts(m.get("content", ""))
        asked = self.count(*(t for t, _ in blocks)) + int(body.get("max_tokens") or 0)
        if asked <= limit:
            return None
        return (f"This model's maximum context length is {limit} tokens. However, you requested {asked} tokens. "
                "Please reduce the length of the messages or completion.")

    def count(self, *texts: str) -> int:
        """Tokens as this server's usage reports them (FakeConfig.tokenizer)."""
        return count_gguf_tokens(*texts) if self.config.tokenizer == "gguf" else count_tokens(*texts)

    def _prefix_seen(self, prefix: str, tokens: int | None = None) -> tuple[bool, int]:
        """(was this prompt prefix cached before, its tokens when cacheable else 0); caches it."""
        size = self.count(prefix) if tokens is None else tokens
        if not self.config.prompt_cache or not prefix or size < max(1, self.config.prompt_cache_min_tokens):
            return False, 0
        digest = hashlib.sha256(prefix.encode()).hexdigest()
        with self._lock:
            seen = digest in self.prompt_prefixes
            self.prompt_prefixes.add(digest)
        return seen, size

    def _model(self, body: dict[str, Any]) -> str:
        return f"{body.get('model') or 'tgi'}{self.config.served_model_suffix}"

    def _chat(
        self, body: dict[str, Any], digest: str, number: int, rng: random.Random, tag: str = ""
    ) -> tuple[dict[str, Any], dict[str, str]]:
        messages = body.get("messages") or []
        prompt = "\n".join(t for m in messages for t, _ in _block_texts(m.get("content", "")))
        prompt_tokens = self.count(*(t for m in messages for t, _ in _block_texts(m.get("content", ""))))
        if self.config.tokenizer == "gguf":  # as a llama.cpp server counts: the prompt in its chat template
            prompt_tokens = count_gguf_tokens(chatml(messages), special=True)
        if self.config.tokenizer == "gguf" and fmt_schema(body) is not None:  # providers bill the schema too
            prompt_tokens += self.count(json.dumps(fmt_schema(body)))
        cut = prompt.find(f"\n{CACHE_BREAK}\n")
        seen, size = self._prefix_seen(prompt[:cut]) if cut > 0 else (False, 0)
        cached_tokens = size if seen else 0  # OpenAI reports reads only
        fmt = body.get("response_format") or {}
        schema = None
        if fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
        elif fmt.get("type") in ("json", "json_object") and isinstance(fmt.get("value"), dict):
            schema = fmt["value"]  # TGI's grammar
        elif fmt.get("type") == "json_object" and isinstance(fmt.get("schema"), dict):
            schema = fmt["schema"]  # llama.cpp's servers
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
        refusal = None
        if schema is not None and tag in self.config.model_refusal:
            text, refusal, finish = None, "I can't help with rating these texts.", "stop"
        elif schema is not None and tag in self.config.ignore_response_format:
            text, finish = verdict_prose(value_for_schema(schema, rng)), "stop"
        elif schema is not None and tag in self.config.cut_answers and _first_ask(messages):
            text = json.dumps(value_for_schema(schema, rng))
            text, finish = text[: len(text) // 2], "length"
        elif schema is not None:
            text = json.dumps(value_for_schema(schema, rng))
            finish = "stop"
        elif tag in self.config.long_answers:
            text, finish = " ".join(rng.choice(WORDS) for _ in range(self.config.long_answers[tag])), "length"
        else:
            text, finish = text_for(rng, max_tokens, list(body.get("stop") or []))
        completion_tokens = self.count(text or refusal or "")
        payload = {
            "id": f"chatcmpl-{digest[:24]}",
            "object": "chat.completion",
            "created": CREATED,
            "model": self._model(body),
            "system_fingerprint": "fake-llm-server",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, **({"refusal": refusal} if refusal else {})},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens},
            },
        }
        return payload, {"x-request-id": f"req_fake_{number:08d}"}

    def _messages(
        self, body: dict[str, Any], digest: str, number: int, rng: random.Random, tag: str = ""
    ) -> tuple[dict[str, Any], dict[str, str]]:
        blocks = _block_texts(body.get("system") or "")
        for m in body.get("messages") or []:
            blocks += _block_texts(m.get("content", ""))
        input_tokens = self.count(*(t for t, _ in blocks))
        if self.config.tokenizer == "gguf":  # the system and turns in a chat template, and the tools, are billed
            system = [{"role": "system", "content": body["system"]}] if body.get("system") else []
            input_tokens = count_gguf_tokens(chatml(system + list(body.get("messages") or [])), special=True)
            input_tokens += self.count(json.dumps(body["tools"])) if body.get("tools") else 0
        marked = [i for i, (_, mark) in enumerate(blocks) if mark]
        written = read = 0
        if marked:  # Anthropic caches only what the request marks
            prefix_blocks = [t for t, _ in blocks[: marked[-1] + 1]]
            seen, size = self._prefix_seen("\n".join(prefix_blocks), self.count(*prefix_blocks))
            read, written = (size, 0) if seen else (0, size)
            input_tokens -= read + written  # Anthropic's input_tokens leaves the cached part out
        choice = body.get("tool_choice") or {}
        tools = {t.get("name"): t for t in body.get("tools") or []}
        if choice.get("type") == "tool" and choice.get("name") in tools and tag in self.config.omit_tool_use:
            # Paid and answered, but in prose: the JSON is in a text block, and there is no tool_use block.
            value = value_for_schema(tools[choice["name"]].get("input_schema") or {"type": "object"}, rng)
            content = [{"type": "text", "text": verdict_prose(value)}]
            stop_reason = "end_turn"
            output_tokens = self.count(content[0]["text"])
        elif choice.get("type") == "tool" and choice.get("name") in tools and tag in self.config.cut_answers \
                and _first_ask(body.get("messages") or []):
            value = value_for_schema(tools[choice["name"]].get("input_schema") or {"type": "object"}, rng)
            cut = json.dumps(value)
            content = [{"type": "text", "text": cut[: len(cut) // 2]}]
            stop_reason = "max_tokens"
            output_tokens = self.count(content[0]["text"])
        elif choice.get("type") == "tool" and choice.get("name") in tools:
            tool = tools[choice["name"]]
            value = value_for_schema(tool.get("input_schema") or {"type": "object"}, rng)
            content: list[dict[str, Any]] = [
                {"type": "tool_use", "id": f"toolu_{digest[:20]}", "name": tool["name"], "input": value}
            ]
            stop_reason = "tool_use"
            output_tokens = self.count(json.dumps(value))
        else:
            text, finish = text_for(rng, int(body.get("max_tokens") or 256), list(body.get("stop_sequences") or []))
            content = [{"type": "text", "text": text}]
            stop_reason = "max_tokens" if finish == "length" else "end_turn"
            output_tokens = self.count(text)
        payload = {
            "id": f"msg_{digest[:24]}",
            "type": "message",
            "role": "assistant",
            "model": self._model(body),
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                      "cache_creation_input_tokens": written, "cache_read_input_tokens": read},
        }
        return payload, {"request-id": f"req_fake_{number:08d}"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve fake OpenAI / Anthropic / HF-TGI chat endpoints on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--rate-limit-fraction", type=float, default=0.0)
    parser.add_argument("--server-error-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    server = FakeLLMServer(
        FakeConfig(
            latency_ms=args.latency_ms,
            jitter_ms=args.jitter_ms,
            rate_limit_fraction=args.rate_limit_fraction,
            server_error_fraction=args.server_error_fraction,
            seed=args.seed,
        ),
        port=args.port,
    ).start()
    print(f"fake LLM server on {server.url} (stats: GET {server.url}/_stats); Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
