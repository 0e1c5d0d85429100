"""A member's `batch:` setting, and the batch policy resolved from it and its provider's registry row.

Kept apart from the batch transport so the panel model can import it without the runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from poll_assets.llm.providers.registry import BATCH_PROVIDERS, provider_spec

OnError = Literal["retry", "online"]


class BatchSettings(BaseModel):
    """A member's `batch:` as written in the panel file. Off unless `enabled`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=False, description="Send this member's calls through its provider's batch API.")
    poll_interval_s: float = Field(default=30.0, gt=0, description="First wait between status checks; grows 1.5x per unchanged check.")
    max_poll_interval_s: float = Field(default=300.0, gt=0, description="The longest wait between status checks.")
    # How long one step waits before it fails; the batches stay recorded and a relaunch resumes them.
    max_wait_s: float = Field(default=24 * 3600.0, gt=0, description="How long one step waits before it fails; the batches stay recorded and a relaunch resumes them.")
    # Requests that errored or expired: a new batch (up to limits.max_retries times), or online calls.
    on_error: OnError = Field(default="retry", description="Requests that errored or expired: retry (a new batch, up to limits.max_retries times) or online.")
    # openai_compatible only: the member's server implements OpenAI's /v1/files and /v1/batches.
    server_has_batches: bool = Field(default=False, description="openai_compatible only: the server implements OpenAI's /v1/files and /v1/batches (vLLM, LiteLLM).")
    # Lower than the provider's limits per batch, e.g. to see results of a huge shard sooner.
    max_requests: int | None = Field(default=None, ge=1, description="Fewer requests per batch than the provider allows.")
    max_bytes: int | None = Field(default=None, ge=1024, description="Fewer bytes per batch than the provider allows.")

    def refusal(self, member: str, provider: str) -> str | None:
        """Why this member cannot run in batch mode, or None when it can (or does not ask to)."""
        if not self.enabled:
            return None
        api = provider_spec(provider).batch
        if api is None:
            return (
                f"member {member!r} asks for batch mode, but provider {provider!r} has no batch API; "
                f"providers with one: {', '.join(BATCH_PROVIDERS)}"
                " (openai_compatible only with batch.server_has_batches: true)"
            )
        if api.needs_declaration and not self.server_has_batches:
            return (
                f"member {member!r} asks for batch mode on provider {provider!r}: set batch.server_has_batches: true "
                "if its server implements /v1/files and /v1/batches (vLLM, LiteLLM), else turn batch mode off"
            )
        return None


@dataclass(frozen=True)
class BatchPolicy:
    """How one member's batches are sized, polled and recovered."""

    wire: Literal["openai", "anthropic"]
    max_requests: int
    max_bytes: int
    poll_interval_s: float = 30.0
    max_poll_interval_s: float = 300.0
    max_wait_s: float = 24 * 3600.0
    on_error: OnError = "retry"
    backoff: float = 1.5  # each unchanged status check waits this much longer, up to the cap

    @classmethod
    def resolve(cls, settings: BatchSettings, provider: str) -> "BatchPolicy":
        api = provider_spec(provider).batch
        if api is None:
            raise ValueError(f"provider {provider!r} has no batch API; providers with one: {list(BATCH_PROVIDERS)}")
        return cls(
            wire=api.wire,
            max_requests=min(settings.max_requests or api.max_requests, api.max_requests),
            max_bytes=min(settings.max_bytes or api.max_bytes, api.max_bytes),
            poll_interval_s=settings.poll_interval_s,
            max_poll_interval_s=max(settings.max_poll_interval_s, settings.poll_interval_s),
            max_wait_s=settings.max_wait_s,
            on_error=settings.on_error,
        )

    def next_interval(self, current: float) -> float:
        return min(current * self.backoff, self.max_poll_interval_s)
