"""Many shards in one run: a partition range of the `paper` panel over the loopback fake server.

Each shard is stored, described and checked as its own partition, while every member's calls for
all the range's shards go through one batch (engine/shards.py, engine/stage.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
import yaml

from poll_assets.engine.stage import BackendGate, MemberCalls, SharedCalls, batch_part
from poll_assets.io_manager import partition_path
from poll_assets.llm.base import CallRequest, Completion, GenerationParams
from poll_assets.llm.cache.response_cache import ResponseCache
from poll_assets.llm.online.policy import CallPolicy, Limits
from poll_assets.llm.online.runner import CallBatch
from poll_assets.panel import PANELS_DIR, load_panel
from poll_assets.pipeline import build_assets, build_definitions
from poll_assets_tests.fake_llm_server import FakeLLMServer
from poll_assets_tests.fake_backend import FakeBackend
from poll_assets_tests.fake_panel import PROMPTS, scripted_resources, write_panel
from poll_assets_tests.instance import make_dagster_home
from poll_assets_tests.test_paper_fake_server import member_path

SHARDS = ["shard-00000", "shard-00001", "shard-00002"]
RANGE_TAGS = {"dagster/asset_partition_range_start": SHARDS[0], "dagster/asset_partition_range_end": SHARDS[-1]}
KEY_VARS = ("HF_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY")


def paper_in_shards(tmp_path: Path, url: str, *, shards: int = 3, shard_size: int = 2, **source: Any) -> Path:
    """The `paper` panel aimed at the fake server, over `shards` shards of the bundled prompts."""
    raw = yaml.safe_load((PANELS_DIR / "paper.yaml").read_text())
    raw["source"] = {
        "data_files": [str((PANELS_DIR / "../data/sample_prompts.jsonl").resolve())],
        "column_mapping": {"prompt": "instruction"},
        "num_examples": shards * shard_size,
        "shard_size": shard_size,
        **source,
    }
    for member in (*raw["generators"], *raw["judges"]):
        member["base_url"] = url + member_path(member)
        member["limits"] = {**member.get("limits", {}), "rpm": None, "tpm": None}  # the fake server has no quota
    path = tmp_path / "paper_shards.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def range_run(tmp_path: Path, panel_path: Path, monkeypatch: pytest.MonkeyPatch, tags=RANGE_TAGS) -> tuple[Any, ...]:
    """Every asset of the range in ONE run of Dagster's implicit asset job (as `poll-assets run` launches it)."""
    for var in KEY_VARS:
        monkeypatch.setenv(var, "sk-test")
    home = make_dagster_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    storage = tmp_path / "storage"
    panel, _ = load_panel(panel_path)
    defs = build_definitions(panel, panel_path, storage_dir=str(storage), cache_path=str(home / "cache.sqlite"))
    instance = dg.DagsterInstance.local_temp(str(home))
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(instance=instance, tags=tags, raise_on_error=False)
    return panel, storage, instance, result


def asset_keys(panel: Any) -> list[dg.AssetKey]:
    return [
        dg.AssetKey("prompts"), *[dg.AssetKey(["generations", g.name]) for g in panel.generators],
        dg.AssetKey("combined_generations"), *[dg.AssetKey(["ratings", j.name]) for j in panel.judges],
        dg.AssetKey("pooled_ratings"), dg.AssetKey("preference_pairs"),
    ]


def check_evaluations(instance: dg.DagsterInstance, run_id: str) -> list[Any]:
    return [e.dagster_event.event_specific_data
            for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)]


def materializations(instance: dg.DagsterInstance, run_id: str) -> list[dg.AssetMaterialization]:
    return [e.asset_materialization for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)]


