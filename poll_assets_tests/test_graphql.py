"""Launching a run through Dagster's GraphQL API, as an external scheduler or script would."""

from __future__ import annotations

import time

import pandas as pd
import pytest
from dagster import DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient

from poll_assets.pipeline import JOB_NAME
from poll_assets_tests.dagster_dev import (
    RUN_TIMEOUT_S,
    DagsterDevServer,
)

# dagster-graphql's client calls gql in a way gql now deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Using variable_values and operation_name:DeprecationWarning")

API_PARTITION = "shard-00002"  # the UI test launches shard-00000, so the two never collide
TERMINAL = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


@pytest.mark.slow
def test_submit_job_for_one_partition_and_poll_until_success(
    dagster_server: DagsterDevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # requests must not send loopback to a proxy
    client = DagsterGraphQLClient(dagster_server.host, port_number=dagster_server.port, timeout=60)
    run_id = client.submit_job_execution(JOB_NAME, tags={"dagster/partition": API_PARTITION})

    deadline = time.monotonic() + RUN_TIMEOUT_S
    status = client.get_run_status(run_id)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(2.0)
        status = client.get_run_status(run_id)
    assert status == DagsterRunStatus.SUCCESS, (
        f"run {run_id} is {status.value} after polling; server log:\n{dagster_server.log_tail()}"
    )

    # The run really materialized that shard: the server's instance has the event, the file exists.
    run = dagster_server.graphql(
        """query($id: ID!) { runOrError(runId: $id) { ... on Run { jobName tags { key value }
             assetMaterializations { assetKey { path } partition } } } }""",
        {"id": run_id},
    )["runOrError"]
    assert run["jobName"] == JOB_NAME
    assert {"key": "dagster/partition", "value": API_PARTITION} in run["tags"]
    materialized = {("/".join(m["assetKey"]["path"]), m["partition"]) for m in run["assetMaterializations"]}
    assert ("preference_pairs", API_PARTITION) in materialized
    assert ("pooled_ratings", API_PARTITION) in materialized
    pooled = pd.read_parquet(dagster_server.home / "storage" / "pooled_ratings" / f"{API_PARTITION}.parquet")
    assert len(pooled) == 1  # shard_size 1 in the fast panel
    assert all(min(per_generation) >= 1 for per_generation in pooled["n_valid_judges"])
