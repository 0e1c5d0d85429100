"""The one call path: every LLM call of every asset goes through `run_calls`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from poll_assets.llm.base import CallRequest, Completion, FatalProviderError, ProviderError, request_key
from poll_assets.llm.resources import LLMResource


@dataclass
class CallStats:
    calls: int = 0  # requests actually sent (attempts included)
    cache_hits: int = 0
    failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def cost_usd(self, price: object | None) -> float | None:
        if price is None:
            return None
        return (self.input_tokens * price.input_per_mtok + self.output_tokens * price.output_per_mtok) / 1e6

    def add(self, c: Completion) -> None:
        if c.cached:
            self.cache_hits += 1
        else:
            self.calls += c.attempts
            self.input_tokens += c.input_tokens
            self.output_tokens += c.output_tokens
        if not c.ok:
            self.failures += 1


@dataclass
class CallBatch:
    completions: list[Completion]
    stats: CallStats = field(default_factory=CallStats)

    @property
    def all_failed(self) -> bool:
        return bool(self.completions) and all(not c.ok for c in self.completions)

    def failure_message(self, label: str) -> str:
        return f"{label}: all {len(self.completions)} calls failed; first error: {self.completions[0].error}"


async def _one(llm: LLMResource, request: CallRequest, sem: asyncio.Semaphore) -> Completion:
    backend = llm.backend()
    call_id = request_key(llm.provider, llm.model, llm.base_url, request)
    async with sem:
        try:
            done = await backend.complete(request, llm.timeout_s)
        except FatalProviderError:
            raise
        except ProviderError as exc:
            done = Completion(text=None, error=str(exc), error_kind=exc.kind, model=llm.model)
    done.call_id = call_id
    return done


async def run_calls(
    llm: LLMResource,
    requests: Sequence[CallRequest],
    cache: object | None = None,
    progress: Callable[[str], None] | None = None,
    label: str = "",
) -> CallBatch:
    """Run the requests concurrently within the member's limits; one Completion per request, in order."""
    sem = asyncio.Semaphore(llm.max_concurrency)
    start = time.perf_counter()
    completions = await asyncio.gather(*(_one(llm, r, sem) for r in requests))
    batch = CallBatch(list(completions))
    for c in batch.completions:
        batch.stats.add(c)
    if progress:
        progress(f"{llm.member}: {len(requests)} calls in {time.perf_counter() - start:.1f}s, {batch.stats.failures} failed")
    return batch