@pytest.mark.slow
def test_a_range_of_three_shards_runs_as_one_run_and_stores_each_shard(tmp_path, fake_llm: FakeLLMServer, monkeypatch):
    fake_llm.configure(latency_ms=20, jitter_ms=10)
    panel, storage, instance, result = range_run(tmp_path, paper_in_shards(tmp_path, fake_llm.url), monkeypatch)
    assert result.success
    assert len(instance.get_run_records()) == 1

    # every asset: one file per shard, each with that shard's prompts only
    prompt_ids = {}
    for shard in SHARDS:
        prompts = pd.read_parquet(partition_path(storage, dg.AssetKey("prompts"), shard))
        assert len(prompts) == 2
        prompt_ids[shard] = prompts["prompt_id"].tolist()
    assert len({p for ids in prompt_ids.values() for p in ids}) == 6
    for key in asset_keys(panel)[1:-1]:
        for shard in SHARDS:
            frame = pd.read_parquet(partition_path(storage, key, shard))
            assert frame["prompt_id"].tolist() == prompt_ids[shard], (key, shard)

    # one materialization per asset and shard, with that shard's own metadata (row count, path)
    mats = materializations(instance, result.run_id)
    assert sorted((m.asset_key.to_user_string(), m.partition) for m in mats) == sorted(
        (k.to_user_string(), s) for k in asset_keys(panel) for s in SHARDS)
    for m in mats:
        assert m.metadata["path"].value == str(partition_path(storage, m.asset_key, m.partition))
        if m.asset_key != dg.AssetKey("preference_pairs"):
            assert m.metadata["dagster/row_count"].value == 2

    # every check of every asset recorded once per shard; the blocking ones passed (the fake's random
    # ratings may well disagree, which only warns)
    evaluations = check_evaluations(instance, result.run_id)
    # prompts 1; per member: its stage's combined check (rows and failure or unrated rate) and
    # pending_rows; pooled 2; pairs 2 (chosen above rejected, contested pairs left out)
    n_checks = 1 + 2 * len(panel.generators) + 2 * len(panel.judges) + 2 + 2
    assert len({(e.asset_key, e.check_name) for e in evaluations}) == n_checks
    assert len(evaluations) == n_checks * len(SHARDS)
    assert {e.partition for e in evaluations} == set(SHARDS)
    assert all(e.passed for e in evaluations if e.blocking)
    assert all(e.target_materialization_data is not None for e in evaluations)

    # reading a range of inputs logs one line per input, not one stored log event per shard
    messages = [e.user_message for e in instance.all_logs(result.run_id) if e.dagster_event is None]
    assert not [m for m in messages if m.startswith("Loading partition ")]
    assert any(m.startswith(f"Loading {len(SHARDS)} partitions (") for m in messages)

    # each request made once: one call per prompt per member over the whole range
    stats = fake_llm.stats()
    assert stats["total"] == 6 * (len(panel.generators) + len(panel.judges))
    assert stats["max_repeats"] == 1

    # a warm re-run of the range makes no request
    fake_llm.reset()
    again = dg.DagsterInstance.local_temp(str(tmp_path / "home"))
    job = build_definitions(panel, tmp_path / "paper_shards.yaml", storage_dir=str(storage),
                            cache_path=str(tmp_path / "home" / "cache.sqlite")).resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(instance=again, tags=RANGE_TAGS).success
    assert fake_llm.stats()["total"] == 0


def test_a_check_failing_on_one_shard_of_a_range_is_recorded_against_that_shard_only(tmp_path, monkeypatch):
    # gen_0 refuses "Write one sentence about rivers.", the 2nd prompt: shard-00000 of two shards of 2
    panel, path = write_panel(tmp_path, n_prompts=4, shard_size=2)
    home = make_dagster_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    backends = scripted_resources(panel, fail={"gen_0": "rivers"})
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"), cache_path=str(home / "cache.sqlite"),
                             resource_overrides=backends)
    instance = dg.DagsterInstance.local_temp(str(home))
    tags = {"dagster/asset_partition_range_start": "shard-00000", "dagster/asset_partition_range_end": "shard-00001"}
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, tags=tags, raise_on_error=False)
    assert not result.success  # the blocking check stops the stage's downstream steps

    by_check = {(e.asset_key.to_user_string(), e.check_name, e.partition): e.passed
                for e in check_evaluations(instance, result.run_id)}
    assert by_check[("generations/gen_0", "generations_valid", "shard-00000")] is False
    assert by_check[("generations/gen_0", "generations_valid", "shard-00001")] is True
    assert [k for k, passed in by_check.items() if not passed] == [("generations/gen_0", "generations_valid", "shard-00000")]
    # both shards of every generator are stored and materialized (each once), before the step failed
    mats = {(m.asset_key.to_user_string(), m.partition) for m in materializations(instance, result.run_id)}
    assert {("generations/gen_0", "shard-00000"), ("generations/gen_0", "shard-00001"),
            ("generations/gen_1", "shard-00001")} <= mats
    # one batch per member over both shards: every prompt asked once
    assert backends["llm_gen_1"].attempts == {p: 1 for p in PROMPTS[:4]}


def test_a_range_of_scripted_shards_makes_each_call_once_and_a_warm_rerun_none(tmp_path, monkeypatch):
    panel, path = write_panel(tmp_path, n_prompts=6, shard_size=2)
    home = make_dagster_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    tags = {"dagster/asset_partition_range_start": "shard-00000", "dagster/asset_partition_range_end": "shard-00002"}
    for attempt in ("cold", "warm"):
        backends = scripted_resources(panel)
        defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"),
                                 cache_path=str(home / "cache.sqlite"), resource_overrides=backends)
        instance = dg.DagsterInstance.local_temp(str(home))
        assert defs.resolve_implicit_global_asset_job_def().execute_in_process(instance=instance, tags=tags).success
        calls = sum(b.total_calls for b in backends.values())
        assert calls == (6 * len(panel.members) if attempt == "cold" else 0), attempt
    pairs = [pd.read_parquet(partition_path(tmp_path / "storage", dg.AssetKey("preference_pairs"), s)) for s in SHARDS]
    assert all(len(p) > 0 for p in pairs)


