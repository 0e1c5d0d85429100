"""What a provider's batch wire format must provide (`BatchTransport`), what it reports (`BatchState`,
`BatchItem`), and the one wrapper its SDK calls go through. `batch.run_batch_calls` drives a transport;
`batch_openai` and `batch_anthropic` implement one each: both import this module, neither imports the other."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from poll_assets.llm.base import CallRequest, Completion, ProviderError

if TYPE_CHECKING:  # the SDKs' HTTP client is imported only when a batch is sent
    from poll_assets.llm.providers.remote import RemoteBackend

T = TypeVar("T")
# Per-request outcomes a batch reports besides success; the last two are never the request's fault.
EXPIRED, CANCELED = "expired", "canceled"


@dataclass(frozen=True)
class BatchState:
    """A batch as the provider reports it: its status, whether it is over, and requests by status."""

    status: str
    ended: bool
    counts: dict[str, int]


@dataclass(frozen=True)
class BatchItem:
    """One request's result in a finished batch: a completion, or why there is none."""

    key: str
    completion: Completion | None = None
    error: ProviderError | None = None  # None with no completion: the request expired or was cancelled
    outcome: str = "succeeded"


class BatchTransport:
    """One provider's batch wire format. Everything `run_batch_calls` asks of it is declared here."""

    def line(self, key: str, request: CallRequest) -> bytes:
        """The request as the provider's batch input holds it (its size counts toward the batch's)."""
        raise NotImplementedError

    async def submit(self, lines: list[bytes]) -> str:
        """Create a batch of these requests; returns its id. One submission per call, never retried here."""
        raise NotImplementedError

    async def poll(self, batch_id: str) -> BatchState:
        raise NotImplementedError

    async def results(self, batch_id: str, requests: dict[str, CallRequest]) -> list[BatchItem]:
        """Every result of an ended batch (requests without a line are left out)."""
        raise NotImplementedError

    async def cancel(self, batch_id: str) -> None:
        raise NotImplementedError


async def sdk_call(backend: RemoteBackend[Any], call: Callable[[], Awaitable[T]]) -> T:
    """One SDK call of a batch transport, its failures classified (and scrubbed) as an online call's."""
    try:
        return await call()
    except ProviderError:
        raise
    except Exception as exc:  # noqa: BLE001 - every SDK failure is classified
        failure = backend._classify(exc) or ProviderError("other", f"{backend.who}: {type(exc).__name__}")
    failure.__context__ = None  # the SDK's exception may quote a key the server echoed
    raise failure
