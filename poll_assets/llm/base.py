"""The one call interface every provider implements."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}

OutputMode = Literal["text", "json_schema", "json_object", "tool_use", "grammar", "text_fallback"]
# A structured request whose paid 200 came back without the structured part: kept, and read as text.
TEXT_FALLBACK = "text_fallback"
TEXT_MODES: frozenset[str] = frozenset({"text", TEXT_FALLBACK})
ErrorKind = Literal[
    "auth", "not_found", "bad_request", "rate_limit", "server", "timeout", "connection", "malformed", "other"
]

# The line where a prompt's per-request part starts: prompt builders put everything stable (rubric,
# format) before it, so providers cache that prefix; Anthropic gets a cache breakpoint there.
CACHE_BREAK = "## Material"


def split_at_cache_break(content: str) -> tuple[str, str] | None:
    """(stable prefix, the rest) of a message holding CACHE_BREAK on a line of its own, else None."""
    at = content.find(f"\n{CACHE_BREAK}\n")
    return (content[:at], content[at:]) if at > 0 else None


# Kinds worth another attempt; the rest would fail the same way again.
RETRYABLE_KINDS: frozenset[str] = frozenset({"rate_limit", "server", "timeout", "connection", "malformed"})


@dataclass(frozen=True)
class GenerationParams:
    temperature: float | None = None
    max_new_tokens: int = 512
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def chat_completion_kwargs(self) -> dict[str, Any]:
        """The set parameters under OpenAI's chat-completions names, which TGI and llama.cpp share."""
        kwargs: dict[str, Any] = {"max_tokens": self.max_new_tokens}
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        if self.stop:
            kwargs["stop"] = list(self.stop)
        if self.seed is not None:
            kwargs["seed"] = self.seed
        return kwargs

    def set_fields(self) -> set[str]:
        """Names of the optional parameters a member actually set (used to check provider support)."""
        names = {"max_new_tokens"}
        for name in ("temperature", "top_p", "seed"):
            if getattr(self, name) is not None:
                names.add(name)
        if self.stop:
            names.add("stop")
        return names


@dataclass(frozen=True)
class CallRequest:
    """One chat call. `json_schema`, when set, asks for structured output in that shape."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs, hashable and ordered
    params: GenerationParams
    json_schema: dict[str, Any] | None = None
    sample_index: int = 0  # distinguishes deliberate repeats of the same request

    @classmethod
    def build(
        cls,
        messages: list[Message],
        params: GenerationParams,
        json_schema: dict[str, Any] | None = None,
        sample_index: int = 0,
    ) -> "CallRequest":
        return cls(tuple((m["role"], m["content"]) for m in messages), params, json_schema, sample_index)

    def message_dicts(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class Completion:
    """What every provider returns for one call, successful or not."""

    text: str | None
    finish_reason: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    latency_s: float = 0.0
    model: str | None = None  # as the server reported it
    request_id: str | None = None
    output_mode: str = "text"
    cached: bool = False
    attempts: int = 1
    error: str | None = None
    error_kind: str | None = None
    call_id: str = ""
    # Input tokens the provider served from its prompt cache (OpenAI, Anthropic reads) and wrote to it
    # (Anthropic); both are included in input_tokens, which counts every input token of the call.
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None

    @property
    def structured(self) -> bool:
        """Whether the provider constrained the answer to the requested shape (read it as JSON first)."""
        return self.output_mode not in TEXT_MODES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ProviderError(Exception):
    """A failed call, classified so the retry layer knows what to do with it.

    Messages must never contain a credential: providers build them from status codes, the
    provider name and the model only.
    """

    def __init__(self, kind: ErrorKind, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE_KINDS


class FatalProviderError(ProviderError):
    """An error that makes every further call pointless (bad key, unknown model)."""


@dataclass(frozen=True)
class BackendConfig:
    """What a backend is built from: one member's model, endpoint and (already resolved) key."""

    provider: str
    model: str
    member: str = ""
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    key_env: str | None = None  # the variable's name, for messages (never its value)
    model_path: str | None = None  # in-process providers: the weights file
    n_ctx: int = 4096


class ChatBackend:
    """A provider's client, created once per resource and reused for every call.

    Everything `run_calls` asks of a backend is declared here, with defaults a simple backend keeps.
    """

    provider: str = ""
    model: str = ""
    member: str = ""
    base_url: str | None = None

    @classmethod
    def from_config(cls, config: BackendConfig) -> "ChatBackend":
        """The backend for one member (how the provider registry builds it)."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a BackendConfig")

    async def complete(self, request: CallRequest) -> Completion:
        """Make one call. Raise ProviderError on failure; never retry, and leave the deadline to
        the caller (`runner.attempt` enforces the attempt timeout)."""
        raise NotImplementedError

    def hold(self) -> None:
        """A batch starts using this backend on the running event loop."""

    async def release(self) -> None:
        """A batch on the running loop is done; a backend holding a client per loop may close it."""

    def remaining_requests(self) -> int | None:
        """The requests the provider's latest response said are left (its rate-limit header), which the
        runner's adaptive limits act on after each answer; None when it said nothing."""
        return None

    def learned_form(self) -> str | None:
        """The structured-output form this backend's server took after refusing an earlier one (a fact
        about the server and model, kept across runs in the response cache); None when nothing was learned."""
        return None

    def assume_form(self, form: str) -> None:
        """Start from the structured-output form an earlier run learned for this server and model."""

    @property
    def who(self) -> str:
        """Member, provider and model, for messages (never a credential)."""
        member = f"member {self.member!r}, " if self.member else ""
        return f"{member}provider {self.provider!r}, model {self.model!r}"


@functools.lru_cache(maxsize=256)
def _params_payload(params: GenerationParams) -> dict[str, Any]:
    """The params as `asdict` gives them (the same JSON, so the same keys), built once per distinct
    params: a batch's requests share one, and asdict's deep copy cost 20 µs a request."""
    return {f.name: getattr(params, f.name) for f in fields(params)}


def request_key(provider: str, model: str, base_url: str | None, request: CallRequest) -> str:
    """Stable id of a call: the response-cache key, and the id rows use to point at their call."""
    payload = {
        "provider": provider,
        "model": model,
        "base_url": base_url or "",
        "messages": request.messages,
        "params": _params_payload(request.params),
        "json_schema": request.json_schema,
        "sample_index": request.sample_index,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=list)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
