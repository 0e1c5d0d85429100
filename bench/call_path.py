"""Our own CPU per call on the one call path (`run_calls`), cold and warm, per provider SDK.

Not a test. A loopback fake server (latency 0) runs in a child process, so this process's CPU
(`time.process_time`: every thread, the cache's writer and lease threads included) is the call
path's alone. For each provider: N judge-sized requests against a fresh response cache (cold: every
call sent, claimed and stored), then the same requests again (warm: every call served from the
cache), then, for comparison, the same N calls from a bare aiohttp client in the provider's wire
format (the floor no SDK or cache can beat).

    PYTHONPATH=$PWD .venv/bin/python bench/call_path.py --n 5000 [--providers openai,anthropic] [--profile]

`--profile` adds cProfile's top functions (by own time) of each cold and warm run; the profiler's
own overhead inflates the µs/call of those runs, so read the figures of a run without it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from poll_assets.llm.base import BackendConfig, CallRequest, ChatBackend, GenerationParams
from poll_assets.llm.cache.response_cache import ResponseCache
from poll_assets.llm.online.runner import CallPolicy, run_calls
from poll_assets.llm.providers.registry import provider_spec

CONCURRENCY = 64
PROVIDERS = ("openai", "anthropic", "hf_inference")
# A judge-sized prompt: an instruction and four answers, about 2,500 characters.
FILLER = " ".join(f"word{i % 97}" for i in range(400))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int) -> subprocess.Popen[bytes]:
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen([sys.executable, "-m", "poll_assets_tests.fake_llm_server", "--port", str(port)],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    proc.stdout.readline()  # "fake LLM server on ..." once it listens
    return proc


def base_url(server: str, provider: str) -> str:
    if provider == "anthropic":
        return f"{server}/{provider}_m"  # the SDK appends /v1/messages
    if provider == "hf_inference":
        return f"{server}/hf_{provider}_m/v1"
    return f"{server}/{provider}_m/v1"


def backend_for(provider: str, server: str) -> ChatBackend:
    config = BackendConfig(provider=provider, model=f"{provider}-model", member=f"{provider}_m",
                           base_url=base_url(server, provider), api_key="bench-key")
    return provider_spec(provider).backend_class().from_config(config)


def requests_for(n: int, salt: str) -> list[CallRequest]:
    params = GenerationParams(max_new_tokens=64)
    return [CallRequest.build([{"role": "user", "content": f"{salt} prompt {i}: {FILLER}"}], params) for i in range(n)]


def measure(label: str, run: Callable[[], Awaitable[Any]], n: int, profile: bool) -> dict[str, Any]:
    """µs of process CPU and of wall time per call for one `asyncio.run(run())`."""
    profiler = cProfile.Profile() if profile else None
    wall, cpu = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.enable()
    result = asyncio.run(run())
    if profiler is not None:
        profiler.disable()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    row = {"run": label, "calls": n, "cpu_us_per_call": round(cpu / n * 1e6, 1),
           "wall_us_per_call": round(wall / n * 1e6, 1), "result": result}
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
        row["profile"] = out.getvalue()
    return row


async def bare_client(provider: str, server: str, requests: list[CallRequest]) -> int:
    """The same calls from one aiohttp session, `CONCURRENCY` in flight: no SDK, cache or retries."""
    import aiohttp

    base = base_url(server, provider)
    url = f"{base}/v1/messages" if provider == "anthropic" else f"{base}/chat/completions"
    headers = ({"x-api-key": "k", "anthropic-version": "2023-06-01"} if provider == "anthropic"
               else {"authorization": "Bearer k"})
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(session: aiohttp.ClientSession, r: CallRequest) -> str:
        body = {"model": "m", "max_tokens": r.params.max_new_tokens, "messages": r.message_dicts()}
        async with gate, session.post(url, json=body, headers=headers) as resp:
            data = await resp.json()
        return data["content"][0]["text"] if provider == "anthropic" else data["choices"][0]["message"]["content"]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        answers = await asyncio.gather(*(one(session, r) for r in requests))
    return len(answers)


def one_provider(provider: str, server: str, n: int, profile: bool, work: Path) -> list[dict[str, Any]]:
    requests = requests_for(n, f"{provider}-{time.time_ns()}")
    policy = CallPolicy(max_concurrency=CONCURRENCY)
    path = work / f"{provider}.sqlite"
    rows = []
    for label in ("cold", "warm"):
        cache = ResponseCache(path)  # a new cache object each time, as a new run opens one
        backend = backend_for(provider, server)

        async def run() -> dict[str, int]:
            batch = await run_calls(backend, policy, requests, cache)
            return {"sent": batch.stats.calls, "cache_hits": batch.stats.cache_hits, "failures": batch.stats.failures}

        rows.append(measure(f"{provider} {label}", run, n, profile))
        cache.close()
    rows.append(measure(f"{provider} bare aiohttp", lambda: bare_client(provider, server, requests), n, False))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    port = free_port()
    server = start_server(port)
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="call-path-") as work:
            for provider in args.providers.split(","):
                for row in one_provider(provider, f"http://127.0.0.1:{port}", args.n, args.profile, Path(work)):
                    rows.append(row)
                    print(f"{row['run']:<28} {row['cpu_us_per_call']:>8.1f} µs CPU/call {row['wall_us_per_call']:>8.1f} "
                          f"µs wall/call  {row['result']}", flush=True)
                    if "profile" in row:
                        print(row["profile"], flush=True)
    finally:
        server.terminate()
        server.wait(10)
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "profile"} for r in rows], indent=1))


if __name__ == "__main__":
    main()
