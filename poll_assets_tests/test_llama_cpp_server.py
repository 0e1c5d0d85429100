"""A real OpenAI-compatible server this project did not write: llama-cpp-python's own
`python -m llama_cpp.server`, serving the bundled SmolLM2-135M weights on loopback.

That server refuses `response_format` of type json_schema (HTTP 500 with a validation message) and
takes json_object with a `schema`. A panel of `openai_compatible` members materializes one shard
against it; the server's own access log says how many requests it received and what it answered.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from poll_assets.llm.providers.local import bundled_model_path
from poll_assets.panel import load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets_tests.fake_panel import write_panel_file

PARTITION = "shard-00000"
N_PROMPTS = 2
PROMPTS = ["Name three primary colours.", "Give a synonym for quick."]
ACCESS_LINE = re.compile(r'"POST (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The server's base URL and its log file (uvicorn's access log goes there)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(bundled_model_path()), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "2048", "--model_alias", "smollm2"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(  # e.g. the dev extra's llama-cpp-python[server] is not installed
                    f"llama_cpp.server exited with {proc.returncode}: {log_path.read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server did not answer on {url} within 90 s")
            time.sleep(0.5)
        yield url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def served(log_path: Path) -> list[int]:
    """The status of every chat request the server answered, in order, from its access log."""
    return [int(m["status"]) for m in ACCESS_LINE.finditer(log_path.read_text(errors="replace"))
            if m["path"].endswith("/chat/completions")]


def member(name: str, url: str, concurrency: int, **params: Any) -> dict[str, Any]:
    # The server answers one request at a time; a judge call takes about 35 s on 2 busy cores, so the
    # deadline is generous: a timeout would be retried, and this test counts every request.
    return {"name": name, "provider": "openai_compatible", "model": "smollm2", "family": "smollm2",
            "base_url": f"{url}/v1", "params": params,
            "limits": {"max_concurrency": concurrency, "max_retries": 5, "timeout_s": 400}}


@pytest.fixture(scope="module")
def shard(llama_server: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory):
    url, log_path = llama_server
    tmp = tmp_path_factory.mktemp("panel")
    raw = {
        "name": "llama_server",
        "source": {"data_files": ["prompts.jsonl"], "column_mapping": {"prompt": "instruction"},
                   "num_examples": N_PROMPTS, "shard_size": N_PROMPTS},
        "generators": [member("gen_direct", url, 2, temperature=0.2, max_new_tokens=40, seed=11),
                       member("gen_loose", url, 2, temperature=0.9, max_new_tokens=40, seed=22)],
        "judges": [member("judge_smol", url, 1, temperature=0.0, max_new_tokens=100, seed=1)],
        # The same model everywhere: excluding a judge's own family would exclude every rating.
        # Short rationales keep grammar-constrained sampling quick.
        "judging": {"aspect": "instruction-following", "exclude_self_family": False, "max_rationale_chars": 30},
        "thresholds": {"max_parse_failure_rate": 1.0, "min_agreement": -1.0},
    }
    panel, path = load_panel(write_panel_file(tmp, raw, prompts=PROMPTS))
    storage = tmp / "storage"
    defs = build_definitions(panel, path, storage_dir=str(storage), cache_path=str(tmp / "cache.sqlite"))
    instance = dg.DagsterInstance.ephemeral()
    start = time.monotonic()
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(
        partition_key=PARTITION, instance=instance, raise_on_error=False
    )
    elapsed = time.monotonic() - start
    print(f"llama_cpp.server shard: {elapsed:.1f}s, statuses {served(log_path)}")
    ratings_path = storage / "ratings" / "judge_smol" / f"{PARTITION}.parquet"
    if ratings_path.is_file():
        for row in pd.read_parquet(ratings_path).itertuples():
            print(row.output_mode, list(row.ratings), list(row.rating_errors), repr(row.raw_output)[:300])
    return panel, storage, instance, result, served(log_path)


def read(storage: Path, *key: str) -> pd.DataFrame:
    return pd.read_parquet(storage.joinpath(*key, f"{PARTITION}.parquet"))


@pytest.mark.slow
def test_generations_and_judge_calls_each_cost_one_request_after_one_unretried_refusal(shard):
    panel, storage, instance, result, statuses = shard
    n_gen = N_PROMPTS * len(panel.generators)
    # Generations first (plain text, no response_format). Then the judge: its first call offers
    # json_schema, which this server refuses once with a 500; that call moves on to json_object at
    # once, and every judge call after it goes straight there. Nothing was retried.
    assert statuses == [200] * n_gen + [500] + [200] * N_PROMPTS, statuses
    for g in panel.generators:
        gen = read(storage, "generations", g.name)
        assert gen["error"].isna().all() and gen["generation"].map(lambda t: isinstance(t, str) and bool(t)).all()
    event = instance.get_latest_materialization_event(dg.AssetKey(["ratings", "judge_smol"]))
    assert event is not None
    meta = {k: v.value for k, v in event.asset_materialization.metadata.items() if k.startswith("llm/")}
    assert meta["llm/calls"] == N_PROMPTS and meta["llm/retries"] == 0 and meta["llm/failures"] == 0


@pytest.mark.slow
def test_the_judge_settles_on_json_object_and_its_verdicts_are_parsed(shard):
    panel, storage, _, _, _ = shard
    ratings = read(storage, "ratings", "judge_smol")
    assert len(ratings) == N_PROMPTS
    assert ratings["error"].isna().all(), ratings["error"].dropna().tolist()  # no transport failure
    assert ratings["output_mode"].isin(["json_object", "text_fallback"]).all()
    assert (ratings["output_mode"] == "json_object").any(), ratings["raw_output"].tolist()
    parsed = [r for rs in ratings["ratings"] for r in rs if r is not None]
    reasons = [e for rs, es in zip(ratings["ratings"], ratings["rating_errors"]) for r, e in zip(rs, es) if r is None]
    # The 135M model is weak: each None must be a reading of what it wrote, never a failed call.
    assert all(e and "judge call failed" not in e for e in reasons), reasons
    assert parsed, f"no readable verdict; reasons: {reasons}; answers: {ratings['raw_output'].tolist()}"
    assert all(1 <= r <= 5 for r in parsed)
    for raw in ratings.loc[ratings["output_mode"] == "json_object", "raw_output"]:
        assert isinstance(json.loads(raw), dict)  # the server's grammar kept the answer JSON
