"""What the HTTP providers share: timing, error classification and keeping secrets out of messages.

Each provider module only knows how to build its SDK call and read its SDK's response and
exceptions; the classification of a failure into a ProviderError kind lives here so every
provider reports the same kinds with the same wording.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, Generic, TypeVar

import httpx2

from poll_assets.llm.base import (
    TEXT_FALLBACK,
    BackendConfig,
    CallRequest,
    ChatBackend,
    Completion,
    FatalProviderError,
    ProviderError,
)
from poll_assets.llm.redact import safe_url, scrub

ClientT = TypeVar("ClientT")

def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait, from `retry-after-ms`, `retry-after` in seconds, or `retry-after` as an HTTP date."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class JsonFields(dict[str, Any]):
    """A JSON object read with attribute access, as the SDKs' response models offer it
    (`out.choices[0].message.content`), without building those models: reading the body this way
    costs a fraction of the SDK's pydantic construction (see docs/calls.md, "Per-call CPU"). A field
    the body lacks reads as None, as an optional field of the SDK's models does."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # protocols (copy, pickle) must not see None for their hooks
            raise AttributeError(name)
        return self.get(name)


def json_fields(body: bytes) -> Any:
    """A response body parsed into `JsonFields` objects; ValueError when it is not JSON."""
    return json.loads(body, object_hook=JsonFields)


def body_message(body: Any) -> str:
    """The human part of an error body in the usual shapes ({"error": {"message"}}, {"error": "..."}, {"message"})."""
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, Mapping):
            msg = err.get("message") or err.get("type")
            return str(msg) if msg else ""
        if isinstance(err, str):
            return err
        msg = body.get("message")
        return str(msg) if msg else ""
    if isinstance(body, str):
        return body
    return ""


