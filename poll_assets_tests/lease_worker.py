"""A process that asks for keys through the cache's lease, for test_lease.py.

    python -m poll_assets_tests.lease_worker DB CALL_LOG KEY[,KEY...] [--call-s S] [--ttl-s S] [--hang] [--url URL]

Each "call" appends its key to CALL_LOG (one line, O_APPEND, so several processes can share it)
and sleeps, or with --url posts a chat completion for the key to that (fake) server over HTTP;
with --hang it never returns, for a claimant to be killed mid-call. Prints one line per key: `key text`.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from poll_assets.llm.base import Completion
from poll_assets.llm.cache.response_cache import ResponseCache, claim_or_wait


async def _ask(cache: ResponseCache, key: str, log: str, call_s: float, ttl_s: float, hang: bool,
               url: str | None) -> Completion:
    async def call() -> Completion:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{key} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
        if url:
            return await _http_call(url, key)
        await asyncio.sleep(3600 if hang else call_s)
        return Completion(text=f"answer to {key} from {os.getpid()}", finish_reason="stop")

    return await claim_or_wait(cache, key, call, "fake", "m", ttl_s=ttl_s, poll_s=0.05)


async def _http_call(url: str, key: str) -> Completion:
    import httpx

    body = {"model": "m", "messages": [{"role": "user", "content": key}], "max_tokens": 8}
    async with httpx.AsyncClient(timeout=30) as client:
        reply = await client.post(f"{url}/v1/chat/completions", json=body)
    reply.raise_for_status()
    return Completion(text=reply.json()["choices"][0]["message"]["content"], finish_reason="stop")


async def _main(args: argparse.Namespace) -> None:
    cache = ResponseCache(args.db)
    keys = args.keys.split(",")
    answers = await asyncio.gather(*(_ask(cache, k, args.log, args.call_s, args.ttl_s, args.hang, args.url) for k in keys))
    cache.flush()
    for key, answer in zip(keys, answers):
        print(key, answer.text, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("log")
    parser.add_argument("keys")
    parser.add_argument("--call-s", type=float, default=0.05)
    parser.add_argument("--ttl-s", type=float, default=30.0)
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--url")
    asyncio.run(_main(parser.parse_args()))