def test_every_shard_asset_backfills_in_runs_of_shards_per_run(tmp_path):
    panel, path = write_panel(tmp_path, n_prompts=8, shard_size=2, extra={})
    panel = panel.model_copy(update={"source": panel.source.model_copy(update={"shards_per_run": 3})})
    assets = build_assets(panel, path)
    assert len(assets) == 6
    for a in assets:  # the UI's Materialize all over many shards launches runs of this size
        assert a.backfill_policy == dg.BackfillPolicy.multi_run(max_partitions_per_run=3), a.keys


class SlowToBuild:
    """A member's resource whose client takes `build_s` to build (as an SDK import does)."""

    def __init__(self, name: str, backend: FakeBackend, build_s: float = 0.0):
        self.provider, self.model, self.member, self.base_url = backend.provider, backend.model, name, None
        self._backend, self._build_s = backend, build_s
        self.built_at: float | None = None

    def backend(self) -> FakeBackend:
        time.sleep(self._build_s)  # blocks the event loop, like an import
        self.built_at = time.monotonic()
        return self._backend


def test_members_build_their_clients_only_for_uncached_calls_and_all_before_any_sends(tmp_path):
    cache = ResponseCache(tmp_path / "cache.sqlite")
    policy = CallPolicy.resolve(Limits(), "openai_compatible")
    requests = [CallRequest.build([{"role": "user", "content": f"q{i}"}], GenerationParams()) for i in range(4)]

    member = write_panel(tmp_path)[0].generators[0]  # online calls (no batch API)

    async def stage(resources: list[SlowToBuild]) -> None:
        gate = BackendGate(len(resources))
        calls = [MemberCalls(member, r, policy, cache, lambda _: None, r.member, gate) for r in resources]
        await asyncio.gather(*(c.send(requests) for c in calls))

    fast, slow = FakeBackend("m-fast", "fast"), FakeBackend("m-slow", "slow")
    cold = [SlowToBuild("fast", fast), SlowToBuild("slow", slow, build_s=0.3)]
    asyncio.run(stage(cold))
    assert fast.total_calls == slow.total_calls == 4
    assert min(fast.starts) >= cold[1].built_at  # the fast member waited for the slow one's client

    warm = [SlowToBuild("fast", FakeBackend("m-fast", "fast")), SlowToBuild("slow", FakeBackend("m-slow", "slow"))]
    asyncio.run(stage(warm))
    assert [r.built_at for r in warm] == [None, None]  # the cache served every call: no client built
    cache.close()


def test_a_shards_part_of_a_batch_counts_its_own_calls_and_keeps_the_batch_wide_figures():
    completions = [Completion(text="a", input_tokens=3, output_tokens=5), Completion(text=None, error="x", attempts=3),
                   Completion(text="c", cached=True)]
    batch = CallBatch(completions, member="m")
    for c in completions:
        batch.stats.add(c)
    batch.stats.elapsed_s, batch.stats.batches = 7.0, [{"batch_id": "batch_1"}]
    first, rest = batch_part(batch, 0, 2), batch_part(batch, 2, 3)
    assert (first.stats.calls, first.stats.retries, first.stats.failures, first.stats.input_tokens) == (4, 2, 1, 3)
    assert (rest.stats.calls, rest.stats.cache_hits, rest.completions) == (0, 1, completions[2:])
    assert first.stats.elapsed_s == rest.stats.elapsed_s == 7.0 and rest.stats.batches == [{"batch_id": "batch_1"}]


def test_shards_send_their_rounds_together_and_a_finished_shard_is_not_waited_for():
    sent: list[list[str]] = []

    async def send(requests):
        sent.append([r.messages[-1][1] for r in requests])
        return CallBatch([Completion(text="ok") for _ in requests])

    async def shard(shared: SharedCalls, name: str, rounds: int) -> int:
        try:
            for k in range(rounds):  # e.g. a judge's repair re-asks after its first calls
                batch = await shared.submit([CallRequest.build([{"role": "user", "content": f"{name}{k}"}],
                                                               GenerationParams())])
                assert len(batch.completions) == 1
            return rounds
        finally:
            shared.finish()

    async def both() -> list[int]:
        shared = SharedCalls(send, 2)
        return await asyncio.gather(shard(shared, "a", 2), shard(shared, "b", 1))

    assert asyncio.run(both()) == [2, 1]
    assert sent == [["a0", "b0"], ["a1"]]  # one batch per round; round 2 did not wait for the finished shard