class RemoteBackend(ChatBackend, Generic[ClientT]):
    """Base for SDK-backed providers.

    The SDK client is created lazily and then reused for every call. Connection pools are tied to
    the event loop that opened them, and assets run each stage under its own `asyncio.run`, so a
    client is kept per running loop. `run_calls` brackets each batch with `hold`/`release`; the
    client is closed when the last batch on its loop releases it, so no socket outlives its loop.

    SDK clients are built without a timeout of their own: the attempt timeout is enforced once, by
    the caller (`runner.attempt`), which cancels the call.
    """

    def __init__(
        self,
        model: str,
        *,
        provider: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        key_env: str | None = None,
        member: str | None = None,
    ):
        if provider is not None:  # one class may serve several registry rows (openai, openai_compatible)
            self.provider = provider
        self.model = model
        self.base_url = base_url
        self._api_key = api_key
        self.key_env = key_env
        self.member = member or ""
        self._client: ClientT | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._holders = 0
        self.clients_created = 0
        self.clients_closed = 0
        self._remaining: int | None = None  # what the latest response's rate-limit header said

    @classmethod
    def from_config(cls, config: BackendConfig) -> "RemoteBackend[ClientT]":
        return cls(
            config.model, provider=config.provider, base_url=config.base_url, api_key=config.api_key,
            key_env=config.key_env, member=config.member,
        )

    def __repr__(self) -> str:  # never show the key
        return f"{type(self).__name__}(model={self.model!r}, base_url={safe_url(self.base_url)!r})"

    # -- subclass hooks -------------------------------------------------------------------------

    def _new_client(self) -> ClientT:
        raise NotImplementedError

    async def _call(self, client: ClientT, request: CallRequest) -> Completion:
        raise NotImplementedError

    def _classify(self, exc: BaseException) -> ProviderError | None:
        """Turn an SDK exception into a ProviderError, or None if it is not the SDK's."""
        raise NotImplementedError

    async def _close_client(self, client: ClientT) -> None:
        await client.close()  # type: ignore[attr-defined]

    # -- shared machinery -----------------------------------------------------------------------

    def client(self) -> ClientT:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = self._new_client()
            _listen_for_rate_limits(self._client, self._note_limits)
            self._client_loop = loop
            self.clients_created += 1
        return self._client

    def hold(self) -> None:
        """A batch starts using this backend on the running loop."""
        self._holders += 1

    async def release(self) -> None:
        """A batch is done; the last one on this loop closes the client (and its sockets)."""
        self._holders = max(0, self._holders - 1)
        client, loop = self._client, self._client_loop
        if self._holders or client is None or loop is not asyncio.get_running_loop():
            return
        self._client = None
        self._client_loop = None
        try:
            await self._close_client(client)
        except Exception:  # noqa: BLE001 - a failed close must not fail a batch whose answers are in
            pass
        self.clients_closed += 1

    def remaining_requests(self) -> int | None:
        return self._remaining

    async def _note_limits(self, response: Any) -> None:
        self._remaining = remaining_requests_header(response.headers)

    @property
    def who(self) -> str:
        where = f" at {safe_url(self.base_url)}" if self.base_url else ""
        member = f"member {self.member!r}, " if self.member else ""
        return f"{member}provider {self.provider!r}, model {self.model!r}{where}"

    def scrub(self, text: str) -> str:
        return scrub(text, (self._api_key,))

    async def complete(self, request: CallRequest) -> Completion:
        client = self.client()
        start = time.perf_counter()
        failure: ProviderError | None = None
        try:
            done = await self._call(client, request)
        except ProviderError as exc:
            failure = exc
        except TimeoutError as exc:
            # An SDK's own TimeoutError subclass, which may hide a refused connection; the SDK's
            # classifier knows which. (The attempt deadline cancels the call instead of raising here.)
            failure = self._classify(exc) or ProviderError("timeout", f"{self.who}: the request timed out")
        except Exception as exc:  # noqa: BLE001 - every SDK failure is classified
            failure = self._classify(exc) or ProviderError(
                "other", f"{self.who}: {type(exc).__name__}: {self.scrub(str(exc))}"
            )
        if failure is not None:
            # Raised outside the except block so the SDK exception (whose text may quote a key the
            # server echoed) is neither __cause__ nor __context__ of what callers and Dagster see.
            failure.__context__ = None
            raise failure
        done.latency_s = time.perf_counter() - start
        return done

    def status_error(
        self, status: int, headers: Mapping[str, str] | None, detail: str, *, body_text: str = ""
    ) -> ProviderError:
        """The ProviderError for an HTTP error status. `detail` is the server's message (scrubbed here)."""
        detail = self.scrub(detail or body_text or "")
        suffix = f": {detail}" if detail else ""
        if status in (401, 403):
            key_hint = f" in ${self.key_env}" if self.key_env else ""
            what = "authentication failed" if status == 401 else "permission denied"
            # The server's text is left out: auth errors are where keys get echoed back.
            return FatalProviderError(
                "auth", f"{self.who}: HTTP {status}, {what}; check the API key{key_hint} and its access to this model"
            )
        if status == 404:
            return FatalProviderError(
                "not_found", f"{self.who}: HTTP 404, unknown model or wrong base_url (endpoint not found){suffix}"
            )
        if status == 429:
            retry_after = parse_retry_after(headers)
            wait = f", retry after {retry_after:g}s" if retry_after is not None else ""
            return ProviderError("rate_limit", f"{self.who}: HTTP 429, rate limited{wait}{suffix}", retry_after)
        if status >= 500:
            return ProviderError("server", f"{self.who}: HTTP {status}, server error{suffix}")
        if status == 408:
            return ProviderError("timeout", f"{self.who}: HTTP 408, the server timed out{suffix}")
        return ProviderError("bad_request", f"{self.who}: HTTP {status}, request rejected{suffix}")

    def capability_refusal(self, status: int, detail: str) -> str | None:
        """How a refusal of the structured-output request reads in records, or None if this error is not one."""
        if not mentions_structured_output(status, detail):
            return None
        return f"HTTP {status}, {self.scrub(detail)}"

    def malformed(self, why: str) -> ProviderError:
        return ProviderError("malformed", f"{self.who}: unreadable response ({self.scrub(why)})")

    def connection_error(self, why: str) -> ProviderError:
        return ProviderError("connection", f"{self.who}: connection failed ({self.scrub(why)})")


_REMAINING_HEADERS = ("x-ratelimit-remaining-requests", "anthropic-ratelimit-requests-remaining")


def remaining_requests_header(headers: Mapping[str, str]) -> int | None:
    """The requests a response says are left (OpenAI's or Anthropic's header); None when it says nothing."""
    for name in _REMAINING_HEADERS:
        value = headers.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return None


