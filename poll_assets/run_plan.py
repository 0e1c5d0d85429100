"""What `poll-assets run` has to do: the (asset, shard) pairs that are missing or stale, and the runs
that make exactly those. Pure: it reads plain records of what the instance holds (engine/run_state.py
reads them from Dagster) and knows nothing of Dagster.

An asset's shard is to do when it is (the root causes, in this order of precedence):
- **missing**: never materialized;
- **code changed**: the asset's code version differs from the one its latest materialization
  recorded (a member's model, params or prompt; a stage's settings);
- **pending**: its `pending_rows` check failed on its latest materialization (calls that failed for
  a transient reason; the re-run calls only those rows);
- **upstream updated**: a parent's shard was materialized after it (the automation's
  `any_deps_updated`), unless the parent's data version shows nothing changed;
and, whatever its own state, when a parent's shard is to do in the same plan: it is re-made from the
parent's new output, as a Dagster run of both does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from poll_assets.partitions import run_ranges

MISSING = "missing"
CODE_CHANGED = "code version changed"
PENDING = "rows pending"
UPSTREAM_UPDATED = "upstream updated"
FORCED = "--force"
AFTER = "after "  # prefix of the reason of a shard re-made because a parent's is: "after ratings/j1"


@dataclass(frozen=True)
class Made:
    """The latest materialization of one asset's shard: its event id (later is larger), the code
    version it recorded, and, per parent, whether the data it read is still the parent's current data."""

    storage_id: int
    code_version: str | None
    inputs_current: Mapping[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class AssetState:
    """One asset as the plan needs it: its code version now, its parents, and what the instance holds."""

    code_version: str | None
    parents: tuple[str, ...]
    made: Mapping[str, Made]  # shard -> its latest materialization
    pending: frozenset[str] = frozenset()  # shards whose pending_rows check failed on the latest one


@dataclass(frozen=True)
class Plan:
    """Per shard that has work, the assets to materialize and why (asset -> reason)."""

    shards: tuple[str, ...]  # the shards asked for, in partition order
    todo: Mapping[str, Mapping[str, str]]  # shard -> {asset: reason}, assets in graph order
    assets: tuple[str, ...]  # every asset, in graph order (parents first)

    @property
    def empty(self) -> bool:
        return not self.todo


@dataclass(frozen=True)
class PlannedRun:
    """One run: these assets, over these consecutive shards."""

    assets: tuple[str, ...]
    shards: tuple[str, ...]


def graph_order(states: Mapping[str, AssetState]) -> list[str]:
    """The assets, parents before children (ties by name, so the order is stable)."""
    order: list[str] = []
    placed: set[str] = set()
    remaining = sorted(states)
    while remaining:
        ready = [a for a in remaining if all(p in placed or p not in states for p in states[a].parents)]
        if not ready:
            raise ValueError(f"the asset graph has a cycle among {remaining}")
        order += ready
        placed.update(ready)
        remaining = [a for a in remaining if a not in placed]
    return order


def root_cause(state: AssetState, states: Mapping[str, AssetState], shard: str) -> str | None:
    """Why this asset's shard needs a run on its own account (see the module docstring), or None."""
    made = state.made.get(shard)
    if made is None:
        return MISSING
    if state.code_version is not None and made.code_version != state.code_version:
        return CODE_CHANGED
    if shard in state.pending:
        return PENDING
    for parent in state.parents:
        upstream = states[parent].made.get(shard) if parent in states else None
        if upstream is not None and upstream.storage_id > made.storage_id and not made.inputs_current.get(parent, False):
            return UPSTREAM_UPDATED
    return None


def plan_shards(states: Mapping[str, AssetState], shards: Sequence[str], force: bool = False) -> Plan:
    """What to materialize in `shards`: every asset with a root cause, and everything downstream of
    one in the same shard; with `force`, every asset of every shard."""
    order = graph_order(states)
    todo: dict[str, dict[str, str]] = {}
    for shard in shards:
        chosen: dict[str, str] = {}
        for asset in order:
            state = states[asset]
            if force:
                chosen[asset] = FORCED
                continue
            reason = root_cause(state, states, shard)
            redone = [p for p in state.parents if p in chosen]
            if reason is None and redone:
                reason = AFTER + ", ".join(redone)
            if reason is not None:
                chosen[asset] = reason
        if chosen:
            todo[shard] = chosen
    return Plan(tuple(shards), todo, tuple(order))


def plan_runs(plan: Plan, shards_per_run: int) -> list[PlannedRun]:
    """The runs that make the plan: consecutive shards with the same assets to do share runs of at
    most `shards_per_run` shards (a run covers one range of shards and one asset selection)."""
    runs: list[PlannedRun] = []
    block: list[str] = []
    block_assets: tuple[str, ...] = ()

    def close() -> None:
        runs.extend(PlannedRun(block_assets, tuple(part)) for part in run_ranges(block, shards_per_run))

    for shard in plan.shards:
        assets = tuple(plan.todo.get(shard, {}))
        if block and assets != block_assets:
            close()
            block = []
        if assets:
            block_assets = assets
            block.append(shard)
    if block:
        close()
    return runs


def _reason_counts(plan: Plan, asset: str) -> Counter[str]:
    return Counter(chosen[asset] for chosen in plan.todo.values() if asset in chosen)


def plan_summary(plan: Plan) -> list[str]:
    """What the plan does, for the terminal: a headline, then per asset its shards to do by reason."""
    n = len(plan.shards)
    if plan.empty:
        return [f"nothing to do: every asset of the {n} shard(s) is materialized and up to date "
                "(none missing, none stale); --force redoes them"]
    roots = Counter(reason for chosen in plan.todo.values() for reason in chosen.values() if not reason.startswith(AFTER))
    why = ", ".join(f"{count} {reason}" for reason, count in sorted(roots.items()))
    follow = any(r.startswith(AFTER) for chosen in plan.todo.values() for r in chosen.values())
    lines = [f"{len(plan.todo)} of {n} shard(s) to do ((asset, shard) pairs: {why}"
             f"{'; and what depends on them' if follow else ''}), {n - len(plan.todo)} up to date:"]
    for asset in plan.assets:
        counts = _reason_counts(plan, asset)
        if counts:
            detail = ", ".join(f"{reason}: {count}" for reason, count in sorted(counts.items()))
            lines.append(f"  {asset}: {sum(counts.values())} shard(s) ({detail})")
    return lines
