"""LLM clients as Dagster resources: one resource per panel member, one class per provider."""

from __future__ import annotations

import importlib
import os
from typing import ClassVar

import dagster as dg
from pydantic import Field, PrivateAttr

from poll_assets.llm.base import ChatBackend
from poll_assets.llm.local import LocalLlamaBackend
from poll_assets.panel import Member


class MissingAPIKeyError(RuntimeError):
    """A panel member needs a key and its environment variable is unset or empty."""

    def __init__(self, member: str, provider: str, env_var: str):
        super().__init__(
            f"panel member {member!r} (provider {provider!r}) needs an API key: environment variable "
            f"{env_var} is not set or empty. Put `{env_var}=...` in the project's .env file (read by "
            f"`dagster dev`) or export it, or point the member at another variable with `api_key_env`."
        )
        self.member = member
        self.env_var = env_var


class LLMResource(dg.ConfigurableResource):
    """Settings shared by every provider. The backend (the SDK client) is created once and reused."""

    provider: ClassVar[str] = ""
    member: str
    model: str
    base_url: str | None = None
    max_concurrency: int = 8
    rpm: int | None = None
    tpm: int | None = None
    timeout_s: float = 120.0
    max_retries: int = 5

    _backend: ChatBackend | None = PrivateAttr(default=None)

    def _make_backend(self) -> ChatBackend:
        raise NotImplementedError

    def backend(self) -> ChatBackend:
        if self._backend is None:
            self._backend = self._make_backend()
        return self._backend


class LocalLlamaResource(LLMResource):
    """A GGUF model run in-process by llama-cpp-python (default: the bundled SmolLM2-135M)."""

    provider: ClassVar[str] = "local"
    model_path: str | None = None
    n_ctx: int = 4096

    def _make_backend(self) -> ChatBackend:
        return LocalLlamaBackend(self.model, self.model_path, self.n_ctx)


class RemoteLLMResource(LLMResource):
    """A provider reached over HTTP with an API key read from the environment (through dg.EnvVar)."""

    api_key: str | None = Field(default=None, repr=False)  # resolved secret: kept out of repr/str
    api_key_env: str | None = None  # the variable's name, for error messages (never the value)
    key_required: ClassVar[bool] = True

    def _key_value(self) -> str | None:
        # Inside a run Dagster has already resolved the EnvVar; a resource used directly (scripts,
        # tests) still holds the EnvVar itself, which must be read explicitly.
        if isinstance(self.api_key, dg.EnvVar):
            return self.api_key.get_value() or None
        return self.api_key or None

    def _checked_key(self) -> str | None:
        key = self._key_value()
        if self.key_required and not key:
            raise MissingAPIKeyError(self.member, self.provider, self.api_key_env or "<api_key_env>")
        return key

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Fail when the run initialises the resource, before any asset starts calling.
        self._checked_key()

    def _backend_kwargs(self) -> dict[str, object]:
        return {
            "base_url": self.base_url,
            "api_key": self._checked_key(),
            "key_env": self.api_key_env,
            "member": self.member,
        }


class OpenAIResource(RemoteLLMResource):
    """OpenAI's API (or Azure OpenAI's v1 endpoint through `base_url`)."""

    provider: ClassVar[str] = "openai"

    def _make_backend(self) -> ChatBackend:
        from poll_assets.llm.openai_api import OpenAIChatBackend

        return OpenAIChatBackend(self.model, provider=self.provider, **self._backend_kwargs())


class OpenAICompatibleResource(RemoteLLMResource):
    """Any server speaking OpenAI's chat completions (vLLM, TGI, Ollama, llama.cpp server, LiteLLM)."""

    provider: ClassVar[str] = "openai_compatible"
    key_required: ClassVar[bool] = False  # self-hosted servers often run without a key

    def _checked_key(self) -> str | None:
        key = self._key_value()
        if self.api_key_env and not key:
            # The member named a variable, so it meant to send a key: a missing one is an error.
            raise MissingAPIKeyError(self.member, self.provider, self.api_key_env)
        return key

    def _make_backend(self) -> ChatBackend:
        from poll_assets.llm.openai_api import OpenAIChatBackend

        if not self.base_url:
            raise ValueError(f"panel member {self.member!r}: provider 'openai_compatible' needs a base_url")
        return OpenAIChatBackend(self.model, provider=self.provider, **self._backend_kwargs())


class AnthropicResource(RemoteLLMResource):
    """Anthropic's Messages API."""

    provider: ClassVar[str] = "anthropic"

    def _make_backend(self) -> ChatBackend:
        from poll_assets.llm.anthropic_api import AnthropicChatBackend

        return AnthropicChatBackend(self.model, **self._backend_kwargs())


class HFInferenceResource(RemoteLLMResource):
    """Hugging Face inference: a Hub model id (serverless), or an Inference Endpoint / TGI URL in base_url."""

    provider: ClassVar[str] = "hf_inference"

    def _make_backend(self) -> ChatBackend:
        from poll_assets.llm.hf_inference import HFInferenceBackend

        return HFInferenceBackend(self.model, **self._backend_kwargs())


RESOURCE_CLASSES: dict[str, type[LLMResource]] = {
    "local": LocalLlamaResource,
    "openai": OpenAIResource,
    "openai_compatible": OpenAICompatibleResource,
    "anthropic": AnthropicResource,
    "hf_inference": HFInferenceResource,
}


# The SDK module behind each remote provider. Imported when the panel's resources are built (at
# definitions load), not at the first call: `import anthropic` alone takes 2-4 s of CPU here, and paid
# inside a stage it stalls every other member's calls on the same event loop.
BACKEND_MODULES: dict[str, str] = {
    "openai": "poll_assets.llm.openai_api",
    "openai_compatible": "poll_assets.llm.openai_api",
    "anthropic": "poll_assets.llm.anthropic_api",
    "hf_inference": "poll_assets.llm.hf_inference",
}


def resource_key(member: Member) -> str:
    return f"llm_{member.name}"


def build_llm_resource(member: Member) -> LLMResource:
    """The resource for one panel member; keys come from the environment through EnvVar."""
    cls = RESOURCE_CLASSES[member.provider]
    if member.provider in BACKEND_MODULES:
        importlib.import_module(BACKEND_MODULES[member.provider])
    kwargs: dict[str, object] = {
        "member": member.name,
        "model": member.model,
        "base_url": member.base_url,
        "max_concurrency": member.limits.max_concurrency,
        "rpm": member.limits.rpm,
        "tpm": member.limits.tpm,
        "timeout_s": member.limits.timeout_s,
        "max_retries": member.limits.max_retries,
    }
    if member.provider == "local":
        kwargs.update(model_path=member.model_path, n_ctx=member.n_ctx)
    elif member.key_env:
        kwargs["api_key_env"] = member.key_env
        # Dagster resolves an unset EnvVar into a config error at run launch that names the resource
        # key but not the member, and with a long stack trace. So the EnvVar is passed only when the
        # variable is set here; otherwise api_key stays None and setup_for_execution raises
        # MissingAPIKeyError naming the variable and the member. Definitions are loaded again in the
        # run worker, so this check sees the environment the run actually has.
        if os.environ.get(member.key_env):
            kwargs["api_key"] = dg.EnvVar(member.key_env)
    return cls(**kwargs)