def _listen_for_rate_limits(client: Any, hook: Callable[[Any], Awaitable[None]]) -> None:
    """Hand every response to `hook` (the backend's, which keeps its rate-limit header). The OpenAI
    and Anthropic SDK clients keep their httpx client in `_client`; other clients are left alone."""
    hooks = getattr(getattr(client, "_client", None), "event_hooks", None)
    if isinstance(hooks, dict) and isinstance(hooks.get("response"), list):
        hooks["response"].append(hook)


# Statuses a server may choose for "I cannot do that structured-output request": llama-cpp-python's
# server answers a response_format it does not know with a 500 carrying a validation message.
# 502-504 are left out: they come from gateways and outages, not from the model server's validation.
_REFUSAL_STATUSES = frozenset({400, 415, 422, 500, 501})
_REFUSAL_WORDS = ("response_format", "json_schema", "json_object", "schema", "grammar", "structured output")


def mentions_structured_output(status: int, detail: str) -> bool:
    """Whether an error answer says the server cannot do the structured-output request we sent (a
    capability refusal, not an outage), whatever status code the server chose for it."""
    if status not in _REFUSAL_STATUSES:
        return False
    low = detail.lower()
    return any(w in low for w in _REFUSAL_WORDS)


def structured_reading(text: str | None, form: str) -> tuple[str, str, str | None]:
    """(text, output_mode, why it fell back) for a 200 answer to a structured request in `form`.

    A paid answer is never thrown away: one that is not JSON (prose, a refusal, nothing at all) is
    kept as text with mode `text_fallback`, and the verdict parser reads it as text.
    """
    if form == "text":
        return text or "", "text", None
    if text is None or not text.strip():
        return text or "", TEXT_FALLBACK, "the answer has no content"
    try:
        json.loads(text)
    except ValueError:
        return text, TEXT_FALLBACK, f"the {form} answer is not valid JSON"
    return text, form, None


RefusalReader = Callable[[BaseException], str | None]


class FormNegotiation:
    """Which structured-output form one member's server takes, learned once per backend.

    Forms are tried in order (e.g. json_schema, then json_object with a schema, then text). A
    capability refusal moves on to the next form at once: the server generated nothing, so it is
    neither a paid call nor an outage, and it is never retried. The form that answered is kept for
    the rest of the run. Until one has answered, calls probe one at a time (per event loop), so a
    batch meets each refusal once rather than once per concurrent slot.
    """

    def __init__(self, forms: Sequence[str]):
        if not forms or forms[-1] != "text":
            raise ValueError(f"structured-output forms must end with 'text', got {list(forms)}")
        self.forms = tuple(forms)
        self.index = 0
        self.settled = False
        self.refusals: Counter[str] = Counter()  # form -> refusals met (not paid, not retried)
        self._probe: asyncio.Lock | None = None
        self._probe_loop: asyncio.AbstractEventLoop | None = None

    @property
    def form(self) -> str:
        return self.forms[self.index]

    @property
    def learned(self) -> str | None:
        """The form settled on after a refusal (or assumed from an earlier run), else None."""
        return self.form if self.settled and self.index > 0 else None

    def assume(self, form: str) -> None:
        """Start at `form`, learned by an earlier run: no refused probe of the forms before it. A
        server that has changed since still refuses onwards from there."""
        if not self.settled and form in self.forms:
            self.index, self.settled = self.forms.index(form), True

    def _probe_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._probe is None or self._probe_loop is not loop:
            self._probe, self._probe_loop = asyncio.Lock(), loop
        return self._probe

    async def run(self, send: Callable[[str], Awaitable[Completion]], refusal: RefusalReader) -> Completion:
        """One call in the negotiated form; `refusal` says why an exception is a capability refusal (or None)."""
        if not self.settled:
            async with self._probe_lock():
                if not self.settled:
                    return await self._walk(send, refusal)
        # Settled: calls go at once. (Calls that queued for the probe leave the lock one by one
        # without sending under it, or a member's first round would be sent one call at a time.)
        return await self._walk(send, refusal)

    async def _walk(self, send: Callable[[str], Awaitable[Completion]], refusal: RefusalReader) -> Completion:
        refused: list[str] = []
        while True:
            form = self.form
            try:
                done = await send(form)
            except Exception as exc:
                why = refusal(exc) if form != "text" else None
                if why is None:
                    raise
                self.refusals[form] += 1
                refused.append(f"{form}: {why}")
                if self.form == form:  # another call may have moved on already
                    self.index += 1
                continue
            self.settled = True
            if refused:
                done.extra["structured_refusals"] = refused
            return done


