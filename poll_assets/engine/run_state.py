"""What the instance holds of each asset's shards, read for the run plan (poll_assets/run_plan.py).

A few queries per asset, whatever the number of shards: the latest materialization id of every
shard (one grouped query), those materializations' stored events in chunks (their code version and
the data versions they read, read as tags from the stored JSON), the latest data version of every
shard (one indexed query), and one for the latest result of every `pending_rows` check. Dagster's own CachingStaleStatusResolver asks
per (asset, shard), several queries each, which at thousands of shards takes longer than the work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dagster as dg
from dagster._core.definitions.data_version import (  # not exported by dagster 1.13; the tags it writes
    CODE_VERSION_TAG,
    DATA_VERSION_TAG,
    get_input_data_version_tag,
)
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
from dagster._core.storage.sqlalchemy_compat import db_select

from poll_assets.engine.metadata import PENDING_CHECK
from poll_assets.run_plan import AssetState, Made

_CHUNK = 500  # storage ids per query: well under SQLite's bound on bound parameters


def asset_states(instance: dg.DagsterInstance, job: dg.JobDefinition) -> dict[str, AssetState]:
    """Every asset `job` materializes, by its user string, with what the instance holds of its shards."""
    graph = job.asset_layer.asset_graph
    keys = sorted(job.asset_layer.selected_asset_keys)
    versions = {key: _latest_data_versions(instance, key) for key in keys}
    runs: dict[str, dg.DagsterRun | None] = {}
    pending = _pending_shards(instance, [ck for key in keys for ck in graph.get(key).check_keys
                                         if ck.name == PENDING_CHECK])
    states = {}
    for key in keys:
        node = graph.get(key)
        parents = tuple(sorted(p for p in node.parent_keys if p in versions))
        made = {}
        for rec in _latest_records(instance, key, versions[key].ids):
            inputs = {p.to_user_string(): _input_current(instance, rec, p, versions[p], job, runs) for p in parents
                      if _updated_after(versions[p], rec)}
            made[rec.shard] = Made(rec.storage_id, rec.tag(CODE_VERSION_TAG), inputs)
        states[key.to_user_string()] = AssetState(
            code_version=node.code_version, parents=tuple(p.to_user_string() for p in parents), made=made,
            pending=frozenset(pending.get(key, ())))
    return states


@dataclass(frozen=True)
class _Latest:
    """The latest materialization of one shard, as stored: its id, its run, its serialized event."""

    storage_id: int
    shard: str
    run_id: str
    event: str

    def tag(self, name: str) -> str | None:
        """One tag of the materialization, read from the stored JSON without unpacking the event (its
        metadata, previews included, costs ~3 ms a shard to unpack). A tag key can only appear
        unescaped as a key of the event's tags; if the format ever differs, the event is unpacked."""
        marker = json.dumps(name) + ": "
        at = self.event.find(marker)
        if at < 0:
            return self._unpacked_tags().get(name)
        value, _ = json.JSONDecoder().raw_decode(self.event, at + len(marker))
        return value if isinstance(value, str) else self._unpacked_tags().get(name)

    def _unpacked_tags(self) -> Mapping[str, str]:
        entry = dg.deserialize_value(self.event, dg.EventLogEntry)
        return (entry.asset_materialization.tags or {}) if entry.asset_materialization else {}


def _latest_records(instance: dg.DagsterInstance, key: dg.AssetKey, ids: Mapping[str, int]) -> list[_Latest]:
    """The stored events of `ids`, the latest materialization of each shard of `key` (one query per
    chunk). Read as rows of Dagster's event log table where the storage is SQL (SQLite, PostgreSQL)."""
    storage = instance.event_log_storage
    wanted = sorted(ids.values())
    if not isinstance(storage, SqlEventLogStorage):
        return [_Latest(rec.storage_id, rec.partition_key, rec.run_id,
                        dg.serialize_value(rec.event_log_entry)) for rec in _fetched(instance, key, wanted)]
    table = SqlEventLogStorageTable
    rows = []
    for i in range(0, len(wanted), _CHUNK):
        query = db_select([table.c.id, table.c.partition, table.c.run_id, table.c.event]).where(
            table.c.id.in_(wanted[i : i + _CHUNK]))
        with storage.index_connection() as conn:
            rows += conn.execute(query).fetchall()
    return [_Latest(int(row[0]), row[1], row[2], row[3]) for row in rows]


