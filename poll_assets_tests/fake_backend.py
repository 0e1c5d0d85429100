"""An in-process ChatBackend for tests of the call pipeline, and the policy to call it under.

Run as a module it becomes a worker process (`python -m poll_assets_tests.fake_backend ...`)
used by the cache tests to kill a run mid-batch and to write one cache from several processes.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from poll_assets.llm.base import CallRequest, ChatBackend, Completion, GenerationParams
from poll_assets.llm.online.policy import CallPolicy, RetryPolicy

# What a script returns for (request text, attempt number): None = answer normally,
# an exception = raise it, a float = stall that many seconds first.
Script = Callable[[str, int], "BaseException | float | None"]
# What the backend answers, when the default echo will not do (e.g. verdicts shaped by a schema).
Answer = Callable[[CallRequest], Completion]


# Retries a test waits for take milliseconds, not seconds.
FAST_RETRY = RetryPolicy(base_s=0.001, cap_s=0.01)


class FakeBackend(ChatBackend):
    provider = "fake"

    def __init__(
        self,
        model: str = "fake-1",
        member: str = "fake_member",
        latency_s: float = 0.0,
        script: Script | None = None,
        prefix: str = "answer to",
        usage: tuple[int, int] | None = None,
        answer: Answer | None = None,
    ) -> None:
        self.model = model
        self.member = member
        self.latency_s = latency_s
        self.script = script
        self.prefix = prefix
        self.usage = usage  # (input, output) tokens to report instead of word counts
        self.answer = answer
        self.attempts: Counter[str] = Counter()  # per prompt text
        self.starts: list[float] = []  # monotonic time each attempt started
        self.order: list[str] = []  # prompt texts in the order attempts started
        self.in_flight = 0
        self.peak_in_flight = 0

    @property
    def total_calls(self) -> int:
        return sum(self.attempts.values())

    async def complete(self, request: CallRequest) -> Completion:
        text = request.messages[-1][1]
        self.attempts[text] += 1
        self.starts.append(time.monotonic())
        self.order.append(text)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            else:
                await asyncio.sleep(0)  # still yield, like any real network call
            action = self.script(text, self.attempts[text]) if self.script else None
            if isinstance(action, BaseException):
                raise action
            if isinstance(action, (int, float)):
                await asyncio.sleep(action)
            if self.answer is not None:
                return self.answer(request)
            answer = f"{self.prefix} {text}"
            tokens_in, tokens_out = self.usage or (len(text.split()) + 3, len(answer.split()))
            return Completion(
                text=answer,
                finish_reason="stop",
                input_tokens=tokens_in,
                output_tokens=tokens_out,
                latency_s=self.latency_s,
                model=self.model,
                request_id=f"req-{self.total_calls}",
            )
        finally:
            self.in_flight -= 1


def with_policy(backend: ChatBackend, **fields: Any) -> tuple[ChatBackend, CallPolicy]:
    """`run_calls`' first two arguments: the backend and a policy (fast retries unless `retry` is
    given, and no retry window unless `retry_window_s` is: `max_retries` alone says when to give up)."""
    fields.setdefault("retry", FAST_RETRY)
    fields.setdefault("retry_window_s", 0.0)
    return backend, CallPolicy(**fields)


def make_requests(n: int, tag: str = "q", max_new_tokens: int = 16) -> list[CallRequest]:
    params = GenerationParams(max_new_tokens=max_new_tokens)
    return [CallRequest.build([{"role": "user", "content": f"{tag}{i}"}], params) for i in range(n)]


def _worker() -> None:
    from poll_assets.llm.cache.response_cache import ResponseCache
    from poll_assets.llm.online.runner import run_calls

    ap = argparse.ArgumentParser()
    ap.add_argument("db")
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--tag", default="q")
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--concurrency", type=int, default=1)
    args = ap.parse_args()
    backend = FakeBackend(latency_s=args.latency)
    policy = CallPolicy(max_concurrency=args.concurrency)
    batch = asyncio.run(run_calls(backend, policy, make_requests(args.n, args.tag), ResponseCache(args.db)))
    print(f"ok {sum(c.ok for c in batch.completions)} calls {backend.total_calls}")


if __name__ == "__main__":
    _worker()