def schema_name(schema: dict[str, Any], default: str = "response") -> str:
    """A name for the schema as tool/format APIs want it: [A-Za-z0-9_-], at most 64 characters."""
    raw = str(schema.get("title") or default)
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", raw).strip("_") or default
    return name[:64]


def classify_sdk_failure(backend: RemoteBackend[Any], exc: BaseException, sdk: ModuleType) -> ProviderError | None:
    """Failures other than an HTTP status, for the OpenAI and Anthropic SDKs, which raise the same
    exception family (`sdk` is the module: `openai` or `anthropic`). None if `exc` is not one of them."""
    if isinstance(exc, sdk.APITimeoutError):
        # The SDK calls every transport "timeout" a timeout; the aiohttp transport also reports
        # refused and dropped connections that way, which classify_transport sorts out.
        return classify_transport(backend, exc.__cause__) or ProviderError("timeout", f"{backend.who}: the request timed out")
    if isinstance(exc, sdk.APIConnectionError):
        return classify_transport(backend, exc.__cause__) or backend.connection_error(type(exc.__cause__).__name__)
    if isinstance(exc, sdk.APIResponseValidationError | json.JSONDecodeError):
        return backend.malformed(type(exc).__name__)
    if isinstance(exc, httpx2.HTTPError):
        return classify_transport(backend, exc)
    return None


def classify_transport(backend: RemoteBackend[Any], exc: BaseException | None) -> ProviderError | None:
    """httpx failures below the SDK: a body cut short is 'malformed', everything else 'connection'."""
    if _body_cut_short(exc):
        return backend.malformed(f"{type(exc).__name__}: the response body ended early")
    if _connection_failed_under_aiohttp(exc):
        return backend.connection_error(type(exc.__cause__).__name__)
    if isinstance(exc, httpx2.TimeoutException):
        return ProviderError("timeout", f"{backend.who}: the request timed out")
    if isinstance(exc, httpx2.DecodingError):
        return backend.malformed(f"{type(exc).__name__}: the response body could not be decoded")
    if isinstance(exc, httpx2.TransportError):
        return backend.connection_error(type(exc).__name__)
    return None


def _body_cut_short(exc: BaseException | None) -> bool:
    """A response whose body ended before its Content-Length, under either HTTP transport."""
    if isinstance(exc, httpx2.RemoteProtocolError) and "body" in str(exc).lower():
        return True  # httpcore's wording
    # The aiohttp transport reports it as a ReadError caused by aiohttp's ClientPayloadError.
    cause = exc.__cause__ if exc is not None else None
    return isinstance(exc, httpx2.ReadError) and type(cause).__name__ in ("ClientPayloadError", "ContentLengthError")


def _connection_failed_under_aiohttp(exc: BaseException | None) -> bool:
    """The aiohttp transport maps every aiohttp connection error (refused, reset, server gone) to
    httpx's ConnectTimeout; only a real timeout should count as one."""
    cause = exc.__cause__ if exc is not None else None
    if not isinstance(exc, httpx2.ConnectTimeout) or cause is None:
        return False
    return type(cause).__module__.startswith("aiohttp") and "Timeout" not in type(cause).__name__


async def send_negotiated(
    backend: Any,
    request: CallRequest,
    send: Callable[[dict[str, Any], str], Awaitable[Completion]],
    response_format_of: Callable[[str, dict[str, Any]], dict[str, Any] | None],
) -> Completion:
    """One chat-completions call: plain when the request has no JSON schema, else in the first
    structured form the server accepts (`backend.negotiation`, which remembers it; a refusal is
    recognised by `backend._refusal` and moves on to the next form instead of being retried)."""
    kwargs = backend._kwargs(request)
    schema = request.json_schema
    if schema is None:
        return await send(kwargs, "text")

    async def in_form(form: str) -> Completion:
        fmt = response_format_of(form, schema)
        return await send({**kwargs, "response_format": fmt} if fmt else kwargs, form)

    return await backend.negotiation.run(in_form, backend._refusal)