def _fetched(instance: dg.DagsterInstance, key: dg.AssetKey, wanted: list[int]) -> list[dg.EventLogRecord]:
    records: list[dg.EventLogRecord] = []
    for i in range(0, len(wanted), _CHUNK):
        chunk = wanted[i : i + _CHUNK]
        records += instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, storage_ids=chunk), limit=len(chunk)).records
    return records


class _Versions:
    """The latest data version and materialization id of each shard of one asset."""

    def __init__(self, ids: Mapping[str, int], data: Mapping[str, str]) -> None:
        self.ids, self.data = ids, data


def _latest_data_versions(instance: dg.DagsterInstance, key: dg.AssetKey) -> _Versions:
    storage = instance.event_log_storage
    ids = storage.get_latest_storage_id_by_partition(key, dg.DagsterEventType.ASSET_MATERIALIZATION)
    tags = storage.get_latest_tags_by_partition(key, dg.DagsterEventType.ASSET_MATERIALIZATION, [DATA_VERSION_TAG])
    return _Versions(ids, {shard: t[DATA_VERSION_TAG] for shard, t in tags.items() if DATA_VERSION_TAG in t})


def _updated_after(parent: _Versions, rec: _Latest) -> bool:
    return parent.ids.get(rec.shard, 0) > rec.storage_id


def _input_current(instance: dg.DagsterInstance, rec: _Latest, parent: dg.AssetKey, versions: _Versions,
                   job: dg.JobDefinition, runs: dict[str, dg.DagsterRun | None]) -> bool:
    """Whether the data `rec` read from `parent` is still the parent's current data, though the
    parent was materialized since (a re-run that made the same data: Dagster's staleness says fresh).
    Dagster records, as a partitioned input's data version, a hash of the data versions of every shard
    of the run's range; recomputed from the current ones, equal means no shard of the range changed.
    Asked only for shards whose parent was materialized after them, so a no-op plan never comes here."""
    recorded = rec.tag(get_input_data_version_tag(parent))
    if recorded is None:
        return False
    if rec.run_id not in runs:
        runs[rec.run_id] = instance.get_run_by_id(rec.run_id)
    shards = _run_shards(runs[rec.run_id], job, rec.shard)
    current = [versions.data[s] for s in sorted(shards) if s in versions.data]
    return recorded == hashlib.sha256("".join(current).encode()).hexdigest()


def _run_shards(run: dg.DagsterRun | None, job: dg.JobDefinition, shard: str) -> Sequence[str]:
    """The shards a run materialized: its partition range, else its one partition (else `shard`)."""
    tags = run.tags if run is not None else {}
    start, end = tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")
    if start and end:
        keys = job.partitions_def.get_partition_keys()
        return keys[keys.index(start) : keys.index(end) + 1]
    return [tags.get("dagster/partition", shard)]


def _pending_shards(instance: dg.DagsterInstance, check_keys: Sequence[dg.AssetCheckKey]) -> dict[dg.AssetKey, set[str]]:
    """Per asset, the shards whose `pending_rows` check failed on their latest materialization (one query)."""
    pending: dict[dg.AssetKey, set[str]] = {}
    if not check_keys:
        return pending
    for info in instance.event_log_storage.get_asset_check_partition_info(check_keys):
        if (info.partition_key is not None and info.is_current
                and info.latest_execution_status == AssetCheckExecutionRecordStatus.FAILED):
            pending.setdefault(info.check_key.asset_key, set()).add(info.partition_key)
    return pending
