"""The run plan (poll_assets/run_plan.py) on plain records, without Dagster: what is missing or stale,
what follows it downstream, and the runs that make it."""

from __future__ import annotations

from poll_assets.run_plan import (
    CODE_CHANGED,
    FORCED,
    MISSING,
    PENDING,
    UPSTREAM_UPDATED,
    AssetState,
    Made,
    PlannedRun,
    plan_runs,
    plan_shards,
    plan_summary,
)

SHARDS = [f"shard-{i:05d}" for i in range(6)]
GRAPH = {  # a small panel: two generators, one combine, two judges, pooling, pairs
    "prompts": (), "generations/g1": ("prompts",), "generations/g2": ("prompts",),
    "combined_generations": ("generations/g1", "generations/g2", "prompts"),
    "ratings/j1": ("combined_generations",), "ratings/j2": ("combined_generations",),
    "pooled_ratings": ("combined_generations", "ratings/j1", "ratings/j2"), "preference_pairs": ("pooled_ratings",),
}
ORDER = list(GRAPH)  # written parents first


def built(shards=SHARDS, code: dict[str, str] | None = None) -> dict[str, AssetState]:
    """Every asset of `shards` materialized once, in graph order (so each after its parents)."""
    code = code or {}
    states = {}
    for rank, asset in enumerate(ORDER):
        made = {s: Made(storage_id=100 * i + rank, code_version="v1") for i, s in enumerate(shards)}
        states[asset] = AssetState(code.get(asset, "v1"), GRAPH[asset], made)
    return states


def test_nothing_missing_or_stale_plans_no_run() -> None:
    plan = plan_shards(built(), SHARDS)
    assert plan.empty and plan_runs(plan, 20) == []
    assert plan_summary(plan)[0].startswith("nothing to do: every asset of the 6 shard(s)")


def test_one_judge_changed_plans_that_judge_and_what_reads_it_in_every_shard() -> None:
    plan = plan_shards(built(code={"ratings/j1": "v2"}), SHARDS)
    for shard in SHARDS:
        assert plan.todo[shard] == {"ratings/j1": CODE_CHANGED, "pooled_ratings": "after ratings/j1",
                                    "preference_pairs": "after pooled_ratings"}
    runs = plan_runs(plan, 4)
    assert runs == [PlannedRun(("ratings/j1", "pooled_ratings", "preference_pairs"), tuple(SHARDS[:4])),
                    PlannedRun(("ratings/j1", "pooled_ratings", "preference_pairs"), tuple(SHARDS[4:]))]
    summary = "\n".join(plan_summary(plan))
    assert "6 of 6 shard(s) to do ((asset, shard) pairs: 6 code version changed; and what depends" in summary
    assert "ratings/j1: 6 shard(s) (code version changed: 6)" in summary
    assert "generations/g1" not in summary and "ratings/j2" not in summary


def test_a_missing_shard_in_the_middle_is_run_alone_and_splits_the_ranges_around_it() -> None:
    states = built()
    for asset in ORDER:
        del states[asset].made["shard-00002"]  # type: ignore[attr-defined]
    plan = plan_shards(states, SHARDS)
    assert list(plan.todo) == ["shard-00002"]
    assert set(plan.todo["shard-00002"].values()) == {MISSING}
    assert plan_runs(plan, 20) == [PlannedRun(tuple(ORDER), ("shard-00002",))]

    states = built(code={"ratings/j2": "v2"})
    for asset in ORDER:
        del states[asset].made["shard-00002"]  # type: ignore[attr-defined]
    judge_only = ("ratings/j2", "pooled_ratings", "preference_pairs")
    assert plan_runs(plan_shards(states, SHARDS), 20) == [
        PlannedRun(judge_only, tuple(SHARDS[:2])), PlannedRun(tuple(ORDER), ("shard-00002",)),
        PlannedRun(judge_only, tuple(SHARDS[3:]))]


def test_a_parent_materialized_later_makes_its_children_stale_unless_its_data_is_unchanged() -> None:
    states = built()
    g1 = states["generations/g1"]
    newer = dict(g1.made, **{"shard-00001": Made(10_000, "v1")})  # g1 re-made alone, after its children
    states["generations/g1"] = AssetState(g1.code_version, g1.parents, newer)
    plan = plan_shards(states, SHARDS)
    assert list(plan.todo) == ["shard-00001"]
    assert plan.todo["shard-00001"]["combined_generations"] == UPSTREAM_UPDATED
    assert "generations/g1" not in plan.todo["shard-00001"] and "ratings/j1" in plan.todo["shard-00001"]

    # The same, but combined_generations read data the parent still has (Dagster: fresh).
    combined = states["combined_generations"]
    same = {s: Made(m.storage_id, m.code_version, {"generations/g1": True}) for s, m in combined.made.items()}
    states["combined_generations"] = AssetState(combined.code_version, combined.parents, same)
    assert plan_shards(states, SHARDS).empty


def test_pending_rows_rerun_that_member_and_downstream_and_force_runs_everything() -> None:
    states = built()
    j2 = states["ratings/j2"]
    states["ratings/j2"] = AssetState(j2.code_version, j2.parents, j2.made, pending=frozenset({"shard-00004"}))
    plan = plan_shards(states, SHARDS)
    assert plan.todo == {"shard-00004": {"ratings/j2": PENDING, "pooled_ratings": "after ratings/j2",
                                         "preference_pairs": "after pooled_ratings"}}

    forced = plan_shards(built(), SHARDS[1:3], force=True)
    assert list(forced.todo) == SHARDS[1:3]
    assert all(chosen == dict.fromkeys(ORDER, FORCED) for chosen in forced.todo.values())
    assert plan_runs(forced, 20) == [PlannedRun(tuple(ORDER), tuple(SHARDS[1:3]))]
    assert plan_summary(forced)[0] == "2 of 2 shard(s) to do ((asset, shard) pairs: 16 --force), 0 up to date:"


def test_an_asset_without_code_version_is_not_stale_by_code() -> None:
    states = built(code={"prompts": None})  # type: ignore[dict-item]
    assert plan_shards(states, SHARDS).empty
