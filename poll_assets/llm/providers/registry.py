"""The provider registry: everything the project knows about a provider, in one row.

Adding a provider is one `ProviderSpec` row here plus one backend module. The panel validates
members against these rows, the resources build backends from them, the asset graph takes its kind
tags from them and the call policy its in-process parallelism. Backend modules are named, not
imported, so loading the registry loads no SDK.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from poll_assets.llm.base import ChatBackend

# When a member needs a key: always, only when it names a variable (`api_key_env`), or never.
KeyRule = Literal["required", "if_named", "none"]

@dataclass(frozen=True)
class BatchAPI:
    """A provider's batch endpoint: its wire format and how much one batch may hold."""

    wire: Literal["openai", "anthropic"]  # OpenAI's /v1/files + /v1/batches, or Anthropic's /v1/messages/batches
    max_requests: int
    max_bytes: int
    # True when only some servers of this provider have it, so a member must say its server does.
    needs_declaration: bool = False


_OPENAI_BATCH = BatchAPI("openai", max_requests=50_000, max_bytes=200 * 1024 * 1024)
_ANTHROPIC_BATCH = BatchAPI("anthropic", max_requests=100_000, max_bytes=256 * 1024 * 1024)

_OPENAI_PARAMS = frozenset({"temperature", "max_new_tokens", "top_p", "stop", "seed"})


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    backend: str  # "module:Class" of its ChatBackend
    params: frozenset[str]  # generation parameters its API honours; others are refused at load
    kind: str  # Dagster kind tag on the member's asset
    structured_output: str  # how a request with a JSON schema is sent (forms tried in order, when negotiated)
    key_env: str | None = None  # the variable read when a member names none
    key: KeyRule = "required"
    needs_base_url: bool = False
    # Calls that run in this process (not over the network) and how many at a time; None = remote.
    in_process_parallelism: int | None = None
    batch: BatchAPI | None = None  # its batch API (half price, answers within 24 h); None = online only

    @property
    def in_process(self) -> bool:
        return self.in_process_parallelism is not None

    def key_required(self, named: bool) -> bool:
        """Whether a member must have a key, given whether it named its variable."""
        return self.key == "required" or (self.key == "if_named" and named)

    def backend_class(self) -> type[ChatBackend]:
        """The backend class, importing its module (and so the provider's SDK) on first use."""
        module, _, name = self.backend.partition(":")
        return getattr(importlib.import_module(module), name)


PROVIDERS: dict[str, ProviderSpec] = {
    spec.name: spec
    for spec in (
        ProviderSpec(
            name="openai", backend="poll_assets.llm.providers.openai_api:OpenAIChatBackend", params=_OPENAI_PARAMS,
            kind="openai", structured_output="negotiated: json_schema (strict), json_object with a schema, text",
            key_env="OPENAI_API_KEY", batch=_OPENAI_BATCH,
        ),
        ProviderSpec(
            # The anthropic SDK (>= 2.0) sends anthropic-version 2026-10-21, which removed temperature,
            # top_p and top_k from the Messages API (a 400 even at default values); it never had a seed.
            name="anthropic", backend="poll_assets.llm.providers.anthropic_api:AnthropicChatBackend",
            params=frozenset({"max_new_tokens", "stop"}), kind="anthropic",
            structured_output="forced tool call; a reply without the tool_use block is kept as text",
            key_env="ANTHROPIC_API_KEY", batch=_ANTHROPIC_BATCH,
        ),
        ProviderSpec(
            name="hf_inference", backend="poll_assets.llm.providers.hf_inference:HFInferenceBackend", params=_OPENAI_PARAMS,
            kind="huggingface",
            structured_output="negotiated: TGI grammar, json_schema, text for a URL; json_schema, text for the Hub router",
            key_env="HF_TOKEN",
        ),
        ProviderSpec(
            # Self-hosted servers often run without a key: one is sent only when the member names it.
            name="openai_compatible", backend="poll_assets.llm.providers.openai_api:OpenAIChatBackend", params=_OPENAI_PARAMS,
            kind="openai", structured_output="negotiated: json_schema (strict), json_object with a schema, text",
            key="if_named", needs_base_url=True,
            # vLLM and LiteLLM serve /v1/batches, most others do not: the member says whether its server does.
            batch=BatchAPI("openai", max_requests=50_000, max_bytes=200 * 1024 * 1024, needs_declaration=True),
        ),
        ProviderSpec(
            # llama.cpp in-process (xllamacpp), one sequence per model: its calls take turns, since the
            # CPU they share gains nothing from two at once and a batch of two rounds differently.
            name="local", backend="poll_assets.llm.providers.local:LocalLlamaBackend", params=_OPENAI_PARAMS,
            kind="llamacpp", structured_output="llama.cpp grammar (LLGuidance, one-line JSON)", key="none",
            in_process_parallelism=1,
        ),
        ProviderSpec(
            # Answers you already have: a generator reading a column of the prompt source (`source_column`).
            # No call, no parameters, no key, no price; "in process" so no model listing or budget asks for one.
            # max_new_tokens only because every member has one (default 512); it is not used.
            name="dataset", backend="poll_assets.llm.providers.source_column:SourceColumnBackend",
            params=frozenset({"max_new_tokens"}),
            kind="dataset", structured_output="none: never called", key="none", in_process_parallelism=1,
        ),
    )
}

PROVIDER_NAMES: tuple[str, ...] = tuple(PROVIDERS)
BATCH_PROVIDERS: tuple[str, ...] = tuple(name for name, spec in PROVIDERS.items() if spec.batch is not None)


def provider_spec(name: str) -> ProviderSpec:
    try:
        return PROVIDERS[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; known providers: {list(PROVIDER_NAMES)}") from None
