"""Parquet on object storage: a shard materialized into s3:// (moto's S3 server on loopback, through
the UPath IO manager and s3fs), then read back by the readers outside a run: `read_partition`,
`stored_partitions`, the prompt trail and the publish job's `read_all_partitions`."""

from __future__ import annotations

import boto3
import dagster as dg
import pytest

from poll_assets.assets.publishing import read_all_partitions
from poll_assets.io_manager import STORAGE_ENV_VAR, default_storage_dir, read_partition, stored_partitions
from poll_assets.lineage import prompt_trail
from poll_assets.panel import load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets_tests.instance import make_dagster_home
from poll_assets_tests.scaleout import API_KEY_ENV, S3_BUCKET, http_panel, s3_endpoint, s3_prefix  # noqa: F401

PARTITION = "shard-00000"
N_PROMPTS = 4


@pytest.mark.slow
def test_a_shard_is_stored_on_s3_and_read_back(tmp_path, fake_llm, s3_endpoint, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "sk-fake")
    base = s3_prefix()
    monkeypatch.setenv(STORAGE_ENV_VAR, base)  # how a deployment points storage at a bucket
    assert default_storage_dir() == base
    panel, path = load_panel(http_panel(tmp_path, fake_llm.url, n_prompts=N_PROMPTS, shard_size=N_PROMPTS,
                                        cache={"path": str(tmp_path / "cache.sqlite")}))
    defs = build_definitions(panel, path)  # storage from POLL_STORAGE_DIR
    job = defs.resolve_job_def(JOB_NAME)
    instance = dg.DagsterInstance.local_temp(str(make_dagster_home(tmp_path / "home")))
    result = job.execute_in_process(partition_key=PARTITION, instance=instance, raise_on_error=False)
    assert result.success

    # Every asset of the shard is an object in the bucket, under <prefix>/<asset key>/<shard>.parquet.
    keys = sorted(job.asset_layer.selected_asset_keys, key=lambda k: k.to_user_string())
    listed = boto3.client("s3").list_objects_v2(Bucket=S3_BUCKET, Prefix=base.split("/", 3)[3] + "/")
    objects = sorted(o["Key"].split("/", 1)[1] for o in listed.get("Contents", []))
    assert objects == sorted(f"{'/'.join(k.path)}/{PARTITION}.parquet" for k in keys)
    assert list(tmp_path.rglob("*.parquet")) == []  # nothing fell back to the local disk

    for key in keys:
        assert stored_partitions(base, key) == [PARTITION], key.to_user_string()
    prompts = read_partition(base, dg.AssetKey("prompts"), PARTITION)
    assert prompts is not None and len(prompts) == N_PROMPTS
    for member in ("gen_0", "gen_1"):
        gen = read_partition(base, dg.AssetKey(["generations", member]), PARTITION)
        assert gen["prompt_id"].tolist() == prompts["prompt_id"].tolist() and gen["error"].isna().all()
    assert read_partition(base, dg.AssetKey("prompts"), "shard-00099") is None

    # The readers used outside a run (the trail, the publish job) work on s3:// too.
    trail = prompt_trail(prompts["prompt_id"].iloc[0], base)
    assert trail["partition"] == PARTITION and len(trail["generations"]) == 2 and len(trail["judges"]) == 2
    assert len(read_all_partitions(base, dg.AssetKey("pooled_ratings"))) == N_PROMPTS

    stats = fake_llm.stats()
    assert stats["by_tag"] == {"gen_0": N_PROMPTS, "gen_1": N_PROMPTS, "judge_0": N_PROMPTS, "judge_1": N_PROMPTS}
    assert stats["max_repeats"] == 1
