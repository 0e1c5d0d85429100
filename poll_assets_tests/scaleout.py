"""Services for the scale-out tests: a real S3 API on loopback (moto's server), and a panel whose
members call the loopback fake provider over HTTP (so a worker in another process reaches it too)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from poll_assets_tests.dagster_dev import require
from poll_assets_tests.fake_panel import PROMPTS, write_panel_file

S3_BUCKET = "poll-assets-test"
# moto accepts any credentials; these only make botocore sign requests.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
API_KEY_ENV = "POLL_TEST_FAKE_KEY"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on 127.0.0.1:{port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:g} s")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a free loopback port for the session, with the bucket created; the
    AWS variables that point boto3/s3fs at it are set in this process (and so in its children)."""
    try:
        import boto3
        import moto.server  # noqa: F401
        import s3fs
    except ImportError as exc:
        require(False, f"moto[server], s3fs and boto3 are needed for the S3 tests ({exc}); pip install -e '.[dev]'")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    # fsspec keeps one S3FileSystem per set of arguments, and the endpoint comes from the environment:
    # a filesystem made for another module's server would still send there.
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        wait_for_port(port, proc, f"moto server (log: {log})")
        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_prefix() -> str:
    """A fresh prefix in the test bucket, so tests never see each other's files."""
    return f"s3://{S3_BUCKET}/run-{uuid.uuid4().hex[:10]}"


def forget_s3_listings() -> None:
    """s3fs caches folder listings per process; files written by other processes need a fresh look."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def http_panel(tmp_path: Path, fake_url: str, *, n_prompts: int, shard_size: int, cache: dict[str, Any],
               max_concurrency: int = 8) -> Path:
    """Two generators and two judges on the `openai` provider, each at its own path on the fake
    server (its tag: gen_0, gen_1, judge_0, judge_1), reading their key from API_KEY_ENV."""
    def member(name: str, judge: bool) -> dict[str, Any]:
        return {"name": name, "provider": "openai", "model": f"{name}-model", "family": name,
                "base_url": f"{fake_url}/{name}/v1", "api_key_env": API_KEY_ENV,
                "params": {"temperature": 0.0, "max_new_tokens": 64} if judge else {"max_new_tokens": 64},
                "limits": {"max_concurrency": max_concurrency, "max_retries": 2, "timeout_s": 30}}

    prompts = [f"{PROMPTS[i % len(PROMPTS)]} (variant {i})" for i in range(n_prompts)]
    raw = {
        "name": "scaleout",
        "source": {"data_files": ["prompts.jsonl"], "column_mapping": {"prompt": "instruction"},
                   "num_examples": n_prompts, "shard_size": shard_size},
        "generators": [member(f"gen_{i}", False) for i in range(2)],
        "judges": [member(f"judge_{i}", True) for i in range(2)],
        "thresholds": {"min_agreement": -1.0},
        "cache": cache,
    }
    return write_panel_file(tmp_path, raw, prompts=prompts)
