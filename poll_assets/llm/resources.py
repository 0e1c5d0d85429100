"""LLM clients as Dagster resources: one resource per panel member, one class per provider."""

from __future__ import annotations

from typing import ClassVar

import dagster as dg
from pydantic import PrivateAttr

from poll_assets.llm.base import ChatBackend
from poll_assets.llm.local import LocalLlamaBackend
from poll_assets.panel import Member


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


RESOURCE_CLASSES: dict[str, type[LLMResource]] = {
    "local": LocalLlamaResource,
}


def resource_key(member: Member) -> str:
    return f"llm_{member.name}"


def build_llm_resource(member: Member) -> LLMResource:
    """The resource for one panel member; keys come from the environment through EnvVar."""
    cls = RESOURCE_CLASSES[member.provider]
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
        kwargs["api_key"] = dg.EnvVar(member.key_env)
    return cls(**kwargs)
